"""What the framework doors share: the log tap, the logged metrics, reports above a progress bar.

The Lightning callback (:mod:`gradwatch.lightning`) and the Hugging Face callback
(:mod:`gradwatch.hf`) each drive one :class:`~gradwatch.Watcher` with explicit steps and
log through their framework. What they do alike lives here, framework-free:

* :class:`LogTap`, a per-watcher plugin that keeps a step's total and per-layer norms
  on device, on the steps the framework writes logs only;
* :func:`log_metrics`, the ``grad/`` metrics of such a step (``log_layers`` decides
  which per-layer norms), and the running diagnosis and clip counts;
* :func:`capture_console`, :func:`take_text` and :func:`print_text`: reports rendered
  off-screen, then printed above the framework's progress bar in one piece.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from gradwatch.hookspecs import hookimpl
from gradwatch.types import GradWatchError

if TYPE_CHECKING:
    from rich.console import Console

    from gradwatch.stats import GradBatch
    from gradwatch.watch import Watcher

__all__ = [
    "AUTO_ALL_LAYERS",
    "LOG_LAYERS",
    "LogTap",
    "capture_console",
    "check_log_layers",
    "count_metrics",
    "log_metrics",
    "pending_scale",
    "print_text",
    "take_text",
]

LOG_LAYERS = ("auto", "all", "aggregate", "none")
#: ``log_layers="auto"`` logs every layer up to this many, aggregates beyond.
AUTO_ALL_LAYERS = 32


def check_log_layers(log_layers: object) -> None:
    """Refuse a ``log_layers`` value the doors do not know.

    Raises:
        GradWatchError: Unless it is one of :data:`LOG_LAYERS` or a positive int.
    """
    if isinstance(log_layers, bool) or not (log_layers in LOG_LAYERS or (isinstance(log_layers, int) and log_layers > 0)):
        raise GradWatchError(
            f"log_layers must be one of {', '.join(map(repr, LOG_LAYERS))} or a positive int k "
            f"(the k largest layer norms), got {log_layers!r}"
        )


class LogTap:
    """Per-watcher plugin that keeps the step's norms, on device, on logging steps only.

    Runs first in the act stage (``tryfirst``), so it sees the gradients before any
    clipping plugin scales them, and reuses the per-tensor norms the core statistics
    already computed on statistics steps (``GradBatch`` caches them).

    Args:
        name: The plugin name it registers under (one per door).
    """

    def __init__(self, name: str) -> None:
        self.gradwatch_name = name
        self.wanted = False
        self.total: torch.Tensor | None = None
        self.layers: torch.Tensor | None = None

    @hookimpl(tryfirst=True)
    def gradwatch_act(self, grads: GradBatch) -> None:
        if self.wanted:
            self.total = grads.total_norm()
            self.layers = grads.layer_norms()


def log_metrics(watcher: Watcher, tap: LogTap, *, prefix: str, log_layers: str | int) -> dict[str, Any]:
    """The metrics of the step ``tap`` holds, as device tensors, plus running counts.

    ``{prefix}norm_total``, the per-layer norms ``log_layers`` asks for
    (``{prefix}norm/<layer>`` or ``{prefix}norm_min|max|mean``), ``{prefix}diagnoses/<kind>``
    and ``{prefix}clips`` (floats: counts so far, which change once per report
    interval). Clears the tap.
    """
    assert tap.total is not None and tap.layers is not None
    metrics: dict[str, Any] = {f"{prefix}norm_total": tap.total}
    names = watcher.model_info.names
    mode = log_layers
    if mode == "auto":
        mode = "all" if len(names) <= AUTO_ALL_LAYERS else "aggregate"
    if mode == "all":
        metrics.update({f"{prefix}norm/{_key(n)}": v for n, v in zip(names, tap.layers.unbind())})
    elif isinstance(mode, int):
        # The one host read of a logging step: which layers are the k largest.
        top = torch.topk(tap.layers, min(mode, len(names))).indices.tolist()
        metrics.update({f"{prefix}norm/{_key(names[k])}": tap.layers[k] for k in top})
    elif mode == "aggregate":
        lo, hi = torch.aminmax(tap.layers)
        metrics.update({f"{prefix}norm_min": lo, f"{prefix}norm_max": hi, f"{prefix}norm_mean": tap.layers.mean()})
    metrics.update(count_metrics(watcher, prefix=prefix))
    tap.total = tap.layers = None
    return metrics


def count_metrics(watcher: Watcher, *, prefix: str) -> dict[str, float]:
    """``{prefix}diagnoses/<kind>`` and ``{prefix}clips``: what the watcher found and did so far."""
    counts: dict[str, int] = {}
    for d in watcher.diagnoses:
        counts[d.kind] = counts.get(d.kind, 0) + 1
    metrics = {f"{prefix}diagnoses/{kind}": float(n) for kind, n in sorted(counts.items())}
    metrics[f"{prefix}clips"] = float(sum(1 for a in watcher.actions if a.kind == "clip"))
    return metrics


def _key(name: str) -> str:
    return name or "(root)"


def pending_scale(scaler: Any, optimizer: Any) -> torch.Tensor | None:
    """The loss scale ``optimizer``'s gradients still carry, or ``None`` when they are unscaled.

    Lightning's mixed precision (``MixedPrecision.optimizer_step``) calls
    ``scaler.unscale_(optimizer)`` before ``on_before_optimizer_step`` only for optimizers
    that do not unscale inside their own step; a fused optimizer (``fused=True``,
    ``_step_supports_amp_scaling``) is handed the scale by ``GradScaler.step`` instead, so
    its gradients are still scaled there (Lightning-AI/pytorch-lightning#21720). The
    scaler's own per-optimizer stage says which case this is; the scale is returned as the
    scaler's device tensor (no host read).

    Raises:
        GradWatchError: When the scaler is enabled, the optimizer unscales in its step, and
            this torch's ``GradScaler`` does not show its stage and scale.
    """
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict) or not hasattr(scaler, "_scale"):
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            raise GradWatchError(
                f"{type(optimizer).__name__} unscales its gradients inside step() (fused=True) and this GradScaler does not "
                "show whether it unscaled them yet, so gradwatch would read them ×loss scale; use fused=False, "
                "or bf16 mixed precision (no scaler)"
            )
        return None
    scale = scaler._scale  # None until the first scaler.scale(loss): nothing was scaled yet
    stage = dict.get(states, id(optimizer), {}).get("stage")  # dict.get: never creates the scaler's entry
    if not isinstance(scale, torch.Tensor) or (stage is not None and getattr(stage, "name", "") == "UNSCALED"):
        return None
    return scale


def capture_console(buffer: io.StringIO) -> Console:
    """A console that renders into ``buffer`` with the terminal's width and colours."""
    from rich import get_console
    from rich.console import Console

    screen = get_console()
    return Console(
        file=buffer,
        width=screen.width,
        color_system=screen.color_system if screen.is_terminal else None,
        force_terminal=screen.is_terminal,
        highlight=False,
    )


def take_text(buffer: io.StringIO) -> str:
    """What was rendered into ``buffer`` since the last call (``""`` if nothing), and empty it."""
    if not buffer.tell():
        return ""
    text = buffer.getvalue().rstrip("\n")
    buffer.seek(0)
    buffer.truncate()
    return text


def print_text(text: str, write: Callable[[str], None] | None = None) -> None:
    """Print a rendered report in one piece: through ``write`` (a progress bar's own
    printer, which clears the bar, prints above it and redraws it), else through rich's
    global console (which prints above a live display such as a rich progress bar)."""
    if not text:
        return
    if write is not None:
        write(text)
        return
    from rich import get_console
    from rich.text import Text

    get_console().print(Text.from_ansi(text), soft_wrap=True)
