"""The plugin host: one ``pluggy.PluginManager`` per watcher.

Built-in plugins are loaded from this distribution's own ``gradwatch`` entry points
(the group third parties use), then third-party entry points, then the plugin
objects the user passes. A plugin that raises is reported once and switched off,
so a bug in a detector never stops the user's training.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import sys
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pluggy

from gradwatch import hookspecs
from gradwatch.types import GradWatchError, GradWatchWarning

if TYPE_CHECKING:
    from gradwatch.config import WatchConfig

__all__ = ["BUILTIN_PLUGINS", "PluginHost", "check_config", "make_plugin_manager", "plugin_manager"]

#: Built-in plugins, in registration order; each is the name of its entry point in
#: pyproject.toml and of its module ``gradwatch.plugins.<name>``.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "nonfinite",
    "vanishing",
    "exploding",
    "activations",
    "recurrent",
    "init",
    "advisor",
    "clipping",
    "console",
    "runlog",
)

_DISABLE_AUTOLOAD_ENV = "GRADWATCH_DISABLE_PLUGIN_AUTOLOAD"
_DISABLE_PLUGINS_ENV = "GRADWATCH_DISABLE_PLUGINS"
_TRACE_ENV = "GRADWATCH_TRACE_PLUGINS"


def _env_list(name: str) -> list[str]:
    return [part.strip() for part in os.environ.get(name, "").split(",") if part.strip()]


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME))


def _own_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    try:
        dist = importlib.metadata.distribution(hookspecs.PROJECT_NAME)
    except importlib.metadata.PackageNotFoundError:  # a source checkout that was never installed
        return {}
    return {ep.name: ep for ep in dist.entry_points.select(group=hookspecs.PROJECT_NAME)}


def plugin_name(plugin: object) -> str:
    """The name a user-supplied plugin object is registered under."""
    name = getattr(plugin, "gradwatch_name", None) or getattr(plugin, "__name__", None)
    if name is None:
        name = type(plugin).__name__
    return str(name)


def make_plugin_manager(
    *,
    plugins: Iterable[object] = (),
    disable: Iterable[str] = (),
    autoload: bool = True,
) -> pluggy.PluginManager:
    """Create a plugin manager with the built-ins, third-party and given plugins.

    Args:
        plugins: Extra plugin objects (modules, classes or instances with ``gradwatch_*``
            hook implementations), registered last.
        disable: Names of plugins not to load, built-in or third-party.
        autoload: Load third-party plugins from the ``gradwatch`` entry-point group
            (``GRADWATCH_DISABLE_PLUGIN_AUTOLOAD=1`` turns it off too).

    Raises:
        GradWatchError: For an unknown name in ``disable`` or a hook implementation that
            matches no specification (a misspelled hook).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    plugins = list(plugins)
    disable = [*disable, *_env_list(_DISABLE_PLUGINS_ENV)]
    known = {*BUILTIN_PLUGINS, *(ep.name for ep in _entry_points()), *(plugin_name(p) for p in plugins)}
    unknown = sorted(set(disable) - known)
    if unknown:
        raise GradWatchError(
            f"disable names unknown plugin(s) {', '.join(map(repr, unknown))}; known plugins are: {', '.join(sorted(known))}"
        )
    for name in disable:
        pm.set_blocked(name)

    own = _own_entry_points()
    for name in BUILTIN_PLUGINS:
        if pm.is_blocked(name):
            continue
        ep = own.get(name)
        module = ep.load() if ep is not None else importlib.import_module(f"gradwatch.plugins.{name}")
        pm.register(module, name)

    if autoload and not os.environ.get(_DISABLE_AUTOLOAD_ENV):
        # Third parties; names already taken (the built-ins) and blocked names are skipped.
        pm.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)

    for plugin in plugins:
        name = plugin_name(plugin)
        if pm.is_blocked(name):
            continue
        if pm.has_plugin(name):
            raise GradWatchError(
                f"a plugin named {name!r} is already registered; give yours another name "
                "(set a 'gradwatch_name' attribute) or disable the other one"
            )
        pm.register(plugin, name)

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise GradWatchError(f"{exc}; hook names start with 'gradwatch_' (see gradwatch.hookspecs)") from exc
    if os.environ.get(_TRACE_ENV):
        pm.add_hookcall_monitoring(_trace_before, _trace_after)
    return pm


def check_config(pm: pluggy.PluginManager, config: WatchConfig) -> None:
    """Check the options that depend on the plugins loaded, the same for every door.

    Raises:
        GradWatchError: For options given to a plugin that is not loaded (a misspelled
            name, say), or for ``clip=`` / ``on_nonfinite=`` when the ``clipping`` plugin
            that carries them out is disabled.
    """
    loaded = {name for name, plugin in pm.list_name_plugin() if plugin is not None}
    unknown = sorted(set(config.options) - loaded - set(config.disable))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(loaded), 1)
            hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
        raise GradWatchError(
            f"options given for unknown plugin(s) {', '.join(hints)}; loaded plugins: {', '.join(sorted(loaded))}"
        )
    if "clipping" not in loaded:
        asked = [f"{name}={getattr(config, name)!r}" for name in ("clip", "on_nonfinite") if getattr(config, name) is not None]
        if asked:
            raise GradWatchError(
                f"{' and '.join(asked)} needs the 'clipping' plugin, which is disabled (disable= or "
                "GRADWATCH_DISABLE_PLUGINS): nothing would clip; enable it or drop the option"
            )


def plugin_manager(config: WatchConfig) -> pluggy.PluginManager:
    """The plugin manager a watch with ``config`` uses, with the configuration checked
    against it (:func:`check_config`)."""
    pm = make_plugin_manager(plugins=config.plugins, disable=config.disable, autoload=config.autoload)
    check_config(pm, config)
    return pm


def _trace_before(hook_name: str, hook_impls: list[pluggy.HookImpl], kwargs: dict[str, Any]) -> None:
    sys.stderr.write(f"gradwatch: {hook_name} -> {', '.join(str(i.plugin_name) for i in hook_impls)}\n")


def _trace_after(outcome: pluggy.Result[Any], hook_name: str, hook_impls: list[pluggy.HookImpl], kwargs: dict[str, Any]) -> None:
    failed = outcome.exception
    sys.stderr.write(f"gradwatch: {hook_name} {'raised ' + repr(failed) if failed else 'done'}\n")


class PluginHost:
    """Calls hooks so that one failing plugin is switched off instead of failing the call.

    Each hook implementation is wrapped once: an exception is recorded and the
    implementation returns ``None`` (so the other plugins' results of the same call are
    kept and nobody runs twice); after the call the plugin is reported once and
    unregistered. ``gradwatch_configure`` is not wrapped: its errors are the user's bad
    options and must reach them.

    Args:
        pm: The plugin manager.
        strict: Re-raise a plugin's exception instead of switching the plugin off.
    """

    _UNGUARDED = frozenset({"gradwatch_configure"})

    def __init__(self, pm: pluggy.PluginManager, *, strict: bool = False) -> None:
        self.pm = pm
        self.strict = strict
        self.failed: dict[str, BaseException] = {}
        self._pending: list[tuple[str, str, BaseException]] = []
        for hook_name in self.pm.hook.__dict__:
            if hook_name.startswith("gradwatch_") and hook_name not in self._UNGUARDED:
                for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                    self._guard(impl, hook_name)

    def _guard(self, impl: pluggy.HookImpl, hook_name: str) -> None:
        if impl.wrapper or impl.hookwrapper:
            return  # a wrapper's failure aborts the call; the host reports it as its own
        function = impl.function
        name = impl.plugin_name
        pending = self._pending
        strict = self.strict

        def guarded(*args: Any) -> Any:
            try:
                return function(*args)
            except GradWatchError:
                raise  # deliberate, for the user (on_nonfinite="raise"): never a plugin bug
            except Exception as exc:
                if strict:
                    raise
                pending.append((name, hook_name, exc))
                return None

        impl.function = guarded

    def call(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call ``hook_name`` and switch off every plugin that raised in it."""
        results = getattr(self.pm.hook, hook_name)(**kwargs)
        while self._pending:
            name, failed_hook, exc = self._pending.pop(0)
            if name not in self.failed:
                self.switch_off(name, failed_hook, exc)
        return results

    def call_historic(self, hook_name: str, **kwargs: Any) -> None:
        """Historic hooks (configure) are called once; their errors always propagate."""
        getattr(self.pm.hook, hook_name).call_historic(kwargs=kwargs)

    def switch_off(self, name: str, hook_name: str, exc: BaseException) -> None:
        self.failed[name] = exc
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        warnings.warn(
            f"gradwatch plugin {name!r} raised {type(exc).__name__}: {exc} in {hook_name}; "
            "it is switched off for the rest of this watch and training goes on "
            "(pass strict=True to re-raise)",
            GradWatchWarning,
            stacklevel=4,
        )
