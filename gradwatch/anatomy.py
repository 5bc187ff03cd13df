"""Model anatomy: what detectors and remedies need to know about the user's model.

Not a plugin: the built-in plugins (``vanishing``, ``exploding``, ``init``, ``advisor``)
and third-party ones use it alike. It holds the one definition of a *weight layer*
(:func:`is_weight_layer`: a module whose ``weight`` has two or more dimensions, embeddings
excepted), which every depth rule and every remedy counts.

What a remedy needs to know about the user's model: which activation follows each
weight layer (modules, and functional calls where ``torch.fx`` can trace the model),
where the normalisation layers are, whether the model has residual additions (and, traced,
the weight layers of each branch and skip path: :func:`residual_branches`), which modules
are attention, and how each weight layer's scale compares with the Kaiming/Xavier
expectation for the activation that follows it (:func:`init_scales`) and what that does
to the signal along its real path (:func:`predict_signal`: residual sums add variances,
normalisation resets). Everything here runs on the host, once per watch (cached by
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
    "Branch",
    "FlowNode",
    "LayerScale",
    "SignalPrediction",
    "INIT_TYPES",
    "is_weight_layer",
    "weight_layers",
    "NORM_TYPES",
    "anatomy",
    "cached",
    "init_call",
    "init_scales",
    "predict_signal",
    "residual_branches",
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
# Attention modules, by class name (torch's, Hugging Face's BertSelfAttention, GPT2Attention…).
_ATTENTION_NAME = re.compile(r"attention|attn|multihead|transformer", re.I)


@dataclass(frozen=True)
class FlowNode:
    """One node of the model's forward graph, as the signal-scale model sees it.

    Attributes:
        kind: ``"input"`` (a placeholder), ``"layer"`` (a weight layer's call), ``"norm"``
            (a normalisation or recurrent module: the scale after it is its own),
            ``"add"`` (a sum of two tensors), ``"const"`` (a parameter or buffer read),
            ``"pass"`` (anything else: activations, pooling, reshapes).
        name: The module name for ``"layer"``/``"norm"``, else the fx node's name.
        parents: Indices (into :attr:`Anatomy.flow`) of the nodes it reads.
    """

    kind: str
    name: str
    parents: tuple[int, ...]


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
        saturating: Names of the sigmoid/tanh-family activation modules.
        attention: Names of attention modules (``nn.MultiheadAttention``, and classes whose
            name says attention or transformer, as Hugging Face's do).
        flow: The traced forward graph in topological order (:class:`FlowNode`), or
            ``None`` when fx could not trace the model.
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
    attention: list[str] = field(default_factory=list)
    flow: tuple[FlowNode, ...] | None = None

    @property
    def transformer(self) -> bool:
        """Whether the model has attention modules (a transformer, for the conventions
        that differ there, such as clipping at 1.0)."""
        return bool(self.attention)

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


def _ancestors(node: torch.fx.Node, limit: int = 10_000) -> set[torch.fx.Node]:
    """``node`` and every node it depends on."""
    stack, seen = [node], {node}
    while stack and len(seen) < limit:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _forked(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    """Whether ``a`` and ``b`` both derive from one computed tensor (a block input that a
    projection shortcut and a branch both read), not only from the model's inputs."""
    common = _ancestors(a) & _ancestors(b)
    return any(n.op not in ("placeholder", "get_attr") for n in common)


def _flow(nodes: list[torch.fx.Node], modules: dict[str, nn.Module]) -> tuple[FlowNode, ...]:
    index = {node: k for k, node in enumerate(nodes)}
    out = []
    for node in nodes:
        parents = tuple(index[p] for p in node.all_input_nodes if p in index)
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        is_add = (node.op == "call_function" and node.target in (*_ADDS, operator.sub, torch.sub)) or (
            node.op == "call_method" and node.target in {"add", "add_", "sub", "sub_"}
        )
        if node.op == "placeholder":
            kind, name = "input", node.name
        elif node.op == "get_attr":
            kind, name = "const", node.name
        elif module is not None and is_weight_layer(module) and not isinstance(module, RECURRENT_TYPES):
            kind, name = "layer", str(node.target)
        elif module is not None and isinstance(module, (*NORM_TYPES, *RECURRENT_TYPES)):
            kind, name = "norm", str(node.target)
        elif is_add and len(parents) == 2:
            kind, name = "add", node.name
        else:
            kind, name = "pass", node.name
        out.append(FlowNode(kind=kind, name=name, parents=parents))
    return tuple(out)


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
    flow: tuple[FlowNode, ...] | None = None
    if graph is not None:
        nodes = list(graph.nodes)
        flow = _flow(nodes, modules)
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
            if is_add and len(args) == 2 and (_reaches(args[0], args[1]) or _reaches(args[1], args[0]) or _forked(*args)):
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
    attention = [
        n for n, m in modules.items() if n and (isinstance(m, nn.MultiheadAttention) or _ATTENTION_NAME.search(type(m).__name__))
    ]
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
        attention=attention,
        flow=flow,
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


def _exp(x: float) -> float:
    from gradwatch.kit import exp  # kit imports this module: resolved when first used

    return exp(x)


def weight_std(weight: torch.Tensor) -> float:
    """The standard deviation of a weight, read on the host without a collective: for a
    sharded (DTensor, FSDP2) weight, that of this rank's shard (advice runs on rank zero
    only, so it must not issue a collective the other ranks do not; an evenly sharded
    weight of i.i.d. entries has about the std of the whole)."""
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return float(local.detach().float().std()) if local.numel() > 1 else 0.0


def _slope(model: nn.Module, where: str) -> float:
    try:
        module = model.get_submodule(where)
    except (AttributeError, ValueError):
        return 0.01
    slope = getattr(module, "negative_slope", None)
    if slope is None and isinstance(module, nn.PReLU):
        weight = module.weight.to_local() if hasattr(module.weight, "to_local") else module.weight
        slope = float(weight.detach().mean())
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
        std = stds[name] if stds is not None and name in stds else weight_std(weight)
        out.append(LayerScale(name=name, std=std, expected=expected, scheme=scheme, activation=kind, slope=slope))
    return out


def _linear_gain(model: nn.Module, name: str, stds: dict[str, float] | None) -> float:
    """A weight layer's scale against a variance-preserving linear map (``std·sqrt(fan_in)``,
    LeCun): the gain of a layer that no activation follows (the last layer of a residual
    branch, a projection)."""
    module = model.get_submodule(name)
    if not isinstance(module, INIT_TYPES):
        return 1.0
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
    std = stds[name] if stds is not None and name in stds else weight_std(module.weight)
    return std * math.sqrt(fan_in) if std > 0 and fan_in > 0 else 1.0


@dataclass(frozen=True)
class Branch:
    """A residual addition ``a + b`` on the signal path, with the weight layers on each side
    since the tensor both sides read.

    Attributes:
        add: The fx node of the addition.
        layers: Weight layers of the longer side (the residual branch), forward order.
        skip: Weight layers of the other side: ``()`` for an identity shortcut, the
            projection for a downsampling one.
        gain: Product of the branch layers' gains.
        skip_gain: Product of the skip layers' gains (1 for an identity shortcut).
    """

    add: str
    layers: tuple[str, ...]
    skip: tuple[str, ...]
    gain: float
    skip_gain: float


@dataclass(frozen=True)
class SignalPrediction:
    """What the initial weight scale does to the forward signal, along the real signal path.

    Attributes:
        gain: The predicted scale of the signal at :attr:`at`, relative to the model's input
            or to the last normalisation layer before it (where it is largest or smallest).
        at: The weight layer whose output that is.
        layers: The judged layers (those of :func:`init_scales`) that feed it since the last
            normalisation layer, forward order.
        branches: The residual additions among them.
        method: ``"flow"`` (propagated through the fx graph: layer gains multiply, a
            residual sum adds the variances of its two sides, normalisation resets) or
            ``"chain"`` (module order, no residual additions: the product of the gains).
    """

    gain: float
    at: str
    layers: tuple[str, ...]
    branches: tuple[Branch, ...] = ()
    method: str = "flow"


def predict_signal(
    model: nn.Module, anat: Anatomy, scales: list[LayerScale], stds: dict[str, float] | None = None
) -> SignalPrediction | None:
    """Predict how the initial weights scale the forward signal, following residual paths.

    A weight layer multiplies the signal's standard deviation by its gain against the
    variance-preserving init (:attr:`LayerScale.gain` for a judged layer, ``std·sqrt(fan_in)``
    for one that no activation follows); ``a + b`` adds the variances of its two sides
    (independent signals: ``x + f(x)`` has gain ``sqrt(1 + G²)`` for a branch of gain ``G``,
    so an identity path keeps it near 1 and a chain is never multiplied through a residual
    block); a normalisation layer resets the scale. Without a trace, the judged layers in
    module order multiply as one chain, unless the model looks residual (then ``None``:
    its signal path is not known).

    Args:
        model: The model.
        anat: Its :func:`anatomy`.
        scales: The judged layers (:func:`init_scales`).
        stds: Measured stds by layer name (e.g. at attach); measured now if absent.

    Returns:
        The prediction at the layer where the predicted scale is furthest from 1, or
        ``None`` when no layer is judged or the signal path is unknown.
    """
    gains = {s.name: s.gain for s in scales if s.gain > 0 and math.isfinite(s.gain)}
    if not gains:
        return None
    if anat.flow is None:
        if anat.residuals:
            return None
        chain = [n for n in anat.weight_layers if n in gains]
        cumulative = [0.0]
        for name in chain:
            cumulative.append(cumulative[-1] + math.log(gains[name]))
        k = max(range(1, len(cumulative)), key=lambda i: abs(cumulative[i]))
        return SignalPrediction(gain=_exp(cumulative[k]), at=chain[k - 1], layers=tuple(chain[:k]), method="chain")

    def product(path: list[str]) -> float:
        return _exp(sum(math.log(gains.get(n) or _linear_gain(model, n, stds)) for n in path))

    flow = anat.flow
    logs: list[float | None] = []
    seen_layers: set[str] = set()
    judged_at: dict[str, int] = {}
    for k, node in enumerate(flow):
        parents = [logs[p] for p in node.parents if logs[p] is not None]
        value: float | None
        if node.kind == "input":
            value = 0.0
        elif node.kind == "const" or not parents:
            value = None
        elif node.kind == "norm":
            value = 0.0
        elif node.kind == "layer":
            gain = gains.get(node.name) or _linear_gain(model, node.name, stds)
            value = max(parents) + math.log(gain)
            if node.name in gains and node.name not in seen_layers:
                judged_at[node.name] = k
            seen_layers.add(node.name)
        elif node.kind == "add" and len(parents) == 2:
            # Variances add: log sqrt(e^2a + e^2b), computed without overflow.
            hi, lo = max(parents), min(parents)
            value = hi + 0.5 * math.log1p(_exp(2 * (lo - hi)))
        else:
            value = max(parents)
        logs.append(value)
    # The signal is what flows on: a judged layer's output or a residual sum, but not the
    # inside of a residual branch (its output is added to the skip path before it goes on).
    inside: set[int] = set()
    for node in flow:
        if node.kind == "add" and len(node.parents) == 2:
            a, b = (_upstream(flow, p) for p in node.parents)
            inside |= a ^ b
    points = {n: k for n, k in judged_at.items() if k not in inside and logs[k] is not None}
    points.update(
        {flow[k].name: k for k, node in enumerate(flow) if node.kind == "add" and k not in inside and logs[k] is not None}
    )
    if not points:
        return None
    at_name = max(points, key=lambda n: abs(logs[points[n]] or 0.0))
    at = points[at_name]
    # An addition is named by the last weight layer that feeds it.
    worst = at_name if flow[at].kind == "layer" else _last_layer(flow, at, anat.weight_layers) or at_name
    upstream = _upstream(flow, at)
    names = {flow[i].name for i in upstream if flow[i].kind == "layer"}
    layers = tuple(n for n in anat.weight_layers if n in names and n in gains)
    branches = [
        Branch(add=add, layers=branch, skip=skip, gain=product(list(branch)), skip_gain=product(list(skip)))
        for k, add, branch, skip in _sides(flow, anat.weight_layers)
        if k in upstream
    ]
    return SignalPrediction(gain=_exp(logs[at] or 0.0), at=worst, layers=layers, branches=tuple(branches))


def _sides(flow: tuple[FlowNode, ...], order: list[str]) -> list[tuple[int, str, tuple[str, ...], tuple[str, ...]]]:
    """``(node index, add name, branch layers, skip layers)`` of every residual addition
    whose sides hold weight layers (the longer side is the branch), forward order."""
    out = []
    for k, node in enumerate(flow):
        if node.kind != "add" or len(node.parents) != 2:
            continue
        a, b = (_upstream(flow, p) for p in node.parents)
        names_a = {flow[j].name for j in a - b if flow[j].kind == "layer"}
        names_b = {flow[j].name for j in b - a if flow[j].kind == "layer"}
        side_a = tuple(n for n in order if n in names_a)
        side_b = tuple(n for n in order if n in names_b)
        if side_a or side_b:
            branch, skip = (side_a, side_b) if len(side_a) >= len(side_b) else (side_b, side_a)
            out.append((k, node.name, branch, skip))
    return out


def residual_branches(anat: Anatomy) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """``(add, branch layers, skip layers)`` of each residual addition fx found (the
    longer side is the branch; the skip side is ``()`` for an identity shortcut); ``[]``
    without a trace."""
    return [(add, branch, skip) for _, add, branch, skip in _sides(anat.flow, anat.weight_layers)] if anat.flow else []


def _last_layer(flow: tuple[FlowNode, ...], start: int, order: list[str]) -> str | None:
    names = {flow[k].name for k in _upstream(flow, start) if flow[k].kind == "layer"}
    found = [n for n in order if n in names]
    return found[-1] if found else None


def _upstream(flow: tuple[FlowNode, ...], start: int) -> set[int]:
    """``start`` and the nodes it depends on, back to (and including) the nearest
    normalisation layers, which reset the scale."""
    seen, stack = {start}, [start]
    while stack:
        k = stack.pop()
        if flow[k].kind == "norm" and k != start:
            continue
        for p in flow[k].parents:
            if p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


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
