"""Dead and saturated units, from forward hooks on activation modules on sampled steps.

* **dead_units**: for each ``nn.ReLU`` / ``nn.ReLU6`` module, the fraction of its units that output zero for every sample
  of the sampled batch. A unit is a feature (last dimension) for 2-d and 3-d outputs
  (``[N, F]``, ``[N, T, F]``) and a channel for conv outputs (``[N, C, ...]``).
* **saturation**: for each ``nn.Sigmoid``/``nn.Tanh`` module, the fraction of outputs
  whose derivative is below ``derivative`` (``σ(1-σ)`` for sigmoid, ``1-tanh²`` for tanh).

The work (a comparison and a reduction per activation call) runs on device, on sampled
steps only, and is summed over calls (a module called several times, or gradient
accumulation). Healthy deep ReLU nets have tens of percent of dead units in a layer at
initialisation, so the verdict needs a high fraction on every one of at least
``min_samples`` sampled steps in the window.

Options (``options={"activations": {...}}``): ``dead`` (0.9: fraction of dead units that
condemns a layer; AUTOTRAINER uses 0.7 of zero gradients), ``saturated`` (0.9),
``derivative`` (0.01), ``min_samples`` (3), ``window`` (200 steps). Functional
activations (``torch.relu`` inside ``forward``) are not seen: only modules are hooked.

A condition is reported once, and again when the set of layers changes.
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
    ModelInfo,
    Severity,
    StashKey,
    StatsWindow,
    StepContext,
    WatchConfig,
    hookimpl,
)
from gradwatch.kit import plugin_options

_DEFAULTS: dict[str, Any] = {"dead": 0.9, "saturated": 0.9, "derivative": 0.01, "min_samples": 3, "window": 200}
_RECTIFIERS = (nn.ReLU, nn.ReLU6)
_SQUASHERS = (nn.Sigmoid, nn.Tanh)
DEAD_KEY, SAT_KEY = "activations.dead", "activations.saturated"


@dataclass
class _State:
    opts: dict[str, Any]
    names: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    sums: torch.Tensor | None = None  # float32 [2, A]: summed fraction, calls
    rows: deque[tuple[int, torch.Tensor]] = field(default_factory=deque)
    reported: dict[str, tuple[str, ...]] = field(default_factory=dict)


KEY = StashKey[_State]()


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    # dead, saturated, derivative: fractions in (0, 1).
    fraction = (0.0, 1.0)
    opts = plugin_options(
        config, "activations", _DEFAULTS, bounds={"dead": fraction, "saturated": fraction, "derivative": fraction}
    )
    ctx.stash[KEY] = _State(opts=opts)


@hookimpl
def gradwatch_attach(model: ModelInfo, ctx: StepContext) -> None:
    state = ctx.stash[KEY]
    for name, module in model.model.named_modules():
        if isinstance(module, _RECTIFIERS + _SQUASHERS):
            state.names.append(name)
            state.kinds.append(type(module).__name__)
            ctx.probes.forward_hook(module, _probe(state, len(state.names) - 1, module), sampled=True)
    if state.names:
        device = next(iter(model.model.parameters())).device
        state.sums = torch.zeros(2, len(state.names), dtype=torch.float32, device=device)


def _dead_fraction(out: torch.Tensor) -> torch.Tensor:
    if out.dim() <= 1:
        return (out == 0).all().float()
    alive = out != 0
    if out.dim() == 2 or out.dim() == 3:
        alive = alive.flatten(0, -2).any(0)  # per feature
    else:
        alive = alive.transpose(0, 1).flatten(1).any(1)  # per channel
    return 1.0 - alive.float().mean()


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
            value = _dead_fraction(out)
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
    sums = state.sums
    fraction = torch.where(sums[1] > 0, sums[0] / sums[1].clamp_min(1), math.nan)
    sums.zero_()
    return {DEAD_KEY: fraction}


@hookimpl
def gradwatch_diagnose(window: StatsWindow, model: ModelInfo, ctx: StepContext) -> list[Diagnosis] | None:
    state = ctx.stash[KEY]
    opts = state.opts
    series = window.extras.get(DEAD_KEY)
    if series is not None:
        for step, row in zip(series.steps.tolist(), series.values):
            state.rows.append((int(step), row))
    while state.rows and state.rows[0][0] <= window.last_step - opts["window"]:
        state.rows.popleft()
    if len(state.rows) < opts["min_samples"]:
        return None
    values = torch.stack([row for _, row in state.rows])
    seen = torch.isfinite(values).sum(0)
    # Sustained: the smallest fraction over the sampled steps in the window.
    low = torch.where(torch.isfinite(values), values, torch.ones_like(values)).amin(0)
    out = []
    for kind, classes, limit in (
        ("dead_units", ("ReLU", "ReLU6"), opts["dead"]),
        ("saturation", ("Sigmoid", "Tanh"), opts["saturated"]),
    ):
        cols = [
            k
            for k, t in enumerate(state.kinds)
            if t in classes and int(seen[k]) >= opts["min_samples"] and float(low[k]) >= limit
        ]
        layers = tuple(state.names[k] for k in cols)
        if not layers:
            state.reported.pop(kind, None)
            continue
        if state.reported.get(kind) == layers:
            continue
        state.reported[kind] = layers
        activation = state.kinds[cols[0]]
        worst = max(float(low[k]) for k in cols)
        what = "output zero for every sample" if kind == "dead_units" else f"have a derivative below {opts['derivative']}"
        out.append(
            Diagnosis(
                kind=kind,
                severity=Severity.WARNING,
                step=state.rows[0][0],
                layers=layers,
                message=(
                    f"in {len(layers)} {activation} module(s) at least {limit:.0%} of the units {what} "
                    f"on every one of {len(state.rows)} sampled steps (up to {worst:.0%})"
                ),
                summary=f"{worst:.0%} of the units of {state.names[max(cols, key=lambda k: float(low[k]))]!r} "
                f"{'dead' if kind == 'dead_units' else 'saturated'}",
                evidence={
                    "fraction": {state.names[k]: float(low[k]) for k in cols},
                    "activation": activation,
                    "threshold": limit,
                    "steps_seen": len(state.rows),
                },
                source="activations",
            )
        )
    return out or None
