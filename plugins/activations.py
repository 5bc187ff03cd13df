"""Dead and saturated units, from forward hooks on activation modules on sampled steps.

* **dead_units**: for each ``nn.ReLU`` / ``nn.ReLU6`` module, which of its units output zero
  for every sample of a sampled batch. A unit is a feature (last dimension) for 2-d and 3-d
  outputs (``[N, F]``, ``[N, T, F]``) and a channel for conv outputs (``[N, C, ...]``). Two
  statistics are recorded on each sampled step:

  * ``activations.dead``: the fraction of the units that were zero for every sample of this
    step's batch (averaged over the module's calls in the step);
  * ``activations.dead_always``: the fraction of the units that were zero for every sample
    of *every* sampled batch seen since the start of the judging window (a per-module mask
    of the units ever alive, OR-ed on device at each sampled call), with
    ``activations.dead_batches``, the number of sampled steps behind it.

  The per-batch fraction depends on the batch size (a healthy unit is more likely to miss
  every one of 4 samples than every one of 256), and it moves from batch to batch (83% on
  one, 98% on the next for the same dead layer); a unit that stays zero on every sampled
  batch does not. A module is reported when at least ``persistent`` of its units were zero
  on every one of at least ``min_samples`` sampled batches, or when its per-batch fraction,
  averaged over the sampled steps judged, is at least ``dead``. The window of the mask ends
  at the first sampled step that is at least ``window`` steps after it started and has seen
  ``min_samples`` batches (the last full window is judged until the next one fills), so
  units that die late in a run are seen; the per-batch fractions are judged over the
  sampled steps of the last ``window`` steps, and at least the last ``min_samples`` of them.
* **saturation**: for each ``nn.Sigmoid``/``nn.Tanh`` module, the fraction of outputs whose
  derivative is below ``derivative`` (``σ(1-σ)`` for sigmoid, ``1-tanh²`` for tanh),
  reported when it is at least ``saturated`` on every one of at least ``min_samples``
  sampled steps judged.

The work (a comparison, a reduction and an OR per activation call) runs on device, on
sampled steps only, and is summed over calls (a module called several times, or gradient
accumulation); nothing is read on the host until the report interval.

Why these thresholds (measured with batches of 8 and 32, SGD and Adam, 3 seeds, every step
sampled and one step in 8, over 300 steps): on healthy nets the largest fraction of a
module's units zero on every one of at least 3 sampled batches was 0.55 (the deepest
layers of a 30-layer Kaiming ReLU MLP under Adam; 0.39 on a 12-layer one, 0 in a residual
conv net with BatchNorm, where a channel sums over positions), and the largest mean of the
per-batch fraction over 7 sampled steps 0.71 (the same net, batches of 8). A 6-layer MLP
with one hidden layer's bias at -4 (83-98% of its units zero on each batch of 32) has
0.73-0.92 of them zero on all of 7 sampled batches and a mean per-batch fraction of
0.89-1.0; at -3.5, 0.69-0.83 and 0.82-0.98.

Options (``options={"activations": {...}}``): ``dead`` (0.85: mean per-batch fraction that
condemns a layer; AUTOTRAINER uses 0.7 of zero gradients), ``persistent`` (0.7: fraction of
units zero on every sampled batch that condemns it), ``saturated`` (0.9), ``derivative``
(0.01), ``min_samples`` (3), ``window`` (200 steps). Functional activations (``torch.relu``
inside ``forward``) are not seen: only modules are hooked.

A condition is reported once, and again when the set of layers changes; the set reported
and the masks are kept across a detach and attach (``gradwatch_state_dict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch import (
    Diagnosis,
    GradBatch,
    ModelInfo,
    Severity,
    StashKey,
    StatsWindow,
    StepContext,
    WatchConfig,
    hookimpl,
)
from gradwatch.kit import plugin_options

if TYPE_CHECKING:
    from gradwatch.stats import History

_DEFAULTS: dict[str, Any] = {
    "dead": 0.85,
    "persistent": 0.7,
    "saturated": 0.9,
    "derivative": 0.01,
    "min_samples": 3,
    "window": 200,
}
_RECTIFIERS = (nn.ReLU, nn.ReLU6)
_SQUASHERS = (nn.Sigmoid, nn.Tanh)
DEAD_KEY, SAT_KEY = "activations.dead", "activations.saturated"
ALWAYS_KEY, BATCHES_KEY = "activations.dead_always", "activations.dead_batches"


@dataclass
class _State:
    opts: dict[str, Any]
    names: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    sums: torch.Tensor | None = None  # float32 [2, A]: summed fraction, calls
    # Units ever alive in the judging window, per module and per unit count (a module
    # called on outputs of two widths keeps a mask for each).
    alive: list[dict[int, torch.Tensor]] = field(default_factory=list)
    always: torch.Tensor | None = None  # float32 [A]: fraction zero on every sampled batch
    batches: torch.Tensor | None = None  # float32 [A]: sampled steps behind ``always``
    window_start: int | None = None
    window_samples: int = 0
    reported: dict[str, tuple[str, ...]] = field(default_factory=dict)


KEY = StashKey[_State]()


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    # dead, persistent, saturated, derivative: fractions in (0, 1).
    fraction = (0.0, 1.0)
    opts = plugin_options(
        config,
        "activations",
        _DEFAULTS,
        bounds={"dead": fraction, "persistent": fraction, "saturated": fraction, "derivative": fraction},
    )
    ctx.stash[KEY] = _State(opts=opts)


@hookimpl
def gradwatch_attach(model: ModelInfo, ctx: StepContext) -> None:
    state = ctx.stash[KEY]
    for name, module in model.model.named_modules():
        if isinstance(module, _RECTIFIERS + _SQUASHERS):
            state.names.append(name)
            state.kinds.append(type(module).__name__)
            state.alive.append({})
            ctx.probes.forward_hook(module, _probe(state, len(state.names) - 1, module), sampled=True)
    if state.names:
        device = next(iter(model.model.parameters())).device
        state.sums = torch.zeros(2, len(state.names), dtype=torch.float32, device=device)
        state.always = torch.full((len(state.names),), math.nan, dtype=torch.float32, device=device)
        state.batches = torch.zeros(len(state.names), dtype=torch.float32, device=device)


def _alive_units(out: torch.Tensor) -> torch.Tensor:
    """Which units of ``out`` are non-zero for at least one sample: bool ``[units]``."""
    alive = out != 0
    if out.dim() <= 1:
        return alive.any().reshape(1)
    if out.dim() == 2 or out.dim() == 3:
        return alive.flatten(0, -2).any(0)  # per feature
    return alive.transpose(0, 1).flatten(1).any(1)  # per channel


def _dead_fraction(out: torch.Tensor) -> torch.Tensor:
    return 1.0 - _alive_units(out).float().mean()


def _remember(state: _State, index: int, alive: torch.Tensor) -> None:
    """OR this call's live units into the module's mask and store the fraction of units
    never alive in the window, on device."""
    masks = state.alive[index]
    seen = masks.get(alive.numel())
    if seen is None:
        masks[alive.numel()] = alive.clone()
    else:
        if seen.device != alive.device:
            seen = masks[alive.numel()] = seen.to(alive.device)
        seen |= alive
    if len(masks) == 1:
        never = 1.0 - next(iter(masks.values())).float().mean()
    else:
        total = sum(m.numel() for m in masks.values())
        never = sum((~m).sum().to(state.sums.device) for m in masks.values()) / total  # type: ignore[union-attr]
    assert state.always is not None
    state.always[index] = never.to(state.always.device)


def _probe(state: _State, index: int, module: nn.Module) -> Any:
    threshold = state.opts["derivative"]
    sigmoid = isinstance(module, nn.Sigmoid)
    rectifier = isinstance(module, _RECTIFIERS)

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        # Training forwards only (grad mode); the statistic itself needs no graph.
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.numel():
            with torch.no_grad():
                measure(out)

    def measure(out: torch.Tensor) -> None:
        sums = state.sums
        assert sums is not None
        if rectifier:
            alive = _alive_units(out)
            value = 1.0 - alive.float().mean()
            _remember(state, index, alive)
        elif sigmoid:
            o = out.float()
            value = ((o * (1 - o)) < threshold).float().mean()
        else:
            o = out.float()
            value = ((1 - o * o) < threshold).float().mean()
        sums[0, index] += value.to(sums.device)
        sums[1, index] += 1

    return hook


@hookimpl
def gradwatch_collect(grads: GradBatch, ctx: StepContext) -> dict[str, torch.Tensor] | None:
    state = ctx.stash[KEY]
    if state.sums is None or not ctx.sampled:
        return None
    sums, always, batches = state.sums, state.always, state.batches
    assert always is not None and batches is not None
    called = sums[1] > 0
    fraction = torch.where(called, sums[0] / sums[1].clamp_min(1), math.nan)
    batches += called
    out = {
        DEAD_KEY: fraction,
        ALWAYS_KEY: torch.where(batches > 0, always, math.nan),
        BATCHES_KEY: batches.clone(),
    }
    sums.zero_()
    # The window is decided from host-known steps only (no tensor is read).
    if state.window_start is None:
        state.window_start = ctx.step
    state.window_samples += 1
    if state.window_samples >= state.opts["min_samples"] and ctx.step - state.window_start + 1 >= state.opts["window"]:
        _new_window(state)
    return out


def _new_window(state: _State) -> None:
    for masks in state.alive:
        masks.clear()
    if state.always is not None and state.batches is not None:
        state.always.fill_(math.nan)
        state.batches.zero_()
    state.window_start, state.window_samples = None, 0


def _judged(series: Any, last: int, opts: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled steps of the last ``window`` steps, and at least the last ``min_samples``."""
    steps, values = series.steps, series.values
    keep = steps > last - opts["window"]
    if int(keep.sum()) < opts["min_samples"]:
        keep = torch.arange(len(steps)) >= len(steps) - opts["min_samples"]
    return steps[keep], values[keep]


@hookimpl
def gradwatch_diagnose(window: StatsWindow, model: ModelInfo, history: History, ctx: StepContext) -> list[Diagnosis] | None:
    state = ctx.stash[KEY]
    opts = state.opts
    series = history.extras.get(DEAD_KEY)
    if series is None or not len(series.steps) or series.values.shape[-1] != len(state.names):
        return None
    steps, values = _judged(series, window.last_step, opts)
    seen = torch.isfinite(values).sum(0)
    finite = torch.where(torch.isfinite(values), values, torch.nan).double()
    mean = finite.nanmean(0)
    high = torch.where(torch.isfinite(values), values, -math.inf).amax(0)
    low = torch.where(torch.isfinite(values), values, math.inf).amin(0)
    always, batches, since = _persistent(history, len(state.names), opts["min_samples"])
    out = []
    for kind, classes in (("dead_units", ("ReLU", "ReLU6")), ("saturation", ("Sigmoid", "Tanh"))):
        cols = [k for k, t in enumerate(state.kinds) if t in classes and int(seen[k]) >= opts["min_samples"]]
        if kind == "dead_units":
            cols = [k for k in cols if always[k] >= opts["persistent"] or float(mean[k]) >= opts["dead"]]
        else:
            cols = [k for k in cols if float(low[k]) >= opts["saturated"]]
        layers = tuple(state.names[k] for k in cols)
        if not layers:
            state.reported.pop(kind, None)
            continue
        if state.reported.get(kind) == layers:
            continue
        state.reported[kind] = layers
        first = int(steps[0])
        if kind == "dead_units":
            out.append(_dead(state, cols, steps, seen, mean, high, always, batches, since, first))
        else:
            out.append(_saturated(state, cols, seen, low, high, first))
    return out or None


def _persistent(history: History, width: int, min_samples: int) -> tuple[list[float], list[int], list[int | None]]:
    """Per module: the fraction of units zero on every sampled batch of the latest window
    with at least ``min_samples`` batches (NaN when none), the batches behind it and the
    step its window started."""
    nan = [math.nan] * width
    always, count = history.extras.get(ALWAYS_KEY), history.extras.get(BATCHES_KEY)
    if always is None or count is None or always.values.shape[-1] != width or len(always.steps) != len(count.steps):
        return nan, [0] * width, [None] * width
    full = (count.values >= min_samples) & torch.isfinite(always.values)
    # The latest full row of each module; a window starts where its count is 1.
    index = torch.arange(len(always.steps)).unsqueeze(1).expand(-1, width)
    latest = torch.where(full, index, -1).amax(0).tolist() if len(always.steps) else [-1] * width
    fractions, behind, starts = [], [], []
    for k, row in enumerate(latest):
        if row < 0:
            fractions.append(math.nan)
            behind.append(0)
            starts.append(None)
            continue
        fractions.append(float(always.values[row, k]))
        behind.append(int(count.values[row, k]))
        begun = torch.nonzero(count.values[: row + 1, k] == 1).flatten()
        starts.append(int(always.steps[int(begun[-1])]) if begun.numel() else None)
    return fractions, behind, starts


def _dead(state: _State, cols: list[int], steps: torch.Tensor, seen: torch.Tensor, mean: torch.Tensor, high: torch.Tensor,
          always: list[float], batches: list[int], since: list[int | None], first: int) -> Diagnosis:  # fmt: skip
    opts = state.opts
    names = [state.names[k] for k in cols]
    persistent = [k for k in cols if always[k] >= opts["persistent"]]
    # The worst module: the most units dead on every batch, else the highest mean.
    worst = max(cols, key=lambda k: (always[k] if math.isfinite(always[k]) else -1.0, float(mean[k])))
    name, p, b, m, top, n = (
        state.names[worst],
        always[worst],
        batches[worst],
        float(mean[worst]),
        float(high[worst]),
        int(seen[worst]),
    )
    activation = state.kinds[worst]
    shown = ", ".join(repr(x) for x in names[:4]) + (", …" if len(names) > 4 else "")
    if math.isfinite(p):
        never = f"{p:.0%} of the units of {name!r} output zero for every sample of all {b} sampled batches seen"
    else:
        never = f"the units of {name!r} output zero for every sample of most sampled batches"
    message = (
        f"dead units in {len(names)} {activation} module(s) ({shown}): {never}; per batch {m:.0%} of its units "
        f"were dead on average over {n} sampled steps, and up to {top:.0%}"
    )
    starts = [since[k] for k in persistent if since[k] is not None]
    return Diagnosis(
        kind="dead_units",
        severity=Severity.WARNING,
        step=min(starts) if starts else first,
        layers=tuple(names),
        message=message,
        summary=f"{(p if math.isfinite(p) else m):.0%} of the units of {name!r} dead",
        evidence={
            "fraction": {state.names[k]: always[k] if math.isfinite(always[k]) else float(mean[k]) for k in cols},
            "persistent_fraction": {state.names[k]: always[k] for k in cols if math.isfinite(always[k])},
            "batches": {state.names[k]: batches[k] for k in cols if batches[k]},
            "mean_fraction": {state.names[k]: float(mean[k]) for k in cols},
            "max_fraction": {state.names[k]: float(high[k]) for k in cols},
            "activation": activation,
            "threshold": opts["dead"],
            "persistent_threshold": opts["persistent"],
            "steps_seen": n,
            "judged_steps": [int(s) for s in steps.tolist()],
        },
        source="activations",
    )


def _saturated(
    state: _State, cols: list[int], seen: torch.Tensor, low: torch.Tensor, high: torch.Tensor, first: int
) -> Diagnosis:
    opts = state.opts
    limit = opts["saturated"]
    activation = state.kinds[cols[0]]
    worst = max(cols, key=lambda k: float(high[k]))
    n = int(seen[worst])
    return Diagnosis(
        kind="saturation",
        severity=Severity.WARNING,
        step=first,
        layers=tuple(state.names[k] for k in cols),
        message=(
            f"in {len(cols)} {activation} module(s) at least {limit:.0%} of the units have a derivative below "
            f"{opts['derivative']} on every one of {n} sampled steps (up to {float(high[worst]):.0%} in {state.names[worst]!r})"
        ),
        summary=f"{float(low[worst]):.0%} of the units of {state.names[worst]!r} saturated",
        evidence={
            "fraction": {state.names[k]: float(low[k]) for k in cols},
            "max_fraction": {state.names[k]: float(high[k]) for k in cols},
            "activation": activation,
            "threshold": limit,
            "derivative": opts["derivative"],
            "steps_seen": n,
        },
        source="activations",
    )


@hookimpl
def gradwatch_state_dict(ctx: StepContext) -> dict[str, Any] | None:
    s = ctx.stash[KEY]
    return {
        "activations": {
            "names": list(s.names),
            "alive": [{n: m.cpu() for n, m in masks.items()} for masks in s.alive],
            "always": s.always.cpu() if s.always is not None else None,
            "batches": s.batches.cpu() if s.batches is not None else None,
            "window_start": s.window_start,
            "window_samples": s.window_samples,
            "reported": {k: list(v) for k, v in s.reported.items()},
        }
    }


@hookimpl
def gradwatch_load_state_dict(state: dict[str, Any], ctx: StepContext) -> None:
    mine = state.get("activations")
    s = ctx.stash[KEY]
    if not mine or mine.get("names") != s.names:
        return  # another model's modules: start afresh
    s.reported = {k: tuple(v) for k, v in mine.get("reported", {}).items()}
    if s.sums is None or mine.get("always") is None or mine.get("batches") is None:
        return
    device = s.sums.device
    s.alive = [{int(n): m.to(device) for n, m in masks.items()} for masks in mine["alive"]]
    s.always = mine["always"].to(device)
    s.batches = mine["batches"].to(device)
    s.window_start, s.window_samples = mine["window_start"], int(mine["window_samples"])
