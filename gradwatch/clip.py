"""Configuration of gradient clipping: one frozen dataclass per mode.

``watch(clip=...)`` and ``GradWatch(clip=...)`` take a number, a mode name or one of
these objects; :func:`resolve_clip` turns any of them into a config object and says
what is wrong with a bad value before training starts. The work itself is done by the
built-in ``clipping`` plugin.

Example::

    from gradwatch import ZClip, watch

    with watch(model, optimizer, clip=ZClip(alpha=0.97, z=2.5)) as gw:
        ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gradwatch.types import GradWatchError

__all__ = ["AGC", "AutoClip", "ClipConfig", "ClipNorm", "NONFINITE_POLICIES", "ZClip", "resolve_clip", "resolve_nonfinite"]

#: Values of ``on_nonfinite``: what happens to a step whose gradients hold NaN or Inf.
NONFINITE_POLICIES = ("skip", "zero", "warn", "raise")


def _positive(name: str, value: Any, *, allow_inf: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or (math.isinf(value) and not allow_inf):
        raise GradWatchError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClipNorm:
    """Clip the global L2 norm of all gradients to ``max_norm``, exactly as
    ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` does.

    Attributes:
        max_norm: The largest global gradient norm let through.
    """

    max_norm: float

    def __post_init__(self) -> None:
        _positive("clip (the max global gradient norm)", self.max_norm)


@dataclass(frozen=True, slots=True, kw_only=True)
class AutoClip:
    """AutoClip (Seetharaman et al. 2020): clip to the ``percentile``-th percentile of
    the history of global gradient norms, the current step's norm included.

    Attributes:
        percentile: ``p`` in (0, 100]; the paper's default is 10 (clip the 90% largest).
        history: Number of most recent norms kept; ``None`` (the paper's choice) keeps
            every norm of the run. The percentile costs O(history) per step (a selection,
            not a sort); give a window (e.g. 10_000) for very long runs.
    """

    percentile: float = 10.0
    history: int | None = None

    def __post_init__(self) -> None:
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
            raise GradWatchError(f"AutoClip percentile must be in (0, 100], got {p!r}; the paper's default is 10")
        h = self.history
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise GradWatchError(f"AutoClip history must be a positive number of steps or None (all), got {h!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ZClip:
    """ZClip (Kumar et al. 2025): z-score spike clipping on an EMA of the global norm.

    The first ``warmup`` norms initialise the mean and (population) variance (the norms
    before clipping); during warm-up no adaptive clipping happens, and the global norm is
    clipped at ``warmup_max_norm`` instead, as the authors' package clips at its
    ``max_grad_norm`` (1.0) then: without it a run diverging from its first steps goes
    NaN before the statistics exist (issue 12). Afterwards, with ``σ = sqrt(var)`` and
    ``s = (g - μ) / (σ + eps)``, a step with ``s > z`` is clipped to the norm
    ``μ + z·σ / (s / z)`` (the authors' "adaptive_scaling": the larger the spike, the
    harder the clip), and the EMA is updated with the norm after clipping:
    ``μ ← α μ + (1-α) g*``, ``var ← α var + (1-α) (g* - μ)²`` (new ``μ``). Defaults are
    the paper's and its reference implementation's (``zclip`` 1.0 on PyPI).

    Attributes:
        alpha: EMA smoothing factor (0.97).
        z: The z-score threshold (2.5).
        warmup: Steps whose norms initialise the statistics (25).
        eps: Added to ``σ`` in the z-score (1e-6).
        max_norm: Optional fixed cap applied at every step (the package's ``max_grad_norm``
            applies after warm-up too; that is not the paper's method, so ours is ``None``).
        warmup_max_norm: The global norm clipped to during warm-up (1.0, the package's
            default ``max_grad_norm``); ``None`` lets warm-up steps through unclipped, as
            the paper describes.
    """

    alpha: float = 0.97
    z: float = 2.5
    warmup: int = 25
    eps: float = 1e-6
    max_norm: float | None = None
    warmup_max_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 1:
            raise GradWatchError(f"ZClip alpha must be in (0, 1), got {self.alpha!r}; the paper uses 0.97")
        _positive("ZClip z", self.z)
        _positive("ZClip eps", self.eps)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 1:
            raise GradWatchError(f"ZClip warmup must be a positive number of steps, got {self.warmup!r}; the paper uses 25")
        if self.max_norm is not None:
            _positive("ZClip max_norm", self.max_norm)
        if self.warmup_max_norm is not None:
            _positive("ZClip warmup_max_norm", self.warmup_max_norm)


@dataclass(frozen=True, slots=True, kw_only=True)
class AGC:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, NFNets).

    For each unit (a row of a weight: one output neuron or output channel; a whole
    bias or other 1-d parameter), ``G ← G · min(1, λ·max(‖W‖, eps) / max(‖G‖, 1e-6))``.

    Attributes:
        clipping: ``λ`` (0.01, the paper's value for its large batches; the paper
            raises it for small batches).
        eps: Floor on the parameter norm, so zero-initialised units can move (1e-3).
        exclude: Qualified names of layers not clipped unit-wise. ``None`` (the
            default) excludes the last layer in forward order, the final classifier that
            the paper does not clip; ``()`` clips every layer.
        exclude_max_norm: The excluded layers (and sparse gradients, whose units AGC
            does not split) are clipped together by their global L2 norm at this value
            (1.0), so that a run whose other layers are all clipped cannot diverge
            through them alone (a tanh MLP at lr 10 did, issue 12); ``None`` leaves them
            unclipped, as the paper does.
    """

    clipping: float = 0.01
    eps: float = 1e-3
    exclude: tuple[str, ...] | None = None
    exclude_max_norm: float | None = 1.0

    def __post_init__(self) -> None:
        _positive("AGC clipping (lambda)", self.clipping)
        _positive("AGC eps", self.eps)
        if self.exclude_max_norm is not None:
            _positive("AGC exclude_max_norm", self.exclude_max_norm)
        if isinstance(self.exclude, str):
            raise GradWatchError(
                f"AGC exclude takes a tuple of layer names, got the string {self.exclude!r}; use ({self.exclude!r},)"
            )


ClipConfig = ClipNorm | AutoClip | ZClip | AGC
_MODES = {"autoclip": AutoClip, "zclip": ZClip, "agc": AGC}


def resolve_clip(value: object) -> ClipConfig | None:
    """Turn ``clip=`` into a config object.

    Args:
        value: ``None``, a positive number (max global norm), ``"autoclip"``,
            ``"zclip"``, ``"agc"`` or a config object.

    Raises:
        GradWatchError: For anything else, saying what is accepted.
    """
    if value is None or isinstance(value, (ClipNorm, AutoClip, ZClip, AGC)):
        return value
    if isinstance(value, str):
        mode = _MODES.get(value.lower())
        if mode is None:
            raise GradWatchError(
                f"unknown clip mode {value!r}; use a max norm (clip=1.0), 'autoclip', 'zclip', 'agc', "
                "or a config object such as gradwatch.ZClip(alpha=0.97, z=2.5)"
            )
        return mode()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value > 0 or math.isinf(value):
            raise GradWatchError(f"clip={value!r}: a max global gradient norm must be a positive finite number (e.g. clip=1.0)")
        return ClipNorm(max_norm=float(value))
    raise GradWatchError(
        f"clip takes None, a positive number, 'autoclip', 'zclip', 'agc' or a gradwatch clip config, got {type(value).__name__}"
    )


def resolve_nonfinite(value: object) -> str | None:
    """Check ``on_nonfinite=``; returns it lower-cased, or ``None``."""
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in NONFINITE_POLICIES:
        raise GradWatchError(f"on_nonfinite must be None or one of {', '.join(map(repr, NONFINITE_POLICIES))}, got {value!r}")
    return value.lower()
