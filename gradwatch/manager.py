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
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

from gradwatch import hookspecs
from gradwatch.types import Action, Diagnosis, GradWatchError, GradWatchWarning, Remedy, Severity

if TYPE_CHECKING:
    from gradwatch.config import WatchConfig

__all__ = ["BUILTIN_PLUGINS", "PluginHost", "as_plugin", "check_config", "first_line", "make_plugin_manager", "plugin_manager"]

#: Built-in plugins, in registration order; each is the name of its entry point in
#: pyproject.toml and of its module ``gradwatch.plugins.<name>``.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "nonfinite",
    "vanishing",
    "exploding",
    "updates",
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


_HOOK_NAMES = frozenset(name for name in dir(hookspecs) if name.startswith("gradwatch_"))
_MARK = f"{hookspecs.PROJECT_NAME}_impl"
_WHAT_TO_PASS = (
    "pass a module, an object (an instance) or a function with @gradwatch.hookimpl-marked gradwatch_* hooks, "
    "or an importable module name"
)


class _FunctionPlugin:
    """A bare hook function given as a plugin (``plugins=[gradwatch_diagnose]``)."""

    def __init__(self, hook: str, function: Any) -> None:
        self.gradwatch_name = f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', hook)}"
        self.__dict__[hook] = function

    def __repr__(self) -> str:
        return f"<gradwatch function plugin {self.gradwatch_name}>"


def as_plugin(plugin: object) -> tuple[str, object]:
    """The name and the object to register for one entry of ``plugins=[...]``.

    A module, an instance, a class (instantiated once per watch: each watch gets its own
    instance), a bare hook function (named after its hook or marked
    ``@hookimpl(specname=...)``; marked as a hook implementation if it is not) or the name
    of an importable module.

    Raises:
        GradWatchError: For anything else, and for ``gradwatch_*`` methods left without
            ``@hookimpl`` (pluggy would ignore them silently), saying what to pass.
    """
    given = plugin
    if isinstance(plugin, str):
        try:
            plugin = importlib.import_module(plugin)
        except ImportError as exc:
            raise GradWatchError(f"plugins=[{given!r}]: cannot import module {given!r} ({exc}); {_WHAT_TO_PASS}") from None
    elif inspect.isclass(plugin):
        try:
            plugin = plugin()
        except TypeError as exc:
            raise GradWatchError(
                f"plugins=[{given.__name__}] is a class that cannot be built without arguments ({exc}); "
                f"pass an instance, plugins=[{given.__name__}(...)]"
            ) from None
    elif inspect.isfunction(plugin) or inspect.ismethod(plugin):
        opts = getattr(plugin, _MARK, None)
        hook = (opts or {}).get("specname") or plugin.__name__
        if hook not in _HOOK_NAMES:
            raise GradWatchError(
                f"plugins=[{plugin.__name__}]: a function given as a plugin must be named after the hook it "
                f"implements (gradwatch_diagnose, gradwatch_report, ...) or be marked "
                f'@gradwatch.hookimpl(specname="gradwatch_diagnose"); {plugin.__name__!r} is neither'
            )
        if opts is None:
            function = plugin.__func__ if inspect.ismethod(plugin) else plugin
            hookspecs.hookimpl(function)  # what @hookimpl would have done: the function is given as a hook
        wrapped = _FunctionPlugin(hook, plugin)
        return wrapped.gradwatch_name, wrapped
    elif plugin is None or isinstance(plugin, (int, float, bool, bytes, list, tuple, dict, set)):
        raise GradWatchError(f"plugins=[{given!r}] is not a plugin; {_WHAT_TO_PASS}")
    attributes = {name: _static(plugin, name) for name in dir(plugin)}
    marked = [name for name, value in attributes.items() if getattr(value, _MARK, None) is not None]
    unmarked = [
        name
        for name, value in attributes.items()
        if name.startswith("gradwatch_") and name != "gradwatch_name" and callable(value) and name not in marked
    ]
    if unmarked:
        raise GradWatchError(
            f"plugin {plugin_name(plugin)!r}: {', '.join(unmarked)} {'is' if len(unmarked) == 1 else 'are'} not marked with "
            "@gradwatch.hookimpl, so it would never be called; decorate it (from gradwatch import hookimpl)"
        )
    if not marked:
        raise GradWatchError(f"plugins=[{plugin_name(plugin)}] implements no gradwatch_* hook; {_WHAT_TO_PASS}")
    return plugin_name(plugin), plugin


def _static(plugin: object, name: str) -> Any:
    """An attribute as stored, without running properties (as pluggy looks hooks up)."""
    value = inspect.getattr_static(plugin, name, None)
    return value.__func__ if isinstance(value, (staticmethod, classmethod)) else value


def make_plugin_manager(
    *,
    plugins: Iterable[object] = (),
    disable: Iterable[str] = (),
    autoload: bool = True,
) -> pluggy.PluginManager:
    """Create a plugin manager with the built-ins, third-party and given plugins.

    Args:
        plugins: Extra plugins, registered last: modules, instances or classes (built
            once per manager) with ``@hookimpl``-marked ``gradwatch_*`` hooks, bare hook
            functions, or importable module names (see :func:`as_plugin`).
        disable: Names of plugins not to load, built-in or third-party.
        autoload: Load third-party plugins from the ``gradwatch`` entry-point group
            (``GRADWATCH_DISABLE_PLUGIN_AUTOLOAD=1`` turns it off too).

    Raises:
        GradWatchError: For an unknown name in ``disable`` or a hook implementation that
            matches no specification (a misspelled hook).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    entries = [as_plugin(p) for p in plugins]
    disable = [*disable, *_env_list(_DISABLE_PLUGINS_ENV)]
    known = {*BUILTIN_PLUGINS, *(ep.name for ep in _entry_points()), *(name for name, _ in entries)}
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

    for name, plugin in entries:
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


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most ``limit`` characters: a torch
    dispatcher error lists ~100 backends, which a one-line warning must not quote."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _trace_before(hook_name: str, hook_impls: list[pluggy.HookImpl], kwargs: dict[str, Any]) -> None:
    sys.stderr.write(f"gradwatch: {hook_name} -> {', '.join(str(i.plugin_name) for i in hook_impls)}\n")


def _trace_after(outcome: pluggy.Result[Any], hook_name: str, hook_impls: list[pluggy.HookImpl], kwargs: dict[str, Any]) -> None:
    failed = outcome.exception
    sys.stderr.write(f"gradwatch: {hook_name} {'raised ' + repr(failed) if failed else 'done'}\n")


class PluginReturnError(TypeError):
    """A plugin's hook returned something its specification does not allow."""


def _items(result: Any, item: type, hook: str) -> list[Any]:
    if isinstance(result, item):
        raise PluginReturnError(f"returned one {item.__name__} from {hook}; return a list of them: [{item.__name__.lower()}]")
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
        raise PluginReturnError(
            f"returned {type(result).__name__} from {hook}; it must return a list of gradwatch.{item.__name__} or None"
        )
    out = list(result)
    for value in out:
        if not isinstance(value, item):
            raise PluginReturnError(
                f"returned a list holding {type(value).__name__} from {hook}; every item must be a gradwatch.{item.__name__}"
            )
    return out


def _check_diagnoses(result: Any, name: str, shapes: Any) -> list[Diagnosis]:
    out = _items(result, Diagnosis, "gradwatch_diagnose")
    for d in out:
        bad = [
            what
            for what, ok in (
                ("severity (a gradwatch.Severity)", isinstance(d.severity, Severity)),
                ("step (an int)", isinstance(d.step, int) and not isinstance(d.step, bool)),
                ("kind (a str)", isinstance(d.kind, str)),
                ("message (a str)", isinstance(d.message, str)),
                ("layers (a tuple of str)", isinstance(d.layers, (tuple, list)) and all(isinstance(n, str) for n in d.layers)),
            )
            if not ok
        ]
        if bad:
            raise PluginReturnError(f"returned a Diagnosis with a bad {', '.join(bad)} from gradwatch_diagnose")
    return out


def _check_remedies(result: Any, name: str, shapes: Any) -> list[Remedy]:
    out = _items(result, Remedy, "gradwatch_advise")
    for r in out:
        if not (isinstance(r.kind, str) and isinstance(r.title, str) and isinstance(r.rationale, str)):
            raise PluginReturnError("returned a Remedy whose kind, title or rationale is not a str from gradwatch_advise")
    return out


def _check_actions(result: Any, name: str, shapes: Any) -> list[Action]:
    out = _items(result, Action, "gradwatch_read_actions (or gradwatch_actions)")
    for a in out:
        if not isinstance(a.step, int) or isinstance(a.step, bool):
            raise PluginReturnError(f"returned an Action whose step is {type(a.step).__name__}, not an int")
    return out


def _check_statistics(result: Any, name: str, shapes: dict[str, tuple[tuple[int, ...], str]]) -> Mapping[str, Any]:
    import torch

    if not isinstance(result, Mapping):
        raise PluginReturnError(
            f"returned {type(result).__name__} from gradwatch_collect; it must return a dict of "
            '"<plugin>.<name>" keys to tensors, or None'
        )
    for key, value in result.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise PluginReturnError(
                f"returned {{{key!r}: {type(value).__name__}}} from gradwatch_collect; keys are str, values tensors"
            )
        shape = tuple(value.shape)
        seen = shapes.setdefault(key, (shape, name))
        if seen[1] != name:
            raise PluginReturnError(
                f"returned the statistic {key!r}, which plugin {seen[1]!r} returns; prefix keys with the plugin's name"
            )
        if seen[0] != shape:
            raise PluginReturnError(f"returned the statistic {key!r} with shape {shape}, first {seen[0]}; a key keeps one shape")
    return result


def _check_state(result: Any, name: str, shapes: Any) -> Mapping[str, Any]:
    if not isinstance(result, Mapping):
        raise PluginReturnError(
            f"returned {type(result).__name__} from gradwatch_state_dict; it must return {{plugin_name: state}} or None"
        )
    return result


_CHECKS: dict[str, Callable[[Any, str, Any], Any]] = {
    "gradwatch_collect": _check_statistics,
    "gradwatch_read_actions": _check_actions,
    "gradwatch_actions": _check_actions,
    "gradwatch_diagnose": _check_diagnoses,
    "gradwatch_advise": _check_remedies,
    "gradwatch_state_dict": _check_state,
}


class PluginHost:
    """Calls hooks so that one failing plugin is switched off instead of failing the call.

    Each hook implementation is wrapped once: an exception is recorded and the
    implementation returns ``None`` (so the other plugins' results of the same call are
    kept and nobody runs twice); after the call the plugin is reported once and
    unregistered. A :class:`GradWatchError` is never caught: in ``gradwatch_configure`` it
    is the user's bad option, in the act stage a deliberate stop (``on_nonfinite="raise"``).
    A return value its hook does not allow counts as a failure of that plugin.

    Args:
        pm: The plugin manager.
        strict: Re-raise a plugin's exception instead of switching the plugin off.
    """

    _UNGUARDED: frozenset[str] = frozenset()

    def __init__(self, pm: pluggy.PluginManager, *, strict: bool = False) -> None:
        self.pm = pm
        self.strict = strict
        self.failed: dict[str, BaseException] = {}
        self._pending: list[tuple[str, str, BaseException]] = []
        #: ``gradwatch_collect`` keys: their shape and the plugin that returned them first.
        self.shapes: dict[str, tuple[tuple[int, ...], str]] = {}
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
        check = _CHECKS.get(hook_name)
        shapes = self.shapes

        def guarded(*args: Any) -> Any:
            try:
                result = function(*args)
                # A wrong return value is the plugin's fault, not the core's (issue 12): checked here,
                # where the plugin is known, so that only this plugin is switched off.
                return result if check is None or result is None else check(result, name, shapes)
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
        self._switch_off_pending()
        return results

    def _switch_off_pending(self) -> None:
        while self._pending:
            name, failed_hook, exc = self._pending.pop(0)
            if name not in self.failed:
                self.switch_off(name, failed_hook, exc)

    def call_historic(self, hook_name: str, **kwargs: Any) -> None:
        """Call a historic hook (configure). A :class:`GradWatchError` (a bad option) reaches
        the user; any other exception is a plugin bug: that plugin is switched off."""
        getattr(self.pm.hook, hook_name).call_historic(kwargs=kwargs)
        self._switch_off_pending()

    def configure_again(self, **kwargs: Any) -> None:
        """Call the historic ``gradwatch_configure`` again (a re-attached watcher), so that
        a plugin registered later is replayed this call, not the first one."""
        caller = self.pm.hook.gradwatch_configure
        # pluggy has no public way to call a historic hook twice without replaying both calls
        # to late plugins: the first call is forgotten, then the new one is made historic.
        history = getattr(caller, "_call_history", None)
        if history is not None:
            history.clear()
        caller.call_historic(kwargs=kwargs)
        self._switch_off_pending()

    def switch_off(self, name: str, hook_name: str, exc: BaseException) -> None:
        self.failed[name] = exc
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        what = (
            first_line(exc)
            if isinstance(exc, PluginReturnError)
            else f"raised {type(exc).__name__}: {first_line(exc)} in {hook_name}"
        )
        warnings.warn(
            f"gradwatch plugin {name!r} {what}; "
            "it is switched off for the rest of this watch and training goes on "
            "(pass strict=True to re-raise)",
            GradWatchWarning,
            stacklevel=4,
        )
