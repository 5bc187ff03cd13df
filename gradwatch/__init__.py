"""gradwatch: gradient diagnostics for any PyTorch model.

``import gradwatch`` imports torch, pluggy and gradwatch's own core, never Lightning or
transformers: ``GradWatch`` (the Lightning callback), ``hf`` (the Hugging Face door) and
``__version__`` resolve lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradwatch.clip import AGC, AutoClip, ClipNorm, ZClip
from gradwatch.config import WatchConfig
from gradwatch.hookspecs import hookimpl, hookspec
from gradwatch.stash import Stash, StashKey
from gradwatch.stats import GradBatch
from gradwatch.types import (
    Action,
    Diagnosis,
    GradWatchError,
    GradWatchWarning,
    LayerInfo,
    ModelInfo,
    Remedy,
    Report,
    Series,
    Severity,
    StatsWindow,
    StepContext,
)
from gradwatch.watch import Watcher, watch

if TYPE_CHECKING:
    from gradwatch.lightning import GradWatch

__all__ = [
    "AGC",
    "AutoClip",
    "ClipNorm",
    "ZClip",
    "Action",
    "Diagnosis",
    "GradBatch",
    "GradWatch",
    "GradWatchError",
    "GradWatchWarning",
    "LayerInfo",
    "ModelInfo",
    "Remedy",
    "Report",
    "Series",
    "Severity",
    "Stash",
    "StashKey",
    "StatsWindow",
    "StepContext",
    "WatchConfig",
    "Watcher",
    "hookimpl",
    "hookspec",
    "watch",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "GradWatch":
        from gradwatch.lightning import GradWatch

        return GradWatch
    if name == "hf":
        import gradwatch.hf

        return gradwatch.hf
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("gradwatch")
        except PackageNotFoundError:  # a source checkout that was never installed
            return "0.0.0+unknown"
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
