"""Hooks gradwatch puts on the user's modules and optimizers, and how they are removed.

* :class:`Hook` wraps every function gradwatch registers: a watcher's own methods are held
  weakly (a watcher dropped without ``detach()`` can still be collected), and a deep copy or
  a pickle of an attached model gets an inert function instead of a copy of the watcher.
* :class:`Probes` holds the module hooks plugins register through ``ctx.probes``: sampled
  ones are installed only for the forwards of sampled steps, scheduled ones for the steps
  their schedule names; permanent ones for every forward. The watcher removes them all on
  detach.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from gradwatch.watch import Watcher

__all__ = ["Hook", "Probes", "remove_all"]


def _inert(*args: object, **kwargs: object) -> None:
    """What a gradwatch hook becomes in a deep copy or a pickle of an attached model."""
    return None


class Hook:
    """A hook registered by gradwatch.

    A watcher's own methods are held weakly, so a watcher that is dropped without
    ``detach()`` can still be collected (its hooks then do nothing). A deep copy or a
    pickle of the model (an EMA copy taken mid-training, a checkpoint) gets an inert
    hook instead of a copy of the watcher.
    """

    __slots__ = ("_fn", "_method")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._method = weakref.WeakMethod(fn) if hasattr(fn, "__self__") and hasattr(fn, "__func__") else None
        self._fn = None if self._method is not None else fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self._fn if self._method is None else self._method()
        return None if fn is None else fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, object]) -> Callable[..., None]:
        return _inert

    def __reduce__(self) -> tuple[Callable[..., None], tuple[()]]:
        return _inert_factory, ()


def _inert_factory() -> Callable[..., None]:
    return _inert


class _Timed(Hook):
    """A plugin's probe, with the host time it takes added to its :class:`Probes`' clock
    (the ``auto`` cadence weighs sampled work by it)."""

    __slots__ = ("_clock", "_slot")

    def __init__(self, fn: Callable[..., Any], clock: list[float], slot: int) -> None:
        super().__init__(fn)
        self._clock = clock
        self._slot = slot

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._clock[self._slot] += time.perf_counter() - start


class Probes:
    """Module hooks registered by plugins through the watcher, so detach removes them.

    Sampled hooks are installed only for the forward passes of sampled steps and removed
    when the step closes, so other steps pay nothing. ``sampled`` may also be a schedule,
    ``f(step) -> bool`` (the non-finite checks of the dense start): its hooks are installed
    for the steps it names. Hooks sharing one schedule object are installed together, so
    the watcher asks each schedule once a step, not once a hook.
    """

    def __init__(self, watcher: Watcher) -> None:
        self._watcher = weakref.ref(watcher)
        # schedule (None: the sampled steps) -> its hooks
        self._scheduled: dict[Callable[[int], bool] | None, list[tuple[nn.Module, str, Callable[..., Any], dict[str, Any]]]] = {}
        self._installed: list[RemovableHandle] = []
        self._step: int | None = None
        self.permanent: list[RemovableHandle] = []
        #: Host seconds spent in plugins' probes since :meth:`take_time`: permanent ones, then
        #: sampled and scheduled ones.
        self.clock = [0.0, 0.0]

    def forward_hook(
        self, module: nn.Module, fn: Callable[..., Any], *, sampled: bool | Callable[[int], bool] = True, **kwargs: Any
    ) -> None:
        """Register ``fn`` as a forward hook of ``module`` (``kwargs`` as for
        ``nn.Module.register_forward_hook``): on sampled steps (``sampled=True``), on every
        forward (``False``), or on the steps a schedule ``f(step) -> bool`` names."""
        self._add(module, "register_forward_hook", fn, sampled, kwargs)

    def forward_pre_hook(
        self, module: nn.Module, fn: Callable[..., Any], *, sampled: bool | Callable[[int], bool] = True, **kwargs: Any
    ) -> None:
        """Register ``fn`` as a forward pre-hook of ``module`` (``sampled`` as for :meth:`forward_hook`)."""
        self._add(module, "register_forward_pre_hook", fn, sampled, kwargs)

    def add_handle(self, handle: RemovableHandle) -> None:
        """Keep any other removable handle (a tensor hook, say) to remove on detach."""
        self.permanent.append(handle)

    def _add(
        self,
        module: nn.Module,
        method: str,
        fn: Callable[..., Any],
        sampled: bool | Callable[[int], bool],
        kwargs: dict[str, Any],
    ) -> None:
        fn = _Timed(fn, self.clock, 0 if sampled is False else 1)
        if sampled is False:
            self.permanent.append(getattr(module, method)(fn, **kwargs))
            return
        schedule = None if sampled is True else sampled
        self._scheduled.setdefault(schedule, []).append((module, method, fn, kwargs))
        if self._step is not None and self._due(schedule, self._step):
            self._installed.append(getattr(module, method)(fn, **kwargs))

    def _due(self, schedule: Callable[[int], bool] | None, step: int) -> bool:
        if schedule is not None:
            return bool(schedule(step))
        watcher = self._watcher()
        return watcher is not None and watcher.probing

    def take_time(self) -> tuple[float, float]:
        """``(permanent, scheduled)`` host seconds in probes since the last call; resets."""
        spent = (self.clock[0], self.clock[1])
        self.clock[0] = self.clock[1] = 0.0
        return spent

    @property
    def has_sampled(self) -> bool:
        """Whether any plugin registered a sampled or scheduled hook."""
        return any(self._scheduled.values())

    @property
    def installed(self) -> bool:
        return bool(self._installed)

    def install(self, step: int) -> None:
        """Install the hooks due at ``step`` (the sampled ones when the watcher is probing)."""
        self._step = step
        if not self._installed:
            for schedule, hooks in self._scheduled.items():
                if self._due(schedule, step):
                    self._installed += [getattr(m, method)(fn, **kw) for m, method, fn, kw in hooks]

    def uninstall(self) -> None:
        for handle in self._installed:
            handle.remove()
        self._installed = []

    def remove_all(self) -> None:
        self.uninstall()
        for handle in self.permanent:
            handle.remove()
        self.permanent = []
        self._scheduled = {}
        self._step = None


def remove_all(handles: list[RemovableHandle]) -> None:
    """Remove every handle in ``handles`` and empty the list (idempotent)."""
    for handle in handles:
        handle.remove()
    handles.clear()
