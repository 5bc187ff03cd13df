"""Initialisation: weight scale against the Kaiming/Xavier expectation (kind ``init_scale``).

For each ``Linear``/``Conv`` layer whose output reaches an activation before any
normalisation layer, the weight standard deviation (measured at attach, i.e. at
initialisation for a fresh model) is compared with what keeps the signal's variance
through that activation: Kaiming/He et al. 2015 ``gain/sqrt(fan_in)`` for the ReLU
family, Xavier/Glorot ``gain·sqrt(2/(fan_in+fan_out))`` for sigmoid and tanh, with
``nn.init.calculate_gain``. What those gains do to the signal is predicted along the real
signal path (:func:`gradwatch.anatomy.predict_signal`): layer gains multiply, a normalisation
layer resets the scale, and a residual sum ``x + f(x)`` adds the variances of its two sides,
so a block is judged per branch and its identity path keeps the gain near 1 (gain
``sqrt(1 + G²)`` for a branch of gain ``G``). A plain 30-layer ReLU net drawn with ``std =
sqrt(1/fan_in)`` scales the signal by ``0.71^29 = 4e-5``; the same layers as 12 residual
blocks scale it by about ×3, and no verdict is given.

The prediction is checked against the gradients of the steps seen: when the first quarter
of the layers on the path gets ×10 (or 1/10) the gradient RMS of the last quarter in the
opposite direction to the prediction (init looks small, but the gradients grow toward the
input; or looks large, but they shrink, as behind sigmoids), the diagnosis is an info that
says "not the cause", and the advisor offers no re-initialisation for it.

The activation that follows each layer comes from ``torch.fx`` where the model traces
(functional activations included), else from module order (then a model that looks
residual gets no prediction: its signal path is not known). Reported once, at the first
report interval.

Options (``options={"init": {...}}``):

* ``depth_gain`` (float, default ``100``): a predicted scale below ``1/depth_gain`` or
  above ``depth_gain`` is a warning.
* ``info_gain`` (float, default ``10``): the same bound for an info diagnosis, and the
  margin by which the gradients must contradict a prediction.
* ``layer_tol`` (float, default ``1.25``): a layer is named as mis-scaled when its gain is
  outside ``[1/layer_tol, layer_tol]``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from gradwatch import (
    Diagnosis,
    GradWatchError,
    ModelInfo,
    Severity,
    StashKey,
    StatsWindow,
    StepContext,
    WatchConfig,
    anatomy,
    hookimpl,
)
from gradwatch.kit import exp as _exp
from gradwatch.kit import num, plugin_options, profile, times

_DEFAULTS = {"depth_gain": 100.0, "info_gain": 10.0, "layer_tol": 1.25}


@dataclass
class InitState:
    """Per-watch state: options, weight stds at attach, whether the verdict was given."""

    depth_gain: float
    info_gain: float
    layer_tol: float
    stds: dict[str, float] = field(default_factory=dict)
    done: bool = False


KEY = StashKey[InitState]()


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    # Each is a factor > 1.
    values = plugin_options(config, "init", _DEFAULTS, bounds=dict.fromkeys(_DEFAULTS, (1.0, None)))
    if values["info_gain"] > values["depth_gain"]:
        raise GradWatchError(f"init info_gain ({values['info_gain']:g}) must not exceed depth_gain ({values['depth_gain']:g})")
    ctx.stash[KEY] = InitState(**{k: float(v) for k, v in values.items()})


@hookimpl
def gradwatch_attach(model: ModelInfo, ctx: StepContext) -> None:
    # The weights at attach are the initialisation (for a fresh model); one host read.
    named = [(n, m.weight) for n, m in model.model.named_modules() if isinstance(m, anatomy.INIT_TYPES)]
    if named:
        with torch.no_grad():
            stds = torch.stack(
                [(w.full_tensor() if hasattr(w, "full_tensor") else w).detach().float().std().cpu() for _, w in named]
            ).tolist()
        ctx.stash[KEY].stds = dict(zip((n for n, _ in named), stds))


def measured_early_late(window: StatsWindow, model: ModelInfo, layers: tuple[str, ...]) -> float | None:
    """Geometric-mean gradient RMS of the first quarter of ``layers`` over the last
    quarter's, over the window's rows (``None`` for fewer than 4 layers or no finite rows)."""
    columns = [window.layers.index(n) for n in layers if n in window.layers]
    if len(columns) < 4 or not len(window):
        return None
    v = profile(window.grad_rms, columns)
    q = max(1, len(columns) // 4)
    early, late = v[:q], v[-q:]
    if not (torch.isfinite(early).all() and torch.isfinite(late).all()):
        return None
    return float(early.log().mean().exp() / late.log().mean().exp())


@hookimpl
def gradwatch_diagnose(window: StatsWindow, model: ModelInfo, ctx: StepContext) -> list[Diagnosis] | None:
    state = ctx.stash[KEY]
    if state.done:
        return None
    state.done = True
    anat = anatomy.cached(ctx, model)
    scales = [s for s in anatomy.init_scales(model.model, anat, state.stds) if s.expected > 0 and s.std > 0]
    prediction = anatomy.predict_signal(model.model, anat, scales, state.stds)
    if prediction is None:
        return None
    log_gain = math.log(prediction.gain)
    if abs(log_gain) < math.log(state.info_gain):
        return None
    on_path = set(prediction.layers)
    off = [s for s in scales if s.name in on_path and abs(math.log(s.gain)) > math.log(state.layer_tol)]
    if not off:
        return None
    depth_gain = prediction.gain
    severity = Severity.WARNING if abs(log_gain) >= math.log(state.depth_gain) else Severity.INFO
    scheme = Counter(s.scheme for s in off).most_common(1)[0][0]
    mean_gain = _exp(sum(math.log(s.gain) for s in off) / len(off))
    acts = sorted({s.activation for s in off})
    n = len(prediction.layers)
    if prediction.branches:
        path = (
            f"along the signal path to {prediction.at!r} ({n} layers; {len(prediction.branches)} residual additions, "
            "each branch summed with its skip path)"
        )
    else:
        path = f"over a chain of {n} such layers"
    # What the gradients did on the steps seen: a prediction they contradict is not the cause.
    measured = measured_early_late(window, model, prediction.layers)
    small = depth_gain < 1
    contradicted = measured is not None and (
        (small and measured >= state.info_gain) or (not small and measured <= 1 / state.info_gain)
    )
    looks = f"{len(off)} layer(s) are initialised at {times(mean_gain)} (geometric mean) of the {scheme} std for the {'/'.join(acts)} that follows"
    if contradicted:
        severity = Severity.INFO
        message = (
            f"init looks {'small' if small else 'large'}: {looks}, and {path} the signal would scale by {num(depth_gain)}; "
            f"but the gradients {'grow' if small else 'shrink'} toward the input (first/last quarter gradient RMS "
            f"{num(measured)} on the steps seen): not the cause"
        )
        summary = (
            f"init predicts a depth gain of {num(depth_gain)}, but the gradients {'grow' if small else 'shrink'}: not the cause"
        )
    else:
        message = f"{looks}; {path} the signal scales by {num(depth_gain)}"
        summary = f"depth gain {num(depth_gain)} over {n} layers" + (" (residual paths followed)" if prediction.branches else "")
    return [
        Diagnosis(
            kind="init_scale",
            severity=severity,
            step=window.first_step,
            layers=tuple(s.name for s in off),
            message=message,
            summary=summary,
            evidence={
                "std": {s.name: s.std for s in off},
                "expected_std": {s.name: s.expected for s in off},
                "scheme": scheme,
                "schemes": {s.name: s.scheme for s in off},
                "activation": {s.name: s.activation for s in off},
                "gain": {s.name: s.gain for s in off},
                "depth_gain": depth_gain,
                "chain": list(prediction.layers),
                "at": prediction.at,
                "method": prediction.method,
                "branches": {
                    b.add: {"layers": list(b.layers), "gain": b.gain, "skip": list(b.skip), "skip_gain": b.skip_gain}
                    for b in prediction.branches
                },
                "measured_early_late": measured,
                "contradicted": contradicted,
                "activation_source": "fx" if anat.traced else "module order",
                "threshold": state.depth_gain,
            },
            source="init",
        )
    ]


@hookimpl
def gradwatch_state_dict(ctx: StepContext) -> dict[str, Any] | None:
    state = ctx.stash[KEY]
    return {"init": {"stds": dict(state.stds), "done": state.done}}


@hookimpl
def gradwatch_load_state_dict(state: dict[str, Any], ctx: StepContext) -> None:
    saved = state.get("init")
    if saved:
        own = ctx.stash[KEY]
        own.stds = dict(saved.get("stds", own.stds))  # the initial weights, not the resumed ones
        own.done = bool(saved.get("done", False))
