"""Non-finite detector: the step and the first module whose output or gradient became NaN/Inf.

A NaN at step ``k`` poisons every weight after step ``k``, so the module that produced it
can only be named from the forward pass of step ``k`` itself. How, at a cost far below
``torch.autograd.detect_anomaly`` (``benchmarks/detectors.py`` measures both):

* **Outputs.** A forward hook on every module keeps a reference to its floating-point
  output(s): no kernel, a list append. When the root module's forward returns, one
  reduction reads them all (outputs are still alive for backward, so nothing is kept
  longer; see below for which reduction); the position of the first non-finite output in
  completion order (a module completes after its children, so this is the module that
  produced the value) goes into a device tensor, stamped with the step at the optimizer
  step (``gradwatch_act``). No host sync: the host reads it once per report interval.
  ``outputs="every_step"`` does this on every step; ``outputs="sampled"`` on sampled steps
  only (nearly free, but a NaN between sampled steps is then seen in the gradients only,
  without its module). The default, ``outputs="auto"``, is ``every_step`` for models of
  at most ``max_modules`` (128) modules; on larger ones, where a hook per module per step
  costs more than a pass over the gradients (400 tiny modules add ~25% to a CPU step),
  the model's own output is checked every step (the exact step, with a message saying
  how to get the module named) and each module on sampled steps.
* **Gradients.** ``window.nonfinite`` (per-layer count of non-finite gradient tensors, on
  statistics steps) gives a gradient that became non-finite while every output was
  finite (a NaN from a custom backward, or from the loss): ``where="gradient"``, step
  exact to ``stats_every`` steps, layer = the one nearest the output whose gradient is
  non-finite (backward enters the NaN there and carries it toward the input).
* Steps that ``GradScaler`` skipped (``window.amp_skips``) are loss-scale overflows, not
  errors, and are ignored.

On accelerators the check is a float64 foreach L2 norm (it cannot overflow); on CPU, where
torch's float64 and inf foreach norms are slow, it is max|x| from per-tensor ``aminmax``
(exact, NaN-propagating, one vectorised pass). Either way no Python branch on a value.
Limitation: an in-place operation that poisons an earlier module's output tensor is blamed on that
earlier module.

Options (``options={"nonfinite": {...}}``):

* ``outputs`` (``"auto"`` | ``"every_step"`` | ``"sampled"`` | ``"off"``, default ``"auto"``).
* ``max_modules`` (int, default 128): the size up to which ``"auto"`` checks every module
  on every step.

A condition is reported once; after it, the detector re-arms only when a whole report
interval is finite again (training recovered, e.g. with ``on_nonfinite="skip"``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwatch import Diagnosis, GradBatch, ModelInfo, Severity, StashKey, StatsWindow, StepContext, WatchConfig, hookimpl
from gradwatch.kit import float_tensors, plugin_options

_MODES = ("auto", "every_step", "sampled", "off")
_MIN = operator.itemgetter(0)
_MAX = operator.itemgetter(1)
_DEFAULTS: dict[str, Any] = {"outputs": "auto", "max_modules": 128}


@dataclass
class _State:
    mode: str
    max_modules: int = 128
    modules_sampled: bool = False  # "auto" on a model of many modules: per-module checks sampled
    names: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    outs: list[torch.Tensor] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    id_cache: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    # pending [module, value] of this step's forwards; first [step, module, value]; -1 = none.
    pending: torch.Tensor | None = None
    first: torch.Tensor | None = None
    armed: bool = True
    reported: Diagnosis | None = None


KEY = StashKey[_State]()


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    opts = plugin_options(config, "nonfinite", _DEFAULTS, bounds={"max_modules": (0, None)}, choices={"outputs": _MODES})
    ctx.stash[KEY] = _State(mode=opts["outputs"], max_modules=opts["max_modules"])


@hookimpl
def gradwatch_attach(model: ModelInfo, ctx: StepContext) -> None:
    state = ctx.stash[KEY]
    if state.mode == "off":
        return
    root = model.model
    device = next(iter(root.parameters())).device
    state.pending = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=device)
    state.first = torch.tensor([-1.0, -1.0, 0.0], dtype=torch.float64, device=device)
    count = sum(1 for _ in root.modules())
    # "auto": a forward hook per module costs a few microseconds a call, nothing next to a
    # large layer and a lot next to many tiny ones (200 Linear(64) layers: +25% a step).
    # Past max_modules the model's own output is still checked on every step (the exact
    # step), and each module on sampled steps.
    state.modules_sampled = state.mode == "sampled" or (state.mode == "auto" and count > state.max_modules)
    sampled = state.modules_sampled
    root_sampled = state.mode == "sampled"
    outs, ids = state.outs, state.ids
    for index, (name, module) in enumerate(root.named_modules()):
        state.names.append(name)
        state.types.append(type(module).__name__)
        if module is root:
            # A forward that raised left its outputs behind: read them before the new one.
            ctx.probes.forward_pre_hook(root, lambda m, a: _flush(state), sampled=root_sampled)
            ctx.probes.forward_hook(root, _root_hook(state, index), sampled=root_sampled)
        else:
            ctx.probes.forward_hook(module, _module_hook(outs, ids, index), sampled=sampled)


def _module_hook(outs: list[torch.Tensor], ids: list[int], index: int) -> Any:
    append_out, append_id = outs.append, ids.append

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        # Hot path: a reference, no kernel; eval forwards (no grad) are not training steps.
        if torch.is_grad_enabled():
            if type(out) is torch.Tensor:
                if out.is_floating_point():
                    append_out(out)
                    append_id(index)
            else:
                for t in float_tensors(out):
                    append_out(t)
                    append_id(index)

    return hook


def _root_hook(state: _State, index: int) -> Any:
    def hook(module: nn.Module, args: Any, out: Any) -> None:
        if torch.is_grad_enabled():
            for t in float_tensors(out):
                state.outs.append(t)
                state.ids.append(index)
            _flush(state)

    return hook


def _norms(outs: list[torch.Tensor]) -> torch.Tensor:
    """Per output, a value that is non-finite exactly when the output holds NaN/Inf
    (NaN for a NaN, Inf for an Inf); device work only, no host read."""
    if outs[0].device.type != "cpu" or min(map(torch.Tensor.numel, outs)) == 0:
        # float64 accumulation cannot overflow for float32/16 entries; on an accelerator
        # it costs the same memory pass as float32, and nothing is read on the host.
        return torch.stack(torch._foreach_norm(outs, 2.0, dtype=torch.float64))
    # On CPU the float64 and inf foreach norms take a slow path in torch 2.13 (~20x), and a
    # float32 L2 norm overflows past ~1e19. max|x| from per-tensor aminmax (mapped in C) is
    # exact, propagates NaN, and costs one vectorised pass.
    pairs = list(map(torch.aminmax, outs))
    return torch.maximum(torch.stack(list(map(_MAX, pairs))).double(), torch.stack(list(map(_MIN, pairs))).double().neg())


@torch.no_grad()
def _flush(state: _State) -> None:
    """One foreach launch over the outputs seen since the last flush; device work only."""
    outs, ids = state.outs, state.ids
    if not outs or state.pending is None:
        return
    pending = state.pending
    try:
        norms = _norms(outs).to(pending.device)
    except RuntimeError:  # outputs on several devices (model parallel): one launch per tensor
        norms = torch.stack([_norms([t]).to(pending.device)[0] for t in outs])
    key = tuple(ids)
    table = state.id_cache.get(key)
    if table is None:
        # Cached per call pattern: a host list becomes a device tensor once, not every step.
        table = state.id_cache[key] = torch.tensor(ids, dtype=torch.float64, device=pending.device)
    outs.clear()
    ids.clear()
    n = norms.numel()
    bad = ~torch.isfinite(norms)
    pos = torch.where(bad, torch.arange(n, device=norms.device), n).amin().clamp_max(n - 1)
    hit = bad.any() & (pending[0] < 0)
    pending.copy_(torch.where(hit, torch.stack((table[pos], norms[pos].double())), pending))


@hookimpl
def gradwatch_act(grads: GradBatch, ctx: StepContext) -> None:
    state = ctx.stash[KEY]
    if state.first is None or state.pending is None:
        return
    with torch.no_grad():
        _flush(state)  # forwards outside the root module (a head called on its own)
        first, pending = state.first, state.pending
        new = (first[0] < 0) & (pending[0] >= 0)
        first.copy_(torch.where(new, torch.cat((pending.new_full((1,), float(ctx.step)), pending)), first))
        pending[0] = -1.0


@hookimpl
def gradwatch_diagnose(window: StatsWindow, model: ModelInfo, ctx: StepContext) -> list[Diagnosis] | None:
    state = ctx.stash[KEY]
    skips = set(window.amp_skips)
    out_step = out_module = -1
    value = 0.0
    if state.first is not None:
        out_step, out_module, value = state.first.tolist()
        out_step, out_module = int(out_step), int(out_module)
    grad_step, grad_layer, grad_layers = _first_bad_gradient(window, skips)
    if not state.armed:
        if out_step < 0 and grad_step < 0 and len(window):
            state.armed = True  # a whole interval finite again: a new occurrence is news
        return None
    if out_step >= 0 and (grad_step < 0 or out_step <= grad_step):
        what = "NaN" if math.isnan(value) else "Inf"
        evidence: dict[str, Any] = {"first_step": out_step, "where": "output", "value": what.lower()}
        if out_module == 0 and state.modules_sampled and out_step % ctx.config.sample_every != 0:
            # Only the model's output was checked on that step ("auto" on a model of many modules).
            layers: tuple[str, ...] = ()
            evidence.update(module_type="", located=False)
            message = (
                f"the model's output became {what} at step {out_step}; its {len(state.names)} modules are checked "
                f"one by one on sampled steps only (every {ctx.config.sample_every}), so the module is not known: "
                'pass options={"nonfinite": {"outputs": "every_step"}} to name it'
            )
            summary = f"the model's output became {what} at step {out_step}"
        else:
            name, module_type = state.names[out_module], state.types[out_module]
            layers = (name,)
            evidence.update(module_type=module_type)
            message = (
                f"the output of {name or '(root)'} ({module_type}) became {what} at step {out_step}, "
                "the first module in forward order to produce a non-finite value"
            )
            summary = f"first non-finite output at step {out_step}, in {name or '(root)'!r} ({module_type})"
        diagnosis = Diagnosis(
            kind="nonfinite",
            severity=Severity.ERROR,
            step=out_step,
            layers=layers,
            message=message,
            summary=summary,
            evidence=evidence,
            source="nonfinite",
        )
    elif grad_step >= 0:
        name = window.layers[grad_layer]
        module_type = model.layer(name).type_name if name in model.names else ""
        diagnosis = Diagnosis(
            kind="nonfinite",
            severity=Severity.ERROR,
            step=grad_step,
            layers=(name,),
            message=(
                f"the gradient of {name or '(root)'} ({module_type}) became non-finite by step {grad_step} while "
                f"every module output was finite (seen on statistics steps, every {ctx.config.stats_every} steps)"
            ),
            summary=f"first non-finite gradient at step {grad_step}, in {name or '(root)'!r} ({module_type})",
            evidence={
                "first_step": grad_step,
                "where": "gradient",
                "module_type": module_type,
                "resolution_steps": ctx.config.stats_every,
                "layers_nonfinite": grad_layers,
                "outputs_checked": state.mode,
            },
            source="nonfinite",
        )
    else:
        return None
    state.armed = False
    state.reported = diagnosis
    if state.first is not None:
        state.first.copy_(torch.tensor([-1.0, -1.0, 0.0], dtype=torch.float64))
    return [diagnosis]


def _first_bad_gradient(window: StatsWindow, skips: set[int]) -> tuple[int, int, list[str]]:
    """(step, layer column, names) of the first statistics step with a non-finite
    gradient; the column is the layer nearest the output among the bad ones."""
    if not len(window):
        return -1, -1, []
    rows = (window.nonfinite > 0).any(1)
    for row in torch.nonzero(rows).flatten().tolist():
        step = int(window.steps[row])
        if step in skips:
            continue
        cols = torch.nonzero(window.nonfinite[row] > 0).flatten().tolist()
        return step, cols[-1], [window.layers[c] for c in cols]
    return -1, -1, []


@hookimpl
def gradwatch_state_dict(ctx: StepContext) -> dict[str, Any] | None:
    state = ctx.stash[KEY]
    return {"nonfinite": {"armed": state.armed, "reported": state.reported.to_dict() if state.reported else None}}


@hookimpl
def gradwatch_load_state_dict(state: dict[str, Any], ctx: StepContext) -> None:
    mine = state.get("nonfinite")
    if mine:
        own = ctx.stash[KEY]
        own.armed = bool(mine["armed"])
        own.reported = Diagnosis.from_dict(mine["reported"]) if mine.get("reported") else None
