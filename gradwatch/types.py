"""The public vocabulary of gradwatch: what plugins receive and what they return.

Everything here is a frozen, slotted, keyword-only dataclass (or an enum), so a
hook implementation can keep what it is given without copying it, and a test can
compare two of them field by field.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from torch import nn

    from gradwatch.config import WatchConfig
    from gradwatch.stash import Stash

__all__ = [
    "Action",
    "Diagnosis",
    "GradWatchError",
    "GradWatchWarning",
    "LayerInfo",
    "ModelInfo",
    "Remedy",
    "Report",
    "Series",
    "Severity",
    "StatsWindow",
    "StepContext",
    "DIAGNOSIS_KINDS",
    "REMEDY_KINDS",
]

#: Diagnosis kinds of the built-in detectors; plugins may add their own.
DIAGNOSIS_KINDS = ("vanishing", "exploding", "nonfinite", "dead_units", "saturation", "update_scale")
#: Remedy kinds of the built-in advisor; plugins may add their own.
REMEDY_KINDS = ("relu", "normalization", "residual", "clipping", "reinit", "lstm_gru", "lower_lr")


class GradWatchError(Exception):
    """Raised for bad input; the message says what to change."""


class GradWatchWarning(UserWarning):
    """Warned when gradwatch switches something off or cannot do what was asked."""


class Severity(enum.Enum):
    """How bad a diagnosis is; ordered, so ``max(severities)`` is the worst."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank < other.rank

    def __str__(self) -> str:
        return self.value


_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2}


@dataclass(frozen=True, slots=True, kw_only=True)
class Remedy:
    """One thing the user can change, with the measured number that justifies it.

    Attributes:
        kind: One of :data:`REMEDY_KINDS`, or a plugin's own kind.
        title: A short imperative ("Replace the 19 Sigmoid modules with ReLU").
        rationale: Why, quoting the measured number.
        snippet: Python that names the user's own modules and runs against the model.
        params: Every number (and choice) the remedy carries, by name
            (``{"max_norm": 0.35}``, ``{"lr_factor": 0.01}``), so programs need not parse
            the title; the title and snippet are written from them.
        apply: Where the remedy can be applied programmatically, a callable that takes
            a *copy* of the model, changes it and returns it. Never given the live model
            by gradwatch.
    """

    kind: str
    title: str
    rationale: str
    snippet: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    apply: Callable[[nn.Module], nn.Module] | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "title": self.title,
            "rationale": self.rationale,
            "snippet": self.snippet,
            "params": _jsonable(self.params),
            "applicable": self.apply is not None,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Diagnosis:
    """Something that looks wrong with the gradients, in words and numbers.

    Attributes:
        kind: One of :data:`DIAGNOSIS_KINDS`, or a plugin's own kind.
        severity: How bad it is.
        step: The first optimizer step (0-based) at which it was seen.
        layers: Qualified module names, as in ``model.named_modules()``.
        message: One sentence a person understands.
        evidence: The numbers behind it (JSON-serialisable values).
        summary: The headline numbers in a few words ("early/late gradient RMS ratio
            2.5e-09 over 20 layers"), written by the detector; remedies quote it.
        remedies: What to do about it, best first; filled in by the advise stage.
        source: The name of the plugin that made it (set by the plugin).
    """

    kind: str
    severity: Severity
    step: int
    layers: tuple[str, ...] = ()
    message: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    remedies: tuple[Remedy, ...] = ()
    source: str = ""

    def with_remedies(self, remedies: Sequence[Remedy]) -> Diagnosis:
        return dataclasses.replace(self, remedies=tuple(remedies))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Diagnosis:
        """Rebuild a diagnosis from :meth:`to_dict` output (remedies lose ``apply``)."""
        return cls(
            kind=d["kind"],
            severity=Severity(d["severity"]),
            step=int(d["step"]),
            layers=tuple(d["layers"]),
            message=d["message"],
            evidence=dict(d["evidence"]),
            summary=d.get("summary", ""),
            remedies=tuple(
                Remedy(
                    kind=r["kind"],
                    title=r["title"],
                    rationale=r["rationale"],
                    snippet=r.get("snippet", ""),
                    params=dict(r.get("params", {})),
                )
                for r in d.get("remedies", ())
            ),
            source=d.get("source", ""),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity.value,
            "step": self.step,
            "layers": list(self.layers),
            "message": self.message,
            "evidence": _jsonable(self.evidence),
            "summary": self.summary,
            "remedies": [r.to_dict() for r in self.remedies],
            "source": self.source,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    """Something gradwatch did to the training, read back on the host.

    Attributes:
        kind: ``"clip"``, ``"skip"``, ``"zero"``, ``"amp_skip"`` or a plugin's own kind.
        step: The optimizer step it happened at.
        evidence: Numbers (e.g. ``norm``, ``threshold``, ``coefficient`` for a clip).
        source: The plugin that acted.
    """

    kind: str
    step: int
    evidence: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Action:
        return cls(kind=d["kind"], step=int(d["step"]), evidence=dict(d.get("evidence", {})), source=d.get("source", ""))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "step": self.step, "evidence": _jsonable(self.evidence), "source": self.source}


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerInfo:
    """A layer: a module that owns parameters directly.

    Attributes:
        index: Position in forward order (the order in which layers first ran).
        name: Qualified name, without ``module.`` / ``_orig_mod.`` wrapper prefixes.
        module: The module itself.
        type_name: ``type(module).__name__``.
        param_names: Names of the parameters it owns and gradwatch watches (trainable,
            first owner of a shared tensor).
        numel: Number of elements of those parameters.
    """

    index: int
    name: str
    module: nn.Module = field(repr=False, compare=False)
    type_name: str
    param_names: tuple[str, ...]
    numel: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """What gradwatch knows of the model.

    Attributes:
        model: The unwrapped root module (``DistributedDataParallel``, ``DataParallel``
            and ``torch.compile`` wrappers removed).
        layers: The layers, in forward order once the first forward has run
            (``order_known``), before that in ``named_modules()`` order.
        order_known: Whether ``layers`` is in forward order.
        compiled: Whether the model given was wrapped by ``torch.compile``.
    """

    model: nn.Module = field(repr=False, compare=False)
    layers: tuple[LayerInfo, ...]
    order_known: bool = False
    compiled: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


class Series(NamedTuple):
    """Values recorded on some steps: ``values[i]`` was recorded at ``steps[i]``."""

    steps: torch.Tensor
    values: torch.Tensor

    def since(self, step: int) -> Series:
        """The values recorded at ``step`` or later."""
        keep = self.steps >= step
        return Series(self.steps[keep], self.values[keep])

    def before(self, step: int) -> Series:
        """The values recorded before ``step``."""
        keep = self.steps < step
        return Series(self.steps[keep], self.values[keep])


@dataclass(frozen=True, slots=True, kw_only=True)
class StatsWindow:
    """One report interval of statistics, drained from the device in one read.

    All tensors are float32 host tensors (never live ones); rows are steps, columns
    are layers in forward order. Gradients are read after AMP unscaling and
    accumulation, before clipping.

    Attributes:
        layers: Layer names (columns).
        steps: int64 ``[S]``: the optimizer step of each row.
        grad_norm: ``[S, L]`` L2 norm of each layer's gradient.
        grad_rms: ``[S, L]`` root mean square (``grad_norm / sqrt(numel)``).
        grad_max: ``[S, L]`` max ``|g|``.
        nonfinite: ``[S, L]`` number of the layer's parameter tensors whose gradient
            holds a NaN or an Inf.
        present: ``[S, L]`` number of the layer's parameter tensors that had a gradient
            (``0`` for a layer unused on that step).
        total_norm: ``[S]`` global L2 norm over all watched gradients.
        weight_norm: Sampled steps: ``[S', L]`` L2 norm of each layer's parameters.
        update_ratio: Sampled steps with an optimizer step: ``[S'', L]``
            ``‖Δw‖ / ‖w‖`` across ``optimizer.step()``.
        extras: Statistics returned by ``gradwatch_collect`` implementations, by key.
        amp_skips: Steps at which ``GradScaler`` skipped ``optimizer.step()``.
        first_step: First step of the interval (inclusive).
        last_step: Last step of the interval (inclusive).
        final: Whether this is the last window of the watch.
    """

    layers: tuple[str, ...]
    steps: torch.Tensor
    grad_norm: torch.Tensor
    grad_rms: torch.Tensor
    grad_max: torch.Tensor
    nonfinite: torch.Tensor
    present: torch.Tensor
    total_norm: torch.Tensor
    weight_norm: Series
    update_ratio: Series
    extras: Mapping[str, Series] = field(default_factory=dict)
    amp_skips: tuple[int, ...] = ()
    first_step: int = 0
    last_step: int = -1
    final: bool = False

    def __len__(self) -> int:
        return int(self.steps.numel())

    def column(self, name: str) -> int:
        return self.layers.index(name)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepContext:
    """Where a hook is called from: step, rank, configuration and per-watch state.

    Attributes:
        step: The current optimizer step, 0-based.
        rank: Global rank of this process (0 without a process group).
        world_size: Number of processes (1 without a process group).
        config: The watch's configuration.
        stash: Per-watch plugin state (see :class:`gradwatch.StashKey`).
        model: What gradwatch knows of the model.
        sampled: Whether this step is a sampled step (activation probes ran).
        cadence: The watch's :class:`gradwatch.cadence.Cadence`: which steps read
            statistics (``cadence.stats(step)``) and sample (``cadence.sampled(step)``).
        probes: Registers module hooks that the watcher removes on detach (see
            :class:`gradwatch.hooks.Probes`).
        recorder: Used by :meth:`record`; set in collect and act.
    """

    step: int
    rank: int
    world_size: int
    config: WatchConfig
    stash: Stash = field(repr=False, compare=False)
    model: ModelInfo = field(repr=False, compare=False)
    sampled: bool = False
    cadence: Any = field(default=None, repr=False, compare=False)
    probes: Any = field(default=None, repr=False, compare=False)
    recorder: Callable[[str, torch.Tensor], None] | None = field(default=None, repr=False, compare=False)

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    def record(self, key: str, value: torch.Tensor) -> None:
        """Store an on-device value for this step; it appears as ``window.extras[key]``.

        Hot-path safe: the value is copied into a device ring buffer, never read here.
        Keys are ``"<plugin>.<name>"`` and keep one shape.
        """
        if self.recorder is None:
            raise GradWatchError("ctx.record is only available in gradwatch_collect and gradwatch_act")
        self.recorder(key, value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """What reporters are given, on rank zero, at each report interval and at the end.

    Attributes:
        step: The last step covered.
        window: The interval's statistics.
        diagnoses: Diagnoses made in this interval, worst first, with remedies.
        all_diagnoses: Every diagnosis of the watch so far, oldest first.
        actions: Actions taken in this interval (clips, skips).
        model: What gradwatch knows of the model.
        final: Whether this is the report at the end of the watch.
        history: Per-layer statistics of the whole run so far (host tensors).
        request: ``None`` for a scheduled report (every ``report_every`` steps and at the
            end); for one asked for with :meth:`gradwatch.Watcher.report`, what was asked
            (``{"show_all": bool}``): a console reporter prints it now, whatever its
            cadence, with every diagnosis of the run so far.
        cadence: The watch's :class:`gradwatch.cadence.Cadence` (``describe()`` says which
            steps read statistics and why), or ``None``.
    """

    step: int
    window: StatsWindow
    diagnoses: tuple[Diagnosis, ...]
    all_diagnoses: tuple[Diagnosis, ...]
    actions: tuple[Action, ...]
    model: ModelInfo = field(repr=False, compare=False)
    final: bool = False
    history: Any = field(default=None, repr=False, compare=False)
    request: Mapping[str, Any] | None = None
    cadence: Any = field(default=None, repr=False, compare=False)


def _jsonable(value: Any) -> Any:
    """Turn evidence into plain JSON values (tensors and non-finite floats included)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "nan", "inf", "-inf": JSON has no literal for them
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
