"""What gradwatch sees of a model: its layers, in forward order, and its optimizers.

A *layer* is a module that owns trainable parameters directly. ``DistributedDataParallel``,
``DataParallel`` and ``torch.compile`` wrappers are seen through, so layer names carry no
``module.`` / ``_orig_mod.`` prefixes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from gradwatch.types import GradWatchError, LayerInfo

if TYPE_CHECKING:
    from collections.abc import Set as AbstractSet

__all__ = ["as_optimizers", "check_optimizers", "find_layers", "unwrap_model"]


def unwrap_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """Strip ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile`` wrappers.

    Returns:
        The inner module and whether a ``torch.compile`` wrapper was found.
    """
    compiled = False
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            # Checked by name: importing torch._dynamo would cost every user its import time.
            model = model._orig_mod
            compiled = True
        else:
            return model, compiled


def find_layers(root: nn.Module, order: Sequence[nn.Module] = (), keep: AbstractSet[int] | None = None) -> tuple[LayerInfo, ...]:
    """The modules that own trainable parameters directly, in ``order`` first (forward
    order), then the rest in ``named_modules()`` order. A shared parameter belongs to the
    first layer that owns it. With ``keep`` (ids of parameters), only those are watched."""
    named = [(name, module) for name, module in root.named_modules(remove_duplicate=True)]
    rank = {id(m): k for k, m in enumerate(order)}
    named.sort(key=lambda item: rank.get(id(item[1]), len(rank)))
    seen: set[int] = set()
    layers: list[LayerInfo] = []
    for name, module in named:
        own = []
        for pname, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen and (keep is None or id(param) in keep):
                seen.add(id(param))
                own.append((pname, param))
        if own:
            layers.append(
                LayerInfo(
                    index=len(layers),
                    name=name,
                    module=module,
                    type_name=type(module).__name__,
                    param_names=tuple(p for p, _ in own),
                    numel=sum(p.numel() for _, p in own),
                )
            )
    return tuple(layers)


def _unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that really steps. accelerate's ``AcceleratedOptimizer`` never runs
    ``Optimizer.__init__`` (it has no step hooks) and steps its ``.optimizer`` only when
    gradients sync, i.e. once per ``accelerator.accumulate`` step: that one is watched."""
    while not hasattr(optimizer, "_optimizer_step_pre_hooks") and isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    ):
        optimizer = optimizer.optimizer  # type: ignore[attr-defined]
    return optimizer


def as_optimizers(optimizer: object) -> tuple[torch.optim.Optimizer, ...]:
    """``optimizer=`` as a tuple: none, one, or several optimizers.

    Raises:
        GradWatchError: For anything else, saying what to pass.
    """
    if optimizer is None:
        return ()
    if isinstance(optimizer, torch.optim.Optimizer):
        return (_unwrap_optimizer(optimizer),)
    if isinstance(optimizer, Iterable) and not isinstance(optimizer, (str, bytes, nn.Module)):
        optimizers = tuple(optimizer)
        if optimizers and all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            return tuple(map(_unwrap_optimizer, optimizers))
        if all(isinstance(o, (torch.Tensor, dict)) for o in optimizers):
            # watch(model, model.parameters()): parameters (or param groups) where the optimizer goes
            raise GradWatchError(
                f"optimizer= got parameters ({type(optimizer).__name__} of {len(optimizers)} tensor(s) or parameter groups), "
                "not an optimizer; pass the optimizer itself: gradwatch.watch(model, optimizer), or no optimizer and "
                "call gw.step() after each backward"
            )
    raise GradWatchError(f"optimizer must be a torch.optim.Optimizer, a list of them, or None, got {type(optimizer).__name__}")


def check_optimizers(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Refuse an optimizer that trains parameters of another model.

    Raises:
        GradWatchError: Naming the optimizer and how many foreign parameters it holds.
    """
    owned = {id(p) for p in model.parameters()}
    for optimizer in optimizers:
        foreign = sum(1 for group in optimizer.param_groups for p in group["params"] if id(p) not in owned)
        if foreign:
            raise GradWatchError(
                f"{type(optimizer).__name__} holds {foreign} parameter(s) that are not in the watched "
                f"{type(model).__name__}; pass the optimizer that trains this model (or watch each model with its own optimizer)"
            )
