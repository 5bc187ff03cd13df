"""Exploding-gradient detector: spikes, sustained exponential growth, growth toward the input.

Read on the statistics steps' total norm (``window.total_norm``) and per-layer norms, in
step order, across report intervals:

* **spike**: z-score of the norm against an exponential moving average of its mean and
  variance (``ema`` = weight of the newest value); a value counts as a spike when
  ``z > z`` after ``warmup`` rows, and the EMA takes it in clamped at ``z`` standard
  deviations so one outlier does not hide the next. Reported after ``min_spikes`` spikes
  within ``window`` steps (a lone spike is not a verdict).
* **growth**: least-squares fit of ``log total_norm`` over the last ``growth_rows`` finite
  rows; reported when the norm grows by more than ``growth`` × per step and ends above
  ``growth_total`` × the median norm of the earlier intervals (so a recovery from a dip
  is not growth). The recorded loss, read every step, is fitted the same way: a divergence
  too fast for the statistics steps (3-4 steps) is seen there.
* **toward the input**: the geometric mean over the window of the first quarter of the
  weight layers' norms over the last quarter's exceeds ``toward_input`` (AUTOTRAINER,
  ICSE 2021, calls above 70 exploding).

The loss, when recorded (``gw.observe_loss(loss)``, ``window.extras["core.loss"]``), tells
diverging (the mean of the last quarter of the recorded losses above ``diverge`` × the
first quarter's, or non-finite) from not; without it ``update_ratio`` (the largest
``‖Δw‖/‖w‖`` seen on sampled steps) above ``max_update_ratio`` stands in. A diverging run
makes the diagnosis an error, otherwise a warning.

Options (``options={"exploding": {...}}``) and defaults: ``z`` 6.0, ``ema`` 0.05,
``warmup`` 8, ``min_spikes`` 2, ``window`` 200, ``growth`` 1.1, ``growth_total`` 100.0,
``growth_rows`` 3, ``toward_input`` 70.0, ``diverge`` 2.0, ``max_update_ratio`` 1.0.

A condition is reported once, and again when its kind (spike, growth, toward_input) or
severity changes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gradwatch import Diagnosis, ModelInfo, Severity, StashKey, StatsWindow, StepContext, WatchConfig, hookimpl
from gradwatch.kit import num, plugin_options, profile, weight_layers

if TYPE_CHECKING:
    from gradwatch.stats import History

_DEFAULTS: dict[str, Any] = {
    "z": 6.0,
    "ema": 0.05,
    "warmup": 8,
    "min_spikes": 2,
    "window": 200,
    "growth": 1.1,
    "growth_total": 100.0,
    "growth_rows": 3,
    "toward_input": 70.0,
    "diverge": 2.0,
    "max_update_ratio": 1.0,
}


@dataclass
class _State:
    opts: dict[str, Any]
    n: int = 0
    mean: float = 0.0
    var: float = 0.0
    layer_mean: torch.Tensor | None = None
    layer_var: torch.Tensor | None = None
    spikes: deque[tuple[int, float, tuple[int, ...]]] = field(default_factory=deque)
    onset: int | None = None
    reported: tuple[Any, ...] | None = None


KEY = StashKey[_State]()


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    # ema: the weight of the newest value; growth_rows: a fit needs two points.
    opts = plugin_options(config, "exploding", _DEFAULTS, bounds={"ema": (0.0, 1.0), "growth_rows": (2, None)})
    ctx.stash[KEY] = _State(opts=opts)


def _update_ema(state: _State, step: int, total: float, layers: torch.Tensor) -> None:
    opts = state.opts
    a, z = opts["ema"], opts["z"]
    layers = layers.double()
    if state.n == 0 or state.layer_mean is None:
        if state.n == 0:
            state.mean, state.var = total, 0.0
        state.layer_mean, state.layer_var = layers.clone(), torch.zeros_like(layers)
    else:
        assert state.layer_mean is not None and state.layer_var is not None
        std = math.sqrt(state.var) + 1e-12 * abs(state.mean) + 1e-30
        score = (total - state.mean) / std
        lstd = state.layer_var.sqrt() + 1e-30
        lscore = (layers - state.layer_mean) / lstd
        if state.n >= opts["warmup"] and score > z:
            hot = tuple(torch.nonzero(lscore > z).flatten().tolist())
            state.spikes.append((step, score, hot))
        # Clamped so one outlier does not inflate the statistics that judge the next.
        total = min(total, state.mean + z * std) if state.n >= opts["warmup"] else total
        layers = torch.minimum(layers, state.layer_mean + z * lstd) if state.n >= opts["warmup"] else layers
        d, dl = total - state.mean, layers - state.layer_mean
        state.mean += a * d
        state.var = (1 - a) * (state.var + a * d * d)
        state.layer_mean += a * dl
        state.layer_var = (1 - a) * (state.layer_var + a * dl * dl)
    state.n += 1


def _median(values: torch.Tensor) -> float | None:
    finite = values[torch.isfinite(values)].double()
    return float(finite.median()) if finite.numel() else None


def _grown(run: deque[tuple[int, float]], reference: float, opts: dict[str, Any]) -> tuple[int, float] | None:
    """``(onset, growth per step)`` when ``run`` grows exponentially to far above ``reference``
    (the median before this window), else ``None``; a recovery from a dip is not growth."""
    if len(run) < opts["growth_rows"]:
        return None
    g = _growth(run)
    if g is None or g <= opts["growth"] or run[-1][1] <= opts["growth_total"] * max(reference, 1e-30):
        return None
    onset = next((s for s, v in run if v > reference * opts["growth"] ** 2), run[-1][0])
    return onset, g


def _growth(recent: deque[tuple[int, float]]) -> float | None:
    """Per-step growth factor of the fitted ``log norm`` over the recent rows."""
    if len(recent) < 2:
        return None
    x = torch.tensor([s for s, _ in recent], dtype=torch.float64)
    y = torch.tensor([math.log(max(v, 1e-300)) for _, v in recent], dtype=torch.float64)
    xc = x - x.mean()
    den = float(xc.square().sum())
    return math.exp(float((xc * (y - y.mean())).sum()) / den) if den > 0 else None


@hookimpl
def gradwatch_diagnose(window: StatsWindow, model: ModelInfo, history: History, ctx: StepContext) -> list[Diagnosis] | None:
    state = ctx.stash[KEY]
    opts = state.opts
    columns = weight_layers(model) or list(range(len(window.layers)))
    # Non-finite steps belong to the nonfinite detector (AMP skips have no rows at all).
    finite = torch.isfinite(history.total_norm)
    steps, totals = history.steps[finite].tolist(), history.total_norm[finite].tolist()
    earlier = sum(1 for s in steps if s < window.first_step)
    reference = _median(torch.tensor(totals[:earlier]))
    grown = None
    for row, (step, total) in enumerate(zip(window.steps.tolist(), window.total_norm.tolist())):
        if math.isfinite(total):
            _update_ema(state, step, total, window.grad_norm[row])
    for k in range(earlier, len(steps)):
        run = deque(zip(steps[max(0, k - opts["growth_rows"] + 1) : k + 1], totals[max(0, k - opts["growth_rows"] + 1) : k + 1]))
        grown = _grown(run, reference if reference is not None else run[0][1], opts)
        if grown is not None:
            grown = (*grown, "gradient norm")
            break
    loss = history.loss
    if grown is None and len(loss.steps):
        # The loss is recorded every step: it sees a divergence too fast for the
        # statistics steps (SGD far past its stable rate diverges in 3-4 steps).
        loss_ref = _median(loss.before(window.first_step).values)
        new = loss.since(window.first_step)
        run: deque[tuple[int, float]] = deque(maxlen=opts["growth_rows"])
        for step, value in zip(new.steps.tolist(), new.values.tolist()):
            if not math.isfinite(value):
                break
            run.append((step, value))
            if len(run) == run.maxlen:
                grown = _grown(run, loss_ref if loss_ref is not None else run[0][1], opts)
                if grown is not None:
                    grown = (*grown, "loss")
                    break
    last = window.last_step
    while state.spikes and state.spikes[0][0] <= last - opts["window"]:
        state.spikes.popleft()
    ratios = history.update_ratio.values
    ratios = ratios[torch.isfinite(ratios)]
    update_max = float(ratios.max()) if ratios.numel() else None
    recent = history.since(last - opts["window"] + 1)
    layer_rows = recent.grad_norm[torch.isfinite(recent.total_norm)]

    kind, onset, layers, growth, z, grew = None, None, tuple(window.layers), None, 0.0, ""
    if grown is not None:
        kind, onset, growth, grew = "growth", grown[0], grown[1], grown[2]
    elif len(state.spikes) >= opts["min_spikes"]:
        kind, onset = "spike", state.spikes[0][0]
        hot = sorted({c for _, _, cols in state.spikes for c in cols})
        layers = tuple(window.layers[c] for c in hot) or layers
    toward = None
    if len(layer_rows) >= 3 and len(columns) >= 4:
        v = profile(layer_rows, columns)
        q = max(1, len(columns) // 4)
        early, late = v[:q], v[-q:]
        if torch.isfinite(early).all() and torch.isfinite(late).all() and float(late.min()) > 0:
            toward = float(early.log().mean().exp() / late.log().mean().exp())
            if kind is None and toward > opts["toward_input"]:
                kind, onset = "toward_input", int(recent.steps[torch.isfinite(recent.total_norm)][0])
                layers = tuple(window.layers[c] for c in columns[:q])
    if kind is None:
        state.reported = None
        return None
    if state.onset is None or state.reported is None:
        state.onset = onset
    z = max((s for _, s, _ in state.spikes), default=_last_z(state, totals))
    diverging = _diverging(history.loss.values.tolist(), opts["diverge"])
    if diverging is None and update_max is not None:
        diverging_hint = update_max > opts["max_update_ratio"]
    else:
        diverging_hint = bool(diverging)
    severity = Severity.ERROR if diverging_hint else Severity.WARNING
    key = (kind, severity)
    if key == state.reported:
        return None
    state.reported = key
    q = torch.tensor(totals, dtype=torch.float64)
    quantiles = {p: float(q.quantile(f)) for p, f in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
    last_total = totals[-1] if totals else math.nan
    what = {
        "growth": f"the {grew} grows ×{growth or 0:.2f} per step since step {onset}",
        "spike": f"the gradient norm spiked {len(state.spikes)} times (z up to {z:.1f}) since step {onset}",
        "toward_input": f"the gradient norms grow toward the input: the first layers get {toward or 0:.0f}× the norm of the last",
    }[kind]
    tail = " and the loss diverges" if diverging else (" and updates exceed the weights" if diverging_hint else "")
    return [
        Diagnosis(
            kind="exploding",
            severity=severity,
            step=state.onset if state.onset is not None else onset,
            layers=layers,
            message=f"{what} (last total norm {last_total:.3g}){tail}",
            summary=f"total gradient norm {num(last_total)} (z-score {z:.1f}, onset step {state.onset})",
            evidence={
                "total_norm": last_total,
                "z_score": z,
                "onset": state.onset,
                "growth_per_step": growth,
                "norm_quantiles": quantiles,
                "update_ratio": update_max,
                "loss_diverging": diverging,
                "pattern": kind,
                "toward_input_ratio": toward,
            },
            source="exploding",
        )
    ]


def _last_z(state: _State, totals: list[float]) -> float:
    if not totals or state.n < 2:
        return 0.0
    return (totals[-1] - state.mean) / (math.sqrt(state.var) + 1e-30)


def _diverging(losses: list[float], factor: float) -> bool | None:
    if len(losses) < 4:
        return None
    if not all(math.isfinite(x) for x in losses[-max(1, len(losses) // 4) :]):
        return True
    q = max(1, len(losses) // 4)
    first = sum(losses[:q]) / q
    last = sum(losses[-q:]) / q
    return bool(last > factor * first)


@hookimpl
def gradwatch_state_dict(ctx: StepContext) -> dict[str, Any] | None:
    s = ctx.stash[KEY]
    return {"exploding": {"n": s.n, "mean": s.mean, "var": s.var, "onset": s.onset}}


@hookimpl
def gradwatch_load_state_dict(state: dict[str, Any], ctx: StepContext) -> None:
    mine = state.get("exploding")
    if mine:
        s = ctx.stash[KEY]
        s.n, s.mean, s.var, s.onset = mine["n"], mine["mean"], mine["var"], mine["onset"]
