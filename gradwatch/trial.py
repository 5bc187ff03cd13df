"""Try the remedies before the user does: each one measured on a copy of the model.

``gw.trial(loss_fn)`` takes the remedies of the current diagnoses (warning and error
severity; or the ones given), and for each:

1. deep-copies the model (gradwatch's own hooks, inert in a copy, are stripped from it),
   builds a fresh optimizer of the user's class with the user's param-group
   hyper-parameters on the copy's parameters, and applies the remedy: ``remedy.apply``
   changes the copy; ``params["lr_factor"]`` multiplies every group's learning rate;
   ``params["max_norm"]`` clips the copy's gradients with
   ``torch.nn.utils.clip_grad_norm_`` before each step. A remedy with none of these (or
   whose ``apply`` raises) is reported as "could not apply", with the reason;
2. trains the copy for ``steps`` steps on the same batches as an *untouched* copy
   trained from the same state with the same seed (the RNG is re-seeded before each
   copy's training, so dropout draws match);
3. measures, in plain torch, on every step: the loss, the total gradient norm, the
   first/last weight-layer gradient-norm ratio, the first/last backprop-signal ratio
   (the gradient reaching those layers' outputs), the first/last time-step gradient
   ratio of the first recurrent module (``‖∂L/∂x_0‖ / ‖∂L/∂x_{T-1}‖`` of its input), the
   fraction of dead ReLU units (zero for every sample of the batch), and finiteness.

"Before" is the copy's first step (after the remedy, before any update); "after" is
the median over the last quarter of the steps (the mean for the loss), or the step at
which the copy went non-finite. A *weight layer* is a module that owns a trainable
parameter of at least 2 dimensions (embeddings excepted), ordered as it first runs.

Verdicts, against the untouched copy (the thresholds are the module constants):

* finiteness decides first: a copy that stays finite where the untouched one does not
  *helps* (unless its own loss rises by :data:`LOSS_CHANGE` or more over the trial: then
  it only diverges more slowly, *no effect*); one that goes non-finite where the
  untouched one does not *hurts*; both non-finite is *no effect*;
* else the measure of the diagnosed fault (``metric``: first/last gradient ratio for
  vanishing, time-gradient ratio for a recurrence, backprop signal for an init scale,
  growth of the total norm for exploding and non-finite gradients, dead fraction for
  dead units) must move at least :data:`FLOW_DECADES` decades closer to healthy (1 for
  a ratio, no growth, no dead unit; a dead-fraction change of :data:`DEAD_CHANGE`
  counts as one decade), or the loss after must be at least :data:`LOSS_CHANGE` lower
  (relative) than the untouched copy's. Better on one and worse on none *helps*;
  worse on one and better on none *hurts*; when they disagree, the diagnosed measure
  decides, unless the copy's own loss rises over the trial (it diverges: *hurts*, a
  residual stack trained too fast, say); neither is *no effect*.

Trials are ranked by verdict, then by the decades gained, then by the loss. A gated
recurrent cell put in by ``lstm_gru`` is also tried without its gate bias (PyTorch's
default biases), so the bias is shown to matter or not.

What stays untouched: the live model's parameters, gradients, buffers and hooks, the
optimizer and its state, and the global RNG state (torch CPU and CUDA, Python's
``random``, numpy's when numpy is imported) are bitwise the same after a trial. User
hooks (not gradwatch's) are deep-copied with the model and run on the copies. Each
copy is freed before the next is made, so a trial holds one copy of the model and its
optimizer state at a time. The copies are of the unwrapped module (no DDP or
``torch.compile`` wrapper: they run eagerly, in this process) and train in the model's
dtype, one batch per step, in train mode, without autocast, gradient accumulation or a
framework's clipping. ``copy.deepcopy`` copies what the module references too (a module
that holds its dataset copies it).

Batches: ``batches=`` (an iterable of ``(inputs, target)`` pairs, keyword dicts or
tensors; the first ``steps`` are taken and cycled when fewer), or the last
``keep_batches`` forward calls of the root module (``watch(..., keep_batches=k)``):
references to the forward's arguments, detached but not copied, so a loop that later
writes into those tensors in place (a reused input buffer, ``x.mul_()``) changes what
the trial sees; ``keep_copies=True`` clones them instead (a copy per forward). A kept
call ``model(x)`` holds no target (the loss is computed after the forward, out of
gradwatch's sight): such a model needs ``batches=``, unless its output carries its own
loss. ``model(x, y)`` keeps ``y`` as the target; Hugging Face models called with
``labels=`` return their own ``loss``, which the trial uses when ``loss_fn`` is not
given. Each step feeds the copy a fresh clone of the batch, so a forward that writes
into its input changes neither the user's data nor the next copy's.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
import json
import math
import random
import statistics
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch.types import Diagnosis, GradWatchError, GradWatchWarning, Remedy, Severity, _jsonable

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.table import Table
    from rich.text import Text

    from gradwatch.watch import Watcher

__all__ = [
    "DEFAULT_STEPS",
    "DEFAULT_TRIAL_BATCHES",
    "BatchKeeper",
    "KeptBatch",
    "Measures",
    "Trial",
    "Trials",
    "VERDICTS",
    "run_trial",
]

HELPS, NO_EFFECT, HURTS, NOT_APPLIED = "helps", "no effect", "hurts", "could not apply"
#: The verdicts, best first (the ranking order).
VERDICTS = (HELPS, NO_EFFECT, HURTS, NOT_APPLIED)
#: Decades (factors of 10) the diagnosed measure must move toward healthy to count.
FLOW_DECADES = 1.0
#: Relative change of the loss after the trial (vs the untouched copy's) that counts.
LOSS_CHANGE = 0.05
#: A change of the dead-unit fraction that counts as one decade.
DEAD_CHANGE = 0.1
#: Steps a trial trains each copy for, by default.
DEFAULT_STEPS = 20
#: Batches the Lightning door keeps for ``trial=True`` when ``keep_batches`` is 0.
DEFAULT_TRIAL_BATCHES = 8
# A ratio that underflowed to exactly 0 counts as float32's smallest subnormal.
_TINY = 1e-45
# Parameter names of training changes the trial carries out itself.
_TRAINING_PARAMS = ("max_norm", "lr_factor")

#: What each measure is, as the table names it.
METRICS = {
    "grad_ratio": "first/last layer gradient norm",
    "signal_ratio": "first/last backprop signal",
    "time_ratio": "first/last time-step gradient",
    "growth": "total gradient norm growth",
    "dead_fraction": "dead ReLU fraction",
}


# ---------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True, kw_only=True)
class Measures:
    """What was measured on one copy at one point (or aggregated over the last steps).

    Attributes:
        loss: The training loss.
        total_norm: The global L2 norm of the copy's gradients (before any clipping).
        grad_ratio: ``‖g_first‖ / ‖g_last‖`` of the first and last weight layers'
            parameter gradients, or ``None`` with fewer than two weight layers.
        signal_ratio: The same ratio of the gradients reaching those layers' outputs.
        time_ratio: ``‖∂L/∂x_0‖ / ‖∂L/∂x_{T-1}‖`` at the first recurrent module's input,
            or ``None`` without one.
        dead_fraction: Units of ``nn.ReLU``/``nn.ReLU6`` modules that output zero for
            every sample of the batch, as a fraction of all their units, or ``None``.
        finite: Whether the loss and every gradient norm were finite.
    """

    loss: float
    total_norm: float
    grad_ratio: float | None = None
    signal_ratio: float | None = None
    time_ratio: float | None = None
    dead_fraction: float | None = None
    finite: bool = True

    def get(self, metric: str) -> float | None:
        return getattr(self, metric, None) if metric != "growth" else None

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({name: getattr(self, name) for name in self.__slots__})


@dataclass(frozen=True, slots=True, kw_only=True)
class Trial:
    """One remedy measured on a copy of the model, against the untouched copy.

    Attributes:
        remedy: The remedy tried; ``None`` for the untouched copy.
        variant: ``""`` for the remedy as given; a description of the variant tried
            otherwise (``"no gate bias"``: a gated cell put in by ``lstm_gru`` with
            PyTorch's default biases).
        diagnoses: The diagnoses that suggested the remedy.
        metric: The measure of the diagnosed fault the verdict uses (a key of
            :data:`METRICS`).
        before: The copy's first step (after the remedy, before any update).
        after: The last quarter of the steps (see the module docs).
        growth: ``max(total norm) / total norm at the first step`` (``inf`` once non-finite).
        losses: The loss of every step trained.
        nonfinite_step: The first step whose loss or gradients were non-finite, or ``None``.
        flow_effect: Decades the diagnosed measure moved toward healthy, vs the
            untouched copy (negative: away); ``None`` when not measurable.
        loss_effect: ``(untouched loss − this loss) / |untouched loss|``, after.
        verdict: One of :data:`VERDICTS` (``"baseline"`` for the untouched copy).
        reason: Why, in one sentence with the numbers.
        seconds: Wall time of this copy: copy, remedy, training and measuring.
    """

    remedy: Remedy | None
    variant: str = ""
    diagnoses: tuple[Diagnosis, ...] = ()
    metric: str = "grad_ratio"
    before: Measures | None = None
    after: Measures | None = None
    growth: float | None = None
    losses: tuple[float, ...] = ()
    nonfinite_step: int | None = None
    flow_effect: float | None = None
    loss_effect: float | None = None
    verdict: str
    reason: str = ""
    seconds: float = 0.0

    @property
    def name(self) -> str:
        """``"relu"``, ``"lstm_gru (no gate bias)"``, ``"untouched"``."""
        if self.remedy is None:
            return "untouched"
        return self.remedy.kind + (f" ({self.variant})" if self.variant else "")

    def value(self, when: str = "after", metric: str | None = None) -> float | None:
        """The measure ``metric`` (default: the trial's own) ``"before"`` or ``"after"``."""
        metric = metric or self.metric
        if metric == "growth":
            return 1.0 if when == "before" and self.before is not None else self.growth
        point = self.before if when == "before" else self.after
        return None if point is None else point.get(metric)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "remedy": None if self.remedy is None else self.remedy.to_dict(),
            "variant": self.variant,
            "diagnoses": [{"kind": d.kind, "step": d.step, "layers": list(d.layers)} for d in self.diagnoses],
            "metric": self.metric,
            "before": None if self.before is None else self.before.to_dict(),
            "after": None if self.after is None else self.after.to_dict(),
            "growth": _jsonable(self.growth),
            "losses": _jsonable(list(self.losses)),
            "nonfinite_step": self.nonfinite_step,
            "flow_effect": _jsonable(self.flow_effect),
            "loss_effect": _jsonable(self.loss_effect),
            "verdict": self.verdict,
            "reason": self.reason,
            "seconds": round(self.seconds, 4),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Trials(Sequence[Trial]):
    """The trials of one ``gw.trial()``, ranked best first; iterate or index it.

    Attributes:
        trials: The remedies' trials, ranked.
        baseline: The untouched copy's trial (``None`` when nothing was tried).
        steps: Steps each copy trained for.
        batches: Number of distinct batches (cycled when fewer than ``steps``).
        source: Where the batches came from (``"batches="``, ``"8 kept batches"``).
        seed: The seed every copy trained with.
        note: Why nothing was tried, when nothing was.
        seconds: Wall time of the whole trial.
    """

    trials: tuple[Trial, ...] = ()
    baseline: Trial | None = None
    steps: int = 0
    batches: int = 0
    source: str = ""
    seed: int = 0
    note: str = ""
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.trials)

    def __getitem__(self, index: Any) -> Any:
        return self.trials[index]

    def __iter__(self) -> Iterator[Trial]:
        return iter(self.trials)

    @property
    def best(self) -> Trial | None:
        """The top-ranked trial if it helps, else ``None``."""
        return self.trials[0] if self.trials and self.trials[0].verdict == HELPS else None

    def of_kind(self, kind: str) -> list[Trial]:
        """The trials of remedies of ``kind``, in rank order (variants included)."""
        return [t for t in self.trials if t.remedy is not None and t.remedy.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "batches": self.batches,
            "source": self.source,
            "seed": self.seed,
            "note": self.note,
            "seconds": round(self.seconds, 4),
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "trials": [t.to_dict() for t in self.trials],
        }

    def table(self, console: Console | None = None) -> Table:
        """The rich table: one row per trial, ranked, and the untouched copy last."""
        return _table(self, console)

    def __rich__(self) -> RenderableType:
        return _render(self, None)

    def print(self, console: Console | None = None) -> None:
        """Print the table (default console: ``rich.get_console()``)."""
        if console is None:
            from rich import get_console

            console = get_console()
        console.print(_render(self, console))


# ---------------------------------------------------------------------- batches


@dataclass(frozen=True, slots=True)
class KeptBatch:
    """One forward call of the root module, as kept by ``keep_batches``: its positional
    and keyword arguments (tensors detached; references unless ``keep_copies``)."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]

    @property
    def target(self) -> Any:
        """The second positional argument (``model(x, y)``), else a ``labels=`` keyword, else ``None``."""
        if len(self.args) >= 2:
            return self.args[1]
        return self.kwargs.get("labels")


class BatchKeeper:
    """The last ``size`` batches; as a forward pre-hook (``with_kwargs=True``) of the root
    module it keeps each training forward's arguments (grad enabled; ``no_grad``
    evaluation passes are not kept)."""

    def __init__(self, size: int, *, copies: bool = False) -> None:
        self.size = size
        self.copies = copies
        self.batches: deque[Any] = deque(maxlen=size)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled():
            self.batches.append(KeptBatch(_keep(args, self.copies), _keep(kwargs, self.copies)))

    def keep(self, batch: Any) -> None:
        """Keep any batch object (tensors inside detached, copied with ``copies``)."""
        self.batches.append(_keep(batch, self.copies))

    def clear(self) -> None:
        self.batches.clear()

    def __len__(self) -> int:
        return len(self.batches)


def _keep(obj: Any, clone: bool) -> Any:
    """Detach the tensors of a nested structure (no graph kept alive), cloning them if asked."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone() if clone else obj.detach()
    return _map(obj, lambda t: t.detach().clone() if clone else t.detach())


def _map(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_map(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(v, fn) for v in obj)
    if isinstance(obj, KeptBatch):
        return KeptBatch(_map(obj.args, fn), _map(obj.kwargs, fn))
    if isinstance(obj, Mapping):
        values = {k: _map(v, fn) for k, v in obj.items()}
        try:
            return type(obj)(values)
        except Exception:  # a mapping type that is not built from a dict
            return values
    return obj


@dataclass(frozen=True, slots=True)
class _Batch:
    """A batch as the plain door replays it: ``model(*args, **kwargs)``, then the loss."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    target: Any


def _as_batch(item: Any) -> _Batch:
    if isinstance(item, _Batch):
        return item
    if isinstance(item, KeptBatch):
        return _Batch(item.args, item.kwargs, item.target)
    if isinstance(item, Mapping):
        return _Batch((), dict(item), item.get("labels"))
    if isinstance(item, torch.Tensor):
        return _Batch((item,), {}, None)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        inputs, target = item
        if isinstance(inputs, Mapping):
            return _Batch((), dict(inputs), target)
        if isinstance(inputs, (tuple, list)):
            return _Batch(tuple(inputs), {}, target)
        return _Batch((inputs,), {}, target)
    raise _BadInput(
        f"trial batches must be (inputs, target) pairs, dicts of forward keyword arguments or tensors; got "
        f"{type(item).__name__}{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}"
    )


def _own_loss(output: Any) -> torch.Tensor | None:
    """The loss a model returns itself: ``output.loss`` (Hugging Face), ``output["loss"]``,
    or a scalar output."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss.reshape(())
    if isinstance(output, torch.Tensor) and output.numel() == 1 and output.is_floating_point():
        return output.reshape(())
    return None


def _forward_loss(loss_fn: Callable[[Any, Any], torch.Tensor] | None) -> Callable[[nn.Module, Any], torch.Tensor]:
    def compute(model: nn.Module, item: Any) -> torch.Tensor:
        batch = _as_batch(item)
        if loss_fn is not None and batch.target is None:
            raise _BadInput(
                "the batch holds no target for loss_fn(output, target): kept batches hold what the model's forward was "
                "called with, and a model(x) call sees no target; pass batches= (inputs, targets) pairs, "
                "e.g. list(itertools.islice(loader, 8))"
            )
        output = model(*batch.args, **batch.kwargs)
        if loss_fn is not None:
            return loss_fn(output, batch.target)
        loss = _own_loss(output)
        if loss is None:
            raise _BadInput(
                f"the model's output ({type(output).__name__}) carries no loss of its own; pass trial(loss_fn=...), "
                "called as loss_fn(output, target)"
            )
        return loss

    return compute


class _BadInput(GradWatchError):
    """The user's input does not let the untouched copy train (raised, never reported as a trial)."""


def _materialize(batches: Iterable[Any], steps: int) -> list[Any]:
    if isinstance(batches, (str, bytes, torch.Tensor)) or not isinstance(batches, Iterable):
        raise GradWatchError(
            f"trial(batches=...) takes an iterable of batches (a list, a DataLoader, a generator), got {type(batches).__name__}"
        )
    taken = list(itertools.islice(iter(batches), steps))
    if not taken:
        raise GradWatchError("trial(batches=...) yielded no batch; pass at least one (inputs, target) pair")
    return taken


# ---------------------------------------------------------------------- the runner


def trial_of(
    watcher: Watcher,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    batches: Iterable[Any] | None,
    steps: int | None,
    remedies: Sequence[Remedy | str] | None,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
    seed: int,
    compute_loss: Callable[[nn.Module, Any], torch.Tensor] | None,
) -> Trials:
    """:meth:`gradwatch.Watcher.trial`: the watcher's model, optimizers, diagnoses and kept batches."""
    if optimizer is None:
        optimizers = tuple(watcher.optimizers)
    elif isinstance(optimizer, torch.optim.Optimizer):
        optimizers = (optimizer,)
    else:
        optimizers = tuple(optimizer) if isinstance(optimizer, Iterable) else ()
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise GradWatchError(f"trial(optimizer=...) takes a torch.optim.Optimizer or a list of them, got {optimizer!r}")
    source = "batches="
    if batches is None or isinstance(batches, BatchKeeper):
        kept = batches if isinstance(batches, BatchKeeper) else getattr(watcher, "kept", None)
        batches = list(kept.batches) if kept is not None else []
        source = f"{len(batches)} kept batch{'es' if len(batches) != 1 else ''}"
        if not batches:
            batches = None
    return run_trial(
        watcher.model,
        optimizers,
        watcher.diagnoses,
        batches,
        loss_fn=loss_fn,
        compute_loss=compute_loss,
        steps=DEFAULT_STEPS if steps is None else steps,
        remedies=remedies,
        seed=seed,
        source=source,
    )


def run_trial(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    diagnoses: Sequence[Diagnosis],
    batches: Iterable[Any] | None,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    compute_loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    steps: int = DEFAULT_STEPS,
    remedies: Sequence[Remedy | str] | None = None,
    seed: int = 0,
    source: str = "batches=",
) -> Trials:
    """Measure remedies on copies of ``model`` (see the module docs); the live state is untouched.

    Args:
        model: The live model (unwrapped: no DDP or ``torch.compile`` wrapper).
        optimizers: The live optimizers: their classes and param-group hyper-parameters
            are rebuilt on each copy.
        diagnoses: The diagnoses whose remedies are tried (warning and error severity).
        batches: The batches (see the module docs), or ``None`` (an error when there is
            something to try).
        loss_fn: ``loss_fn(output, target)``; ``None`` uses the output's own loss.
        compute_loss: ``compute_loss(copy, batch) -> loss`` instead of forward and
            ``loss_fn`` (a framework's training step); ``batch`` is given as it came
            (cloned).
        steps: Steps each copy trains for.
        remedies: Remedies to try instead of the diagnoses' (``Remedy`` objects, or kinds
            of the diagnoses' remedies).
        seed: The seed each copy's remedy and training start from.
        source: Where the batches came from, for the table's title.

    Raises:
        GradWatchError: For bad arguments, or when the untouched copy cannot train on
            the batches (the message says what to pass).
    """
    started = time.perf_counter()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise GradWatchError(f"trial(steps=...) must be a positive integer of training steps, got {steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GradWatchError(f"trial(seed=...) must be an integer, got {seed!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise GradWatchError(f"trial(loss_fn=...) takes a function loss_fn(output, target), got {type(loss_fn).__name__}")
    candidates = _candidates(diagnoses, remedies)
    if not candidates:
        return Trials(
            steps=steps,
            seed=seed,
            note="nothing to try: "
            + ("no remedy given" if remedies is not None else "no warning or error diagnosis has a remedy"),
            seconds=time.perf_counter() - started,
        )
    params = list(model.parameters())
    if any(type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor" for p in params):
        raise GradWatchError(
            "trial() does not run on sharded (FSDP2/DTensor) models: a copy would need every rank; try it on one process"
        )
    if not optimizers:
        raise GradWatchError(
            "trial() needs the optimizer whose class and hyper-parameters the copies use: pass trial(optimizer=your_optimizer) "
            "(the watcher was given none)"
        )
    owned = {id(p) for p in params}
    for opt in optimizers:
        if any(id(p) not in owned for g in opt.param_groups for p in g["params"]):
            raise GradWatchError(
                f"{type(opt).__name__} holds parameters that are not in the model; pass the optimizer that trains this model"
            )
    with torch.no_grad():
        bad = sum(1 for p in params if not bool(torch.isfinite(p).all()))
    if bad:
        return Trials(
            steps=steps,
            seed=seed,
            note=(
                f"nothing tried: {bad} parameter tensor(s) of the model are already non-finite, and a trial starts from the "
                "current weights; load a checkpoint from before the fault and call trial() again"
            ),
            seconds=time.perf_counter() - started,
        )
    if batches is None:
        raise GradWatchError(
            "trial() has no batches: pass trial(batches=...) (e.g. list(itertools.islice(loader, 8))) "
            "or watch(..., keep_batches=8) to keep the last batches the model saw"
        )
    taken = _materialize(batches, steps)
    compute = compute_loss if compute_loss is not None else _forward_loss(loss_fn)
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with _untouched_rng(cuda), torch.enable_grad():
        base_run = _train(model, optimizers, None, "", taken, compute, steps, seed, cuda)
        if base_run.error is not None:
            raise GradWatchError(f"trial(): the untouched copy cannot train ({base_run.error}); check loss_fn and the batches")
        baseline = _baseline(base_run)
        trials = []
        for remedy, diags in candidates:
            metric = _metric(remedy, diags)
            for variant in _variants(remedy):
                run = _train(model, optimizers, remedy, variant, taken, compute, steps, seed, cuda)
                trials.append(_judge(remedy, variant, diags, metric, run, base_run))
    trials.sort(key=_rank_key)
    return Trials(
        trials=tuple(trials),
        baseline=baseline,
        steps=steps,
        batches=len(taken),
        source=source,
        seed=seed,
        seconds=time.perf_counter() - started,
    )


def _candidates(
    diagnoses: Sequence[Diagnosis], remedies: Sequence[Remedy | str] | None
) -> list[tuple[Remedy, tuple[Diagnosis, ...]]]:
    """Remedies to try with the diagnoses that suggested each (one entry per distinct remedy)."""
    suggested: dict[tuple[str, str, str], tuple[Remedy, list[Diagnosis]]] = {}
    for d in diagnoses:
        for r in d.remedies:
            key = _identity(r)
            if key in suggested:
                suggested[key][1].append(d)
            else:
                suggested[key] = (r, [d])
    if remedies is None:
        # Info notes (a default forget-gate bias on a healthy LSTM) are not faults to repair.
        found = [(r, tuple(d for d in ds if d.severity.rank >= Severity.WARNING.rank)) for r, ds in suggested.values()]
        return [(r, ds) for r, ds in found if ds]
    if isinstance(remedies, (str, Remedy)):
        remedies = [remedies]
    chosen: list[tuple[Remedy, tuple[Diagnosis, ...]]] = []
    for item in remedies:
        if isinstance(item, Remedy):
            found = suggested.get(_identity(item))
            chosen.append((item, tuple(found[1]) if found else ()))
        elif isinstance(item, str):
            matches = [(r, tuple(ds)) for r, ds in suggested.values() if r.kind == item]
            if not matches:
                kinds = sorted({r.kind for r, _ in suggested.values()})
                raise GradWatchError(
                    f"trial(remedies=[{item!r}]): no diagnosis so far has a {item!r} remedy; "
                    + (f"the remedies suggested are: {', '.join(kinds)}" if kinds else "no remedy has been suggested yet")
                )
            chosen += matches
        else:
            raise GradWatchError(f"trial(remedies=...) takes Remedy objects or remedy kinds (str), got {type(item).__name__}")
    return chosen


def _identity(remedy: Remedy) -> tuple[str, str, str]:
    """What makes two suggested remedies the same change: kind, title and params (the
    snippet's comments may quote each diagnosis's own numbers)."""
    return remedy.kind, remedy.title, json.dumps(_jsonable(remedy.params), sort_keys=True)


def _metric(remedy: Remedy, diagnoses: Sequence[Diagnosis]) -> str:
    """The measure of the fault a remedy is tried against."""
    for d in diagnoses:
        if d.evidence.get("recurrent") and d.kind in ("vanishing", "exploding"):
            return "time_ratio"
        if d.kind == "vanishing" or d.kind == "saturation":
            return "grad_ratio"
        if d.kind in ("exploding", "nonfinite"):
            return "growth"
        if d.kind == "dead_units":
            return "dead_fraction"
        if d.kind == "init_scale":
            return "signal_ratio"
    if remedy.kind == "lstm_gru":
        return "time_ratio"
    if remedy.kind in ("clipping", "lower_lr"):
        return "growth"
    return "grad_ratio"


def _variants(remedy: Remedy) -> tuple[str, ...]:
    # A gated cell's gate bias is the part of lstm_gru PyTorch does not do: try without it too.
    return ("", _NO_GATE_BIAS) if remedy.kind == "lstm_gru" and remedy.apply is not None else ("",)


_NO_GATE_BIAS = "no gate bias"


# ---------------------------------------------------------------------- one copy


@dataclass
class _Run:
    records: list[dict[str, float | None]] = field(default_factory=list)
    nonfinite_step: int | None = None
    error: str | None = None
    seconds: float = 0.0


def _train(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    remedy: Remedy | None,
    variant: str,
    batches: list[Any],
    compute: Callable[[nn.Module, Any], torch.Tensor],
    steps: int,
    seed: int,
    cuda: Sequence[int],
) -> _Run:
    started = time.perf_counter()
    run = _Run()
    memo: dict[int, Any] = {}
    try:
        twin = copy.deepcopy(model, memo)
    except Exception as exc:
        run.error = f"the model cannot be deep-copied ({type(exc).__name__}: {exc})"
        return run
    _strip_gradwatch_hooks(twin)
    mapping = {pid: memo[pid] for pid in map(id, model.parameters()) if pid in memo}
    del memo
    for p in twin.parameters():
        p.grad = None
    probe = None
    stage = "preparing the copy"
    try:
        _seed(seed, cuda)
        max_norm = lr_factor = None
        if remedy is not None:
            twin, max_norm, lr_factor, why = _apply(remedy, variant, twin)
            if why:
                run.error = why
                return run
        stage = "rebuilding the optimizer"
        opts = _fresh_optimizers(optimizers, mapping, twin, lr_factor)
        del mapping
        device = _device(twin)
        twin.train()
        probe = _Probe(twin)
        _seed(seed, cuda)  # every copy trains on the same random stream (dropout)
        for step in range(steps):
            stage = f"step {step}"
            probe.start(step)
            for p in twin.parameters():
                p.grad = None
            loss = compute(twin, _map(batches[step % len(batches)], lambda t: _fresh(t, device)))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise _BadInput(f"the loss must be a one-element tensor, got {type(loss).__name__}")
            loss.backward()
            record = probe.read(loss.detach())
            run.records.append(record)
            if not _finite(record):
                run.nonfinite_step = step
                break
            if max_norm is not None:
                nn.utils.clip_grad_norm_([p for p in twin.parameters() if p.grad is not None], max_norm)
            for opt in opts:
                opt.step()
        return run
    except _BadInput as exc:
        run.error = str(exc)
        return run
    except Exception as exc:
        # The user's forward, loss or optimizer (or a remedy that broke them) failed on the copy.
        run.error = f"{'' if remedy is None else 'the repaired copy: '}{stage} raised {type(exc).__name__}: {exc}"
        return run
    finally:
        if probe is not None:
            probe.remove()
        run.seconds = time.perf_counter() - started
        del twin  # freed before the next copy is made


def _fresh(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    t = t.detach()
    if device is not None and t.device != device and t.device.type == "cpu":
        return t.to(device)
    return t.clone()


def _device(model: nn.Module) -> torch.device | None:
    devices = {p.device for p in model.parameters()}
    return devices.pop() if len(devices) == 1 else None


def _apply(remedy: Remedy, variant: str, twin: nn.Module) -> tuple[nn.Module, float | None, float | None, str]:
    """The remedy's changes on the copy: ``(copy, max_norm, lr_factor, why_not)``."""
    params = dict(remedy.params or {})
    max_norm, lr_factor = params.get("max_norm"), params.get("lr_factor")
    for name, value in (("max_norm", max_norm), ("lr_factor", lr_factor)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            return twin, None, None, f"params[{name!r}] = {value!r} is not a positive number"
    if remedy.apply is None and max_norm is None and lr_factor is None:
        return (
            twin,
            None,
            None,
            (
                "it has no apply() to change a copy of the model and no params the trial carries out "
                f"({', '.join(_TRAINING_PARAMS)}); try its snippet by hand"
            ),
        )
    if remedy.apply is not None:
        before = {name: type(m) for name, m in twin.named_modules()}
        try:
            result = remedy.apply(twin)
        except Exception as exc:
            return twin, None, None, f"apply() raised {type(exc).__name__}: {exc}"
        if result is not None and not isinstance(result, nn.Module):
            return twin, None, None, f"apply() returned {type(result).__name__}, not the changed module"
        twin = result if result is not None else twin
        if variant == _NO_GATE_BIAS:
            _default_gate_biases(twin, before)
    return twin, (None if max_norm is None else float(max_norm)), (None if lr_factor is None else float(lr_factor)), ""


def _default_gate_biases(model: nn.Module, before: Mapping[str, type]) -> None:
    """Redraw the biases of gated cells the remedy put in as PyTorch initialises them
    (uniform in ±1/sqrt(hidden)), undoing any gate-bias initialisation."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.LSTM, nn.GRU)) and before.get(name) is not type(module):
                bound = 1.0 / math.sqrt(module.hidden_size)
                for pname, p in module.named_parameters():
                    if pname.startswith("bias"):
                        p.uniform_(-bound, bound)


def _fresh_optimizers(
    optimizers: Sequence[torch.optim.Optimizer], mapping: Mapping[int, nn.Parameter], twin: nn.Module, lr_factor: float | None
) -> list[torch.optim.Optimizer]:
    """Optimizers of the user's classes and param-group hyper-parameters on the copy's
    parameters, with no state. Parameters a remedy added join the first group."""
    present = {id(p) for p in twin.parameters()}
    copied = {id(p) for p in mapping.values()}
    new = [p for p in twin.parameters() if id(p) not in copied and p.requires_grad]
    built = []
    for i, opt in enumerate(optimizers):
        groups = []
        for group in opt.param_groups:
            hyper = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            if lr_factor is not None and "lr" in hyper:
                hyper["lr"] = hyper["lr"] * lr_factor
            params = [mapping[id(p)] for p in group["params"] if id(p) in mapping and id(mapping[id(p)]) in present]
            groups.append({**hyper, "params": params})
        if i == 0 and groups:
            groups[0]["params"] = groups[0]["params"] + new
        groups = [g for g in groups if g["params"]]
        if not groups:
            continue
        try:
            built.append(type(opt)(groups, **opt.defaults))
        except TypeError:  # an optimizer whose defaults are not all constructor arguments
            built.append(type(opt)(groups))
    return built


def _strip_gradwatch_hooks(model: nn.Module) -> None:
    """Remove the inert functions gradwatch's hooks become in a deep copy: they do
    nothing, but every one is a Python call per module per forward and keeps
    ``Module.__call__`` off its fast path."""
    for module in model.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if not hooks:
                continue
            for key in [k for k, fn in hooks.items() if _is_inert(fn)]:
                del hooks[key]
                for flags in _HOOK_FLAGS:
                    getattr(module, flags, {}).pop(key, None)


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_HOOK_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _is_inert(fn: object) -> bool:
    # Matched by name and module, not by identity, so this holds wherever the core keeps it.
    return getattr(fn, "__name__", None) == "_inert" and str(getattr(fn, "__module__", "")).startswith("gradwatch")


def _is_weight_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.Embedding):
        return False
    return any(p.requires_grad and p.dim() >= 2 for p in module.parameters(recurse=False))


class _Probe:
    """The measurement hooks on one copy (plain torch; removed when the copy is done)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.step = 0
        self.order: list[nn.Module] = []
        self.handles: dict[int, Any] = {}
        self.extra: list[Any] = []
        self.ordering: list[Any] = []
        for module in model.modules():
            if _is_weight_layer(module):
                # Order from pre-hooks (the order layers start, as the watcher records it),
                # outputs from forward hooks (which run inner modules first).
                self.ordering.append(module.register_forward_pre_hook(self._layer_in))
                self.handles[id(module)] = module.register_forward_hook(self._layer_out)
        self.rnn: nn.Module | None = None
        for module in model.modules():
            if isinstance(module, nn.RNNBase):
                self.extra.append(module.register_forward_pre_hook(self._rnn_in))
        for module in model.modules():
            if isinstance(module, (nn.ReLU, nn.ReLU6)):
                self.extra.append(module.register_forward_hook(self._relu_out))
        self._reset()

    def _reset(self) -> None:
        self.signal: dict[int, torch.Tensor] = {}
        self.time: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rnn_called = False
        self.dead: list[torch.Tensor] = []
        self.units = 0

    def start(self, step: int) -> None:
        self.step = step
        self._reset()
        if step == 1:
            for handle in self.ordering:
                handle.remove()
            self.ordering = []
        if step == 1 and len(self.order) >= 1:
            # Only the first and last weight layers are needed from now on.
            keep = {id(self.order[0]), id(self.order[-1])}
            for key in [k for k in self.handles if k not in keep]:
                self.handles.pop(key).remove()

    def remove(self) -> None:
        for handle in (*self.handles.values(), *self.extra, *self.ordering):
            handle.remove()
        self.handles, self.extra, self.ordering = {}, [], []

    def _layer_in(self, module: nn.Module, args: Any) -> None:
        if self.step == 0 and all(m is not module for m in self.order):
            self.order.append(module)

    def _layer_out(self, module: nn.Module, args: Any, output: Any) -> None:
        out = _first_tensor(output)
        if out is not None and out.requires_grad:
            key = id(module)
            out.register_hook(lambda g, key=key: self._add_signal(key, g))

    def _add_signal(self, key: int, grad: torch.Tensor) -> None:
        sq = grad.detach().float().square().sum()
        self.signal[key] = sq if key not in self.signal else self.signal[key] + sq

    def _rnn_in(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        if self.rnn is None and self.step == 0:
            self.rnn = module
        if module is not self.rnn or self.rnn_called or not args:
            return None
        self.rnn_called = True
        x = args[0]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            return None  # a PackedSequence or an unbatched step: no time axis to measure
        tdim = 1 if getattr(module, "batch_first", False) and x.dim() == 3 else 0
        if x.shape[tdim] < 2:
            return None
        if not x.requires_grad:
            # A leaf that asks for its gradient; nothing upstream, so training is unchanged.
            x = x.detach().requires_grad_(True)
            args = (x, *args[1:])
        x.register_hook(lambda g: self._add_time(g, tdim))
        return args

    def _add_time(self, grad: torch.Tensor, tdim: int) -> None:
        per_step = grad.detach().float().movedim(tdim, 0).flatten(1).norm(dim=1)
        self.time = (per_step[0], per_step[-1])

    def _relu_out(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.dim() >= 1 and output.shape[0] > 0:
            dead = (output.detach() == 0).all(dim=0)
            self.dead.append(dead.sum())
            self.units += dead.numel()

    def read(self, loss: torch.Tensor) -> dict[str, float | None]:
        """This step's measures, read to the host in one transfer."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        nan = torch.tensor(math.nan, device=loss.device)
        values: dict[str, torch.Tensor] = {"loss": loss.float().reshape(())}
        values["total_norm"] = _norm(grads, nan)
        first, last = (self.order[0], self.order[-1]) if len(self.order) >= 2 else (None, None)
        if first is not None and last is not None:
            values["grad_first"] = _norm([p.grad for p in first.parameters(recurse=False) if p.grad is not None], nan)
            values["grad_last"] = _norm([p.grad for p in last.parameters(recurse=False) if p.grad is not None], nan)
            if id(first) in self.signal and id(last) in self.signal:
                values["signal_first"] = self.signal[id(first)].sqrt()
                values["signal_last"] = self.signal[id(last)].sqrt()
        if self.time is not None:
            values["time_first"], values["time_last"] = self.time
        if self.units:
            values["dead"] = torch.stack(self.dead).sum().float() / self.units
        keys = list(values)
        host = dict(zip(keys, torch.stack([v.to(loss.device, torch.float32) for v in values.values()]).tolist()))
        return {
            "loss": host["loss"],
            "total_norm": host["total_norm"],
            "grad_ratio": _ratio(host.get("grad_first"), host.get("grad_last")),
            "signal_ratio": _ratio(host.get("signal_first"), host.get("signal_last")),
            "time_ratio": _ratio(host.get("time_first"), host.get("time_last")),
            "dead_fraction": host.get("dead"),
        }


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    return None


def _norm(tensors: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    if not tensors:
        return empty
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.detach(), dtype=torch.float32) for t in tensors]))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return None
    if b == 0:
        return math.inf if a > 0 else None
    return a / b


def _finite(record: Mapping[str, float | None]) -> bool:
    return all(v is None or math.isfinite(v) for k, v in record.items() if k in ("loss", "total_norm"))


# ---------------------------------------------------------------------- judging


def _summarise(run: _Run) -> tuple[Measures | None, Measures | None, float | None]:
    if not run.records:
        return None, None, None
    first = run.records[0]
    before = _measures([first], finite=_finite(first))
    if run.nonfinite_step is not None:
        after = _measures([run.records[-1]], finite=False)
        growth = math.inf
    else:
        tail = run.records[-max(1, len(run.records) // 4) :]
        after = _measures(tail, finite=True)
        start = first["total_norm"]
        peak = max(r["total_norm"] for r in run.records)  # type: ignore[type-var]
        growth = peak / start if start and start > 0 else None  # type: ignore[operator]
    return before, after, growth


def _measures(records: Sequence[Mapping[str, float | None]], *, finite: bool) -> Measures:
    def median(key: str) -> float | None:
        values = [r[key] for r in records if r.get(key) is not None]
        return float(statistics.median(values)) if values else None  # type: ignore[type-var]

    losses = [r["loss"] for r in records]
    return Measures(
        loss=float(statistics.fmean(losses)) if all(math.isfinite(v) for v in losses) else float(losses[-1]),  # type: ignore[arg-type]
        total_norm=median("total_norm") if median("total_norm") is not None else math.nan,  # type: ignore[arg-type]
        grad_ratio=median("grad_ratio"),
        signal_ratio=median("signal_ratio"),
        time_ratio=median("time_ratio"),
        dead_fraction=median("dead_fraction"),
        finite=finite,
    )


def _baseline(run: _Run) -> Trial:
    before, after, growth = _summarise(run)
    return Trial(
        remedy=None,
        before=before,
        after=after,
        growth=growth,
        losses=tuple(r["loss"] for r in run.records),  # type: ignore[misc]
        nonfinite_step=run.nonfinite_step,
        verdict="baseline",
        reason="the model as it is, trained on the same batches with the same seed"
        + (f"; non-finite at step {run.nonfinite_step}" if run.nonfinite_step is not None else ""),
        seconds=run.seconds,
    )


def _decades(value: float | None) -> float | None:
    """Distance of a ratio from the healthy 1, in decades."""
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return math.inf
    return abs(math.log10(max(value, _TINY)))


def _flow_effect(metric: str, copy_: Trial, base: Trial) -> float | None:
    if metric == "growth":
        a, b = copy_.growth, base.growth
        if a is None or b is None or math.isnan(a) or math.isnan(b):
            return None
        return math.log10(max(b, 1.0)) - math.log10(max(a, 1.0)) if math.isfinite(a) and math.isfinite(b) else None
    a, b = copy_.value("after", metric), base.value("after", metric)
    if metric == "dead_fraction":
        if a is None and b is not None:
            a = 0.0  # the remedy left no ReLU unit that could die (LeakyReLU)
        return None if a is None or b is None else (b - a) / DEAD_CHANGE
    da, db = _decades(a), _decades(b)
    if da is None or db is None or (math.isinf(da) and math.isinf(db)):
        return None
    return db - da


def _rising(trial: Trial) -> bool:
    """Whether the copy's own loss rose over the trial by at least :data:`LOSS_CHANGE`: it diverges."""
    if trial.before is None or trial.after is None:
        return False
    a, b = trial.after.loss, trial.before.loss
    return math.isfinite(a) and math.isfinite(b) and a - b > LOSS_CHANGE * abs(b)


def _judge(remedy: Remedy, variant: str, diagnoses: tuple[Diagnosis, ...], metric: str, run: _Run, base_run: _Run) -> Trial:
    if run.error is not None:
        return Trial(
            remedy=remedy, variant=variant, diagnoses=diagnoses, metric=metric, verdict=NOT_APPLIED, reason=run.error, seconds=run.seconds
        )  # fmt: skip
    before, after, growth = _summarise(run)
    draft = Trial(
        remedy=remedy,
        variant=variant,
        diagnoses=diagnoses,
        metric=metric,
        before=before,
        after=after,
        growth=growth,
        losses=tuple(r["loss"] for r in run.records),  # type: ignore[misc]
        nonfinite_step=run.nonfinite_step,
        verdict=NO_EFFECT,
        seconds=run.seconds,
    )
    base = _baseline(base_run)
    if metric in ("signal_ratio", "time_ratio") and draft.value("after", metric) is None:
        metric = "grad_ratio"  # not measurable on this copy (no recurrent module left, say)
    copy_finite, base_finite = run.nonfinite_step is None, base_run.nonfinite_step is None
    flow = loss = None
    rising = _rising(draft)
    if copy_finite and base_finite:
        flow = _flow_effect(metric, draft, base)
        if after is not None and base.after is not None:
            loss = (base.after.loss - after.loss) / max(abs(base.after.loss), 1e-12)
    own = f"its loss {fmt(before.loss if before else None)} → {fmt(after.loss if after else None)}"
    if copy_finite and not base_finite:
        verdict = NO_EFFECT if rising else HELPS
        reason = f"stays finite over {len(run.records)} steps where the untouched copy is non-finite from step {base_run.nonfinite_step}"
        reason += f", but {own} rises: it diverges more slowly" if rising else f"; {own}"
    elif base_finite and not copy_finite:
        verdict = HURTS
        reason = f"non-finite at step {run.nonfinite_step}; the untouched copy stays finite"
    elif not copy_finite and not base_finite:
        verdict = NO_EFFECT
        reason = f"non-finite at step {run.nonfinite_step}, the untouched copy at step {base_run.nonfinite_step}"
    else:
        better_flow = flow is not None and flow >= FLOW_DECADES
        worse_flow = flow is not None and flow <= -FLOW_DECADES
        better_loss = loss is not None and loss >= LOSS_CHANGE
        worse_loss = loss is not None and loss <= -LOSS_CHANGE
        if better_flow and worse_loss:
            # Disagreement: the flow decides, unless the copy's own loss rises (it diverges).
            verdict = HURTS if rising else HELPS
        elif worse_flow and better_loss:
            verdict = HURTS
        elif better_flow or better_loss:
            verdict = HELPS
        elif worse_flow or worse_loss:
            verdict = HURTS
        else:
            verdict = NO_EFFECT
        reason = _reason(metric, draft, base, flow, loss)
        if rising and worse_loss:
            reason += f"; {own} rises: it diverges"
    return dataclasses.replace(draft, metric=metric, flow_effect=flow, loss_effect=loss, verdict=verdict, reason=reason)


def _reason(metric: str, copy_: Trial, base: Trial, flow: float | None, loss: float | None) -> str:
    parts = []
    a, b = copy_.value("after", metric), base.value("after", metric)
    label = METRICS[metric]
    if flow is None:
        parts.append(f"{label} not measurable")
    elif a == 0 and b == 0:
        parts.append(f"{label} 0 on both copies (it underflows)")
    elif metric == "dead_fraction":
        parts.append(f"{label} {_pct(a)} vs {_pct(b)} untouched")
    else:
        toward = "closer to" if flow >= 0 else "farther from"
        # A ratio that underflowed to 0 was clamped to 1e-45: the distance is a bound.
        bound = "≥ " if (a == 0 and flow < 0) or (b == 0 and flow > 0) else ""
        healthy = "no growth" if metric == "growth" else "1"
        parts.append(f"{label} {fmt(a)} vs {fmt(b)} untouched ({bound}{abs(flow):.2g} decades {toward} {healthy})")
    if loss is not None and copy_.after is not None and base.after is not None:
        parts.append(
            f"loss {fmt(copy_.after.loss)} vs {fmt(base.after.loss)} untouched ({_change(copy_.after.loss, base.after.loss)})"
        )
    return "; ".join(parts)


def _change(value: float, reference: float) -> str:
    """``"3% lower"``, ``"0.07% higher"``, ``"x3.7e+05"`` (beyond a factor of 2)."""
    if reference > 0 and value > 0 and not 0.5 <= value / reference <= 2:
        return f"×{fmt(value / reference)}"
    rel = (value - reference) / max(abs(reference), 1e-12)
    return f"{abs(rel) * 100:.2g}% {'higher' if rel > 0 else 'lower'}" if rel else "equal"


def _rank_key(trial: Trial) -> tuple[int, float, float, float]:
    order = VERDICTS.index(trial.verdict)
    flow = trial.flow_effect if trial.flow_effect is not None and math.isfinite(trial.flow_effect) else 0.0
    loss = trial.loss_effect if trial.loss_effect is not None and math.isfinite(trial.loss_effect) else 0.0
    # Last: the loss reached (finiteness verdicts have no loss effect against a NaN copy).
    after = trial.after.loss if trial.after is not None and math.isfinite(trial.after.loss) else math.inf
    return order, -flow, -loss, after


# ---------------------------------------------------------------------- the RNG


def _seed(seed: int, cuda: Sequence[int]) -> None:
    # Not torch.manual_seed: it also seeds every CUDA device, or queues that seeding for
    # when CUDA initialises, a change to RNG state the trial does not restore.
    torch.random.default_generator.manual_seed(seed)
    for index in cuda:
        torch.cuda.default_generators[index].manual_seed(seed)


@contextlib.contextmanager
def _untouched_rng(cuda: Sequence[int]) -> Iterator[None]:
    """Every global RNG a trial may draw from (the CPU generator, the generators of the CUDA
    devices the model is on, Python's, numpy's), restored bitwise afterwards."""
    devices = list(cuda)
    py_state = random.getstate()
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        if np is not None and np_state is not None:
            np.random.set_state(np_state)


# ---------------------------------------------------------------------- the table


def fmt(value: float | None) -> str:
    """A number in 3 significant digits (scientific outside 1e-3..1e4); ``-`` for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.2e}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _metric_text(trial: Trial, metric: str, when: str) -> str:
    value = trial.value(when, metric)
    if metric == "dead_fraction":
        return _pct(value)
    if metric == "growth" and when == "before":
        return "1"
    return fmt(value)


_VERDICT_STYLE = {HELPS: "bold green", NO_EFFECT: "yellow", HURTS: "red", NOT_APPLIED: "dim", "baseline": "cyan"}
#: Column labels of the measures in the table.
SHORT = {
    "grad_ratio": "grad 1st/last",
    "signal_ratio": "signal 1st/last",
    "time_ratio": "time 1st/last",
    "growth": "norm growth",
    "dead_fraction": "dead ReLU",
}


def _plain(console: Console | None) -> bool:
    return console is not None and (not console.is_terminal or not console.encoding.lower().startswith("utf"))


def _table(trials: Trials, console: Console | None) -> Table:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    plain = _plain(console)
    arrow, dot = ("->", "-") if plain else ("→", "·")
    if not trials.trials:
        table = Table(box=None, show_header=False, pad_edge=False)
        table.add_row(f"gradwatch trial {dot} {trials.note or 'nothing tried'}")
        return table
    table = Table(
        title=(
            f"gradwatch trial {dot} each remedy on a copy of the model, {trials.steps} steps on {trials.source} "
            f"({trials.batches} distinct), seed {trials.seed}"
        ),
        title_justify="left",
        box=box.ASCII if plain else box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("remedy", min_width=13, overflow="fold")
    table.add_column("measure", no_wrap=True)
    table.add_column(f"before {arrow} after", justify="right", no_wrap=True)
    table.add_column("untouched", justify="right", no_wrap=True)
    table.add_column("loss", justify="right", no_wrap=True)
    table.add_column("verdict", min_width=9)
    base = trials.baseline
    for rank, trial in enumerate(trials.trials, 1):
        verdict = Text(trial.verdict, style=_VERDICT_STYLE.get(trial.verdict, ""))
        if trial.verdict == NOT_APPLIED:
            table.add_row(str(rank), trial.name, "", "", "", "", verdict)
            continue
        metric = trial.metric
        table.add_row(
            str(rank),
            trial.name,
            SHORT[metric],
            f"{_metric_text(trial, metric, 'before')} {arrow} {_metric_text(trial, metric, 'after')}",
            _metric_text(base, metric, "after") if base is not None else "-",
            _loss_text(trial, arrow),
            verdict,
        )
    if base is not None:
        table.add_row("", Text("untouched", style="italic"), "", "", "", _loss_text(base, arrow), Text("baseline", style="cyan"))
    return table


def _notes(trials: Trials, console: Console | None) -> Text:
    """Below the table: each trial's remedy title and the reason for its verdict."""
    from rich.text import Text

    text = Text()
    for rank, trial in enumerate(trials.trials, 1):
        assert trial.remedy is not None
        kinds = ", ".join(dict.fromkeys(d.kind for d in trial.diagnoses))
        text.append(f"{rank}. {trial.name}", style="bold")
        title = trial.remedy.title + (
            ", with PyTorch's default biases for the new cell" if trial.variant == _NO_GATE_BIAS else ""
        )
        text.append(f"{f' (for {kinds})' if kinds else ''}: {title}. ")
        text.append(trial.reason[:1].upper() + trial.reason[1:] + ".", style=_VERDICT_STYLE.get(trial.verdict, ""))
        text.append("\n")
    if trials.trials:
        text.append(
            f"helps / hurts: the diagnosed measure at least {10**FLOW_DECADES:g}x closer to / farther from healthy, or the "
            f"loss at least {LOSS_CHANGE:.0%} lower / higher than the untouched copy's; non-finite copies and copies whose "
            "own loss rises are judged on that first. After = median of the last quarter of the steps.",
            style="dim",
        )
    return text


def _render(trials: Trials, console: Console | None) -> RenderableType:
    from rich.console import Group

    return Group(_table(trials, console), _notes(trials, console)) if trials.trials else _table(trials, console)


def _loss_text(trial: Trial, arrow: str) -> str:
    if trial.before is None or trial.after is None:
        return "-"
    return f"{fmt(trial.before.loss)} {arrow} {fmt(trial.after.loss)}"


# ---------------------------------------------------------------------- Lightning


def lightning_trial(
    trainer: Any, pl_module: Any, watcher: Watcher, kept: BatchKeeper, *, steps: int = DEFAULT_STEPS
) -> Trials | None:
    """``GradWatch(trial=True)`` at the end of fit, on rank zero: each copy of the
    ``LightningModule`` computes its loss with its own ``training_step`` on the kept
    batches. Never raises: a failure is a warning and training's result stands."""
    try:
        if not getattr(pl_module, "automatic_optimization", True):
            warnings.warn(
                "GradWatch(trial=True) needs automatic optimisation (training_step returns the loss); "
                "with manual optimisation call watcher.trial(compute_loss=...) yourself",
                GradWatchWarning,
                stacklevel=2,
            )
            return None
        optimizers = [getattr(o, "_optimizer", o) for o in getattr(trainer, "optimizers", [])]
        if len(optimizers) != 1:
            warnings.warn(
                f"GradWatch(trial=True) tries remedies with one optimizer; this run has {len(optimizers)}",
                GradWatchWarning,
                stacklevel=2,
            )
            return None
        takes_index = _takes_batch_idx(pl_module.training_step)
        return watcher.trial(
            batches=kept,
            steps=steps,
            optimizer=optimizers[0],
            compute_loss=lambda module, item: _training_step_loss(module, item, takes_index),
        )
    except Exception as exc:
        warnings.warn(
            f"GradWatch(trial=True): the trial did not run ({type(exc).__name__}: {exc})", GradWatchWarning, stacklevel=2
        )
        return None


def _takes_batch_idx(step: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(step).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def _training_step_loss(module: Any, item: tuple[Any, int], takes_index: bool) -> torch.Tensor:
    batch, index = item
    with warnings.catch_warnings():
        # A copy has no Trainer: self.log() warns and does nothing, as Lightning intends for that case.
        warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")
        out = module.training_step(batch, index) if takes_index else module.training_step(batch)
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, torch.Tensor):
        raise _BadInput(f"training_step returned {type(out).__name__}, not a loss tensor (or a dict with 'loss')")
    return loss
