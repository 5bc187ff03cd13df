"""Steps that ``GradScaler`` skipped: seen at the next forward, told apart from discarded
gradients by a drop of the loss scale.

``GradScaler.step()`` skips ``optimizer.step()`` when the scaled gradients overflowed, so no
step boundary fires. The next training forward then sees: a backward ran (a flag set by a
post-accumulate-grad hook on one parameter), its gradients were cleared, no optimizer
stepped. A GAN's discarded generator pass through the discriminator looks the same, so the
skip is confirmed by a drop of the loss scale (one host read, on such steps only). Without
``scaler=``, such steps are not counted. Under FSDP2 the flag never fires.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch.hooks import Hook
from gradwatch.types import GradWatchError

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from gradwatch.types import LayerInfo

__all__ = ["AmpSkips"]


class AmpSkips:
    """The "a backward ran" flag and the loss-scale comparison of one watch.

    Args:
        scaler: The loop's ``torch.amp.GradScaler``, or ``None`` (skips are not counted).

    Raises:
        GradWatchError: When ``scaler`` is not a ``GradScaler``.
    """

    def __init__(self, scaler: Any = None) -> None:
        if scaler is not None and not (hasattr(scaler, "get_scale") and hasattr(scaler, "_scale")):
            raise GradWatchError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler
        self.backward_seen = False
        self._scale_seen: torch.Tensor | None = None
        self._sentinel: nn.Parameter | None = None
        self.layer: nn.Module | None = None
        self.handle: RemovableHandle | None = None

    def watch(self, layer: LayerInfo) -> RemovableHandle:
        """Put the flag on ``layer``'s first parameter (the first layer in forward order once
        known: it gets its gradient last) and return the hook's handle. A flag only:
        statistics are never read in a tensor hook (it fires before accumulation and DDP's
        all-reduce)."""
        self.remove()
        self.layer = layer.module
        self._sentinel = layer.module.get_parameter(layer.param_names[0])
        self.handle = self._sentinel.register_post_accumulate_grad_hook(Hook(self._on_backward_done))
        return self.handle

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        self._sentinel = self.layer = self.handle = None

    def _on_backward_done(self, param: torch.Tensor) -> None:
        self.backward_seen = True

    def skipped(self) -> bool:
        """At a training forward with no step open: whether ``GradScaler`` skipped the step
        whose backward ran last (a backward ran, its gradients were cleared, no optimizer
        stepped, and the loss scale dropped)."""
        if not (self.backward_seen and self._sentinel is not None and self._sentinel.grad is None):
            return False
        self.backward_seen = False
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled() or scaler._scale is None:
            return False
        previous = float(self._scale_seen) if self._scale_seen is not None else float(scaler._init_scale)
        return float(scaler._scale) < previous  # the one host read, on such steps only

    def remember_scale(self) -> None:
        """Keep the current loss scale on device (no sync) for the next comparison."""
        scaler = self.scaler
        if scaler is not None and scaler._scale is not None:
            if self._scale_seen is None:
                self._scale_seen = scaler._scale.detach().clone()
            else:
                self._scale_seen.copy_(scaler._scale)
