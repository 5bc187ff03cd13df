"""Non-finite detector: the first NaN/Inf of a run, in order, and the module that produced it.

A NaN at step ``k`` poisons every weight after step ``k``'s update, so whatever runs later
is non-finite too: the module that *produced* the value can only be named from the step
it appeared in, as the first module whose output was non-finite while its inputs and its
own weights were finite. The diagnosis gives the chain in order:

* the first step whose **loss** was non-finite (when it is recorded: ``gw.observe_loss``,
  the Lightning and Hugging Face doors);
* the first step whose **gradients** were non-finite, and which layers, first in backward
  order (statistics steps; every step while the cadence is dense, or while clipping reads
  the norms);
* the first step whose **weights** were non-finite, and after which step's update;
* the first module that **produced** a non-finite output from finite inputs and finite
  weights: its type, what it made (``nan``, ``inf``, ``-inf``) and the range and dtype of
  its inputs, which the advice builds on. A module whose own weights are already
  non-finite is not the origin, nor is one whose inputs were (a batch holding NaN is
  reported as such).

How, at a cost far below ``torch.autograd.detect_anomaly`` (``benchmarks/detectors.py``
measures both):

* **Every step**, the model's own output: one ``aminmax`` per output tensor of the root
  module's forward and a few device ops, recorded in the statistics ring (no host read);
  on check steps its inputs (the batch) too.
* **On check steps** (``outputs="auto"``: the dense start, the first 32 steps, and every
  sampled step after it), a forward hook on every module keeps references to its
  floating-point inputs and outputs and, at its first call of the step, its own
  parameters (a list append, no kernel). When the root module's forward returns, one
  vectorised pass (per-tensor ``aminmax``, exact and NaN-propagating) reads them all, and
  a few device ops find the first producing module in completion order (a module
  completes after its children, so it is the one that made the value) and the range of
  its inputs. The hooks are installed only on check steps, so the other steps pay
  nothing for them.
* Steps that ``GradScaler`` skipped (``window.amp_skips``) are loss-scale overflows, not
  errors, and are ignored.

A non-finite value that appears after the dense start on a step that is not sampled is
seen at its exact step in the model's output, the gradients and the loss; the producing
module is then not known, and the message says how to have it named
(``options={"nonfinite": {"outputs": "every_step"}}``). Limitation: an in-place operation
that poisons an earlier module's output tensor is blamed on that earlier module.

Options (``options={"nonfinite": {...}}``):

* ``outputs`` (``"auto"`` | ``"every_step"`` | ``"sampled"`` | ``"off"``, default ``"auto"``):
  when modules are checked one by one (``"sampled"``: on sampled steps only, and the
  model's output then only on those too; ``"off"``: neither, gradients and loss only).

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
from gradwatch.cadence import DENSE_STEPS
from gradwatch.kit import float_tensors, num, plugin_options

_MODES = ("auto", "every_step", "sampled", "off")
_DEFAULTS: dict[str, Any] = {"outputs": "auto"}
_MIN = operator.itemgetter(0)
_MAX = operator.itemgetter(1)
#: ``ctx.record`` key of the per-step row (see :data:`COLUMNS`).
RECORD = "nonfinite.step"
#: Columns of the per-step row: whether modules were checked one by one; the module (index
#: in ``named_modules()`` order, -1 = none) of the first non-finite output; of the first
#: producing module, what it made (:data:`VALUES`), the range and dtype of its inputs; the
#: first module whose own weights were non-finite; the first whose inputs were; max|x| of the
#: model's own outputs / inputs (not finite: they held NaN/Inf).
COLUMNS = (
    "checked",
    "first_output",
    "origin",
    "origin_value",
    "origin_input_min",
    "origin_input_max",
    "origin_dtype",
    "first_weights",
    "first_input",
    "root_output",
    "root_input",
)
_COL = {name: k for k, name in enumerate(COLUMNS)}
#: Codes of ``origin_value`` (the worst value among a call's outputs).
VALUES = {1: "-inf", 2: "inf", 3: "nan"}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ROLE_OUT, _ROLE_IN, _ROLE_W = 0, 1, 2


#: Columns filled from the per-module checks (the rest: the model's own output and input).
_MODULE_COLUMNS = len(COLUMNS) - 2


@dataclass
class _State:
    mode: str
    names: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    weights: dict[int, list[nn.Parameter]] = field(default_factory=dict)  # module index -> own float parameters
    # This forward's references, in completion order: tensor, call number, role.
    tensors: list[torch.Tensor] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    roles: list[int] = field(default_factory=list)
    call_module: list[int] = field(default_factory=list)  # call number -> module index
    call_dtype: list[int] = field(default_factory=list)  # call number -> dtype code of its first input
    weighed: set[int] = field(default_factory=set)  # modules whose weights were taken this step
    root: list[torch.Tensor] = field(default_factory=list)  # the model's outputs, then its inputs
    root_outputs: int = 0
    tables: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = field(default_factory=dict)
    # This step's row, on device: the module columns (first forward with an event wins) and,
    # as views of it, max|x| of the model's outputs and inputs (any forward; NaN propagates).
    row: torch.Tensor | None = None
    modules: torch.Tensor | None = None
    flags: torch.Tensor | None = None
    peak: torch.Tensor | None = None  # flags[0], the model's outputs' max|x|
    fresh: bool = True  # no forward yet this step: the flags hold the last step's
    no_event: torch.Tensor | None = None
    touched: bool = False
    armed: bool = True
    reported: Diagnosis | None = None


KEY = StashKey[_State]()


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    opts = plugin_options(config, "nonfinite", _DEFAULTS, choices={"outputs": _MODES})
    ctx.stash[KEY] = _State(mode=opts["outputs"])


def _schedule(cadence: Any) -> Any:
    """The check steps of ``outputs="auto"``: the dense start and every sampled step."""

    def due(step: int) -> bool:
        return cadence.dense(step) or cadence.sampled(step)

    return due


@hookimpl
def gradwatch_attach(model: ModelInfo, ctx: StepContext) -> None:
    state = ctx.stash[KEY]
    if state.mode == "off":
        return
    root = model.model
    device = next(iter(root.parameters())).device
    state.no_event = torch.full((_MODULE_COLUMNS,), -1.0, dtype=torch.float32, device=device)
    state.no_event[_COL["checked"]] = 0.0
    state.row = torch.cat((state.no_event, torch.zeros(2, dtype=torch.float32, device=device)))
    state.modules, state.flags = state.row[:_MODULE_COLUMNS], state.row[_MODULE_COLUMNS:]
    state.peak = state.flags[0]
    modules: Any = {"every_step": False, "sampled": True, "auto": _schedule(ctx.cadence)}[state.mode]
    root_schedule = state.mode == "sampled"
    for index, (name, module) in enumerate(root.named_modules()):
        state.names.append(name)
        state.types.append(type(module).__name__)
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
        if own:
            state.weights[index] = own
        if module is root:
            # A forward that raised left its references behind (a check step's): read them first.
            ctx.probes.forward_pre_hook(root, lambda m, a: _flush(state), sampled=modules)
            ctx.probes.forward_hook(root, _root_hook(state), sampled=root_schedule)
        else:
            ctx.probes.forward_hook(module, _module_hook(state, index), sampled=modules)


def _dtype_code(t: torch.Tensor) -> int:
    return _DTYPES.index(t.dtype) + 1 if t.dtype in _DTYPES else 0


def _module_hook(state: _State, index: int) -> Any:
    tensors, calls, roles = state.tensors, state.calls, state.roles

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        # Check steps only (the hook is installed then); list appends, no kernel.
        if not torch.is_grad_enabled():
            return
        call = len(state.call_module)
        state.call_module.append(index)
        dtype = 0
        for t in float_tensors(args):
            if t.numel():
                dtype = dtype or _dtype_code(t)
                tensors.append(t)
                calls.append(call)
                roles.append(_ROLE_IN)
        state.call_dtype.append(dtype)
        for t in float_tensors(out):
            if t.numel():
                tensors.append(t)
                calls.append(call)
                roles.append(_ROLE_OUT)
        own = state.weights.get(index)
        if own is not None and index not in state.weighed:
            state.weighed.add(index)
            for p in own:
                local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2: this rank's shard, no collective
                if local.numel():
                    tensors.append(local.detach())
                    calls.append(call)
                    roles.append(_ROLE_W)

    return hook


def _root_hook(state: _State) -> Any:
    def hook(module: nn.Module, args: Any, out: Any) -> None:
        if not torch.is_grad_enabled():
            return
        fast = type(out) is torch.Tensor and out.is_floating_point() and out.device == state.peak.device
        if fast and not state.tensors and out.numel():
            # Every step, the common case (one output tensor, modules not checked): max|x| in
            # four launches, on a detached view (no autograd), nothing read on the host.
            peak = state.peak
            lo, hi = torch.aminmax(out.detach())
            if state.fresh:  # the step's first forward: overwrite, no reset needed
                torch.maximum(hi, lo.neg(), out=peak)
                state.fresh = False
            else:
                torch.maximum(peak, hi, out=peak)
                torch.maximum(peak, lo.neg(), out=peak)
            return
        outputs = [t for t in float_tensors(out) if t.numel()]
        state.root += outputs
        state.root_outputs += len(outputs)
        if state.tensors:  # a check step: the model's inputs too (the batch)
            state.root += [t for t in float_tensors(args) if t.numel()]
        _flush(state)

    return hook


def _ranges(tensors: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tensor, ``(min, max)`` as float64 on ``device``: NaN when it holds a NaN, ±Inf
    for an Inf. Per-tensor ``aminmax`` is exact and costs one pass (torch's float64 and inf
    foreach norms take a slow path on CPU)."""
    pairs = list(map(torch.aminmax, tensors))
    lo, hi = list(map(_MIN, pairs)), list(map(_MAX, pairs))
    try:
        return torch.stack(lo).double().to(device), torch.stack(hi).double().to(device)
    except RuntimeError:  # several devices (model parallel): one small copy per tensor
        return torch.stack([v.to(device) for v in lo]).double(), torch.stack([v.to(device) for v in hi]).double()


def _peak(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    device = pairs[0][0].device
    lo = torch.stack([p[0].to(device, torch.float32) for p in pairs])
    hi = torch.stack([p[1].to(device, torch.float32) for p in pairs])
    return torch.maximum(hi, lo.neg()).amax()


def _bad(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


@torch.no_grad()
def _flush(state: _State) -> None:
    """Read the references of the forward that just ended into this step's device state;
    a fixed number of launches whatever the number of modules, nothing read on the host."""
    flags = state.flags
    if flags is None or not (state.root or state.tensors):
        return
    if state.root:
        # max|x| of the model's outputs and (check steps) inputs, a few launches. NaN
        # propagates through aminmax and maximum; the host reads "not finite".
        if state.fresh:
            flags.zero_()
            state.fresh = False
        k = state.root_outputs
        for part, slot in ((state.root[:k], 0), (state.root[k:], 1)):
            if part:
                pairs = list(map(torch.aminmax, part))
                peak = torch.maximum(pairs[0][1], pairs[0][0].neg()) if len(pairs) == 1 else _peak(pairs)
                torch.maximum(flags[slot], peak.to(flags.device, torch.float32), out=flags[slot])
        state.root, state.root_outputs = [], 0
    if state.tensors:
        _check_modules(state)
        state.tensors.clear()
        state.calls.clear()
        state.roles.clear()
        state.call_module.clear()
        state.call_dtype.clear()


def _check_modules(state: _State) -> None:
    """The module columns of this forward, merged into the step's (the first forward with
    an event wins)."""
    modules = state.modules
    assert modules is not None and state.no_event is not None
    device = modules.device
    lo, hi = _ranges(state.tensors, device)
    key = (*state.calls, -1, *state.roles, -1, *state.call_module, -1, *state.call_dtype)
    table = state.tables.get(key)
    if table is None:
        # Cached per call pattern: host lists become device tensors once, not every check step.
        n = len(state.call_module)
        table = state.tables[key] = (
            torch.tensor([r * n + c for r, c in zip(state.roles, state.calls)], dtype=torch.int64, device=device),
            torch.tensor(state.call_module, dtype=torch.float32, device=device),
            torch.tensor(state.call_module, dtype=torch.int64, device=device),
            torch.tensor(state.call_dtype, dtype=torch.float32, device=device),
            torch.tensor([r == _ROLE_IN for r in state.roles], dtype=torch.bool, device=device),
            torch.tensor([r == _ROLE_OUT for r in state.roles], dtype=torch.bool, device=device),
            torch.tensor(state.calls, dtype=torch.int64, device=device),
        )
    slots, module, module_index, dtype, inputs, outputs, calls = table
    n = module.numel()
    bad = _bad(lo, hi)
    flags = torch.zeros(3 * n, dtype=torch.float32, device=device).index_add_(0, slots, bad.float()).view(3, n) > 0
    out_bad, in_bad = flags[_ROLE_OUT], flags[_ROLE_IN]
    # A module's weights are taken at its first call of the step; they hold for its later calls.
    per_module = torch.zeros(len(state.names), dtype=torch.float32, device=device)
    w_bad = per_module.index_add_(0, module_index, flags[_ROLE_W].float())[module_index] > 0
    produced = out_bad & ~in_bad & ~w_bad
    order = torch.arange(n, device=device)
    none = modules.new_tensor(-1.0)

    def first(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.where(mask, order, n).amin().clamp_max(n - 1), mask.any()

    columns = [modules.new_tensor(1.0)]
    for mask in (out_bad, produced):
        pos, hit = first(mask)
        columns.append(torch.where(hit, module[pos], none))
    # What the producing call made (the worst of its outputs) and the range of its inputs.
    code = torch.where(
        torch.isnan(lo) | torch.isnan(hi), 3.0, torch.where(hi == math.inf, 2.0, torch.where(lo == -math.inf, 1.0, 0.0))
    )
    mine = calls == pos
    columns += [
        torch.where(hit, torch.where(mine & outputs, code, 0.0).amax().float(), none),
        torch.where(mine & inputs, lo, math.inf).amin().float(),
        torch.where(mine & inputs, hi, -math.inf).amax().float(),
        torch.where(hit, dtype[pos], none),
    ]
    for mask in (w_bad, in_bad & ~w_bad):
        at, found = first(mask)
        columns.append(torch.where(found, module[at], none))
    row = torch.stack(columns)
    event = (row[1] >= 0) | (row[7] >= 0) | (row[8] >= 0)
    had = (modules[1] >= 0) | (modules[7] >= 0) | (modules[8] >= 0)
    merged = torch.where(event & ~had, row, modules)
    merged[0] = 1.0
    modules.copy_(merged)
    state.touched = True


@hookimpl
def gradwatch_act(grads: GradBatch, ctx: StepContext) -> None:
    state = ctx.stash[KEY]
    if state.modules is None or state.flags is None:
        return
    with torch.no_grad():
        _flush(state)  # forwards outside the root module (a head called on its own)
        if state.fresh:
            state.flags.zero_()  # no forward of the root module this step
        ctx.record(RECORD, state.row)
        if state.touched:
            state.modules.copy_(state.no_event)
            state.touched = False
        state.fresh = True
    state.weighed.clear()


# ---------------------------------------------------------------------- host side


@dataclass
class _Chain:
    """The first non-finite events of a window, in steps (``None``: not seen)."""

    loss: tuple[int, float] | None = None
    gradient: tuple[int, list[str]] | None = None
    output: int | None = None  # the model's output, or a module's
    origin: tuple[int, dict[str, Any]] | None = None  # step, what the producing module saw
    weights: tuple[int, str] | None = None  # step of the forward that found them, module
    inputs: tuple[int, str] | None = None
    checked: list[int] = field(default_factory=list)  # steps whose modules were checked

    @property
    def first(self) -> int | None:
        steps = [e[0] for e in (self.loss, self.gradient, self.origin, self.weights, self.inputs) if e is not None]
        if self.output is not None:
            steps.append(self.output)
        return min(steps) if steps else None


def _chain(window: StatsWindow, state: _State, skips: set[int]) -> _Chain:
    chain = _Chain()
    loss = window.extras.get("core.loss")
    if loss is not None:
        for step, value in zip(loss.steps.tolist(), loss.values.reshape(-1).tolist()):
            if not math.isfinite(value) and step not in skips:
                chain.loss = (int(step), value)
                break
    chain.gradient = _first_bad_gradient(window, skips)
    rows = window.extras.get(RECORD)
    if rows is None:
        return chain
    for step, row in zip(rows.steps.tolist(), rows.values.tolist()):
        if step in skips:
            continue
        values = dict(zip(COLUMNS, row))
        if values["checked"] > 0:
            chain.checked.append(step)
        root_output, root_input = not math.isfinite(values["root_output"]), not math.isfinite(values["root_input"])
        if chain.output is None and (root_output or values["first_output"] >= 0):
            chain.output = step
        if chain.origin is None and values["origin"] >= 0:
            k = int(values["origin"])
            dtype = int(values["origin_dtype"])
            lo, hi = values["origin_input_min"], values["origin_input_max"]
            has_inputs = math.isfinite(lo) and math.isfinite(hi) and lo <= hi
            chain.origin = (
                step,
                {
                    "module": state.names[k],
                    "module_type": state.types[k],
                    "output": VALUES.get(int(values["origin_value"]), "nan"),
                    "input_min": lo if has_inputs else None,
                    "input_max": hi if has_inputs else None,
                    "input_dtype": str(_DTYPES[dtype - 1]).removeprefix("torch.") if dtype > 0 else None,
                    "input_finite": True,
                    "weights_finite": True,
                    # An exact zero is known only where the range ends at it (ReLU outputs: min 0).
                    "input_has_zero": bool(has_inputs and (lo == 0.0 or hi == 0.0)),
                    "input_has_negative": bool(has_inputs and lo < 0.0),
                },
            )
        if chain.weights is None and values["first_weights"] >= 0:
            chain.weights = (step, state.names[int(values["first_weights"])])
        if chain.inputs is None and (root_input or values["first_input"] >= 0):
            first_input = int(values["first_input"])
            source = state.names[first_input] if not root_input and first_input >= 0 else state.names[0]
            chain.inputs = (step, source)
    return chain


def _first_bad_gradient(window: StatsWindow, skips: set[int]) -> tuple[int, list[str]] | None:
    """``(step, layers)`` of the first step with a non-finite gradient entry, the layers
    first in backward order (the last in forward order first). Statistics steps count the
    non-finite entries per layer; on the other steps that read the norms (clipping), a
    non-finite total norm whose square did not merely overflow (every per-tensor norm is
    read as one: an infinite norm of finite entries is possible) gives the step alone."""
    found: tuple[int, list[str]] | None = None
    if len(window):
        rows = (window.nonfinite > 0).any(1)
        for row in torch.nonzero(rows).flatten().tolist():
            step = int(window.steps[row])
            if step not in skips:
                cols = torch.nonzero(window.nonfinite[row] > 0).flatten().tolist()
                found = (step, [window.layers[c] for c in reversed(cols)])
                break
    norms = window.extras.get("core.step_norm")
    if norms is not None:
        stats_steps = set(window.steps.tolist())
        for step, value in zip(norms.steps.tolist(), norms.values.reshape(-1).tolist()):
            if math.isnan(value) and step not in skips and step not in stats_steps:
                if found is None or step < found[0]:
                    found = (int(step), [])
                break
    return found


def _names(names: list[str], most: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f", … ({len(names)} layers)" if len(names) > most else "")


@hookimpl
def gradwatch_diagnose(window: StatsWindow, ctx: StepContext) -> list[Diagnosis] | None:
    state = ctx.stash[KEY]
    skips = set(window.amp_skips)
    chain = _chain(window, state, skips)
    first = chain.first
    if not state.armed:
        if first is None and len(window):
            state.armed = True  # a whole interval finite again: a new occurrence is news
        return None
    if first is None:
        return None
    diagnosis = _diagnosis(chain, first, state, ctx)
    state.armed = False
    state.reported = diagnosis
    return [diagnosis]


def _diagnosis(chain: _Chain, first: int, state: _State, ctx: StepContext) -> Diagnosis:
    """The diagnosis of a chain whose first event is at step ``first``."""
    evidence: dict[str, Any] = {"first_step": first}
    parts: list[tuple[int, str]] = []
    layers: tuple[str, ...] = ()
    if chain.loss is not None:
        step, value = chain.loss
        evidence["loss_step"] = step
        parts.append((step, f"the loss was {_value(value)} at step {step}"))
    if chain.gradient is not None:
        step, names = chain.gradient
        evidence["gradient_step"] = step
        evidence["layers_nonfinite"] = names
        evidence["layers_nonfinite_count"] = len(names)
        where = f" (first in backward order: {_names(names)})" if names else ""
        parts.append((step, f"the gradients were non-finite at step {step}{where}"))
    origin = chain.origin
    produced = origin is not None and origin[0] <= first
    if chain.weights is not None:
        step, name = chain.weights
        evidence["weights_step"] = step
        evidence["weights_module"] = name
        after = chain.gradient[0] if chain.gradient is not None and chain.gradient[0] < step else step - 1
        evidence["weights_after_update"] = after
        cause = (
            f" (gradients non-finite at step {chain.gradient[0]})"
            if chain.gradient is not None and chain.gradient[0] <= after
            else ""
        )
        parts.append((after, f"the weights of {name!r} were non-finite after the update of step {after}{cause}"))
    evidence["checked_steps"] = _span(chain.checked)
    if produced:
        assert origin is not None
        step, seen = origin
        where_seen = "output"
        layers = (seen["module"],)
        evidence.update(where="output", produced=True, origin=seen, module_type=seen["module_type"], value=seen["output"])
        inputs = (
            f"finite inputs in [{num(seen['input_min'])}, {num(seen['input_max'])}] ({seen['input_dtype']})"
            if seen["input_min"] is not None
            else "no floating-point inputs"
        )
        head = (
            f"{seen['module']!r} ({seen['module_type']}) produced {seen['output']} at step {step} from "
            f"{inputs} and finite weights: the first module to make a non-finite value"
        )
        summary = f"{seen['output']} produced at step {step} in {seen['module']!r} ({seen['module_type']})"
        parts = [(k, p) for k, p in parts if not p.startswith("the weights of")]
    elif chain.inputs is not None and chain.inputs[0] <= first:
        step, name = chain.inputs
        where_seen = "input"
        layers = (name,)
        evidence.update(
            where="input",
            produced=False,
            origin={"module": name, "module_type": state.types[state.names.index(name)], "input_finite": False,
                    "weights_finite": True},
        )  # fmt: skip
        head = f"the inputs of {name!r} already held NaN/Inf at step {step} (its weights were finite)"
        summary = f"non-finite inputs at step {step}, into {name!r}"
    else:
        where_seen = _where(chain, first)
        layers = tuple(chain.gradient[1]) if where_seen == "gradient" and chain.gradient is not None else ()
        evidence.update(where=where_seen, produced=False)
        if chain.output is not None and chain.output == first and where_seen == "output":
            head = (
                f"the model's output became non-finite at step {first}; its modules are checked one by one on the "
                f"first {DENSE_STEPS} steps and on sampled steps, so the module is not known: "
                'pass options={"nonfinite": {"outputs": "every_step"}} to name it'
            )
            evidence["located"] = False
        else:
            head = (
                f"no module produced a non-finite value from finite inputs and finite weights before step {first}"
                if chain.checked
                else f"non-finite values from step {first}"
            )
        summary = f"first non-finite {where_seen} at step {first}"
    message = "; ".join([head, *(p for _, p in sorted(parts, key=lambda part: part[0]))])
    return Diagnosis(
        kind="nonfinite",
        severity=Severity.ERROR,
        step=first,
        layers=layers,
        message=message,
        summary=summary,
        evidence={**evidence, "where": where_seen},
        source="nonfinite",
    )


def _where(chain: _Chain, first: int) -> str:
    if chain.loss is not None and chain.loss[0] == first and (chain.output is None or chain.output > first):
        return "loss"
    if chain.gradient is not None and chain.gradient[0] == first:
        return "gradient"
    if chain.weights is not None and chain.weights[0] == first:
        return "weights"
    return "output"


def _value(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _span(steps: list[int]) -> str:
    if not steps:
        return ""
    return f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else str(steps[0])


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
