"""gradwatch: gradient diagnostics for any PyTorch model.

``import gradwatch`` imports torch, pluggy and gradwatch's own core, never Lightning:
``GradWatch`` (the Lightning callback) and ``__version__`` resolve lazily.
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
    from gradwatch.trial import Trial, Trials

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
    "Trial",
    "Trials",
    "WatchConfig",
    "Watcher",
    "hookimpl",
    "hookspec",
    "watch",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in ("Trial", "Trials"):  # lazily: a trial is rare, and import time counts
        import gradwatch.trial

        return getattr(gradwatch.trial, name)
    if name == "GradWatch":
        from gradwatch.lightning import GradWatch

        return GradWatch
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("gradwatch")
        except PackageNotFoundError:  # a source checkout that was never installed
            return "0.0.0+unknown"
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
