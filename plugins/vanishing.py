"""Vanishing-gradient detector: early layers starved of gradient, judged over many steps.

Layers are the weight layers (modules owning a weight of two or more dimensions, embeddings
excepted: their gradients are sparse by nature), in forward order. For a per-layer signal
``v`` (geometric mean over the rows of the last ``window`` steps), the detector fits
``log v`` against depth by least squares; ``decay_per_layer = exp(-slope)`` is the factor
by which the signal shrinks per layer toward the input (0.5 = halves per layer), and
``decay_per_layer ** (depth - 1)`` the attenuation over the whole stack. ``ratio`` is the
RMS of the first quarter of the layers over that of the last quarter.

Signals, in order of preference (the first with ``min_rows`` rows decides):

* ``backprop``: the RMS of the gradient that reaches each layer's output, from a tensor
  hook on the output on sampled steps, accumulated in float64 so that tiny values do
  not underflow to a misleading zero. In a deep ReLU net with too small an
  initialisation the forward and backward decays cancel in the weight gradients and the
  vanishing shows only here (He et al. 2015).
* ``weight_grad``: the layers' gradient RMS on statistics steps.
* ``grad_to_weight``: ``‖g‖ / ‖w‖`` per layer on sampled steps.

Thresholds (``options={"vanishing": {...}}``):

* ``ratio`` (1e-3): vanishing when ``ratio`` or the fitted attenuation is below it
  (AUTOTRAINER, ICSE 2021, uses 1e-3 for first/last layer norms);
* ``max_decay`` (0.9): and the fitted decay per layer is below this (a real trend, not
  two noisy end layers);
* ``starved`` (1e-2): layers whose signal is below ``starved`` × the late layers' RMS are
  named as starved;
* ``min_depth`` (6): shallower stacks are not judged;
* ``min_rows`` (3): rows (steps) a signal needs in the window before it is judged;
* ``window`` (200): steps of history judged together;
* ``backprop`` (True): measure the backprop signal on sampled steps.
* ``tiny`` (1e-7) and ``plateau`` (0.01): with the loss recorded (``gw.observe_loss``, or the
  Lightning callback), gradients vanish in absolute terms when every weight layer's gradient
  RMS (geometric mean over the window) is below ``tiny`` while the loss has fallen by less
  than ``plateau`` (relative) from the first to the last third of the window: the network is
  not learning and not converged either (saturated outputs, a dead stack), whatever the depth.

A condition is reported once, and again only when the starved share of the stack (in
quarters) changes; it is re-armed when the condition clears.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwatch import (
    Diagnosis,
    GradBatch,
    GradWatchError,
    ModelInfo,
    Severity,
    StashKey,
    StatsWindow,
    StepContext,
    WatchConfig,
    hookimpl,
)

_DEFAULTS: dict[str, Any] = {
    "ratio": 1e-3,
    "max_decay": 0.9,
    "starved": 1e-2,
    "min_depth": 6,
    "min_rows": 3,
    "window": 200,
    "backprop": True,
    "tiny": 1e-7,
    "plateau": 0.01,
}
BACKPROP_KEY = "vanishing.backprop_rms"


@dataclass
class _State:
    opts: dict[str, Any]
    modules: list[nn.Module] = field(default_factory=list)
    position: dict[int, int] = field(default_factory=dict)
    sums: torch.Tensor | None = None  # float64 [2, M]: sum of squares, element count
    perm: torch.Tensor | None = None
    rows: dict[str, deque[tuple[int, torch.Tensor]]] = field(default_factory=dict)
    reported: tuple[Any, ...] | None = None


KEY = StashKey[_State]()


def weight_layers(model: ModelInfo) -> list[int]:
    """Columns of the layers the depth detectors judge: weights of ≥ 2 dimensions, no embeddings."""
    out = []
    for layer in model.layers:
        weight = getattr(layer.module, "weight", None)
        if (
            isinstance(weight, torch.Tensor)
            and weight.dim() >= 2
            and "weight" in layer.param_names
            and not isinstance(layer.module, (nn.Embedding, nn.EmbeddingBag))
        ):
            out.append(layer.index)
    return out


def _validate(opts: Any, defaults: dict[str, Any], plugin: str) -> dict[str, Any]:
    unknown = set(opts) - set(defaults)
    if unknown:
        raise GradWatchError(f"unknown {plugin} option(s) {sorted(unknown)}; known: {sorted(defaults)}")
    merged = {**defaults, **opts}
    for name, default in defaults.items():
        value = merged[name]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise GradWatchError(f"{plugin} option {name} must be True or False, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GradWatchError(f"{plugin} option {name} must be a positive integer, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            raise GradWatchError(f"{plugin} option {name} must be a positive number (default {default}), got {value!r}")
    return merged


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    opts = _validate(config.plugin_options("vanishing"), _DEFAULTS, "vanishing")
    if opts["max_decay"] >= 1:
        raise GradWatchError(f"vanishing option max_decay must be below 1 (a shrinking trend), got {opts['max_decay']}")
    ctx.stash[KEY] = _State(opts=opts)


@hookimpl
def gradwatch_attach(model: ModelInfo, ctx: StepContext) -> None:
    state = ctx.stash[KEY]
    if not state.opts["backprop"]:
        return
    for layer in model.layers:
        state.position[id(layer.module)] = len(state.modules)
        state.modules.append(layer.module)
        ctx.probes.forward_hook(layer.module, _probe(state, len(state.modules) - 1), sampled=True)
    device = next(iter(model.model.parameters())).device
    state.sums = torch.zeros(2, len(state.modules), dtype=torch.float64, device=device)


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.requires_grad and out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _outputs(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _outputs(item)]
    return []


def _probe(state: _State, index: int) -> Any:
    def on_grad(grad: torch.Tensor) -> None:
        # Sampled steps only, on device; float64 so 1e-30 does not square to zero.
        sums = state.sums
        assert sums is not None
        sums[0, index] += torch.linalg.vector_norm(grad, dtype=torch.float64).square()
        sums[1, index] += grad.numel()

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        # The tensor hook dies with the graph; it fires for every call of a shared module,
        # and sees the gradient of the value before a later in-place op (ReLU(inplace=True)).
        if torch.is_grad_enabled():
            for t in _outputs(out):
                t.register_hook(on_grad)

    return hook


@hookimpl
def gradwatch_collect(grads: GradBatch, ctx: StepContext) -> dict[str, torch.Tensor] | None:
    state = ctx.stash[KEY]
    if state.sums is None or not ctx.sampled:
        return None
    if state.perm is None or state.perm.numel() != len(ctx.model.layers):
        order = [state.position.get(id(layer.module), 0) for layer in ctx.model.layers]
        state.perm = torch.tensor(order, dtype=torch.int64, device=state.sums.device)
    sums = state.sums
    # NaN where a layer's output got no gradient this step (unused), so it is ignored.
    rms = torch.where(sums[1] > 0, (sums[0] / sums[1].clamp_min(1)).sqrt(), math.nan)[state.perm]
    sums.zero_()
    return {BACKPROP_KEY: rms.float()}


def _keep(state: _State, name: str, steps: torch.Tensor, values: torch.Tensor, last_step: int) -> None:
    rows = state.rows.setdefault(name, deque())
    for step, row in zip(steps.tolist(), values):
        rows.append((int(step), row))
    while rows and rows[0][0] <= last_step - state.opts["window"]:
        rows.popleft()


def profile(rows: deque[tuple[int, torch.Tensor]], columns: list[int]) -> torch.Tensor:
    """Geometric mean over rows per column, ignoring zero, missing and non-finite values."""
    values = torch.stack([row for _, row in rows])[:, columns].double()
    ok = torch.isfinite(values) & (values > 0)
    logs = torch.where(ok, values.clamp_min(1e-300).log(), torch.zeros_like(values))
    count = ok.sum(0)
    return torch.where(count > 0, (logs.sum(0) / count.clamp_min(1)).exp(), math.nan)


def fit_decay(v: torch.Tensor) -> float:
    """``exp(-slope)`` of the least-squares fit of ``log v`` over depth (finite entries)."""
    x = torch.arange(v.numel(), dtype=torch.float64)
    ok = torch.isfinite(v) & (v > 0)
    x, y = x[ok], v[ok].log()
    if x.numel() < 2:
        return math.nan
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / xc.square().sum())
    return math.exp(-slope)


@hookimpl
def gradwatch_diagnose(window: StatsWindow, model: ModelInfo, ctx: StepContext) -> list[Diagnosis] | None:
    state = ctx.stash[KEY]
    opts = state.opts
    last = window.last_step
    if len(window):
        _keep(state, "weight_grad", window.steps, window.grad_rms, last)
    series = window.extras.get(BACKPROP_KEY)
    if series is not None and len(series.steps):
        _keep(state, "backprop", series.steps, series.values, last)
    if len(window.weight_norm.steps) and len(window):
        at = {int(s): k for k, s in enumerate(window.steps.tolist())}
        pairs = [(k, at[int(s)]) for k, s in enumerate(window.weight_norm.steps.tolist()) if int(s) in at]
        if pairs:
            w = window.weight_norm.values[[p for p, _ in pairs]]
            g = window.grad_norm[[q for _, q in pairs]]
            steps = window.weight_norm.steps[[p for p, _ in pairs]]
            _keep(state, "grad_to_weight", steps, g / w.clamp_min(1e-30), last)
    loss = window.extras.get("core.loss")
    if loss is not None and len(loss.steps):
        _keep(state, "loss", loss.steps, loss.values.reshape(-1, 1), last)
    columns = weight_layers(model)
    depth = len(columns)
    if depth < opts["min_depth"]:
        return _tiny(state, columns, [window.layers[c] for c in columns], opts)
    verdict = None
    for signal in ("backprop", "weight_grad", "grad_to_weight"):
        rows = state.rows.get(signal)
        if not rows or len(rows) < opts["min_rows"]:
            continue
        verdict = _judge(signal, profile(rows, columns), [window.layers[c] for c in columns], rows[0][0], opts)
        break
    if verdict is None:
        return _tiny(state, columns, [window.layers[c] for c in columns], opts)
    # Noise moves a layer or two across the starved line between intervals: that is the
    # same condition, and so is the same starvation seen first in the weight gradients and
    # then in the backprop signal: the key is the share of the stack starved, in quarters.
    key = (round(4 * len(verdict.layers) / depth),)
    if key == state.reported:
        return None
    state.reported = key
    return [verdict]


def _tiny(state: _State, columns: list[int], names: list[str], opts: dict[str, Any]) -> list[Diagnosis] | None:
    """Tiny gradients everywhere while the recorded loss stays on a plateau."""
    rows, losses = state.rows.get("weight_grad"), state.rows.get("loss")
    if not columns or not rows or not losses or len(rows) < opts["min_rows"] or len(losses) < 3 * opts["min_rows"]:
        state.reported = None
        return None
    v = profile(rows, columns)
    loss = torch.stack([value.reshape(()) for _, value in losses]).double()
    third = max(1, loss.numel() // 3)
    before, after = float(loss[:third].mean()), float(loss[-third:].mean())
    gmax = float(torch.nan_to_num(v, nan=0.0).max()) if v.numel() else math.nan  # all-zero columns are NaN in the profile
    drop = (before - after) / abs(before) if before else 0.0
    if not (gmax < opts["tiny"] and math.isfinite(before) and drop < opts["plateau"]):
        state.reported = None
        return None
    key = ("tiny",)
    if key == state.reported:
        return None
    state.reported = key
    return [
        Diagnosis(
            kind="vanishing",
            severity=Severity.WARNING,
            step=losses[0][0],
            layers=tuple(names),
            message=(
                f"every layer's gradient RMS is below {opts['tiny']:.0e} (largest {gmax:.1e}) while the loss "
                f"stays at {after:.3g} ({100 * drop:+.2f}% over the window): the network has stopped learning "
                "without converging"
            ),
            evidence={
                "ratio": None,
                "decay_per_layer": None,
                "depth": len(columns),
                "signal": "absolute",
                "early_rms": float(v[0]),
                "late_rms": float(v[-1]),
                "threshold": opts["tiny"],
                "max_rms": gmax,
                "loss_before": before,
                "loss_after": after,
                "per_layer": dict(zip(names, v.tolist())),
            },
            source="vanishing",
        )
    ]


def _judge(signal: str, v: torch.Tensor, names: list[str], first_step: int, opts: dict[str, Any]) -> Diagnosis | None:
    depth = v.numel()
    quarter = max(1, depth // 4)
    finite = torch.isfinite(v) & (v > 0)
    early_v, late_v = v[:quarter][finite[:quarter]], v[-quarter:][finite[-quarter:]]
    if not early_v.numel() or not late_v.numel():
        return None
    early, late = float(early_v.log().mean().exp()), float(late_v.log().mean().exp())
    ratio = early / late
    decay = fit_decay(v)
    attenuation = decay ** (depth - 1) if math.isfinite(decay) else math.nan
    threshold = opts["ratio"]
    if not (decay < opts["max_decay"] and (ratio < threshold or attenuation < threshold)):
        return None
    starved = tuple(n for n, x in zip(names, v.tolist()) if not (x >= opts["starved"] * late))
    starved = starved or (names[0],)
    what = {
        "backprop": "the gradient reaching the layer outputs",
        "weight_grad": "the weight gradients",
        "grad_to_weight": "the gradient-to-weight ratio",
    }[signal]
    return Diagnosis(
        kind="vanishing",
        severity=Severity.WARNING,
        step=first_step,
        layers=starved,
        message=(
            f"{what} shrink ×{decay:.2f} per layer toward the input: the first {quarter} of {depth} layers get "
            f"{ratio:.1e} of the RMS of the last {quarter}, so {len(starved)} early layer(s) barely learn"
        ),
        evidence={
            "ratio": ratio,
            "decay_per_layer": decay,
            "attenuation": attenuation,
            "depth": depth,
            "signal": signal,
            "early_rms": early,
            "late_rms": late,
            "threshold": threshold,
            "per_layer": dict(zip(names, v.tolist())),
        },
        source="vanishing",
    )


@hookimpl
def gradwatch_state_dict(ctx: StepContext) -> dict[str, Any] | None:
    return {"vanishing": {"reported": ctx.stash[KEY].reported}}


@hookimpl
def gradwatch_load_state_dict(state: dict[str, Any], ctx: StepContext) -> None:
    mine = state.get("vanishing")
    if mine:
        reported = mine.get("reported")
        ctx.stash[KEY].reported = tuple(reported) if reported else None
