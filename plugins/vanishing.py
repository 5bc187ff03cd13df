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
  two noisy end layers); and no layer of the deeper half is as starved as the first
  quarter (a healthy transformer's query/key projections get ~1e-7 gradients at init in
  every block: a layer-type effect, not a decay with depth);
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch import Diagnosis, GradBatch, ModelInfo, Severity, StashKey, StatsWindow, StepContext, WatchConfig, hookimpl
from gradwatch.kit import fit_decay, float_tensors, num, plugin_options, profile, times, weight_layers

if TYPE_CHECKING:
    from gradwatch.stats import History

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
    reported: tuple[Any, ...] | None = None


KEY = StashKey[_State]()


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    opts = plugin_options(config, "vanishing", _DEFAULTS, bounds={"max_decay": (0.0, 1.0)})
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
            for t in float_tensors(out):
                if t.requires_grad:
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


@hookimpl
def gradwatch_diagnose(window: StatsWindow, model: ModelInfo, history: History, ctx: StepContext) -> list[Diagnosis] | None:
    state = ctx.stash[KEY]
    opts = state.opts
    recent = history.since(window.last_step - opts["window"] + 1)
    columns = weight_layers(model)
    names = [history.layers[c] for c in columns]
    depth = len(columns)
    if depth < opts["min_depth"]:
        return _tiny(state, recent, columns, names, opts)
    verdict = None
    for signal, (steps, rows) in _signals(recent).items():
        if len(steps) < opts["min_rows"]:
            continue
        verdict = _judge(signal, profile(rows, columns), names, int(steps[0]), opts)
        break
    if verdict is None:
        return _tiny(state, recent, columns, names, opts)
    # Noise moves a layer or two across the starved line between intervals: that is the
    # same condition, and so is the same starvation seen first in the weight gradients and
    # then in the backprop signal: the key is the share of the stack starved, in quarters.
    key = (round(4 * len(verdict.layers) / depth),)
    if key == state.reported:
        return None
    state.reported = key
    return [verdict]


def _signals(recent: History) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(steps, [S, L] rows)`` of each signal over the judged window, best first."""
    backprop = recent.extras.get(BACKPROP_KEY)
    out = {}
    if backprop is not None:
        out["backprop"] = (backprop.steps, backprop.values)
    out["weight_grad"] = (recent.steps, recent.grad_rms)
    # ‖g‖/‖w‖ on the sampled steps that also read gradients (all of them do).
    at = {int(s): k for k, s in enumerate(recent.steps.tolist())}
    pairs = [(k, at[int(s)]) for k, s in enumerate(recent.weight_norm.steps.tolist()) if int(s) in at]
    w = recent.weight_norm.values[[p for p, _ in pairs]]
    g = recent.grad_norm[[q for _, q in pairs]]
    out["grad_to_weight"] = (recent.weight_norm.steps[[p for p, _ in pairs]], g / w.clamp_min(1e-30))
    return out


def _tiny(state: _State, recent: History, columns: list[int], names: list[str], opts: dict[str, Any]) -> list[Diagnosis] | None:
    """Tiny gradients everywhere while the recorded loss stays on a plateau."""
    losses = recent.loss
    if not columns or len(recent) < opts["min_rows"] or len(losses.steps) < 3 * opts["min_rows"]:
        state.reported = None
        return None
    v = profile(recent.grad_rms, columns)
    loss = losses.values.double()
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
            step=int(losses.steps[0]),
            layers=tuple(names),
            message=(
                f"every layer's gradient RMS is below {num(opts['tiny'])} (largest {num(gmax)}) while the loss "
                f"stays at {num(after)} (down {num(100 * drop)}% over the window): the network has stopped learning "
                "without converging"
            ),
            summary=f"largest layer gradient RMS {num(gmax)} while the loss stays at {num(after)}",
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
                "loss_drop_percent": 100 * drop,
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
    deep = v[depth // 2 :][finite[depth // 2 :]]
    if deep.numel() and float(deep.min()) <= early:
        # A layer of the deeper half is as starved as the early ones: a layer-type effect
        # (a transformer's query/key projections at init, in every block), not a decay with depth.
        return None
    decay = fit_decay(v)
    attenuation = decay ** (depth - 1) if math.isfinite(decay) else math.nan
    threshold = opts["ratio"]
    if not (decay < opts["max_decay"] and (ratio < threshold or attenuation < threshold)):
        return None
    starved = tuple(n for n, x in zip(names, v.tolist()) if not (x >= opts["starved"] * late))
    starved = starved or (names[0],)
    what = {
        "backprop": "the gradient reaching the layer outputs shrinks",
        "weight_grad": "the weight gradients shrink",
        "grad_to_weight": "the gradient-to-weight ratio shrinks",
    }[signal]
    return Diagnosis(
        kind="vanishing",
        severity=Severity.WARNING,
        step=first_step,
        layers=starved,
        message=(
            f"{what} {times(decay)} per layer toward the input: the first {quarter} of {depth} layers get "
            f"{num(ratio)} of the RMS of the last {quarter}, so {len(starved)} early layer(s) barely learn"
        ),
        summary=f"early/late gradient RMS ratio {num(ratio)}, {times(decay)} per layer ({signal})",
        evidence={
            "ratio": ratio,
            "decay_per_layer": decay,
            "attenuation": attenuation,
            "depth": depth,
            "quarter": quarter,
            "starved": len(starved),
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
