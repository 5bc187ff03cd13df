"""Exploding-gradient detector: spikes, sustained growth, growth toward the input.

Judged at every report (the final one too) on the whole history of the total gradient norm,
so a verdict comes from the rows there are, within a short run as well as across report
intervals. The series is every step's total norm that was read (``history.step_norm``): the
statistics steps' and, while clipping reads the norms on every step, the steps between them.
Non-finite rows are left to the nonfinite detector: they are never a reference, and they end
a growth run.

* **spike**: a row at ``spike`` × or more the median of the last ``lookback`` finite rows
  before it, judged once it has ``min_rows`` such rows. A spike of ``lone_spike`` × or more
  that rises in one step (the row before it is below ``spike`` × that median) is a warning on
  its own, dated at its step. A smaller one counts only when it comes back down (it is still
  ``spike`` × the median of the ``settle`` rows after it; a row without them waits for the
  next report, and the final report judges on what is there), and ``min_spikes`` of them
  within ``window`` steps are a verdict, dated at the first. A norm that rises and stays up
  (a transformer's, as it starts to learn) is not a spike; 100 × in one step is, whatever
  follows. The layers named are those whose own norm was ``spike`` × its median over the
  same rows at a spike's step, else every weight layer.
* **growth**: ``growth_rows`` or more consecutive rows, each larger than the one before,
  ending above ``growth_total`` × the reference: the median of the ``lookback`` finite rows
  before the run, or the run's first row when nothing came before it (a divergence from
  step 0). The onset is the run's first row above ``growth`` × the reference; the growth per
  step, fitted to ``log norm`` from the onset to where the run stops growing, must exceed
  ``growth``. A rise made in one step (a lone spike) is a spike, not the end of a run. The
  recorded loss, read every step, is judged the same way when the norm shows no growth (a
  divergence too fast for the statistics steps is seen there).
* **toward the input**: the geometric mean over the window of the first quarter of the
  weight layers' norms over the last quarter's exceeds ``toward_input`` (AUTOTRAINER,
  ICSE 2021, calls above 70 exploding).

A learning net is not exploding: when the loss is recorded (``gw.observe_loss(loss)``, or
the Lightning and Hugging Face doors, which record it) and falls over the last ``window``
steps (the mean of the last quarter of the losses below the first quarter's, all finite), a
rising norm is learning: only spikes of ``lone_spike`` × count, and growth must end above
``growth_total`` ² × its reference. Without the loss, the run's own history is the
reference, as above.

The loss also tells diverging (the mean of the last quarter of the recorded losses above
``diverge`` × the first quarter's, or a non-finite loss there) from not; without it
``update_ratio`` (the largest ``‖Δw‖/‖w‖`` seen on sampled steps) above
``max_update_ratio`` stands in. A diverging run makes the diagnosis an error, otherwise a
warning.

Options (``options={"exploding": {...}}``) and defaults: ``spike`` 10.0, ``lone_spike``
100.0, ``min_spikes`` 2, ``min_rows`` 8, ``lookback`` 50, ``settle`` 3, ``window`` 200,
``growth`` 1.1, ``growth_total`` 100.0, ``growth_rows`` 3, ``toward_input`` 70.0,
``diverge`` 2.0, ``max_update_ratio`` 1.0. The z-score options of earlier versions (``z``,
``ema``, ``warmup``) are still accepted, with a warning, and have no effect.

Each (pattern, severity) is reported once: the pattern is ``growth``, ``spike`` or
``toward_input``, in that order of precedence, one condition per report.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from gradwatch import (
    Diagnosis,
    GradWatchError,
    GradWatchWarning,
    ModelInfo,
    Severity,
    StashKey,
    StatsWindow,
    StepContext,
    WatchConfig,
    hookimpl,
)
from gradwatch.kit import num, plugin_options, profile, weight_layers

if TYPE_CHECKING:
    from gradwatch.stats import History

_DEFAULTS: dict[str, Any] = {
    "spike": 10.0,
    "lone_spike": 100.0,
    "min_spikes": 2,
    "min_rows": 8,
    "lookback": 50,
    "settle": 3,
    "window": 200,
    "growth": 1.1,
    "growth_total": 100.0,
    "growth_rows": 3,
    "toward_input": 70.0,
    "diverge": 2.0,
    "max_update_ratio": 1.0,
}
# The z-score rule's options: validated as before, then ignored.
_RETIRED: dict[str, Any] = {"z": 6.0, "ema": 0.05, "warmup": 8}


@dataclass
class _State:
    opts: dict[str, Any]
    reported: set[tuple[str, Severity]] = field(default_factory=set)


KEY = StashKey[_State]()


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    bounds = {
        "spike": (1.0, None),
        "lone_spike": (1.0, None),
        "growth": (1.0, None),
        "growth_total": (1.0, None),
        "growth_rows": (2, None),  # a fit needs two points
        "ema": (0.0, 1.0),
    }
    opts = plugin_options(config, "exploding", {**_DEFAULTS, **_RETIRED}, bounds=bounds)
    if opts["lone_spike"] < opts["spike"]:
        raise GradWatchError(f"exploding option lone_spike ({opts['lone_spike']:g}) must be at least spike ({opts['spike']:g})")
    retired = sorted(set(config.plugin_options("exploding")) & set(_RETIRED))
    if retired:
        warnings.warn(
            f"exploding option(s) {', '.join(retired)} have no effect: spikes are judged against the running median "
            "of the earlier rows (options spike, lone_spike, min_spikes, lookback)",
            GradWatchWarning,
            stacklevel=2,
        )
    ctx.stash[KEY] = _State(opts={k: v for k, v in opts.items() if k not in _RETIRED})


# ---------------------------------------------------------------------- the series


def _series(history: History) -> tuple[torch.Tensor, torch.Tensor]:
    """``(steps, total norms)`` in float64 of every step that read the norms: the statistics
    steps and, while clipping reads the norms every step, the steps between them."""
    steps, values = history.step_norm
    return steps.long(), values.double().reshape(-1)


def _running(values: torch.Tensor, lookback: int, ahead: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the median of the last ``lookback`` finite rows before it and their count,
    and the median of the next ``ahead`` finite rows after it and their count (NaN medians
    where there are none). Medians are the lower middle value, as torch's."""
    finite = torch.isfinite(values)
    f = values[finite]
    nan = torch.full((max(lookback, ahead),), math.nan, dtype=values.dtype)
    before = torch.cumsum(finite.long(), 0) - finite.long()  # finite rows strictly before each row
    back = torch.cat((nan[:lookback], f)).unfold(0, lookback, 1).nanmedian(1).values  # [F + 1]: f[j - lookback : j]
    forth = torch.cat((f, nan[:ahead])).unfold(0, ahead, 1).nanmedian(1).values  # [F + 1]: f[j : j + ahead]
    after = torch.where(finite, before + 1, before)  # index in f of the first finite row after each row
    return (
        back[before],
        before.clamp(max=lookback),
        forth[after.clamp(max=f.numel())],
        (f.numel() - after).clamp(min=0, max=ahead),
    )


class _Growth(NamedTuple):
    onset: int
    per_step: float
    end: float
    end_step: int
    reference: float
    rows: int  # the rows the reference is the median of (0: the run's first row)


def _growth(
    steps: list[int], values: list[float], since: int, total: float, opts: dict[str, Any], jumps: frozenset[int] = frozenset()
) -> _Growth | None:
    """The first growth run that ends at or after step ``since`` and above ``total`` × its
    reference, extended to where it stops growing; ``None`` when there is none. A run may not
    end at one of the steps ``jumps`` (lone spikes: a rise made in one step)."""
    rows = opts["growth_rows"]
    start = 0
    for k, v in enumerate(values):
        if not (math.isfinite(v) and v > 0):
            start = k + 1
            continue
        if k > start and not v > values[k - 1]:
            start = k
        if k - start + 1 < rows or steps[k] < since or steps[k] in jumps:
            continue
        earlier = [x for x in values[max(0, start - 4 * opts["lookback"]) : start] if math.isfinite(x)][-opts["lookback"] :]
        reference = _median(earlier) if earlier else values[start]
        if not (reference > 0 and v > total * reference):
            continue
        end = k
        while end + 1 < len(values) and math.isfinite(values[end + 1]) and values[end + 1] > values[end]:
            end += 1
        first = next(i for i in range(start, end + 1) if values[i] > opts["growth"] * reference)
        fit_from = first if end > first else start
        g = _fit(steps[fit_from : end + 1], values[fit_from : end + 1])
        if g is None or g <= opts["growth"]:
            continue
        return _Growth(steps[first], g, values[end], steps[end], reference, len(earlier))
    return None


def _fit(steps: list[int], values: list[float]) -> float | None:
    """Per-step growth factor of the least-squares fit of ``log value`` against the step."""
    x = torch.tensor(steps, dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64).log()
    xc = x - x.mean()
    den = float(xc.square().sum())
    return math.exp(min(float((xc * (y - y.mean())).sum()) / den, 700.0)) if den > 0 else None


def _median(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median())


class _Spike(NamedTuple):
    step: int
    value: float
    median: float
    ratio: float
    rows: int


def _spikes(
    steps: torch.Tensor, values: torch.Tensor, since: int, final: bool, opts: dict[str, Any]
) -> tuple[list[_Spike], list[_Spike]]:
    """``(lone spikes, settled smaller spikes)`` at or after step ``since``."""
    back, count, forth, ahead = _running(values, opts["lookback"], opts["settle"])
    ratio = values / back
    previous = torch.cat((values.new_full((1,), math.nan), values[:-1]))
    candidate = torch.isfinite(values) & (back > 0) & (count >= opts["min_rows"]) & (ratio >= opts["spike"]) & (steps >= since)
    lone, small = [], []
    for k in torch.nonzero(candidate).flatten().tolist():
        spike = _Spike(int(steps[k]), float(values[k]), float(back[k]), float(ratio[k]), int(count[k]))
        if spike.ratio >= opts["lone_spike"] and not float(previous[k]) >= opts["spike"] * spike.median:
            lone.append(spike)
            continue
        settled = int(ahead[k]) >= opts["settle"] or (final and int(ahead[k]) > 0)
        if settled and not float(forth[k]) * opts["spike"] > spike.value:
            small.append(spike)
    return lone, small


def _hot(history: History, at: list[int], columns: list[int], opts: dict[str, Any]) -> list[int]:
    """Columns whose own norm was ``spike`` × its median over the earlier rows at one of
    the steps ``at`` (statistics rows only)."""
    hot: set[int] = set()
    norms = torch.where(history.present > 0, history.grad_norm.double(), math.nan)
    for step in at:
        rows = torch.nonzero(history.steps == step).flatten().tolist()
        if not rows:
            continue
        row = rows[0]
        earlier = norms[max(0, row - opts["lookback"]) : row]
        earlier = torch.where(torch.isfinite(earlier), earlier, math.nan)
        if len(earlier) < opts["min_rows"]:
            continue
        median = earlier.nanmedian(0).values
        ratio = norms[row] / median
        hot |= {c for c in columns if bool(median[c] > 0) and bool(ratio[c] >= opts["spike"])}
    return sorted(hot)


# ---------------------------------------------------------------------- the loss


def _quarters(losses: list[float]) -> tuple[float, float] | None:
    if len(losses) < 4:
        return None
    q = max(1, len(losses) // 4)
    return sum(losses[:q]) / q, sum(losses[-q:]) / q


def _diverging(losses: list[float], factor: float) -> bool | None:
    if len(losses) < 4:
        return None
    if not all(math.isfinite(x) for x in losses[-max(1, len(losses) // 4) :]):
        return True
    first, last = _quarters(losses) or (0.0, 0.0)
    return bool(last > factor * first)


def _learning(losses: list[float]) -> bool:
    """The loss falls: every loss finite, the last quarter's mean below the first's."""
    ends = _quarters(losses)
    return ends is not None and all(math.isfinite(x) for x in losses) and ends[1] < ends[0]


# ---------------------------------------------------------------------- the verdict


@hookimpl
def gradwatch_diagnose(window: StatsWindow, model: ModelInfo, history: History, ctx: StepContext) -> list[Diagnosis] | None:
    state = ctx.stash[KEY]
    opts = state.opts
    columns = weight_layers(model) or list(range(len(window.layers)))
    last = window.last_step
    since = last - opts["window"] + 1
    steps_t, values_t = _series(history)
    steps, values = steps_t.tolist(), values_t.tolist()
    losses = history.loss
    learning = _learning(losses.since(since).values.double().tolist())
    total = opts["growth_total"] ** 2 if learning else opts["growth_total"]

    pattern, onset, layers, what = None, None, tuple(window.layers[c] for c in columns), ""
    extra: dict[str, Any] = {}
    lone, small = _spikes(steps_t, values_t, since, window.final, opts)
    grown = _growth(steps, values, since, total, opts, frozenset(s.step for s in lone))
    series = "gradient norm"
    if grown is None and len(losses.steps):
        grown = _growth(losses.steps.tolist(), losses.values.double().tolist(), since, total, opts)
        series = "loss"
    if grown is not None:
        pattern, onset = "growth", grown.onset
        rise = grown.end / grown.reference
        extra = {
            "growth_series": series,
            "growth_end": grown.end,
            "growth_end_step": grown.end_step,
            "growth_reference": grown.reference,
            "growth_reference_rows": grown.rows,
            "growth_rise": rise,
        }
        against = (
            f"the median {num(grown.reference)} of the {grown.rows} rows before it"
            if grown.rows
            else f"its first row, {num(grown.reference)}"
        )
        what = (
            f"the {series} grows by a factor of {num(grown.per_step)} per step since step {onset}, to {num(grown.end)} at "
            f"step {grown.end_step}, {num(rise)} times {against}"
        )
    else:
        chosen = lone[:1] or ([] if learning or len(small) < opts["min_spikes"] else small)
        if chosen:
            pattern, onset = "spike", chosen[0].step
            top = max(chosen, key=lambda s: s.ratio)
            hot = _hot(history, [s.step for s in chosen], columns, opts)
            layers = tuple(window.layers[c] for c in hot) or layers
            extra = {
                "spike_steps": [s.step for s in chosen],
                "spike_count": len(chosen),
                "spike_norm": top.value,
                "median_before": top.median,
                "spike_ratio": top.ratio,
                "rows_before": top.rows,
            }
            if len(chosen) == 1:
                what = (
                    f"the gradient norm spiked to {num(top.value)} at step {top.step}, {num(top.ratio)} times the median "
                    f"{num(top.median)} of the {top.rows} rows before it"
                )
            else:
                what = (
                    f"the gradient norm spiked {len(chosen)} times since step {onset}, up to {num(top.value)} at step "
                    f"{top.step}, {num(top.ratio)} times the median {num(top.median)} of the rows before it"
                )
    toward = None
    recent = history.since(since)
    layer_rows = recent.grad_norm[torch.isfinite(recent.total_norm)]
    if len(layer_rows) >= 3 and len(columns) >= 4:
        v = profile(layer_rows, columns)
        q = max(1, len(columns) // 4)
        early, late = v[:q], v[-q:]
        if torch.isfinite(early).all() and torch.isfinite(late).all() and float(late.min()) > 0:
            toward = float(early.log().mean().exp() / late.log().mean().exp())
            if pattern is None and toward > opts["toward_input"]:
                pattern, onset = "toward_input", int(recent.steps[torch.isfinite(recent.total_norm)][0])
                layers = tuple(window.layers[c] for c in columns[:q])
                what = f"the gradient norms grow toward the input: the first layers get {num(toward)} times the norm of the last"
    if pattern is None or onset is None:
        return None

    ratios = history.update_ratio.values
    ratios = ratios[torch.isfinite(ratios)]
    update_max = float(ratios.max()) if ratios.numel() else None
    diverging = _diverging(history.loss.values.tolist(), opts["diverge"])
    updates_too_big = diverging is None and update_max is not None and update_max > opts["max_update_ratio"]
    severity = Severity.ERROR if diverging or updates_too_big else Severity.WARNING
    if (pattern, severity) in state.reported:
        return None
    state.reported.add((pattern, severity))

    finite = values_t[torch.isfinite(values_t)]
    quantiles = {p: float(finite.quantile(f)) for p, f in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))} if finite.numel() else {}
    last_total = float(finite[-1]) if finite.numel() else math.nan
    tail = ""
    if diverging:
        tail = " and the loss diverges"
    elif updates_too_big:
        tail = f" and updates exceed the weights (‖Δw‖/‖w‖ up to {num(update_max)})"
    return [
        Diagnosis(
            kind="exploding",
            severity=severity,
            step=onset,
            layers=layers,
            message=f"{what} (last total norm {num(last_total)}){tail}",
            summary=f"{pattern}: total gradient norm {num(last_total)} (onset step {onset})",
            evidence={
                "pattern": pattern,
                "onset": onset,
                "total_norm": last_total,
                "growth_per_step": grown.per_step if grown is not None else None,
                "norm_quantiles": quantiles,
                "update_ratio": update_max,
                "loss_diverging": diverging,
                "learning": learning,
                "toward_input_ratio": toward,
                **extra,
            },
            source="exploding",
        )
    ]


@hookimpl
def gradwatch_state_dict(ctx: StepContext) -> dict[str, Any] | None:
    s = ctx.stash[KEY]
    return {"exploding": {"reported": sorted([pattern, severity.value] for pattern, severity in s.reported)}}


@hookimpl
def gradwatch_load_state_dict(state: dict[str, Any], ctx: StepContext) -> None:
    mine = state.get("exploding")
    if mine:
        ctx.stash[KEY].reported = {(str(p), Severity(v)) for p, v in mine.get("reported", ())}
