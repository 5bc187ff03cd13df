"""Initialisation: weight scale against the Kaiming/Xavier expectation (kind ``init_scale``).

For each ``Linear``/``Conv`` layer whose output reaches an activation before any
normalisation layer, the weight standard deviation (measured at attach, i.e. at
initialisation for a fresh model) is compared with what keeps the signal's variance
through that activation: Kaiming/He et al. 2015 ``gain/sqrt(fan_in)`` for the ReLU
family, Xavier/Glorot ``gain·sqrt(2/(fan_in+fan_out))`` for sigmoid and tanh, with
``nn.init.calculate_gain``. Per-layer gains ``std/expected`` multiply along a chain of
such layers (a normalisation layer, or a layer without an activation, ends the chain),
so the product is what the signal does over depth: ``0.71^29 = 4e-5`` for a 30-layer
ReLU net drawn with ``std = sqrt(1/fan_in)``.

The activation that follows each layer comes from ``torch.fx`` where the model traces
(functional activations included), else from module order. Reported once, at the first
report interval.

Options (``options={"init": {...}}``):

* ``depth_gain`` (float, default ``100``): a chain whose product of gains is below
  ``1/depth_gain`` or above ``depth_gain`` is a warning.
* ``info_gain`` (float, default ``10``): the same bound for an info diagnosis.
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
from gradwatch.kit import num, plugin_options

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


def chains(scales: list[anatomy.LayerScale], anat: anatomy.Anatomy) -> list[list[anatomy.LayerScale]]:
    """Split judged layers into chains of consecutive layers (forward order) whose scale
    compounds: a weight layer that is not judged (it feeds a norm layer or no activation)
    ends a chain."""
    by_name = {s.name: s for s in scales}
    out: list[list[anatomy.LayerScale]] = [[]]
    for name in anat.weight_layers:
        if name in by_name:
            out[-1].append(by_name[name])
        elif out[-1]:
            out.append([])
    return [c for c in out if c]


@hookimpl
def gradwatch_diagnose(window: StatsWindow, model: ModelInfo, ctx: StepContext) -> list[Diagnosis] | None:
    state = ctx.stash[KEY]
    if state.done:
        return None
    state.done = True
    anat = anatomy.cached(ctx, model)
    scales = [s for s in anatomy.init_scales(model.model, anat, state.stds) if s.expected > 0 and s.std > 0]
    worst, worst_log = None, 0.0
    off: list[anatomy.LayerScale] = []
    for chain in chains(scales, anat):
        log_gain = sum(math.log(s.gain) for s in chain)
        if abs(log_gain) >= math.log(state.info_gain):
            off += [s for s in chain if abs(math.log(s.gain)) > math.log(state.layer_tol)]
        if abs(log_gain) > abs(worst_log):
            worst, worst_log = chain, log_gain
    if not off or worst is None:
        return None
    depth_gain = math.exp(worst_log) if worst_log < 709.0 else math.inf  # a chain of 130 layers ×1000 overflows exp
    severity = Severity.WARNING if abs(worst_log) >= math.log(state.depth_gain) else Severity.INFO
    scheme = Counter(s.scheme for s in off).most_common(1)[0][0]
    mean_gain = math.exp(sum(math.log(s.gain) for s in off) / len(off))
    acts = sorted({s.activation for s in off})
    return [
        Diagnosis(
            kind="init_scale",
            severity=severity,
            step=window.first_step,
            layers=tuple(s.name for s in off),
            message=(
                f"{len(off)} layer(s) are initialised at ×{mean_gain:.2g} (geometric mean) of the {scheme} std for the "
                f"{'/'.join(acts)} that follows; over a chain of {len(worst)} such layers the signal scales by {depth_gain:.2g}"
            ),
            summary=f"depth gain {num(depth_gain)} over a chain of {len(worst)} layers",
            evidence={
                "std": {s.name: s.std for s in off},
                "expected_std": {s.name: s.expected for s in off},
                "scheme": scheme,
                "schemes": {s.name: s.scheme for s in off},
                "activation": {s.name: s.activation for s in off},
                "gain": {s.name: s.gain for s in off},
                "depth_gain": depth_gain,
                "chain": [s.name for s in worst],
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
