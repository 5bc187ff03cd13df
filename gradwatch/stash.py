"""Typed per-watch storage for plugins (modelled on pytest's ``Stash``).

Built-in plugins are stateless modules; whatever they remember lives in the
``ctx.stash`` of the watch that calls them, so two watchers never share state.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

__all__ = ["Stash", "StashKey"]

T = TypeVar("T")
D = TypeVar("D")


class StashKey(Generic[T]):
    """A typed key into a :class:`Stash`; create one per plugin at module level."""

    __slots__ = ()


class Stash:
    """A type-safe heterogeneous mutable mapping, one per watcher.

    Example::

        _STATE = StashKey[MyState]()
        ctx.stash[_STATE] = MyState()
        state = ctx.stash[_STATE]
    """

    __slots__ = ("_storage",)

    def __init__(self) -> None:
        self._storage: dict[StashKey[Any], object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._storage[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._storage[key])

    def get(self, key: StashKey[T], default: D) -> T | D:
        try:
            return self[key]
        except KeyError:
            return default

    def setdefault(self, key: StashKey[T], default: T) -> T:
        try:
            return self[key]
        except KeyError:
            self[key] = default
            return default

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._storage[key]

    def __contains__(self, key: StashKey[T]) -> bool:
        return key in self._storage

    def __len__(self) -> int:
        return len(self._storage)

    def clear(self) -> None:
        """Forget everything (a re-attached watcher configures its plugins afresh)."""
        self._storage.clear()
