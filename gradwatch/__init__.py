"""gradwatch: gradient diagnostics for any PyTorch model.

``import gradwatch`` imports nothing heavy: every public name resolves on first use
(PEP 562, as pluggy resolves ``__version__``), so the ``gradwatch`` command's help,
version and argument errors start without torch (issue 14). ``gradwatch.watch`` (or any
other name) imports torch, pluggy and gradwatch's core, never Lightning or transformers:
``GradWatch`` (the Lightning callback) imports its Lightning package when it is resolved, ``hf``
(the Hugging Face door) imports no transformers until its callback class is used.
"""

from __future__ import annotations

# Private names: a submodule import binds its name on the package (gradwatch.types would
# replace a global named ``types``).
import sys as _sys
import types as _types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradwatch.clip import AGC, AutoClip, ClipNorm, ZClip
    from gradwatch.config import WatchConfig
    from gradwatch.hookspecs import hookimpl, hookspec
    from gradwatch.lightning import GradWatch
    from gradwatch.stash import Stash, StashKey
    from gradwatch.stats import GradBatch
    from gradwatch.trial import Trial, Trials
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

#: Where each public name lives (imported on first use).
_WHERE = {
    **dict.fromkeys(("AGC", "AutoClip", "ClipNorm", "ZClip"), "gradwatch.clip"),
    "WatchConfig": "gradwatch.config",
    **dict.fromkeys(("hookimpl", "hookspec"), "gradwatch.hookspecs"),
    "GradWatch": "gradwatch.lightning",
    **dict.fromkeys(("Stash", "StashKey"), "gradwatch.stash"),
    "GradBatch": "gradwatch.stats",
    **dict.fromkeys(
        (
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
        ),
        "gradwatch.types",
    ),
    **dict.fromkeys(("Trial", "Trials"), "gradwatch.trial"),
    **dict.fromkeys(("Watcher", "watch"), "gradwatch.watch"),
}


class _Package(_types.ModuleType):
    """The package module: ``gradwatch.watch`` stays the function.

    Importing the submodule ``gradwatch.watch`` binds it as an attribute of the package;
    the public ``gradwatch.watch`` is the function (as when these names were imported
    eagerly), so that binding is left out and the name resolves through ``__getattr__``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "watch" and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name == "hf":
        import gradwatch.hf

        return gradwatch.hf
    where = _WHERE.get(name)
    if where is not None:
        # __import__ (the import statement's own path), so that -X importtime sees it.
        value = getattr(__import__(where, fromlist=[name]), name)
        if name != "GradWatch":  # built per Lightning package on first use: resolved each time
            globals()[name] = value
        return value
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("gradwatch")
        except PackageNotFoundError:  # a source checkout that was never installed
            return "0.0.0+unknown"
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*(n for n in globals() if not n.startswith("_")), *__all__})
