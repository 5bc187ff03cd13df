"""The options every door takes, declared once: :class:`WatchConfig`.

``gradwatch.watch(model, opt, **options)``, ``gradwatch.GradWatch(**options)`` and every
later door pass their keyword options to :meth:`WatchConfig.from_options`, which owns the
names, the defaults, the documentation and the validation (with a "did you mean" for a
misspelled name). What depends on the plugins that are loaded (options given for a
plugin, ``clip=`` without the plugin that clips) is checked once the plugin manager is
known, by :func:`gradwatch.manager.check_config`, for every door alike.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gradwatch.cadence import AUTO
from gradwatch.types import GradWatchError

__all__ = ["WatchConfig"]


def _option(default: Any = dataclasses.MISSING, *, doc: str, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchConfig:
    """The options shared by every door (:func:`gradwatch.watch`, :class:`gradwatch.GradWatch`).

    Build it with :meth:`from_options` (what the doors do) to get a "did you mean" for a
    misspelled name; the constructor validates every value. Each attribute's
    documentation is the ``doc`` entry of its field's metadata, which the doors' own
    docstrings are written from (:meth:`options_doc`).
    """

    report_every: int = _option(100, doc="Optimizer steps between host reads of the statistics, diagnoses and reports.")
    stats_every: int | str = _option(
        "auto",
        doc='Optimizer steps between gradient statistics, or ``"auto"`` (the default): every step for the first 32 '
        "steps, then as often as 1% of the measured step (or 50 µs a step) allows, chosen once at step 32 and "
        "stated in the report and the run log (:mod:`gradwatch.cadence`). 1 reads every gradient on every step "
        "(about one memory pass over the gradients).",
    )
    sample_every: int | str = _option(
        "auto",
        doc="Steps between sampled work: forward activation probes, per-module non-finite checks, weight norms and "
        'the update/weight ratio; ``"auto"`` (the default): steps 0, 1, 2, 4, 8, 16, then every 32 steps or more, '
        "as the measured cost allows. A sampled step also reads statistics; two integers must divide "
        "(``sample_every`` a multiple of ``stats_every``).",
    )
    clip: Any = _option(
        None,
        doc='``None``, a max global norm (``1.0``), ``"autoclip"``, ``"zclip"``, ``"agc"`` or a config object '
        "(``gradwatch.ZClip(...)``, ``AutoClip``, ``AGC``, ``ClipNorm``); carried out by the ``clipping`` plugin.",
    )
    on_nonfinite: str | None = _option(
        None,
        doc='What to do with a step whose gradients hold NaN/Inf: ``None`` (only diagnose), ``"skip"``, ``"zero"``, '
        '``"warn"`` or ``"raise"``; carried out by the ``clipping`` plugin.',
    )
    log: str | None = _option(None, doc="Path of the JSONL run log (written on rank zero), or ``None``.")
    plugins: tuple[object, ...] = _option((), doc="Extra plugin objects, registered after the built-ins.")
    disable: tuple[str, ...] = _option((), doc="Names of plugins (built-in or third-party) not to load; a string is one name.")
    strict: bool = _option(False, doc="Re-raise errors of gradwatch and its plugins instead of switching them off.")
    autoload: bool = _option(True, doc="Load third-party plugins from the ``gradwatch`` entry-point group.")
    report: bool = _option(True, doc="Print console reports (``False`` keeps gradwatch silent; the run log is still written).")
    options: Mapping[str, Mapping[str, Any]] = _option(
        doc='Per-plugin options, ``{"vanishing": {"ratio": 1e-3}}``; each plugin documents and validates its own.',
        factory=dict,
    )
    history_size: int = _option(10_000, doc="Rows of per-layer statistics kept on the host (``history``).")
    keep_batches: int = _option(
        0,
        doc="Keep the last k batches the root module's forward was called with, for ``gw.trial()`` (0 keeps none): "
        "references to its arguments, detached, not copied, so a loop that later writes into those tensors in place "
        "changes what the trial sees (see ``keep_copies``); they stay on their device until the watcher is dropped.",
    )
    keep_copies: bool = _option(
        False,
        doc="Clone the kept batches (one copy of the inputs per forward) instead of keeping references, for loops "
        "that reuse or mutate their input tensors in place.",
    )

    def __post_init__(self) -> None:
        for name in ("report_every", "history_size"):
            _positive_int(name, getattr(self, name))
        for name in ("stats_every", "sample_every"):
            if getattr(self, name) is None:
                _set(self, name, AUTO)
            if getattr(self, name) != AUTO:
                _positive_int(name, getattr(self, name), auto=True)
        if AUTO not in (self.stats_every, self.sample_every) and self.sample_every % self.stats_every:
            raise GradWatchError(
                f"sample_every={self.sample_every} must be a multiple of stats_every={self.stats_every}, "
                "so that sampled steps also read gradients; "
                f"use sample_every={self.stats_every * max(1, round(self.sample_every / self.stats_every))}"
            )
        from gradwatch.clip import resolve_clip, resolve_nonfinite  # clip.py imports this module's errors

        resolve_clip(self.clip)
        _set(self, "on_nonfinite", resolve_nonfinite(self.on_nonfinite))
        if self.log is not None:
            if not isinstance(self.log, (str, os.PathLike)):
                raise GradWatchError(f"log takes a file path (str or os.PathLike), got {type(self.log).__name__}")
            _set(self, "log", os.fspath(self.log))
        if isinstance(self.plugins, (str, bytes)) or not isinstance(self.plugins, Iterable):
            raise GradWatchError(f"plugins takes a list of plugin objects, got {type(self.plugins).__name__}")
        _set(self, "plugins", tuple(self.plugins))
        disable = (self.disable,) if isinstance(self.disable, str) else self.disable
        disable = tuple(disable) if isinstance(disable, Iterable) else None
        if disable is None or not all(isinstance(n, str) for n in disable):
            raise GradWatchError(f"disable takes plugin names (a list of strings, or one string), got {self.disable!r}")
        _set(self, "disable", disable)
        if isinstance(self.keep_batches, bool) or not isinstance(self.keep_batches, int) or self.keep_batches < 0:
            raise GradWatchError(f"keep_batches must be a number of batches (an int >= 0, e.g. 8), got {self.keep_batches!r}")
        if not isinstance(self.keep_copies, bool):
            raise GradWatchError(f"keep_copies takes True or False, got {self.keep_copies!r}")
        for name in ("strict", "autoload", "report"):
            if not isinstance(getattr(self, name), bool):
                raise GradWatchError(f"{name} takes True or False, got {getattr(self, name)!r}")
        _set(self, "options", _plugin_options(self.options))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option name, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, door: str, door_names: Iterable[str] = ()) -> WatchConfig:
        """Build the configuration from a door's keyword options.

        Args:
            options: The keyword options the user gave the door.
            door: How the door is called in messages (``"watch()"``, ``"GradWatch()"``).
            door_names: The door's own keyword arguments (``console``, ``scaler``…), offered
                as "did you mean" candidates too.

        Raises:
            GradWatchError: For an unknown name (with the closest known one) or a bad value.
        """
        known = cls.names()
        unknown = [name for name in options if name not in known]
        if unknown:
            candidates = sorted({*known, *door_names})
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, candidates, 1)
                hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
            raise GradWatchError(f"{door} got unknown option(s) {', '.join(hints)}; its options are: {', '.join(candidates)}")
        return cls(**options)

    @classmethod
    def options_doc(cls, indent: int = 8) -> str:
        """The Google-style ``Args:`` entries of every option, for the doors' docstrings."""
        width = 92 - indent
        lines = []
        for f in dataclasses.fields(cls):
            body = textwrap.wrap(f"{f.name}: {f.metadata['doc']}", width=width, subsequent_indent="    ")
            lines += [" " * indent + line for line in body]
        return "\n".join(lines).lstrip()

    def plugin_options(self, name: str) -> Mapping[str, Any]:
        """The options given for plugin ``name`` (empty when none)."""
        return self.options.get(name, {})

    def replace(self, **changes: Any) -> WatchConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def _set(config: WatchConfig, name: str, value: Any) -> None:
    object.__setattr__(config, name, value)


def _positive_int(name: str, value: Any, *, auto: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        alternative = ' or "auto"' if auto else ""
        raise GradWatchError(f"{name} must be a positive integer of optimizer steps{alternative}, got {value!r}")


def _plugin_options(options: Any) -> dict[str, dict[str, Any]]:
    """A deep copy (the user's dicts are never shared or changed) of a mapping of plugin
    names to option mappings."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise GradWatchError(
            f'options must map plugin names to dicts, e.g. {{"vanishing": {{"ratio": 1e-3}}}}; got {type(options).__name__}'
        )
    out: dict[str, dict[str, Any]] = {}
    for name, values in options.items():
        if not isinstance(name, str) or not isinstance(values, Mapping):
            raise GradWatchError(
                f"options must map plugin names to dicts of that plugin's options; got {name!r}: {type(values).__name__}"
            )
        out[name] = copy.deepcopy(dict(values))
    return out
