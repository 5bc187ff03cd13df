"""Which process this is, without importing Lightning.

``global_rank()`` asks ``torch.distributed`` once a process group exists, and
otherwise reads the environment variables the launchers set (the same keys
Lightning's ``rank_zero_only.rank`` reads), so a rank is known before
``init_process_group`` runs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

__all__ = ["global_rank", "world_size", "is_rank_zero", "rank_zero_only", "distributed_ready", "reduce_max"]

F = TypeVar("F", bound=Callable[..., Any])

_RANK_KEYS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def distributed_ready() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    if distributed_ready():
        return dist.get_rank()
    for key in _RANK_KEYS:
        value = os.environ.get(key)
        if value is not None:
            return int(value)
    return 0


def world_size() -> int:
    if distributed_ready():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    return global_rank() == 0


def rank_zero_only(fn: F) -> F:
    """Run ``fn`` on rank zero only; other ranks get ``None``."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if is_rank_zero():
            return fn(*args, **kwargs)
        return None

    return wrapped  # type: ignore[return-value]


def reduce_max(values: list[float], device: Any) -> list[float]:
    """The element-wise maximum of ``values`` over every rank (a collective: every rank
    calls it at the same point); ``device`` is where the tensor lives (the gradients'
    device, which the backend can reduce)."""
    import torch

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
