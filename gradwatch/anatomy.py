"""Model anatomy: what detectors and remedies need to know about the user's model.

Not a plugin: the built-in plugins (``vanishing``, ``exploding``, ``init``, ``advisor``)
and third-party ones use it alike. It holds the one definition of a *weight layer*
(:func:`is_weight_layer`: a module whose ``weight`` has two or more dimensions, embeddings
excepted), which every depth rule and every remedy counts.

What a remedy needs to know about the user's model: which activation follows each
weight layer (modules, and functional calls where ``torch.fx`` can trace the model),
where the normalisation layers are, whether the model has residual additions, and how
each weight layer's scale compares with the Kaiming/Xavier expectation for the
activation that follows it. Everything here runs on the host, once per watch (cached by
the callers), and never raises for a model it does not understand: it says so instead.
"""

from __future__ import annotations

import inspect
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwatch.stash import StashKey
from gradwatch.types import ModelInfo, StepContext

__all__ = [
    "Anatomy",
    "LayerScale",
    "INIT_TYPES",
    "is_weight_layer",
    "weight_layers",
    "NORM_TYPES",
    "anatomy",
    "cached",
    "init_call",
    "init_scales",
    "setter",
]

#: Weight layers whose initialisation scale is judged: those whose fan-in and fan-out
#: ``torch.nn.init`` computes right (a transposed weight, like Hugging Face's ``Conv1D``,
#: would be judged against the wrong fan).
INIT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def is_weight_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a weight layer: it owns a ``weight`` of two or more dimensions
    (a matrix or a kernel: ``Linear``, ``Conv*``, Hugging Face's ``Conv1D``, ``Bilinear``…)
    and is not an embedding (whose gradient touches only the rows a batch used)."""
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not isinstance(module, _EMBEDDINGS)


def weight_layers(model: ModelInfo) -> list[int]:
    """Columns (``ModelInfo.layers`` positions, forward order) of the weight layers whose
    weight gradwatch watches: what "depth" means in every depth rule."""
    return [layer.index for layer in model.layers if "weight" in layer.param_names and is_weight_layer(layer.module)]


NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.RNN, nn.LSTM, nn.GRU)

# Activation modules and functions, by the name nn.init.calculate_gain knows them.
_ACT_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "leaky_relu",
    nn.ELU: "relu",
    nn.CELU: "relu",
    nn.GELU: "relu",
    nn.SiLU: "relu",
    nn.Mish: "relu",
    nn.SELU: "selu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardtanh: "tanh",
    nn.Hardsigmoid: "sigmoid",
    nn.Softsign: "tanh",
}
_ACT_FUNCTIONS: dict[Any, str] = {
    torch.relu: "relu",
    nn.functional.relu: "relu",
    nn.functional.relu6: "relu",
    nn.functional.leaky_relu: "leaky_relu",
    nn.functional.elu: "relu",
    nn.functional.gelu: "relu",
    nn.functional.silu: "relu",
    nn.functional.mish: "relu",
    nn.functional.selu: "selu",
    torch.sigmoid: "sigmoid",
    nn.functional.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    nn.functional.tanh: "tanh",
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh", "tanh_": "tanh"}
_SATURATING = {"sigmoid", "tanh"}
_NN_RESIDUAL = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_ADDS = {operator.add, operator.iadd, torch.add}
# Module-heuristic fallback for residual additions when fx cannot trace the model.
_RESIDUAL_NAME = re.compile(r"res|skip|shortcut|bottleneck|basicblock|transformer|encoderlayer|decoderlayer", re.I)
_RESIDUAL_SOURCE = re.compile(r"\b(residual|identity|shortcut|skip)\b|\+=|\bx\s*\+|\+\s*x\b")


@dataclass
class Anatomy:
    """What gradwatch found in a model.

    Attributes:
        traced: Whether ``torch.fx.symbolic_trace`` traced the model.
        trace_error: Why it did not (first line of the exception), else ``None``.
        weight_layers: Names of the weight layers (:func:`is_weight_layer`), in forward order.
        activation_after: For each weight layer, ``(where, kind)`` of the first activation
            its output reaches before the next weight layer (``where`` is a module name or
            ``"functional torch.sigmoid"``), or ``None``.
        normed: Weight layers whose output reaches a normalisation layer first.
        activations: Activation modules by name, with their kind.
        functional: Functional activations found by fx: ``(call, kind, after_layer)``.
        norms: Names of the normalisation modules.
        residual_source: ``"fx"`` or ``"module heuristic"``.
        residuals: Residual additions found: fx node names (with their module) or the
            names of modules judged residual by the heuristic.
        recurrent: Names of the ``nn.RNN``/``nn.LSTM``/``nn.GRU`` modules.
    """

    traced: bool
    trace_error: str | None
    weight_layers: list[str]
    activation_after: dict[str, tuple[str, str] | None]
    normed: set[str]
    activations: dict[str, str]
    functional: list[tuple[str, str, str | None]]
    norms: list[str]
    residual_source: str
    residuals: list[str]
    recurrent: list[str]
    saturating: list[str] = field(default_factory=list)

    @property
    def fx_note(self) -> str:
        """A sentence for rationales on what fx could and could not see."""
        if self.traced:
            return "torch.fx traced the model, so functional activations in forward() were checked too"
        return f"torch.fx could not trace the model ({self.trace_error}), so functional activations in forward() were not checked"


class _LeafTracer(torch.fx.Tracer):
    # Every module without children is a leaf: it is recorded as one call and its Python
    # forward never runs (so a module with side effects in forward is not disturbed).
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return next(m.children(), None) is None or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> tuple[torch.fx.Graph | None, str | None]:
    try:
        return _LeafTracer().trace(model), None
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return None, f"{type(exc).__name__}: {text[0][:120] if text else ''}"


def _act_kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[str, str] | None:
    if node.op == "call_module":
        module = modules.get(str(node.target))
        kind = _ACT_MODULES.get(type(module)) if module is not None else None
        return (str(node.target), kind) if kind else None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        name = getattr(node.target, "__module__", "torch") or "torch"
        prefix = "torch" if name.startswith("torch._C") or name == "torch" else name
        return (f"functional {prefix}.{node.target.__name__}", _ACT_FUNCTIONS[node.target])
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return (f"functional Tensor.{node.target}", _ACT_METHODS[str(node.target)])
    return None


def _is_module(node: torch.fx.Node, modules: dict[str, nn.Module], types: tuple[type[nn.Module], ...]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), types)


def _is_weight(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and is_weight_layer(modules.get(str(node.target), nn.Module()))


def _reaches(src: torch.fx.Node, dst: torch.fx.Node, limit: int = 10_000) -> bool:
    """Whether ``src`` is an ancestor of ``dst``."""
    stack, seen = [dst], set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is src:
            return True
        for parent in node.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return False


def anatomy(model: nn.Module, forward_order: list[str] | None = None) -> Anatomy:
    """Look at ``model``: activations, normalisation, residuals, recurrent modules.

    Args:
        model: The unwrapped model.
        forward_order: Layer names in forward order (gradwatch's ``ModelInfo.names``);
            used to order weight layers when fx cannot trace the model.
    """
    modules = dict(model.named_modules())
    activations = {n: _ACT_MODULES[type(m)] for n, m in modules.items() if type(m) in _ACT_MODULES}
    norms = [n for n, m in modules.items() if isinstance(m, NORM_TYPES)]
    recurrent = [n for n, m in modules.items() if isinstance(m, RECURRENT_TYPES)]
    graph, error = _trace(model)
    after: dict[str, tuple[str, str] | None] = {}
    normed: set[str] = set()
    functional: list[tuple[str, str, str | None]] = []
    residuals: list[str] = []
    if graph is not None:
        nodes = list(graph.nodes)
        weight_nodes = [n for n in nodes if _is_weight(n, modules)]
        weight_layers = list(dict.fromkeys(str(n.target) for n in weight_nodes))
        last_layer: str | None = None
        for node in nodes:
            if _is_weight(node, modules):
                last_layer = str(node.target)
            act = _act_kind(node, modules)
            if act is not None and act[0].startswith("functional"):
                functional.append((act[0], act[1], last_layer))
        for node in weight_nodes:
            name = str(node.target)
            if name in after:
                continue
            after[name] = None
            # Breadth-first along the users of the layer's output, up to the next weight layer.
            frontier, seen = list(node.users), set()
            while frontier:
                nxt = frontier.pop(0)
                if nxt in seen or len(seen) > 50:
                    continue
                seen.add(nxt)
                if _is_weight(nxt, modules) or _is_module(nxt, modules, RECURRENT_TYPES):
                    continue
                if _is_module(nxt, modules, NORM_TYPES):
                    normed.add(name)
                    break
                act = _act_kind(nxt, modules)
                if act is not None:
                    after[name] = act
                    break
                frontier.extend(nxt.users)
        for node in nodes:
            is_add = (node.op == "call_function" and node.target in _ADDS) or (
                node.op == "call_method" and node.target in {"add", "add_"}
            )
            args = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
            if is_add and len(args) == 2 and (_reaches(args[0], args[1]) or _reaches(args[1], args[0])):
                stack = node.meta.get("nn_module_stack") or {}
                owner = next(reversed(stack), None) if stack else None
                residuals.append(f"{owner}: {node.name}" if owner else node.name)
        source = "fx"
        # torch.nn's own containers are fx leaves: their residual additions are known by type.
        residuals += [f"{n} ({type(m).__name__})" for n, m in modules.items() if isinstance(m, _NN_RESIDUAL)]
        seen = set(weight_layers)
        weight_layers += [n for n, m in modules.items() if is_weight_layer(m) and n not in seen]
    else:
        # Module order: forward order for the layers gradwatch saw run, then definition order.
        rank = {n: k for k, n in enumerate(forward_order or ())}
        leaves = [(n, m) for n, m in modules.items() if next(m.children(), None) is None]
        weight_layers = sorted((n for n, m in leaves if is_weight_layer(m)), key=lambda n: rank.get(n, len(rank)))
        position = {n: k for k, (n, _) in enumerate(leaves)}
        for name in weight_layers:
            after[name] = None
            for other, module in leaves[position[name] + 1 :]:
                if is_weight_layer(module) or isinstance(module, RECURRENT_TYPES):
                    break
                if isinstance(module, NORM_TYPES):
                    normed.add(name)
                    break
                if type(module) in _ACT_MODULES:
                    after[name] = (other, _ACT_MODULES[type(module)])
                    break
        for name, module in modules.items():
            if name and (_RESIDUAL_NAME.search(type(module).__name__) or _residual_source(module)):
                residuals.append(name)
        source = "module heuristic"
    saturating = [n for n, k in activations.items() if k in _SATURATING]
    return Anatomy(
        traced=graph is not None,
        trace_error=error,
        weight_layers=weight_layers,
        activation_after=after,
        normed=normed,
        activations=activations,
        functional=functional,
        norms=norms,
        residual_source=source,
        residuals=residuals,
        recurrent=recurrent,
        saturating=saturating,
    )


def _residual_source(module: nn.Module) -> bool:
    forward = type(module).forward
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or forward is nn.Module.forward:
        return False
    if type(module).__module__.startswith("torch.nn"):
        return False
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return bool(_RESIDUAL_SOURCE.search(source))


# ---------------------------------------------------------------------- weight scale


@dataclass(frozen=True)
class LayerScale:
    """One weight layer's scale against its expectation.

    Attributes:
        name: Layer name.
        std: Measured standard deviation of the weight.
        expected: Expected standard deviation for ``scheme`` and ``activation``.
        scheme: ``"kaiming"`` (ReLU family) or ``"xavier"`` (sigmoid, tanh, SELU).
        activation: The activation kind that follows (``nn.init.calculate_gain`` name).
        slope: Negative slope of a following LeakyReLU (else 0).
    """

    name: str
    std: float
    expected: float
    scheme: str
    activation: str
    slope: float = 0.0

    @property
    def gain(self) -> float:
        return self.std / self.expected if self.expected > 0 else math.nan


def _slope(model: nn.Module, where: str) -> float:
    try:
        module = model.get_submodule(where)
    except (AttributeError, ValueError):
        return 0.01
    slope = getattr(module, "negative_slope", None)
    if slope is None and isinstance(module, nn.PReLU):
        slope = float(module.weight.detach().mean())
    return float(slope) if slope is not None else 0.01


def init_scales(model: nn.Module, anat: Anatomy, stds: dict[str, float] | None = None) -> list[LayerScale]:
    """Each weight layer of :data:`INIT_TYPES` followed by an activation (and not by a
    normalisation layer), in forward order, with its measured and expected weight std.

    Args:
        model: The model.
        anat: Its :func:`anatomy`.
        stds: Measured stds by layer name (e.g. taken at attach); measured now if absent.
    """
    out = []
    for name in anat.weight_layers:
        act = anat.activation_after.get(name)
        if act is None or name in anat.normed:
            continue  # the scale of a layer feeding a norm layer (or the loss) does not compound
        module = model.get_submodule(name)
        if not isinstance(module, INIT_TYPES):
            continue
        weight = module.weight
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
        where, kind = act
        slope = _slope(model, where) if kind == "leaky_relu" else 0.0
        gain = nn.init.calculate_gain(kind, slope if kind == "leaky_relu" else None)
        if kind == "selu":  # self-normalising nets want LeCun normal (torch's docs for calculate_gain)
            scheme, expected = "kaiming", 1.0 / math.sqrt(fan_in)
        elif kind in ("relu", "leaky_relu"):
            scheme, expected = "kaiming", gain / math.sqrt(fan_in)
        else:
            scheme, expected = "xavier", gain * math.sqrt(2.0 / (fan_in + fan_out))
        std = stds[name] if stds is not None and name in stds else float(weight.detach().float().std())
        out.append(LayerScale(name=name, std=std, expected=expected, scheme=scheme, activation=kind, slope=slope))
    return out


def init_call(scale: LayerScale, target: str) -> str:
    """The exact ``torch.nn.init`` call that gives ``target`` (an expression) the expected std."""
    if scale.scheme == "kaiming":
        if scale.activation == "selu":
            return f'nn.init.kaiming_normal_({target}, nonlinearity="linear")'
        if scale.activation == "leaky_relu":
            return f'nn.init.kaiming_normal_({target}, a={scale.slope:g}, nonlinearity="leaky_relu")'
        return f'nn.init.kaiming_normal_({target}, nonlinearity="relu")'
    return f'nn.init.xavier_normal_({target}, gain=nn.init.calculate_gain("{scale.activation}"))'


def apply_init(scale: LayerScale, weight: torch.Tensor) -> None:
    """Run :func:`init_call` on ``weight``."""
    with torch.no_grad():
        if scale.scheme == "kaiming":
            nonlinearity = {"leaky_relu": "leaky_relu", "selu": "linear"}.get(scale.activation, "relu")
            nn.init.kaiming_normal_(weight, a=scale.slope, nonlinearity=nonlinearity)
        else:
            nn.init.xavier_normal_(weight, gain=nn.init.calculate_gain(scale.activation))


def setter(name: str, expr: str) -> str:
    """A line of Python that puts ``expr`` at the module path ``name`` of ``model``."""
    parent, _, child = name.rpartition(".")
    if not parent:
        return f"model.{child} = {expr}" if child.isidentifier() else f'setattr(model, "{child}", {expr})'
    return f'setattr(model.get_submodule("{parent}"), "{child}", {expr})'


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at module path ``name`` of ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


_CACHE = StashKey[tuple[bool, Anatomy]]()


def cached(ctx: StepContext, model: ModelInfo) -> Anatomy:
    """The :func:`anatomy` of the watched model, computed once per watch (shared by the
    plugins of one watcher through ``ctx.stash``; redone once the forward order is known)."""
    hit = ctx.stash.get(_CACHE, None)
    if hit is None or (model.order_known and not hit[0]):
        hit = (model.order_known, anatomy(model.model, list(model.names)))
        ctx.stash[_CACHE] = hit
    return hit[1]
