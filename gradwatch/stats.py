"""The statistics engine: per-layer gradient statistics on device, drained once per interval.

The hot path does tensor work only. Per statistics step it launches a fixed number of
``torch._foreach_*`` kernels per device (not per parameter), reduces per-tensor
results to per-layer ones with one ``index_add_`` / ``scatter_reduce_`` each, and
copies one stacked row into a preallocated ring buffer on the gradients' device.
The host reads the ring once per report interval (:meth:`StatsRing.drain`), with a
single device-to-host copy.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradwatch.types import GradWatchError, ModelInfo, Series, StatsWindow

__all__ = ["GradBatch", "History", "Plan", "StatsRing", "CORE_STATS", "LOSS_KEY", "RING_BYTES", "STEP_NORM_KEY", "ring_rows"]

#: ``extras`` key of the recorded loss (``Watcher.observe_loss``).
LOSS_KEY = "core.loss"
#: ``extras`` key of the total gradient norm of the steps without statistics whose norms
#: were read anyway (clipping reads them every step); ``History.step_norm`` merges it with
#: the statistics steps' ``total_norm``.
STEP_NORM_KEY = "core.step_norm"
#: Rows of the per-step core statistics, in ring order.
CORE_STATS = ("grad_norm", "grad_rms", "grad_max", "nonfinite", "present")

_GRAD = operator.attrgetter("grad")
# Identity, mapped in C: ``None in grads`` would call Tensor.__eq__(None) on every gradient
# (about 12 us each, 5 ms a step for 400 tensors).
_IS_NONE = functools.partial(operator.is_, None)
_MIN = operator.itemgetter(0)
_MAX = operator.itemgetter(1)
_F32 = torch.float32


@dataclass(frozen=True, slots=True)
class _Group:
    """The watched parameters on one device (and, for sharded ones, one process group)."""

    device: torch.device
    params: list[nn.Parameter]
    index: torch.Tensor  # int64 layer index of each parameter, on ``device``
    shard_group: Any = None  # the process group a sharded (DTensor) group reduces over
    aminmax_ok: bool = True  # no empty tensors (aminmax refuses them; local shards may be empty)
    sparse: bool = False  # sparse (COO) gradients: nn.Embedding(sparse=True) and the like

    def local(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The local shards of DTensors (FSDP2); plain tensors as they are. A Python pass
        over the list, for sharded groups only: DTensor dispatch is per tensor anyway."""
        return [t.to_local() for t in tensors] if self.shard_group is not None else tensors

    def reduce_(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """Combine per-shard partial results over the shard group (every rank calls this in
        the same order: it runs on statistics steps, which all ranks share)."""
        if self.shard_group is not None:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.shard_group)
        return tensor


def _shard_group(param: torch.Tensor) -> Any:
    """The process group over which a DTensor parameter is sharded, or ``None``."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None or not hasattr(param, "to_local"):
        return None
    if not any(type(p).__name__ == "Shard" or getattr(p, "is_shard", lambda: False)() for p in param.placements):
        return None
    if mesh.ndim != 1:
        raise GradWatchError(
            f"parameters sharded over a {mesh.ndim}-D device mesh (HSDP) are not supported yet; "
            "gradwatch supports FSDP2 over a 1-D mesh and DDP"
        )
    return mesh.get_group()


class Plan:
    """Which parameters are watched, grouped by device, and the layer each belongs to.

    Built once, when the forward order of the layers is known. Shared (tied)
    parameters are counted once, for the first layer that owns them; frozen ones
    (``requires_grad=False``) are not watched.
    """

    def __init__(self, model: ModelInfo) -> None:
        self.model = model
        self.num_layers = len(model.layers)
        params: list[nn.Parameter] = []
        index: list[int] = []
        for layer in model.layers:
            for pname in layer.param_names:
                params.append(layer.module.get_parameter(pname))
                index.append(layer.index)
        self.params = params
        self.layer_of_param = index
        numel = torch.zeros(self.num_layers, dtype=torch.float64)
        for p, i in zip(params, index):
            numel[i] += p.numel()
        self.device = params[0].device
        self.numel = numel.to(_F32).to(self.device)
        self.inv_sqrt_numel = self.numel.clamp_min(1.0).rsqrt()
        # Per layout of present gradients (the groups a batch holds), the present count per layer.
        self._present: dict[tuple[int, ...], torch.Tensor] = {}
        # Modules that say they make sparse gradients (nn.Embedding / EmbeddingBag(sparse=True)).
        self._sparse = {
            id(layer.module.get_parameter(pname))
            for layer in model.layers
            if getattr(layer.module, "sparse", False) is True
            for pname in layer.param_names
        }
        self._group()
        self._checked = False

    def _group(self) -> None:
        params, index = self.params, self.layer_of_param
        keys: dict[tuple[str, int, bool], tuple[torch.device, Any, bool, list[int]]] = {}
        for k, p in enumerate(params):
            group = _shard_group(p)
            sparse = id(p) in self._sparse
            keys.setdefault((str(p.device), id(group), sparse), (p.device, group, sparse, []))[3].append(k)
        self.groups = [
            _Group(
                device=device,
                params=[params[k] for k in positions],
                index=torch.tensor([index[k] for k in positions], dtype=torch.int64, device=device),
                shard_group=group,
                aminmax_ok=all(params[k].numel() > 0 for k in positions),
                sparse=sparse,
            )
            for device, group, sparse, positions in keys.values()
        ]
        # Per "which gradients are missing" pattern, the group layout of the present ones.
        self._layouts: dict[tuple[int, ...], list[_Group]] = {}

    def _check_layouts(self) -> None:
        """Once, on the first step: a gradient that is not strided (sparse) although its
        module did not say so moves to a sparse group, so foreach kernels never see it."""
        self._checked = True
        found = {
            id(p) for p in self.params if p.grad is not None and p.grad.layout != torch.strided and id(p) not in self._sparse
        }
        if found:
            self._sparse |= found
            self._group()

    def batch(self, grad_scale: torch.Tensor | None = None) -> GradBatch:
        """Gather this step's gradients (C-level ``map``; no Python loop when all are present).

        Args:
            grad_scale: The factor the gradients are still multiplied by (a ``GradScaler``'s
                scale when a fused optimizer unscales inside its own step); every statistic
                divides it out, on device.
        """
        if not self._checked:
            self._check_layouts()
        groups: list[tuple[_Group, list[torch.Tensor]]] = []
        for group in self.groups:
            grads = list(map(_GRAD, group.params))
            if any(map(_IS_NONE, grads)):
                # Unused parameters this step: watch the present ones. Builds (once per
                # pattern) an index of the present gradients; a Python pass over the
                # gradient list only on steps where some are missing.
                missing = tuple(k for k, g in enumerate(grads) if g is None)
                key = (id(group), *missing)
                layout = self._layouts.get(key)
                if layout is None:
                    gone = set(missing)
                    keep = [k for k in range(len(grads)) if k not in gone]
                    layout = [
                        _Group(
                            device=group.device,
                            params=[group.params[k] for k in keep],
                            index=group.index[torch.tensor(keep, dtype=torch.int64, device=group.device)],
                            shard_group=group.shard_group,
                            aminmax_ok=group.aminmax_ok,
                            sparse=group.sparse,
                        )
                    ]
                    self._layouts[key] = layout
                sub = layout[0]
                grads = [g for g in grads if g is not None]
                if grads:
                    groups.append((sub, sub.local(grads)))
            else:
                groups.append((group, group.local(grads)))
        inv = None if grad_scale is None else grad_scale.detach().to(self.device, _F32).reciprocal()
        return GradBatch(self, groups, inv)


class GradBatch:
    """One step's final gradients, with per-tensor and per-layer reductions cached.

    Passed to ``gradwatch_collect`` and ``gradwatch_act``. Every method runs on device
    and returns device tensors; nothing here reads a value on the host. The watcher calls
    those hooks under ``torch.no_grad()`` (the methods are not wrapped again: a context
    manager per call cost more than the reductions of a small model).
    """

    __slots__ = ("plan", "_groups", "_norms", "_maxabs", "_layer_sq", "_index", "inv_scale")

    def __init__(
        self, plan: Plan, groups: list[tuple[_Group, list[torch.Tensor]]], inv_scale: torch.Tensor | None = None
    ) -> None:
        self.plan = plan
        self._groups = groups
        #: ``1 / scale`` when the raw :attr:`tensors` still carry a loss scale (fp16 with a fused
        #: optimizer), else ``None``. Every reduction here divides the scale out; a plugin that
        #: reduces :attr:`tensors` itself multiplies by it.
        self.inv_scale = inv_scale
        self._norms: torch.Tensor | None = None
        self._maxabs: torch.Tensor | None = None
        self._layer_sq: torch.Tensor | None = None
        self._index: torch.Tensor | None = None

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The present gradients, in plan order."""
        return [g for _, grads in self._groups for g in grads]

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters of :attr:`tensors`, in the same order."""
        return [p for group, _ in self._groups for p in group.params]

    @property
    def weights(self) -> list[torch.Tensor]:
        """The parameters as :attr:`tensors` hold their gradients: each rank's local shards
        under FSDP2, the parameters themselves otherwise."""
        return [w for group, _ in self._groups for w in group.local(group.params)]

    @property
    def shard_groups(self) -> list[Any]:
        """The process group each of :attr:`tensors` is sharded over (FSDP2), or ``None``."""
        return [group.shard_group for group, grads in self._groups for _ in grads]

    @property
    def layer_index(self) -> torch.Tensor:
        """int64 ``[P]``: the layer of each present gradient, on the statistics device."""
        if self._index is None:
            parts = [group.index.to(self.plan.device) for group, _ in self._groups]
            if len(parts) == 1:
                self._index = parts[0]  # the plan's own tensor: no copy on a one-device model
            else:
                self._index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=self.plan.device)
        return self._index

    @property
    def num_layers(self) -> int:
        return self.plan.num_layers

    def __len__(self) -> int:
        return sum(len(grads) for _, grads in self._groups)

    @property
    def has_norms(self) -> bool:
        """Whether this step's per-tensor norms were computed (statistics, clipping)."""
        return self._norms is not None

    def _per_tensor(self, ord: float) -> torch.Tensor:
        parts = []
        for group, grads in self._groups:
            if group.sparse:
                # A sparse gradient's norms are those of its values once duplicates are summed
                # (coalesce): equal to the dense gradient's. A Python pass over these few tensors.
                # A tied or accumulated gradient of a sparse module may be dense: taken as it is.
                values = [g.coalesce().values() if g.layout != torch.strided else g for g in grads]
                if ord == math.inf:
                    norms = torch.stack([v.abs().amax().to(_F32) if v.numel() else v.new_zeros((), dtype=_F32) for v in values])
                else:
                    norms = torch.stack([torch.linalg.vector_norm(v, ord, dtype=_F32) for v in values])
            elif ord == math.inf and group.device.type == "cpu" and group.aminmax_ok and group.shard_group is None:
                # torch 2.13's CPU foreach inf-norm takes a slow path (about 20x the L2 pass on
                # an MLP); per-tensor aminmax (mapped in C) costs what the L2 pass costs, and a
                # CPU has no kernel launches to save. Exact, NaN-propagating.
                pairs = list(map(torch.aminmax, grads))
                norms = torch.maximum(torch.stack(list(map(_MAX, pairs))), torch.stack(list(map(_MIN, pairs))).neg()).to(_F32)
            else:
                if ord == math.inf and group.shard_group is not None:
                    # A rank's shard of a small parameter may be empty (Linear(32, 1) over 2 ranks), and
                    # the inf-norm of nothing is undefined: its max |g| is 0 here, the other ranks' after
                    # the max-reduce. A Python pass, as DTensor's to_local already is.
                    grads = [g if g.numel() else g.new_zeros(1) for g in grads]
                # One foreach launch per device; float32 accumulation whatever the grad dtype.
                norms = torch.stack(torch._foreach_norm(grads, ord, dtype=_F32))
            if group.shard_group is not None:
                # Sharded gradients: squares (or maxima) of the shards are combined across
                # the shard group before the norm is taken.
                norms = group.reduce_(norms.square(), "sum").sqrt() if ord == 2.0 else group.reduce_(norms, "max")
            parts.append(norms.to(self.plan.device))
        if not parts:
            return torch.zeros(0, dtype=_F32, device=self.plan.device)
        norms = parts[0] if len(parts) == 1 else torch.cat(parts)
        return norms if self.inv_scale is None else norms * self.inv_scale

    def norms(self) -> torch.Tensor:
        """float32 ``[P]``: L2 norm of each present gradient."""
        if self._norms is None:
            self._norms = self._per_tensor(2.0)
        return self._norms

    def maxabs(self) -> torch.Tensor:
        """float32 ``[P]``: max ``|g|`` of each present gradient (NaN if it holds a NaN)."""
        if self._maxabs is None:
            self._maxabs = self._per_tensor(math.inf)
        return self._maxabs

    def layer_sq(self) -> torch.Tensor:
        """float32 ``[L]``: sum of squared gradient entries per layer."""
        if self._layer_sq is None:
            sq = torch.zeros(self.plan.num_layers, dtype=_F32, device=self.plan.device)
            self._layer_sq = sq.index_add_(0, self.layer_index, self.norms().square())
        return self._layer_sq

    def layer_norms(self) -> torch.Tensor:
        """float32 ``[L]``: L2 norm of each layer's gradient."""
        return self.layer_sq().sqrt()

    def total_norm(self) -> torch.Tensor:
        """float32 scalar: global L2 norm, computed as ``clip_grad_norm_`` does (norm of norms)."""
        return torch.linalg.vector_norm(self.norms(), 2.0)

    def mul_(self, coefficient: torch.Tensor) -> None:
        """Scale every present gradient (each rank's shards) in place by an on-device
        scalar (no host sync)."""
        for group, grads in self._groups:
            torch._foreach_mul_(grads, coefficient.to(group.device, non_blocking=True))

    def present(self) -> torch.Tensor:
        """float32 ``[L]``: how many of each layer's parameters have a gradient this step
        (cached per layout of present gradients, a host-known pattern)."""
        plan = self.plan
        key = tuple(id(group) for group, _ in self._groups)
        count = plan._present.get(key)
        if count is None:
            index = self.layer_index
            ones = torch.ones(index.numel(), dtype=_F32, device=plan.device)
            count = plan._present[key] = torch.zeros(plan.num_layers, dtype=_F32, device=plan.device).index_add_(0, index, ones)
        return count

    def core_row(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``[len(CORE_STATS), L]``: this step's core statistics, written into
        ``out`` when given (a ring slot: no stacked copy)."""
        plan = self.plan
        index = self.layer_index
        row = out if out is not None else torch.empty((len(CORE_STATS), plan.num_layers), dtype=_F32, device=plan.device)
        row.zero_()
        torch.sqrt(self.layer_sq(), out=row[0])
        torch.mul(row[0], plan.inv_sqrt_numel, out=row[1])
        maxabs = self.maxabs()
        row[2].scatter_reduce_(0, index, maxabs, "amax", include_self=True)
        row[3].index_add_(0, index, torch.isfinite(maxabs).logical_not_().to(_F32))
        row[4].copy_(self.present())
        return row


class WeightSnapshot:
    """Parameters copied before ``optimizer.step()`` on a sampled step, to measure the update."""

    __slots__ = ("plan", "_copies")

    @torch.no_grad()
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        # float32 copies so a bf16 update is measured exactly (sampled steps only).
        self._copies = [
            torch._foreach_mul(group.local(group.params), 1.0)
            if all(p.dtype == _F32 for p in group.params)
            else [p.detach().to(_F32) for p in group.local(group.params)]
            for group in plan.groups
        ]

    @torch.no_grad()
    def measure(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight_norm [L], update_ratio [L])``: norms before the step, ``‖Δw‖/‖w‖``."""
        plan = self.plan
        w_sq = torch.zeros(plan.num_layers, dtype=_F32, device=plan.device)
        d_sq = torch.zeros_like(w_sq)
        for group, old in zip(plan.groups, self._copies):
            now = [p.detach() if p.dtype == _F32 else p.detach().to(_F32) for p in group.local(group.params)]
            delta = torch._foreach_sub(now, old)
            index = group.index.to(plan.device)
            sq = torch.stack((torch.stack(torch._foreach_norm(old, 2.0)), torch.stack(torch._foreach_norm(delta, 2.0)))).square()
            sq = group.reduce_(sq, "sum").to(plan.device)
            w_sq.index_add_(0, index, sq[0])
            d_sq.index_add_(0, index, sq[1])
        w = w_sq.sqrt()
        return w, d_sq.sqrt() / w.clamp_min(torch.finfo(_F32).tiny)


#: Device memory the per-layer rows of one report interval may hold (issue 12: a
#: ``report_every`` of 10**9 once asked for 8 TB). The ring drains early when it is full.
RING_BYTES = 64 * 2**20
#: Rows a ring holds at least, whatever the model's size.
MIN_RING_ROWS = 16
#: Rows allocated first; a ring doubles as it fills, up to its capacity.
FIRST_RING_ROWS = 32


def ring_rows(num_layers: int, wanted: int, max_bytes: int | None = None) -> int:
    """Rows per device ring: ``wanted`` (``report_every + 1``), bounded so that the core
    rows (``5·L + 1 + 2·L`` float32 values a row: the per-layer statistics, the total
    norm, the weight norm and the update ratio) fit in ``max_bytes``."""
    per_row = 4 * ((len(CORE_STATS) + 2) * num_layers + 1)
    budget = RING_BYTES if max_bytes is None else max_bytes
    return max(1, min(wanted, max(MIN_RING_ROWS, budget // per_row)))


class _Rows:
    """A device ring of rows of one shape, with the host-known step of each row. It is
    allocated in chunks (doubling up to ``capacity`` rows), so a long report interval
    costs only the rows it fills."""

    __slots__ = ("buffer", "steps", "capacity")

    def __init__(self, capacity: int, shape: Sequence[int], device: torch.device) -> None:
        self.capacity = capacity
        self.buffer = torch.zeros((min(capacity, FIRST_RING_ROWS), *shape), dtype=_F32, device=device)
        self.steps: list[int] = []

    def write(self, step: int, row: torch.Tensor) -> None:
        """Copy ``row`` in (no sync). A full ring grows (never drops a row); the watcher
        drains it at the end of the step (:attr:`StatsRing.full`)."""
        self.reserve(step).copy_(row, non_blocking=True)

    def reserve(self, step: int) -> torch.Tensor:
        """The next row, for ``step``, to be written in place (no sync)."""
        slot = len(self.steps)
        if slot >= self.buffer.shape[0]:
            # A device copy into a larger buffer, log2(capacity / 32) times a run at most.
            size = max(slot + 1, min(2 * self.buffer.shape[0], self.capacity))
            grown = self.buffer.new_zeros((size, *self.buffer.shape[1:]))
            grown[:slot].copy_(self.buffer[:slot])
            self.buffer = grown
        self.steps.append(step)
        return self.buffer[slot]

    def flat(self) -> torch.Tensor:
        return self.buffer[: len(self.steps)].reshape(-1)

    def take(self, flat: torch.Tensor) -> Series:
        n = len(self.steps)
        values = flat.reshape((n, *self.buffer.shape[1:]))
        steps = torch.tensor(self.steps, dtype=torch.int64)
        self.steps = []
        return Series(steps, values)


class StatsRing:
    """Device ring buffers for one report interval; :meth:`drain` is the one host read.

    Args:
        num_layers: Columns of the per-layer rows.
        capacity: Rows wanted per ring (``report_every + 1``: one interval never writes
            more), bounded by :func:`ring_rows` to ``max_bytes`` of core rows; when a
            ring is :attr:`full`, the watcher ends the interval early.
        device: Where the rows live (the gradients' device).
        max_bytes: The bound on the core rows' memory (default :data:`RING_BYTES`).
    """

    def __init__(self, num_layers: int, capacity: int, device: torch.device, max_bytes: int | None = None) -> None:
        self.num_layers = num_layers
        self.capacity = ring_rows(num_layers, capacity, max_bytes)
        self.device = device
        self.core = _Rows(self.capacity, (len(CORE_STATS), num_layers), device)
        self.total = _Rows(self.capacity, (), device)
        self.weight = _Rows(self.capacity, (num_layers,), device)
        self.update = _Rows(self.capacity, (num_layers,), device)
        self.extras: dict[str, _Rows] = {}

    @property
    def full(self) -> bool:
        """Whether some ring holds ``capacity`` rows: the interval must end now."""
        rings = (self.core, self.total, self.weight, self.update, *self.extras.values())
        return any(len(r.steps) >= self.capacity for r in rings)

    @property
    def nbytes(self) -> int:
        """Device memory the rings hold now."""
        rings = (self.core, self.total, self.weight, self.update, *self.extras.values())
        return sum(r.buffer.numel() * r.buffer.element_size() for r in rings)

    def write_core(self, step: int, batch: GradBatch) -> None:
        batch.core_row(out=self.core.reserve(step))
        torch.linalg.vector_norm(batch.norms(), 2.0, out=self.total.reserve(step))

    def write_update(self, step: int, weight_norm: torch.Tensor, update_ratio: torch.Tensor) -> None:
        self.weight.write(step, weight_norm)
        self.update.write(step, update_ratio)

    def write_extra(self, step: int, key: str, value: torch.Tensor) -> None:
        rows = self.extras.get(key)
        if rows is None:
            rows = self.extras[key] = _Rows(self.capacity, tuple(value.shape), self.device)
        elif tuple(value.shape) != tuple(rows.buffer.shape[1:]):
            raise ValueError(
                f"statistic {key!r} changed shape from {tuple(rows.buffer.shape[1:])} to {tuple(value.shape)}; "
                "a key must keep one shape"
            )
        rows.write(step, value.detach().to(self.device, _F32, non_blocking=True))

    def drain(
        self, *, layers: tuple[str, ...], amp_skips: Sequence[int], first_step: int, last_step: int, final: bool
    ) -> StatsWindow:
        """Read everything recorded since the last drain to the host, in one copy."""
        rings: list[tuple[str, _Rows]] = [
            ("core", self.core),
            ("total", self.total),
            ("weight", self.weight),
            ("update", self.update),
            *((f"extra:{k}", r) for k, r in self.extras.items()),
        ]
        flats = [r.flat() for _, r in rings]
        sizes = [f.numel() for f in flats]
        # The one device-to-host transfer (a sync) of the interval.
        host = torch.cat(flats).cpu() if sum(sizes) else torch.zeros(0)
        parts = dict(zip((name for name, _ in rings), torch.split(host, sizes)))
        taken = {name: r.take(parts[name]) for name, r in rings}
        core = taken["core"]
        return StatsWindow(
            layers=layers,
            steps=core.steps,
            grad_norm=core.values[:, 0],
            grad_rms=core.values[:, 1],
            grad_max=core.values[:, 2],
            nonfinite=core.values[:, 3],
            present=core.values[:, 4],
            total_norm=taken["total"].values,
            weight_norm=taken["weight"],
            update_ratio=taken["update"],
            extras={name.removeprefix("extra:"): s for name, s in taken.items() if name.startswith("extra:")},
            amp_skips=tuple(amp_skips),
            first_step=first_step,
            last_step=last_step,
            final=final,
        )


class History:
    """Per-layer statistics over the whole run, on the host (the last ``max_rows`` rows).

    Attributes:
        layers: Layer names, the columns.
        steps: int64 ``[S]``.
        grad_norm, grad_rms, grad_max, nonfinite, present: float32 ``[S, L]`` (see
            :class:`~gradwatch.StatsWindow`).
        total_norm: float32 ``[S]``.
        weight_norm, update_ratio: :class:`Series` of sampled steps.
        amp_skips: Steps skipped by ``GradScaler``.
    """

    def __init__(self, layers: tuple[str, ...] = (), max_rows: int = 10_000) -> None:
        self.layers = layers
        self.max_rows = max_rows
        empty = torch.zeros((0, len(layers)), dtype=_F32)
        self.steps = torch.zeros(0, dtype=torch.int64)
        self.grad_norm = self.grad_rms = self.grad_max = self.nonfinite = self.present = empty
        self.total_norm = torch.zeros(0, dtype=_F32)
        self.weight_norm = Series(self.steps, empty)
        self.update_ratio = Series(self.steps, empty)
        self.extras: dict[str, Series] = {}
        self.amp_skips: list[int] = []

    def __len__(self) -> int:
        return int(self.steps.numel())

    @property
    def step_norm(self) -> Series:
        """The total gradient norm of every step that read the norms, in step order: the
        statistics steps' ``total_norm`` and, while clipping reads the norms every step,
        the steps between them."""
        series = self.extras.get(STEP_NORM_KEY)
        if series is None:
            return Series(self.steps, self.total_norm)
        steps = torch.cat((self.steps, series.steps))
        values = torch.cat((self.total_norm, series.values.reshape(-1)))
        order = torch.argsort(steps, stable=True)
        return Series(steps[order], values[order])

    @property
    def loss(self) -> Series:
        """The recorded loss (``observe_loss``, or a framework door), one value per step."""
        series = self.extras.get(LOSS_KEY)
        if series is None:
            return Series(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=_F32))
        return Series(series.steps, series.values.reshape(-1))

    def since(self, step: int) -> History:
        """The rows of step ``step`` and later, as a new :class:`History` (a view a
        detector judges: ``history.since(last_step - window + 1)``)."""
        out = History(self.layers, self.max_rows)
        keep = self.steps >= step
        out.steps = self.steps[keep]
        for name in ("grad_norm", "grad_rms", "grad_max", "nonfinite", "present"):
            setattr(out, name, getattr(self, name)[keep])
        out.total_norm = self.total_norm[keep]
        out.weight_norm = self.weight_norm.since(step)
        out.update_ratio = self.update_ratio.since(step)
        out.extras = {k: v.since(step) for k, v in self.extras.items()}
        out.amp_skips = [s for s in self.amp_skips if s >= step]
        return out

    def _cat(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if old.shape[1:] != new.shape[1:]:
            old = new[:0]
        return torch.cat((old, new))[-self.max_rows :]

    def _cat_series(self, old: Series, new: Series) -> Series:
        return Series(self._cat(old.steps, new.steps), self._cat(old.values, new.values))

    def extend(self, window: StatsWindow) -> None:
        if window.layers != self.layers:
            self.__init__(window.layers, self.max_rows)  # type: ignore[misc]
        self.steps = self._cat(self.steps, window.steps)
        self.grad_norm = self._cat(self.grad_norm, window.grad_norm)
        self.grad_rms = self._cat(self.grad_rms, window.grad_rms)
        self.grad_max = self._cat(self.grad_max, window.grad_max)
        self.nonfinite = self._cat(self.nonfinite, window.nonfinite)
        self.present = self._cat(self.present, window.present)
        self.total_norm = self._cat(self.total_norm, window.total_norm)
        self.weight_norm = self._cat_series(self.weight_norm, window.weight_norm)
        self.update_ratio = self._cat_series(self.update_ratio, window.update_ratio)
        for key, series in window.extras.items():
            old = self.extras.get(key)
            self.extras[key] = series if old is None else self._cat_series(old, series)
        self.amp_skips.extend(window.amp_skips)

    def state_dict(self) -> dict[str, object]:
        return {
            "layers": list(self.layers),
            "steps": self.steps,
            "grad_norm": self.grad_norm,
            "grad_rms": self.grad_rms,
            "grad_max": self.grad_max,
            "nonfinite": self.nonfinite,
            "present": self.present,
            "total_norm": self.total_norm,
            "weight_norm": tuple(self.weight_norm),
            "update_ratio": tuple(self.update_ratio),
            "extras": {k: tuple(v) for k, v in self.extras.items()},
            "amp_skips": list(self.amp_skips),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.__init__(tuple(state["layers"]), self.max_rows)  # type: ignore[misc, arg-type]
        for key in ("steps", "grad_norm", "grad_rms", "grad_max", "nonfinite", "present", "total_norm"):
            setattr(self, key, state[key])
        self.weight_norm = Series(*state["weight_norm"])  # type: ignore[misc]
        self.update_ratio = Series(*state["update_ratio"])  # type: ignore[misc]
        self.extras = {k: Series(*v) for k, v in state["extras"].items()}  # type: ignore[attr-defined]
        self.amp_skips = list(state["amp_skips"])  # type: ignore[call-overload]

    # ------------------------------------------------------------------ reading it (issue 14)

    #: The per-step, per-layer statistics (``[S, L]``), by name: ``history["grad_norm"]``.
    MATRICES = ("grad_norm", "grad_rms", "grad_max", "nonfinite", "present")

    def __getitem__(self, name: str) -> Any:
        """``history["grad_norm"]`` is ``history.grad_norm`` (any statistic named in
        :meth:`to_dict`'s columns, ``steps``, ``total_norm``, ``weight_norm``, ``update_ratio``
        or ``loss``); unknown names raise ``KeyError`` listing the known ones."""
        known = ("steps", *self.MATRICES, "total_norm", "weight_norm", "update_ratio", "loss")
        if name not in known:
            raise KeyError(f"{name!r}; a History holds {', '.join(known)} (and extras in history.extras)")
        return getattr(self, name)

    def __repr__(self) -> str:
        steps = len(self)
        span = f", steps {int(self.steps[0])}..{int(self.steps[-1])}" if steps else ""
        names = [n or "(root)" for n in self.layers]
        shown = ", ".join(repr(n) for n in names[:3]) + (f", ... {names[-1]!r}" if len(names) > 4 else "")
        if len(names) == 4:
            shown += f", {names[-1]!r}"
        sampled = len(self.update_ratio.steps)
        extras = f", extras: {', '.join(sorted(self.extras))}" if self.extras else ""
        return (
            f"History({steps} step{'s' if steps != 1 else ''} x {len(self.layers)} layers{span}; layers [{shown}]; "
            f"{'/'.join(self.MATRICES)} [{steps}, {len(self.layers)}], total_norm [{steps}], "
            f"update_ratio on {sampled} sampled step{'s' if sampled != 1 else ''}{extras})"
        )

    def to_dict(self) -> dict[str, list[Any]]:
        """The history as columns of equal length, one row per (step, layer): a tidy table
        for ``pandas.DataFrame(history.to_dict())``.

        Columns: ``step``, ``layer`` (name), the per-layer statistics ``grad_norm``,
        ``grad_rms``, ``grad_max``, ``nonfinite``, ``present``, the sampled-step
        ``weight_norm`` and ``update_ratio`` (NaN on steps that were not sampled), and the
        per-step ``total_norm`` and ``loss`` (repeated on each layer's row; ``loss`` NaN
        where none was recorded). Rows are in step order, layers in forward order within
        a step. Plugins' extra statistics stay in :attr:`extras`.

        Example::

            df = pandas.DataFrame(gw.history.to_dict())
            df.pivot(index="step", columns="layer", values="grad_norm").plot(logy=True)
        """
        steps = self.steps.tolist()
        width = len(self.layers)
        out: dict[str, list[Any]] = {
            "step": [s for s in steps for _ in range(width)],
            "layer": list(self.layers) * len(steps),
        }
        for name in self.MATRICES:
            values = getattr(self, name).reshape(-1).tolist()
            out[name] = [int(v) for v in values] if name in ("nonfinite", "present") else values
        row = {s: i for i, s in enumerate(steps)}
        for name in ("weight_norm", "update_ratio"):
            series = getattr(self, name)
            column = [math.nan] * (len(steps) * width)
            for step, values in zip(series.steps.tolist(), series.values.tolist()):
                if step in row:
                    column[row[step] * width : (row[step] + 1) * width] = values
            out[name] = column
        out["total_norm"] = [v for v in self.total_norm.tolist() for _ in range(width)]
        loss = dict(zip(self.loss.steps.tolist(), self.loss.values.tolist()))
        out["loss"] = [loss.get(s, math.nan) for s in steps for _ in range(width)]
        return out
