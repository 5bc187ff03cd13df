"""The advisor: remedies that name the user's own modules, chosen by looking at the model.

For each diagnosis the advisor looks at the model (its :mod:`gradwatch.anatomy`:
activation modules and, where ``torch.fx`` traces, functional activations; normalisation
layers; residual additions; weight scale against Kaiming/Xavier; recurrent modules) and
at the measured evidence, and returns the remedies that apply, best first:

========================  ===============================================================
diagnosis                 remedies (each only when the model calls for it)
========================  ===============================================================
vanishing (gradients)     ``relu`` (≥ 2 sigmoid/tanh), ``reinit`` (scale off),
                          ``normalization`` (no norm layer, ≥ 4 weight layers),
                          ``residual`` (no residual addition, ≥ 6 weight layers)
vanishing (recurrent)     ``lstm_gru`` (with the forget-gate bias), ``reinit`` (orthogonal)
exploding                 ``clipping`` (threshold = a percentile of observed norms),
                          ``lower_lr`` (when the loss diverges or updates are too large),
                          ``reinit`` (orthogonal, for a recurrence)
nonfinite                 ``clipping`` and ``lower_lr`` when norms grew before it
dead_units                ``leaky_relu``, ``reinit``, ``lower_lr``
saturation                ``relu``, ``normalization``
init_scale                ``reinit``
========================  ===============================================================

Every snippet runs with ``model`` (the user's model), ``optimizer``, ``torch`` and ``nn``
in scope; remedies that change the model carry ``apply(model) -> model`` for a copy.
The clipping threshold and the learning-rate factor come from the history the host passes
to ``gradwatch_advise``; each rationale quotes the diagnosis's own ``summary``.

Options (``options={"advisor": {...}}``):

* ``clip_percentile`` (float in (0, 100], default ``90``): percentile of the total
  gradient norms seen before the onset used as the clipping threshold.
* ``target_update_ratio`` (float, default ``1e-3``): the update/weight ratio a healthy
  learning rate gives; the ``lower_lr`` factor is the measured ratio over this.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch import (
    Diagnosis,
    GradWatchError,
    ModelInfo,
    Remedy,
    StashKey,
    StepContext,
    WatchConfig,
    anatomy,
    hookimpl,
)
from gradwatch.kit import plugin_options

if TYPE_CHECKING:
    from gradwatch.stats import History

_DEFAULTS = {"clip_percentile": 90.0, "target_update_ratio": 1e-3}
_MIN_DEPTH_NORM = 4
_MIN_DEPTH_RESIDUAL = 6
_NORM_FOR = {nn.Linear: "LayerNorm", nn.Conv1d: "BatchNorm1d", nn.Conv2d: "BatchNorm2d", nn.Conv3d: "BatchNorm3d"}


@dataclass(frozen=True)
class AdvisorOptions:
    """Per-watch options."""

    clip_percentile: float
    target_update_ratio: float


@dataclass(frozen=True)
class Run:
    """What the run measured so far, read from the core's history when advising (host floats).

    Attributes:
        norm_steps: The statistics steps.
        norms: The total gradient norm of each.
        losses: The recorded losses, one per step (empty without ``observe_loss``).
        max_update_ratio: The largest finite ``‖Δw‖/‖w‖`` of a layer on a sampled step.
    """

    clip_percentile: float
    target_update_ratio: float
    norm_steps: list[int] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    max_update_ratio: float | None = None


def measured_run(options: AdvisorOptions, history: History) -> Run:
    ratio = history.update_ratio.values
    ratio = ratio[torch.isfinite(ratio)]
    return Run(
        clip_percentile=options.clip_percentile,
        target_update_ratio=options.target_update_ratio,
        norm_steps=history.steps.tolist(),
        norms=history.total_norm.tolist(),
        losses=history.loss.values.tolist(),
        max_update_ratio=float(ratio.max()) if ratio.numel() else None,
    )


KEY = StashKey[AdvisorOptions]()


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    values = plugin_options(config, "advisor", _DEFAULTS, bounds={"target_update_ratio": (0.0, 1.0)})
    if values["clip_percentile"] > 100:
        raise GradWatchError(
            f"advisor option clip_percentile is a percentile in (0, 100], e.g. 90; got {values['clip_percentile']!r}"
        )
    ctx.stash[KEY] = AdvisorOptions(clip_percentile=values["clip_percentile"], target_update_ratio=values["target_update_ratio"])


@hookimpl(trylast=True)
def gradwatch_advise(diagnosis: Diagnosis, model: ModelInfo, history: History, ctx: StepContext) -> list[Remedy] | None:
    state = measured_run(ctx.stash[KEY], history)
    anat = anatomy.cached(ctx, model)
    root = model.model
    ev = diagnosis.evidence
    kind = diagnosis.kind
    found: list[Remedy | None] = []
    if kind == "vanishing" and ev.get("recurrent"):
        found += [_lstm_gru(diagnosis, root), _orthogonal(diagnosis, root)]
    elif kind == "vanishing":
        found += [
            _relu(diagnosis, root, anat),
            _reinit(diagnosis, root, anat),
            _normalization(diagnosis, root, anat),
            _residual(diagnosis, root, anat),
        ]
    elif kind == "exploding":
        found += [_clipping(diagnosis, state), _lower_lr(diagnosis, state)]
        if ev.get("recurrent"):
            found.append(_orthogonal(diagnosis, root))
    elif kind == "nonfinite":
        if _grew_before(diagnosis, state) or ev.get("where") == "gradient" or _too_big(state):
            found += [_clipping(diagnosis, state), _lower_lr(diagnosis, state, force=True)]
    elif kind == "saturation":
        found += [_relu(diagnosis, root, anat, min_count=1), _normalization(diagnosis, root, anat)]
    elif kind == "dead_units":
        found += [_leaky_relu(diagnosis, root), _reinit(diagnosis, root, anat), _lower_lr(diagnosis, state)]
    elif kind == "init_scale":
        found.append(_reinit(diagnosis, root, anat))
    elif kind == "forget_gate":
        found.append(_gate_bias(diagnosis, root))
    remedies = [r for r in found if r is not None]
    return remedies or None


# ---------------------------------------------------------------------- what was measured


def _g(value: Any, fmt: str = ".2g") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def measured(d: Diagnosis) -> str:
    """The diagnosis's headline numbers, for rationales (the detector's ``summary``)."""
    return d.summary or d.message


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _applier(fn: Callable[[nn.Module], None]) -> Callable[[nn.Module], nn.Module]:
    def apply(model: nn.Module) -> nn.Module:
        fn(model)
        return model

    return apply


# ---------------------------------------------------------------------- model changes


def _relu(d: Diagnosis, root: nn.Module, anat: anatomy.Anatomy, min_count: int = 2) -> Remedy | None:
    targets = [n for n in anat.saturating if not d.layers or d.kind != "saturation" or n in d.layers] or anat.saturating
    functional = [(call, after) for call, kind, after in anat.functional if kind in ("sigmoid", "tanh")]
    if len(targets) + len(functional) < min_count:
        return None
    feeding = [layer for layer, act in anat.activation_after.items() if act is not None and act[0] in targets]
    types = sorted({type(root.get_submodule(n)).__name__ for n in targets})
    what = "/".join(types) if types else "sigmoid/tanh"
    fx = anat.fx_note
    if functional:
        fx += (
            "; functional "
            + ", ".join(f"{c} after {a!r}" for c, a in functional[:4])
            + " must be changed to torch.relu in forward() by hand"
        )
    lines = [f"# replace the {len(targets)} {what} modules with ReLU and Kaiming-initialise the layers feeding them"]
    if targets:
        lines += [
            f"for name in {targets!r}:",
            '    parent, _, child = name.rpartition(".")',
            "    setattr(model.get_submodule(parent), child, nn.ReLU())",
        ]
    if feeding:
        lines += [
            f"for name in {feeding!r}:",
            "    layer = model.get_submodule(name)",
            '    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")',
            "    if layer.bias is not None:",
            "        nn.init.zeros_(layer.bias)",
        ]

    def change(model: nn.Module) -> None:
        for name in targets:
            anatomy.replace(model, name, nn.ReLU())
        with torch.no_grad():
            for name in feeding:
                layer = model.get_submodule(name)
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                if getattr(layer, "bias", None) is not None:
                    nn.init.zeros_(layer.bias)

    return Remedy(
        kind="relu",
        title=f"Replace the {len(targets)} {what} module(s) ({_names(targets)}) with ReLU",
        rationale=(
            f"{measured(d)}; a sigmoid's derivative is at most 0.25 (tanh's is 1 only at 0), so a gradient through "
            f"{len(targets) + len(functional)} of them shrinks by up to 0.25^{len(targets) + len(functional)} = "
            f"{0.25 ** (len(targets) + len(functional)):.1e}, while ReLU passes it unchanged where active; "
            f"re-initialise the {len(feeding)} layer(s) feeding them with Kaiming init (He et al. 2015). {fx}"
        ),
        snippet="\n".join(lines),
        apply=_applier(change) if targets else None,
    )


def _stack(anat: anatomy.Anatomy) -> list[str]:
    """Weight layers that feed an activation: the body of the stack, not the head."""
    body = [n for n, act in anat.activation_after.items() if act is not None]
    return [n for n in anat.weight_layers if n in body] or anat.weight_layers[:-1]


def _normalization(d: Diagnosis, root: nn.Module, anat: anatomy.Anatomy) -> Remedy | None:
    if anat.norms or len(anat.weight_layers) < _MIN_DEPTH_NORM:
        return None
    layers = [n for n in _stack(anat) if type(root.get_submodule(n)) in _NORM_FOR]
    if not layers:
        return None

    def norm_expr(name: str) -> str:
        module = root.get_submodule(name)
        size = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        return f"nn.{_NORM_FOR[type(module)]}({size})"

    exprs = {n: norm_expr(n) for n in layers}
    lines = ["# wrap each layer as Sequential(layer, norm): the norm sits between the layer and its activation"]
    for name, expr in exprs.items():
        lines.append(anatomy.setter(name, f'nn.Sequential(model.get_submodule("{name}"), {expr})'))

    def change(model: nn.Module) -> None:
        for name, _expr in exprs.items():
            layer = model.get_submodule(name)
            size = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            norm = getattr(nn, _NORM_FOR[type(layer)])(size).to(layer.weight.device)
            anatomy.replace(model, name, nn.Sequential(layer, norm))

    kinds = sorted({e.split("(")[0] for e in exprs.values()})
    return Remedy(
        kind="normalization",
        title=f"Insert {'/'.join(kinds)} after the {len(layers)} layer(s) {_names(layers)}, before their activations",
        rationale=(
            f"{measured(d)}; the model has no normalisation layer in its {len(anat.weight_layers)} weight layers, so "
            "nothing restores the scale of activations and gradients from layer to layer (Ioffe & Szegedy 2015; "
            "Ba et al. 2016). LayerNorm for Linear layers works at any batch size. The wrapped layers' state_dict keys gain a '.0'."
        ),
        snippet="\n".join(lines),
        apply=_applier(change),
    )


class Residual(nn.Module):
    """``y = x + f(x)``: the identity path carries the gradient past ``f`` (He et al. 2016)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


_RESIDUAL_CLASS = '''class Residual(nn.Module):
    """y = x + f(x): the identity path carries the gradient past f (He et al. 2016)."""
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x):
        return x + self.inner(x)
'''


def _shape_preserving(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return module.in_features == module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.in_channels != module.out_channels or any(s != 1 for s in module.stride):
            return False
        if module.padding == "same":
            return True
        if isinstance(module.padding, str):
            return False
        return all(p * 2 == d * (k - 1) for p, d, k in zip(module.padding, module.dilation, module.kernel_size))
    return False


def _residual(d: Diagnosis, root: nn.Module, anat: anatomy.Anatomy) -> Remedy | None:
    if anat.residuals or len(anat.weight_layers) < _MIN_DEPTH_RESIDUAL:
        return None
    layers = [n for n in _stack(anat) if _shape_preserving(root.get_submodule(n))]
    if not layers:
        return None
    uses: dict[str, int] = {}
    for name in layers:
        act = anat.activation_after.get(name)
        if act is not None and not act[0].startswith("functional"):
            uses[act[0]] = uses.get(act[0], 0) + 1
    # Wrap the layer together with its own activation module, so the identity path skips both;
    # an activation module shared by several layers stays where it is.
    pairs = {}
    for name in layers:
        act = anat.activation_after.get(name)
        own = act is not None and uses.get(act[0]) == 1 and not act[0].startswith("functional")
        pairs[name] = act[0] if own else None
    lines = [_RESIDUAL_CLASS, "# identity paths around each shape-preserving layer and its activation"]
    for name, act in pairs.items():
        inner = (
            f'nn.Sequential(model.get_submodule("{name}"), model.get_submodule("{act}"))'
            if act
            else f'model.get_submodule("{name}")'
        )
        lines.append(anatomy.setter(name, f"Residual({inner})"))
        if act:
            lines.append(anatomy.setter(act, "nn.Identity()"))

    def change(model: nn.Module) -> None:
        for name, act in pairs.items():
            inner = nn.Sequential(model.get_submodule(name), model.get_submodule(act)) if act else model.get_submodule(name)
            anatomy.replace(model, name, Residual(inner))
            if act:
                anatomy.replace(model, act, nn.Identity())

    how = (
        "torch.fx found no addition of a tensor to its own transform"
        if anat.residual_source == "fx"
        else (
            f"no module looked residual to the module heuristic (class names and forward() source; fx could not trace: {anat.trace_error})"
        )
    )
    return Remedy(
        kind="residual",
        title=f"Add residual connections around the {len(pairs)} shape-preserving layer(s) {_names(list(pairs))}",
        rationale=(
            f"{measured(d)}; {how} in {len(anat.weight_layers)} weight layers, so every gradient must pass through every "
            "layer; with x + f(x) the identity path carries it past each block (He et al. 2016)."
        ),
        snippet="\n".join(lines),
        apply=_applier(change),
    )


def _reinit(d: Diagnosis, root: nn.Module, anat: anatomy.Anatomy) -> Remedy | None:
    scales = [s for s in anatomy.init_scales(root, anat) if s.expected > 0 and s.std > 0]
    if d.kind == "init_scale":
        std = d.evidence.get("std", {})
        scales = [s for s in scales if s.name in std]
        scales = [anatomy.LayerScale(s.name, float(std[s.name]), s.expected, s.scheme, s.activation, s.slope) for s in scales]
    else:
        scales = [s for s in scales if abs(math.log(s.gain)) > math.log(1.25)]
        if not scales or abs(sum(math.log(s.gain) for s in scales)) < math.log(10):
            return None  # the scale is not what makes this diagnosis
    if not scales:
        return None
    product = math.exp(sum(math.log(s.gain) for s in scales))
    lines = [f"# measured std -> expected std ({scales[0].scheme}, for the activation that follows)"]
    for s in scales:
        target = f'model.get_submodule("{s.name}").weight'
        lines.append(f"{anatomy.init_call(s, target)}  # {s.std:.3g} -> {s.expected:.3g}")

    def change(model: nn.Module) -> None:
        for s in scales:
            anatomy.apply_init(s, model.get_submodule(s.name).weight)

    first = scales[0]
    return Remedy(
        kind="reinit",
        title=f"Re-initialise {len(scales)} layer(s) with {first.scheme.capitalize()} init for their {'/'.join(sorted({s.activation for s in scales}))}",
        rationale=(
            f"{measured(d)}; weight std is ×{math.exp(sum(math.log(s.gain) for s in scales) / len(scales)):.2g} of the expectation "
            f"(e.g. {first.name!r}: {first.std:.3g} measured vs {first.expected:.3g} expected), which over {len(scales)} layers "
            f"scales the signal by {product:.2g} (He et al. 2015; Glorot & Bengio 2010)."
        ),
        snippet="\n".join(lines),
        apply=_applier(change),
    )


def _forget_bias(seq_len: int) -> float:
    # σ(b)^T is what an untouched cell keeps over T steps; log T keeps it near 1/e or better.
    return max(1.0, round(math.log(max(seq_len, 2)), 1))


def _lstm_gru(d: Diagnosis, root: nn.Module) -> Remedy | None:
    if d.evidence.get("module_type") != "RNN" or not d.layers:
        return None
    name = d.layers[0]
    old = root.get_submodule(name)
    seq_len = int(d.evidence.get("seq_len") or 1)
    bias = _forget_bias(seq_len)
    h = old.hidden_size
    args = (
        f"{old.input_size}, {h}, num_layers={old.num_layers}, bias={old.bias}, batch_first={old.batch_first}, "
        f"dropout={old.dropout}, bidirectional={old.bidirectional}"
    )
    lines = [
        f"lstm = nn.LSTM({args})",
        "with torch.no_grad():  # gates are (input, forget, cell, output): set the forget slice",
        "    for pname, p in lstm.named_parameters():",
        '        if pname.startswith("bias_ih"):',
        f"            p[{h}:{2 * h}].fill_({bias})",
        '        elif pname.startswith("bias_hh"):',
        f"            p[{h}:{2 * h}].zero_()",
        anatomy.setter(name, "lstm"),
    ]

    def change(model: nn.Module) -> None:
        lstm = nn.LSTM(
            old.input_size, h, num_layers=old.num_layers, bias=old.bias, batch_first=old.batch_first,
            dropout=old.dropout, bidirectional=old.bidirectional,
        )  # fmt: skip
        with torch.no_grad():
            for pname, p in lstm.named_parameters():
                if pname.startswith("bias_ih"):
                    p[h : 2 * h].fill_(bias)
                elif pname.startswith("bias_hh"):
                    p[h : 2 * h].zero_()
        anatomy.replace(model, name, lstm.to(next(old.parameters()).device))

    default = 0.5**seq_len
    return Remedy(
        kind="lstm_gru",
        title=f"Replace the nn.RNN {name!r} with an nn.LSTM (forget-gate bias {bias:g}) or an nn.GRU",
        rationale=(
            f"{measured(d)}; a gated cell keeps an additive path through time. PyTorch initialises LSTM biases "
            f"uniformly in ±1/sqrt({h}) = ±{1 / math.sqrt(h):.2f}, so the forget gate starts near σ(0) = 0.5 and an "
            f"untouched cell keeps 0.5^{seq_len} = {default:.1e} of its gradient; a forget-gate bias of {bias:g} keeps "
            f"σ({bias:g})^{seq_len} = {(1 / (1 + math.exp(-bias))) ** seq_len:.2g} (Gers et al. 2000; Jozefowicz et al. 2015 "
            "use 1; chrono init, Tallec & Ollivier 2018, draws log U(1, T−1)). nn.LSTM returns (output, (h_n, c_n)): "
            "code that uses h_n must take the first element."
            + ("" if old.bias else " The RNN has bias=False; the LSTM needs bias=True for a forget-gate bias.")
        ),
        snippet="\n".join(lines),
        apply=_applier(change),
    )


def _gate_bias(d: Diagnosis, root: nn.Module) -> Remedy | None:
    if not d.layers:
        return None
    name = d.layers[0]
    module = _get(root, name)
    if not isinstance(module, (nn.LSTM, nn.GRU)):
        return None
    seq_len = int(d.evidence.get("seq_len") or 1)
    bias = _forget_bias(seq_len)
    h = module.hidden_size
    gate = "forget" if isinstance(module, nn.LSTM) else "update"
    lines = [
        f"with torch.no_grad():  # the {gate} gate is the slice [{h}:{2 * h}] of each bias",
        f'    for pname, p in model.get_submodule("{name}").named_parameters():',
        '        if pname.startswith("bias_ih"):',
        f"            p[{h}:{2 * h}].fill_({bias})",
        '        elif pname.startswith("bias_hh"):',
        f"            p[{h}:{2 * h}].zero_()",
    ]

    def change(model: nn.Module) -> None:
        with torch.no_grad():
            for pname, p in model.get_submodule(name).named_parameters():
                if pname.startswith("bias_ih"):
                    p[h : 2 * h].fill_(bias)
                elif pname.startswith("bias_hh"):
                    p[h : 2 * h].zero_()

    keep = (1 / (1 + math.exp(-bias))) ** seq_len
    return Remedy(
        kind="lstm_gru",
        title=f"Initialise the {gate}-gate bias of {name!r} to {bias:g}",
        rationale=(
            f"a cell keeps {_g(d.evidence.get('keep'))} of its memory over T = {seq_len} steps at the current bias; "
            f"PyTorch's default init does not make it large. A bias of {bias:g} keeps σ({bias:g})^{seq_len} = {keep:.2g} "
            "(Gers et al. 2000; Jozefowicz et al. 2015 use 1; chrono init, Tallec & Ollivier 2018, draws log U(1, T−1))."
        ),
        snippet="\n".join(lines),
        apply=_applier(change),
    )


def _orthogonal(d: Diagnosis, root: nn.Module) -> Remedy | None:
    if d.evidence.get("module_type") != "RNN" or not d.layers:
        return None
    name = d.layers[0]
    weights = [p for p, _ in root.get_submodule(name).named_parameters() if p.startswith("weight_hh")]
    if not weights:
        return None
    lines = [f'nn.init.orthogonal_(model.get_submodule("{name}").{p})  # spectral radius -> 1' for p in weights]

    def change(model: nn.Module) -> None:
        rnn = model.get_submodule(name)
        with torch.no_grad():
            for p in weights:
                nn.init.orthogonal_(getattr(rnn, p))

    radii = d.evidence.get("spectral_radius") or {}
    shown = ", ".join(f"{k} {_g(v, '.3g')}" for k, v in list(radii.items())[:4])
    return Remedy(
        kind="reinit",
        title=f"Re-initialise the recurrent weights of {name!r} orthogonally (spectral radius 1)",
        rationale=(
            f"{measured(d)}; spectral radius {shown}. An orthogonal W_hh has all eigenvalues on the unit circle, so "
            "γ·max σ′ ≤ 1 and the bound neither explodes nor (before saturation) vanishes (Saxe et al. 2014; Le et al. 2015)."
        ),
        snippet="\n".join(lines),
        apply=_applier(change),
    )


def _leaky_relu(d: Diagnosis, root: nn.Module) -> Remedy | None:
    targets = [n for n in d.layers if n and isinstance(_get(root, n), nn.ReLU)]
    if not targets:
        return None
    lines = [
        f"for name in {targets!r}:",
        '    parent, _, child = name.rpartition(".")',
        "    setattr(model.get_submodule(parent), child, nn.LeakyReLU(0.01))",
    ]

    def change(model: nn.Module) -> None:
        for name in targets:
            anatomy.replace(model, name, nn.LeakyReLU(0.01))

    return Remedy(
        kind="leaky_relu",
        title=f"Replace the ReLU module(s) {_names(targets)} with LeakyReLU(0.01)",
        rationale=f"{measured(d)}; a dead ReLU has zero gradient for every input and never recovers; LeakyReLU keeps a 0.01 slope (Maas et al. 2013).",
        snippet="\n".join(lines),
        apply=_applier(change),
    )


def _get(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


# ---------------------------------------------------------------------- training changes


def _quantile(values: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100.0))


def _clipping(d: Diagnosis, state: Run) -> Remedy | None:
    onset = d.evidence.get("onset", d.step)
    onset = d.step if not isinstance(onset, int) else onset
    finite = [(s, n) for s, n in zip(state.norm_steps, state.norms) if math.isfinite(n)]
    before = [n for s, n in finite if s < onset]
    q = state.clip_percentile
    quantiles = d.evidence.get("norm_quantiles") or {}
    if len(before) >= 3:
        threshold, basis = (
            _quantile(before, q),
            f"the {q:g}th percentile of the {len(before)} total norms measured before step {onset}",
        )
    elif quantiles.get(f"p{q:g}") is not None and math.isfinite(quantiles[f"p{q:g}"]):
        threshold, basis = float(quantiles[f"p{q:g}"]), f"the {q:g}th percentile of the total norm reported by the detector"
    elif finite:
        threshold, basis = (
            _quantile([n for _, n in finite], 50),
            f"the median of the {len(finite)} finite total norms measured (none before the onset)",
        )
    else:
        return None
    if not threshold > 0:
        return None
    value = float(f"{threshold:.3g}")
    return Remedy(
        kind="clipping",
        title=f"Clip the global gradient norm at {value:g}",
        params={"max_norm": value},
        rationale=f"{measured(d)}; the threshold {value:g} is {basis}, so ordinary steps pass unchanged and spikes are scaled down.",
        snippet=(
            "# after loss.backward(), before optimizer.step():\n"
            f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={value:g})\n"
            f"# or let gradwatch do it: gradwatch.watch(model, optimizer, clip={value:g})"
        ),
    )


def _diverging(state: Run) -> float | None:
    """How many times the loss grew from its lowest value (inf once it is non-finite)."""
    if len(state.losses) < 2:
        return None
    finite = [v for v in state.losses if math.isfinite(v)]
    if len(finite) < len(state.losses):
        return math.inf
    low = min(finite[: max(1, len(finite) // 2)])
    return finite[-1] / low if low > 0 else None


def _lower_lr(d: Diagnosis, state: Run, *, force: bool = False) -> Remedy | None:
    ratio = d.evidence.get("update_ratio")
    ratio = ratio if isinstance(ratio, (int, float)) and math.isfinite(ratio) else state.max_update_ratio
    growth = _diverging(state)
    diverging = bool(d.evidence.get("loss_diverging")) or (growth is not None and growth > 10)
    too_big = ratio is not None and ratio > 10 * state.target_update_ratio
    if not (diverging or too_big or force):
        return None
    if ratio is not None and ratio > state.target_update_ratio:
        factor = 10.0 ** max(1, round(math.log10(ratio / state.target_update_ratio)))
        why = f"the update/weight ratio reached {ratio:.2g}, {ratio / state.target_update_ratio:.0f}× the ~{state.target_update_ratio:g} of a healthy step"
    else:
        factor = 10.0
        why = "the update/weight ratio was not measured, so the factor is a first step of 10"
    loss_note = (
        f"; the loss grew ×{growth:.3g} from its low"
        if growth is not None and math.isfinite(growth) and growth > 1
        else ("; the loss became non-finite" if growth == math.inf else "")
    )
    return Remedy(
        kind="lower_lr",
        title=f"Lower the learning rate by ×{factor:g}",
        params={"lr_factor": 1.0 / factor},
        rationale=f"{measured(d)}{loss_note}; {why}.",
        snippet=f'for group in optimizer.param_groups:\n    group["lr"] /= {factor:g}',
    )


def _too_big(state: Run) -> bool:
    """Updates far larger than a healthy step, or a loss that grew ×10 before going non-finite."""
    if state.max_update_ratio is not None and state.max_update_ratio > 10 * state.target_update_ratio:
        return True
    finite = [v for v in state.losses if math.isfinite(v)]
    return (
        len(finite) >= 2
        and min(finite[: max(1, len(finite) // 2)]) > 0
        and max(finite) > 10 * min(finite[: max(1, len(finite) // 2)])
    )


def _grew_before(d: Diagnosis, state: Run) -> bool:
    first = d.evidence.get("first_step", d.step)
    norms = [n for s, n in zip(state.norm_steps, state.norms) if s < first]
    finite = [n for n in norms if math.isfinite(n)]
    if len(finite) < 3:
        return len(norms) > len(finite)
    return max(finite) > 10 * _quantile(finite[: max(1, len(finite) // 2)], 50)
