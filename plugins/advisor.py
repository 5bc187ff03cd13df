"""The advisor: remedies that name the user's own modules, chosen by looking at the model.

For each diagnosis the advisor looks at the model (its :mod:`gradwatch.anatomy`:
activation modules and, where ``torch.fx`` traces, functional activations; normalisation
layers; residual additions; attention modules; weight scale against Kaiming/Xavier along
the real signal path; recurrent modules) and at the measured evidence, and returns the
remedies that apply, best first:

========================  ===============================================================
diagnosis                 remedies (each only when the model and the fault call for it)
========================  ===============================================================
vanishing (gradients)     ``relu`` (≥ 2 sigmoid/tanh), ``reinit`` (only when the init
                          scale explains the shrinking and re-init raises the weights),
                          ``normalization`` (no norm layer, ≥ 4 weight layers),
                          ``residual`` (no residual addition, ≥ 6 weight layers)
vanishing (recurrent)     ``lstm_gru`` (with the forget-gate bias), ``reinit`` (orthogonal)
exploding                 ``clipping`` (threshold from the healthy rows), ``lower_lr``
                          (when the loss diverges or updates are too large),
                          ``normalization`` (deep stack without norm layers), ``reinit``
                          (only when the init scale explains the growth), orthogonal
                          ``reinit`` for a recurrence
update_scale              ``lower_lr`` (factor from the measured update/weight ratio)
nonfinite                 produced in a forward op: ``finite_mask``, ``epsilon``,
                          ``log_space``, ``precision`` or ``op_guard`` from what the op
                          saw; ``input_data`` for a batch that held it; ``stable_loss``;
                          ``clipping`` and ``lower_lr`` only when the norms grew into it
dead_units                ``leaky_relu``, ``reinit``, ``lower_lr``
saturation                ``relu``, ``normalization``
init_scale                ``reinit`` (not when the gradients contradict the prediction)
forget_gate               ``lstm_gru`` (the gate bias)
========================  ===============================================================

Every remedy carries ``params``, every number and choice in it; its ``title`` and
``snippet`` are written from ``params`` alone by :func:`render`, so they cannot disagree.
docs/remedies.md lists each kind, its params and where each number comes from. Numbers
come from healthy steps: a clipping threshold from the rows before the norms grew, a
learning-rate factor from the update/weight ratio of layers whose weights were not zero,
bounded. Every snippet runs with ``model`` (the user's model), ``optimizer``, ``torch`` and
``nn`` in scope, except the op remedies of ``nonfinite``, whose snippet is the line to write
in that module's ``forward()``; remedies that change the model carry ``apply(model) ->
model`` for a copy.

Options (``options={"advisor": {...}}``):

* ``clip_percentile`` (float in (0, 100], default ``90``): percentile of the healthy total
  gradient norms used as the clipping threshold.
* ``target_update_ratio`` (float, default ``1e-3``): the update/weight ratio a healthy
  learning rate gives; the ``lower_lr`` factor is the measured ratio over this.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
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
from gradwatch.kit import exp as _exp
from gradwatch.kit import num, plugin_options, power, round_sig, times

if TYPE_CHECKING:
    from gradwatch.stats import History

_DEFAULTS = {"clip_percentile": 90.0, "target_update_ratio": 1e-3}
_MIN_DEPTH_NORM = 4
_MIN_DEPTH_RESIDUAL = 6
_NORM_FOR = {nn.Linear: "LayerNorm", nn.Conv1d: "BatchNorm1d", nn.Conv2d: "BatchNorm2d", nn.Conv3d: "BatchNorm3d"}
#: A percentile needs this many healthy rows; with fewer, a conventional value is given.
MIN_HEALTHY_ROWS = 3
#: A total norm this many times the median of the rows before it starts the growth: it and
#: every later row are not healthy.
GROWN = 10.0
#: The learning rate is never divided by more than this in one remedy ("at least" beyond).
MAX_LR_DIVISOR = 1000.0
#: The clipping threshold transformers are trained with (Hugging Face ``Trainer``'s
#: ``max_grad_norm`` default; BERT, GPT-2 and ViT recipes).
TRANSFORMER_MAX_NORM = 1.0
#: A weight norm below this fraction of its row's median is "zero" (a zero-initialised head).
_ZERO_WEIGHT = 1e-6
_HALF_MAX = {"float16": 65504.0}
_EXP_LIMIT = {"float16": 11.09, "bfloat16": 88.7, "float32": 88.7, "float64": 709.7}
_EPS = {"float16": 1e-4, "bfloat16": 1e-3, "float32": 1e-8, "float64": 1e-12}
_ATTENTION_TYPE = re.compile(r"attention|attn|softmax|multihead|transformer", re.I)


@dataclass(frozen=True)
class AdvisorOptions:
    """Per-watch options."""

    clip_percentile: float
    target_update_ratio: float


@dataclass(frozen=True)
class Run:
    """What the run measured so far, read from the core's history when advising (host floats).

    Attributes:
        clip_percentile: The ``clip_percentile`` option.
        target_update_ratio: The ``target_update_ratio`` option.
        norm_steps: The statistics steps.
        norms: The total gradient norm of each.
        loss_steps: The steps of the recorded losses.
        losses: The recorded losses (empty without ``observe_loss`` or a framework door).
        update_ratio: The judged update/weight ratio: per layer the median ``‖Δw‖/‖w‖``
            over its sampled steps, the largest over layers; layers whose weights were ~0
            on a sampled step are skipped. ``None`` when none was measured.
        update_layer: The layer it belongs to.
        update_rows: How many sampled steps that median is over.
        skipped_zero_weight: The layers skipped.
    """

    clip_percentile: float
    target_update_ratio: float
    norm_steps: list[int] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    update_ratio: float | None = None
    update_layer: str | None = None
    update_rows: int = 0
    skipped_zero_weight: tuple[str, ...] = ()


def measured_run(options: AdvisorOptions, history: History) -> Run:
    """Read the run's norms, losses and update ratios from ``history`` (host tensors)."""
    ratio, layer, rows, skipped = _judged_update_ratio(history)
    loss = history.loss
    return Run(
        clip_percentile=options.clip_percentile,
        target_update_ratio=options.target_update_ratio,
        norm_steps=history.steps.tolist(),
        norms=history.total_norm.tolist(),
        loss_steps=loss.steps.tolist(),
        losses=loss.values.tolist(),
        update_ratio=ratio,
        update_layer=layer,
        update_rows=rows,
        skipped_zero_weight=skipped,
    )


def _judged_update_ratio(history: History) -> tuple[float | None, str | None, int, tuple[str, ...]]:
    ratios, weights = history.update_ratio.values, history.weight_norm.values
    if not ratios.numel() or ratios.shape != weights.shape or not history.layers:
        return None, None, 0, ()
    positive = torch.where(weights > 0, weights, torch.nan)
    row_median = positive.nanmedian(dim=1, keepdim=True).values
    # A ratio to a weight that was ~0 (a zero-initialised head: 1e+39 at step 0, then ~1/k
    # as it grows from nothing) says nothing about the learning rate: skip the layer.
    zero = ~(weights > _ZERO_WEIGHT * torch.nan_to_num(row_median, nan=0.0))
    skipped_cols = zero.any(0)
    values = torch.where(torch.isfinite(ratios) & ~skipped_cols, ratios, torch.nan).double()
    medians = values.nanmedian(dim=0).values
    counts = torch.isfinite(values).sum(0)
    skipped = tuple(history.layers[c] for c in torch.nonzero(skipped_cols).flatten().tolist())
    if not torch.isfinite(medians).any():
        return None, None, 0, skipped
    col = int(torch.where(torch.isfinite(medians), medians, -math.inf).argmax())
    return float(medians[col]), history.layers[col], int(counts[col]), skipped


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
    run = measured_run(ctx.stash[KEY], history)
    anat = anatomy.cached(ctx, model)
    root = model.model
    d = diagnosis
    ev = d.evidence
    found: list[Remedy | None] = []
    if d.kind == "vanishing" and ev.get("recurrent"):
        found += [_lstm_gru(d, root), _orthogonal(d, root)]
    elif d.kind == "vanishing":
        found += [_relu(d, root, anat), _reinit(d, root, anat), _normalization(d, root, anat), _residual(d, root, anat)]
    elif d.kind == "exploding":
        found += [_clipping(d, run, anat), _lower_lr(d, run)]
        if ev.get("recurrent"):
            found.append(_orthogonal(d, root))
        else:
            found += [_normalization(d, root, anat), _reinit(d, root, anat)]
    elif d.kind == "update_scale":
        found.append(_lower_lr(d, run, force=True))
    elif d.kind == "nonfinite":
        found += _nonfinite(d, root, anat, run)
    elif d.kind == "saturation":
        found += [_relu(d, root, anat, min_count=1), _normalization(d, root, anat)]
    elif d.kind == "dead_units":
        found += [_leaky_relu(d, root), _reinit(d, root, anat), _lower_lr(d, run)]
    elif d.kind == "init_scale":
        found.append(_reinit(d, root, anat))
    elif d.kind == "forget_gate":
        found.append(_gate_bias(d, root))
    remedies = [r for r in found if r is not None]
    return remedies or None


# ---------------------------------------------------------------------- rendering


def render(kind: str, params: Mapping[str, Any]) -> tuple[str, str]:
    """The ``(title, snippet)`` of a built-in remedy, written from its ``params`` alone.

    Args:
        kind: The remedy's kind.
        params: Its ``params``.

    Raises:
        KeyError: For a kind the advisor does not make.
    """
    return _RENDER[kind](params)


def _remedy(
    kind: str, params: dict[str, Any], *, rationale: str, apply: Callable[[nn.Module], nn.Module] | None = None
) -> Remedy:
    title, snippet = render(kind, params)
    return Remedy(kind=kind, title=title, rationale=rationale, params=params, snippet=snippet, apply=apply)


def _names(names: list[str] | tuple[str, ...], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _module(p: Mapping[str, Any]) -> str:
    return f"{p['module']!r} ({p['module_type']})" if p.get("module_type") else repr(p["module"])


def _render_relu(p: Mapping[str, Any]) -> tuple[str, str]:
    targets, feeding = list(p["modules"]), list(p["reinit"])
    what = "/".join(p["module_types"]) or "sigmoid/tanh"
    if targets:
        title = f"Replace the {len(targets)} {what} module(s) ({_names(targets)}) with ReLU"
    else:
        title = f"Replace the {len(p['functional'])} functional sigmoid/tanh call(s) in forward() with torch.relu"
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
            f'    nn.init.{p["init"]}(layer.weight, nonlinearity="{p["nonlinearity"]}")',
            "    if layer.bias is not None:",
            "        nn.init.zeros_(layer.bias)",
        ]
    for call in p["functional"]:
        lines.append(f"# by hand in forward(): {call} -> torch.relu")
    return title, "\n".join(lines)


def _render_leaky_relu(p: Mapping[str, Any]) -> tuple[str, str]:
    slope = p["negative_slope"]
    lines = [
        f"for name in {list(p['modules'])!r}:",
        '    parent, _, child = name.rpartition(".")',
        f"    setattr(model.get_submodule(parent), child, nn.LeakyReLU({slope!r}))",
    ]
    return f"Replace the ReLU module(s) {_names(p['modules'])} with LeakyReLU({slope!r})", "\n".join(lines)


def _render_normalization(p: Mapping[str, Any]) -> tuple[str, str]:
    layers: Mapping[str, Mapping[str, Any]] = p["layers"]
    kinds = sorted({spec["norm"] for spec in layers.values()})
    lines = ["# wrap each layer as Sequential(layer, norm): the norm sits between the layer and its activation"]
    for name, spec in layers.items():
        expr = f"nn.{spec['norm']}({spec['num_features']})"
        lines.append(anatomy.setter(name, f'nn.Sequential(model.get_submodule("{name}"), {expr})'))
    if p["zero_init"]:
        lines.append("# each residual branch starts as the identity: its last norm's weight at zero (Goyal et al. 2017)")
        lines += [f'nn.init.zeros_(model.get_submodule("{name}.1").weight)' for name in p["zero_init"]]
    title = f"Insert {'/'.join(kinds)} after the {len(layers)} layer(s) {_names(list(layers))}, before their activations"
    return title, "\n".join(lines)


_RESIDUAL_CLASS = '''class Residual(nn.Module):
    """y = x + f(x): the identity path carries the gradient past f (He et al. 2016)."""
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x):
        return x + self.inner(x)
'''


def _render_residual(p: Mapping[str, Any]) -> tuple[str, str]:
    pairs: Mapping[str, str | None] = p["layers"]
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
    return f"Add residual connections around the {len(pairs)} shape-preserving layer(s) {_names(list(pairs))}", "\n".join(lines)


def _init_line(target: str, spec: Mapping[str, Any]) -> str:
    if spec["init"] == "kaiming_normal_":
        a = f"a={spec['a']!r}, " if spec["nonlinearity"] == "leaky_relu" else ""
        return f'nn.init.kaiming_normal_({target}, {a}nonlinearity="{spec["nonlinearity"]}")'
    return f'nn.init.xavier_normal_({target}, gain=nn.init.calculate_gain("{spec["activation"]}"))'


def _render_reinit(p: Mapping[str, Any]) -> tuple[str, str]:
    if p["init"] == "orthogonal_":
        name = p["module"]
        lines = [f'nn.init.orthogonal_(model.get_submodule("{name}").{w})  # spectral radius -> 1' for w in p["weights"]]
        return f"Re-initialise the recurrent weights of {name!r} orthogonally (spectral radius 1)", "\n".join(lines)
    layers: Mapping[str, Mapping[str, Any]] = p["layers"]
    lines = [f"# measured std -> expected std ({p['scheme']}, for the activation that follows)"]
    for name, spec in layers.items():
        target = f'model.get_submodule("{name}").weight'
        lines.append(f"{_init_line(target, spec)}  # {num(spec['measured_std'])} -> {num(spec['std'])}")
    acts = "/".join(sorted({spec["activation"] for spec in layers.values()}))
    return f"Re-initialise {len(layers)} layer(s) with {p['scheme'].capitalize()} init for their {acts}", "\n".join(lines)


def _bias_lines(module: str, gate: str, h: int, bias: float, target: str) -> list[str]:
    return [
        f"with torch.no_grad():  # the {gate} gate is the slice [{h}:{2 * h}] of each bias",
        f"    for pname, p in {target}.named_parameters():",
        '        if pname.startswith("bias_ih"):',
        f"            p[{h}:{2 * h}].fill_({bias!r})",
        '        elif pname.startswith("bias_hh"):',
        f"            p[{h}:{2 * h}].zero_()",
    ]


def _render_lstm_gru(p: Mapping[str, Any]) -> tuple[str, str]:
    name, h = p["module"], p["hidden_size"]
    if "replacement" in p:
        bias = p["forget_bias"]
        args = (
            f"{p['input_size']}, {h}, num_layers={p['num_layers']}, bias={p['bias']}, batch_first={p['batch_first']}, "
            f"dropout={p['dropout']}, bidirectional={p['bidirectional']}"
        )
        lines = [f"lstm = nn.LSTM({args})", *_bias_lines(name, "forget", h, bias, "lstm"), anatomy.setter(name, "lstm")]
        return f"Replace the nn.RNN {name!r} with an nn.LSTM (forget-gate bias {num(bias)}) or an nn.GRU", "\n".join(lines)
    gate = p["gate"]
    bias = p[f"{gate}_bias"]
    lines = _bias_lines(name, gate, h, bias, f'model.get_submodule("{name}")')
    return f"Initialise the {gate}-gate bias of {name!r} to {num(bias)}", "\n".join(lines)


def _render_clipping(p: Mapping[str, Any]) -> tuple[str, str]:
    value = p["max_norm"]
    snippet = (
        "# after loss.backward(), before optimizer.step():\n"
        f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={value:g})\n"
        f"# or let gradwatch do it: gradwatch.watch(model, optimizer, clip={value:g})"
    )
    return f"Clip the global gradient norm at {num(value)}", snippet


def _render_lower_lr(p: Mapping[str, Any]) -> tuple[str, str]:
    divide = int(p["divide_by"])
    title = f"Lower the learning rate by {'at least ' if p['at_least'] else ''}{times(divide)}"
    return title, f'for group in optimizer.param_groups:\n    group["lr"] /= {divide}'


def _render_finite_mask(p: Mapping[str, Any]) -> tuple[str, str]:
    where = _module(p)
    if p["module_type"] == "MultiheadAttention":
        lines = [
            f"# nn.MultiheadAttention {p['module']!r}: no query may have all of its keys masked (a key_padding_mask row",
            "# that is all True, or an attn_mask row of -inf, gives softmax over nothing = NaN); before calling it:",
            "key_padding_mask = key_padding_mask.clone()",
            "key_padding_mask[key_padding_mask.all(dim=-1)] = False  # a fully padded sequence attends to its padding",
        ]
    else:
        lines = [
            f"# in the forward() of {where}, where the mask is applied to the attention scores:",
            "scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)  # not float('-inf')",
            "# or keep -inf and zero the rows whose keys are all masked, after the softmax:",
            "weights = torch.softmax(scores, dim=-1).masked_fill(mask.all(dim=-1, keepdim=True), 0.0)",
        ]
    return f"Mask the attention scores of {where} with a finite value, not -inf", "\n".join(lines)


def _render_epsilon(p: Mapping[str, Any]) -> tuple[str, str]:
    where, eps, op = _module(p), p["eps"], p["op"]
    head = f"# in the forward() of {where}:"
    if op == "log":
        title = f"Clamp the input of the log in {where} to at least {num(eps)}"
        body = [f"y = torch.log(x.clamp_min({eps!r}))  # log(0) = -inf; or torch.log1p(x) for log(1 + x)"]
    elif op == "sqrt":
        title = f"Clamp the input of the sqrt/log/pow in {where} at 0 (and add {num(eps)})"
        body = [
            f"y = torch.sqrt(x.clamp_min(0) + {eps!r})  # sqrt(x < 0) = nan; the eps keeps the gradient finite at 0",
            f"y = torch.log(x.clamp_min({eps!r}))  # log(x < 0) = nan",
        ]
    elif op == "division":
        title = f"Keep the denominators in {where} away from zero (epsilon {num(eps)})"
        body = [
            f"y = a / b.clamp_min({eps!r})  # a non-negative denominator: x / 0 = inf, 0 / 0 = nan",
            f"y = a / torch.where(b.abs() < {eps!r}, torch.full_like(b, {eps!r}), b)  # a signed one",
        ]
    elif op == "backward":
        title = f"Add an epsilon where the forward of {where} takes a sqrt, norm or pow at 0 (its gradient is infinite there)"
        body = [
            f"y = torch.sqrt(x + {eps!r})  # d/dx sqrt(x) = inf at 0",
            f"n = torch.linalg.vector_norm(x, dim=-1).clamp_min({eps!r})  # a norm that divides",
            f"y = (x.abs() + {eps!r}).pow(p)  # pow with 0 < p < 1",
        ]
        head = f"# in the forward() of {where} (its gradient is the first non-finite one, in backward order):"
    else:
        raise KeyError(op)
    return title, "\n".join([head, *body])


def _render_log_space(p: Mapping[str, Any]) -> tuple[str, str]:
    where, limit = _module(p), p["exp_limit"]
    lines = [
        f"# in the forward() of {where}: exp overflows {p['dtype']} above {limit!r}",
        "y = torch.logsumexp(z, dim=-1)  # instead of torch.exp(z).sum(-1).log()",
        "y = nn.functional.softplus(z)  # instead of torch.log(1 + torch.exp(z))",
        f"y = torch.exp(z.clamp_max({limit - 1:.1f}))  # where exp itself is needed",
    ]
    return f"Compute the exp in {where} in log space (or clamp its input below {num(limit)})", "\n".join(lines)


def _render_precision(p: Mapping[str, Any]) -> tuple[str, str]:
    name, where = p["module"], _module(p)
    lines = [
        f"# {p['dtype']} tops out at {num(p['dtype_max'])}; run {name!r} in {p['compute_dtype']}:",
        f'layer = model.get_submodule("{name}").float()',
        "# and where it is called, in forward():",
        "with torch.autocast(device_type=x.device.type, enabled=False):",
        "    y = layer(x.float())",
        "# or train in bfloat16 (float32's range), or scale its inputs down",
    ]
    return f"Run {where} in {p['compute_dtype']}: its {p['dtype']} output overflowed", "\n".join(lines)


def _render_input_data(p: Mapping[str, Any]) -> tuple[str, str]:
    lines = [
        "# in the training loop, before the forward pass:",
        "x = batch  # the tensor(s) fed to the model",
        'assert torch.isfinite(x).all(), "the batch holds NaN/Inf: check the data pipeline"',
        "# or, to train on regardless: x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)",
    ]
    return f"Check the batches: the inputs of {_module(p)} already held NaN/Inf", "\n".join(lines)


def _render_stable_loss(p: Mapping[str, Any]) -> tuple[str, str]:
    lines = [
        "# compute the loss from logits, never log(softmax(z)) or log(sigmoid(z)) by hand:",
        "loss = nn.functional.cross_entropy(logits, target)  # log_softmax inside: finite for any logits",
        "loss = nn.functional.binary_cross_entropy_with_logits(logits, target)  # not BCE of sigmoid(logits)",
        f"loss = -(target * torch.log(probs.clamp_min({p['eps']!r}))).sum(-1).mean()  # if probabilities it must be",
    ]
    return "Compute the loss from logits (cross_entropy, binary_cross_entropy_with_logits)", "\n".join(lines)


def _render_op_guard(p: Mapping[str, Any]) -> tuple[str, str]:
    where, eps, limit = _module(p), p["eps"], p["exp_limit"]
    seen = (
        f"its inputs were finite, in [{num(p['input_min'])}, {num(p['input_max'])}] ({p['dtype']}); "
        if p["input_min"] is not None and p["input_max"] is not None
        else ""
    )
    lines = [
        f"# in the forward() of {where}: {seen}guard the op that produced {p['output']}:",
        f"y = torch.log(x.clamp_min({eps!r}))  # log(0) = -inf, log(x < 0) = nan",
        f"y = a / b.clamp_min({eps!r})  # x / 0 = inf, 0 / 0 = nan",
        f"y = torch.exp(z.clamp_max({limit - 1:.1f}))  # exp overflows {p['dtype']} above {limit!r}",
    ]
    return f"Find the op in {where} that turns finite inputs into {p['output']}", "\n".join(lines)


_RENDER: dict[str, Callable[[Mapping[str, Any]], tuple[str, str]]] = {
    "relu": _render_relu,
    "leaky_relu": _render_leaky_relu,
    "normalization": _render_normalization,
    "residual": _render_residual,
    "reinit": _render_reinit,
    "lstm_gru": _render_lstm_gru,
    "clipping": _render_clipping,
    "lower_lr": _render_lower_lr,
    "finite_mask": _render_finite_mask,
    "epsilon": _render_epsilon,
    "log_space": _render_log_space,
    "precision": _render_precision,
    "input_data": _render_input_data,
    "stable_loss": _render_stable_loss,
    "op_guard": _render_op_guard,
}


# ---------------------------------------------------------------------- what was measured


def measured(d: Diagnosis) -> str:
    """The diagnosis's headline numbers, for rationales (the detector's ``summary``)."""
    return d.summary or d.message


def _applier(fn: Callable[[nn.Module], None]) -> Callable[[nn.Module], nn.Module]:
    def apply(model: nn.Module) -> nn.Module:
        fn(model)
        return model

    return apply


def _number(value: Any) -> float | None:
    """A finite float from evidence, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _step(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


# ---------------------------------------------------------------------- model changes


#: The derivative bound of each saturating activation, as rationales quote it.
_BOUNDS = {
    "Sigmoid": ("σ′ ≤ ¼", 0.25),
    "Hardsigmoid": ("hardsigmoid′ ≤ 1/6", 1 / 6),
    "Tanh": ("tanh′ ≤ 1 (1 only at 0)", 1.0),
    "Hardtanh": ("hardtanh′ is 1 inside [−1, 1] and 0 outside", 1.0),
    "Softsign": ("softsign′ ≤ 1 (1 only at 0)", 1.0),
    "functional sigmoid": ("σ′ ≤ ¼", 0.25),
    "functional tanh": ("tanh′ ≤ 1 (1 only at 0)", 1.0),
}


def _bound_text(types: list[str], decay: float | None) -> str:
    """The derivative bound of each activation type present, what it implies over their
    number, and the measured decay."""
    counts: dict[str, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    bounds = {t: _BOUNDS.get(t, (f"{t}′ is bounded", 1.0)) for t in counts}
    shrinking = [t for t in counts if bounds[t][1] < 1]
    others = [t for t in counts if bounds[t][1] >= 1]
    parts = [f"{bounds[t][0]} for the {counts[t]} {t}" for t in shrinking]
    if shrinking:
        n = sum(counts[t] for t in shrinking)
        bound = max(bounds[t][1] for t in shrinking)
        parts[-1] += f", so through {n} of them a gradient shrinks by up to {num(bound)}^{n} = {power(bound, n)}"
    parts += [f"{bounds[t][0]} for the {counts[t]} {t}" for t in others]
    if others:
        at_1, at_2 = num(1 - math.tanh(1) ** 2), num(1 - math.tanh(2) ** 2)
        parts.append(f"a tanh-like unit shrinks a gradient only where it saturates (tanh′(±1) = {at_1}, tanh′(±2) = {at_2})")
    if decay is not None:
        parts.append(f"the measured decay is {times(decay)} per layer toward the input")
    return "; ".join(parts)


def _relu(d: Diagnosis, root: nn.Module, anat: anatomy.Anatomy, min_count: int = 2) -> Remedy | None:
    targets = [n for n in anat.saturating if not d.layers or d.kind != "saturation" or n in d.layers] or anat.saturating
    functional = [(call, kind, after) for call, kind, after in anat.functional if kind in ("sigmoid", "tanh")]
    if len(targets) + len(functional) < min_count:
        return None
    feeding = [layer for layer, act in anat.activation_after.items() if act is not None and act[0] in targets]
    module_types = [type(root.get_submodule(n)).__name__ for n in targets]
    params = {
        "modules": targets,
        "module_types": sorted(set(module_types)),
        "replacement": "ReLU",
        "reinit": feeding,
        "init": "kaiming_normal_",
        "nonlinearity": "relu",
        "functional": [f"{call} after {after!r}" for call, _, after in functional],
    }
    fx = anat.fx_note
    if functional:
        fx += "; functional " + ", ".join(params["functional"][:4]) + " must be changed to torch.relu in forward() by hand"
    decay = _number(d.evidence.get("decay_per_layer"))
    bounds = _bound_text(module_types + [f"functional {kind}" for _, kind, _ in functional], decay)

    def change(model: nn.Module) -> None:
        for name in targets:
            anatomy.replace(model, name, nn.ReLU())
        with torch.no_grad():
            for name in feeding:
                layer = model.get_submodule(name)
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                if getattr(layer, "bias", None) is not None:
                    nn.init.zeros_(layer.bias)

    rationale = (
        f"{measured(d)}; {bounds}; ReLU passes a gradient unchanged where active; re-initialise the {len(feeding)} "
        f"layer(s) feeding them with Kaiming init (He et al. 2015). {fx}"
    )
    return _remedy("relu", params, rationale=rationale, apply=_applier(change) if targets else None)


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

    def size(module: nn.Module) -> int:
        return module.out_features if isinstance(module, nn.Linear) else module.out_channels

    specs = {n: {"norm": _NORM_FOR[type(root.get_submodule(n))], "num_features": size(root.get_submodule(n))} for n in layers}
    branches = anatomy.residual_branches(anat)
    zero = [branch[-1] for _, branch, _ in branches if len(branch) >= 2 and branch[-1] in specs]
    params = {"layers": specs, "position": "after the layer, before its activation", "zero_init": zero}

    def change(model: nn.Module) -> None:
        for name, spec in specs.items():
            layer = model.get_submodule(name)
            norm = getattr(nn, spec["norm"])(spec["num_features"]).to(layer.weight.device)
            anatomy.replace(model, name, nn.Sequential(layer, norm))
        with torch.no_grad():
            for name in zero:
                nn.init.zeros_(model.get_submodule(f"{name}.1").weight)

    where = f"after the {len(specs)} layer(s) {_names(layers)}, before their activations"
    residual = (
        f"; in the {len(branches)} residual branches the last norm starts at zero (Goyal et al. 2017), so each block "
        "starts as the identity"
        if zero
        else ""
    )
    rationale = (
        f"{measured(d)}; the model has no normalisation layer in its {len(anat.weight_layers)} weight layers, so "
        "nothing restores the scale of activations and gradients from layer to layer (Ioffe & Szegedy 2015; "
        f"Ba et al. 2016). Where: {where}{residual}. LayerNorm for Linear layers works at any batch size. "
        "The wrapped layers' state_dict keys gain a '.0'."
    )
    return _remedy("normalization", params, rationale=rationale, apply=_applier(change))


class Residual(nn.Module):
    """``y = x + f(x)``: the identity path carries the gradient past ``f`` (He et al. 2016)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


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
    pairs: dict[str, str | None] = {}
    for name in layers:
        act = anat.activation_after.get(name)
        own = act is not None and uses.get(act[0]) == 1 and not act[0].startswith("functional")
        pairs[name] = act[0] if own and act is not None else None

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
    rationale = (
        f"{measured(d)}; {how} in {len(anat.weight_layers)} weight layers, so every gradient must pass through every "
        "layer; with x + f(x) the identity path carries it past each block (He et al. 2016)."
    )
    return _remedy("residual", {"layers": pairs}, rationale=rationale, apply=_applier(change))


def _reinit(d: Diagnosis, root: nn.Module, anat: anatomy.Anatomy) -> Remedy | None:
    """Re-initialise to the Kaiming/Xavier std, only in the direction that helps the fault:
    a vanishing signal gets only layers whose weights are too small (re-init raises them),
    an exploding one only those too large, and only when the init scale predicts the
    fault along the real signal path (residual additions followed)."""
    scales = [s for s in anatomy.init_scales(root, anat) if s.expected > 0]
    if d.kind == "init_scale":
        if d.evidence.get("contradicted"):
            return None  # the init plugin found the gradients contradict its prediction: not the cause
        # The stds measured at attach (the weights now may be anything, NaN included).
        std = d.evidence.get("std", {})
        scales = [
            anatomy.LayerScale(s.name, float(std[s.name]), s.expected, s.scheme, s.activation, s.slope)
            for s in scales
            if s.name in std and float(std[s.name]) > 0
        ]
        predicted = _number(d.evidence.get("depth_gain"))
    else:
        scales = [s for s in scales if s.std > 0]  # NaN weights have no scale to judge
        prediction = anatomy.predict_signal(root, anat, scales)
        if prediction is None:
            return None
        predicted = prediction.gain
        on_path = set(prediction.layers)
        tol = math.log(1.25)
        if d.kind == "vanishing":
            if predicted > 0.1:
                return None  # the init does not predict the shrinking
            scales = [s for s in scales if s.name in on_path and math.log(s.gain) < -tol]
        elif d.kind == "exploding":
            if predicted < 10:
                return None
            scales = [s for s in scales if s.name in on_path and math.log(s.gain) > tol]
        else:
            if abs(math.log(predicted)) < math.log(10):
                return None
            scales = [s for s in scales if s.name in on_path and abs(math.log(s.gain)) > tol]
    if not scales:
        return None
    layers = {
        s.name: {
            "init": "kaiming_normal_" if s.scheme == "kaiming" else "xavier_normal_",
            "nonlinearity": {"leaky_relu": "leaky_relu", "selu": "linear"}.get(s.activation, "relu")
            if s.scheme == "kaiming"
            else None,
            "a": s.slope,
            "activation": s.activation,
            "std": s.expected,
            "measured_std": s.std,
        }
        for s in scales
    }
    first = scales[0]
    params = {"init": layers[first.name]["init"], "scheme": first.scheme, "layers": layers, "predicted_gain": predicted}

    def change(model: nn.Module) -> None:
        for s in scales:
            anatomy.apply_init(s, model.get_submodule(s.name).weight)

    mean = _exp(sum(math.log(s.gain) for s in scales) / len(scales))
    rationale = (
        f"{measured(d)}; weight std is {times(mean)} of the expectation (e.g. {first.name!r}: {num(first.std)} measured vs "
        f"{num(first.expected)} expected), and along the signal path the init scales the signal by "
        f"{num(predicted) if predicted is not None else 'n/a'} (He et al. 2015; Glorot & Bengio 2010)"
    )
    if d.kind == "vanishing" and any(s.activation == "sigmoid" for s in scales):
        rationale += (
            "; re-initialisation alone does not fix the σ′ ≤ ¼ bound: each sigmoid still multiplies the gradient by "
            "at most ¼ (nn.init.calculate_gain('sigmoid') is 1), so replace the sigmoids as well"
        )
    return _remedy("reinit", params, rationale=rationale + ".", apply=_applier(change))


def _forget_bias(seq_len: int) -> float:
    # σ(b)^T is what an untouched cell keeps over T steps; log T keeps it near 1/e or better.
    return max(1.0, round(math.log(max(seq_len, 2)), 1))


def _keep(bias: float, steps: int) -> str:
    """``σ(bias)^steps`` as messages write it (log space: no underflow)."""
    return power(0.5 * (1 + math.tanh(bias / 2)), steps)  # σ(b), no overflow at any bias


def _set_gate_bias(module: nn.Module, h: int, bias: float) -> None:
    with torch.no_grad():
        for pname, p in module.named_parameters():
            if pname.startswith("bias_ih"):
                p[h : 2 * h].fill_(bias)
            elif pname.startswith("bias_hh"):
                p[h : 2 * h].zero_()


def _lstm_gru(d: Diagnosis, root: nn.Module) -> Remedy | None:
    if d.evidence.get("module_type") != "RNN" or not d.layers:
        return None
    name = d.layers[0]
    old = root.get_submodule(name)
    seq_len = int(_number(d.evidence.get("seq_len")) or 1)
    bias = _forget_bias(seq_len)
    h = old.hidden_size
    params = {
        "module": name,
        "replacement": "LSTM",
        "forget_bias": bias,
        "input_size": old.input_size,
        "hidden_size": h,
        "num_layers": old.num_layers,
        "bias": old.bias,
        "batch_first": old.batch_first,
        "dropout": old.dropout,
        "bidirectional": old.bidirectional,
    }

    def change(model: nn.Module) -> None:
        lstm = nn.LSTM(
            old.input_size, h, num_layers=old.num_layers, bias=old.bias, batch_first=old.batch_first,
            dropout=old.dropout, bidirectional=old.bidirectional,
        )  # fmt: skip
        _set_gate_bias(lstm, h, bias)
        anatomy.replace(model, name, lstm.to(next(old.parameters()).device))

    rationale = (
        f"{measured(d)}; a gated cell keeps an additive path through time. PyTorch initialises LSTM biases "
        f"uniformly in ±1/sqrt({h}) = ±{num(1 / math.sqrt(h))}, so the forget gate starts near σ(0) = 0.5 and an "
        f"untouched cell keeps 0.5^{seq_len} = {power(0.5, seq_len)} of its gradient; a forget-gate bias of {num(bias)} keeps "
        f"σ({num(bias)})^{seq_len} = {_keep(bias, seq_len)} (Gers et al. 2000; Jozefowicz et al. 2015 "
        "use 1; chrono init, Tallec & Ollivier 2018, draws log U(1, T−1)). nn.LSTM returns (output, (h_n, c_n)): "
        "code that uses h_n must take the first element."
        + ("" if old.bias else " The RNN has bias=False; the LSTM needs bias=True for a forget-gate bias.")
    )
    return _remedy("lstm_gru", params, rationale=rationale, apply=_applier(change))


def _gate_bias(d: Diagnosis, root: nn.Module) -> Remedy | None:
    if not d.layers:
        return None
    name = d.layers[0]
    module = _get(root, name)
    if not isinstance(module, (nn.LSTM, nn.GRU)):
        return None
    seq_len = int(_number(d.evidence.get("seq_len")) or 1)
    bias = _forget_bias(seq_len)
    h = module.hidden_size
    gate = "forget" if isinstance(module, nn.LSTM) else "update"
    params = {"module": name, "gate": gate, f"{gate}_bias": bias, "hidden_size": h}
    rationale = (
        f"a cell keeps {num(_number(d.evidence.get('keep')))} of its memory over T = {seq_len} steps at the current bias; "
        f"PyTorch's default init does not make it large. A bias of {num(bias)} keeps σ({num(bias)})^{seq_len} = "
        f"{_keep(bias, seq_len)} (Gers et al. 2000; Jozefowicz et al. 2015 use 1; chrono init, Tallec & Ollivier 2018, "
        "draws log U(1, T−1))."
    )
    return _remedy(
        "lstm_gru", params, rationale=rationale, apply=_applier(lambda model: _set_gate_bias(model.get_submodule(name), h, bias))
    )


def _orthogonal(d: Diagnosis, root: nn.Module) -> Remedy | None:
    if d.evidence.get("module_type") != "RNN" or not d.layers:
        return None
    name = d.layers[0]
    weights = [p for p, _ in root.get_submodule(name).named_parameters() if p.startswith("weight_hh")]
    if not weights:
        return None

    def change(model: nn.Module) -> None:
        rnn = model.get_submodule(name)
        with torch.no_grad():
            for p in weights:
                nn.init.orthogonal_(getattr(rnn, p))

    radii = d.evidence.get("spectral_radius") or {}
    shown = ", ".join(f"{k} {num(_number(v))}" for k, v in list(radii.items())[:4])
    rationale = (
        f"{measured(d)}; spectral radius {shown}. An orthogonal W_hh has all eigenvalues on the unit circle, so "
        "γ·max σ′ ≤ 1 and the bound neither explodes nor (before saturation) vanishes (Saxe et al. 2014; Le et al. 2015)."
    )
    return _remedy(
        "reinit", {"init": "orthogonal_", "module": name, "weights": weights}, rationale=rationale, apply=_applier(change)
    )


def _leaky_relu(d: Diagnosis, root: nn.Module) -> Remedy | None:
    targets = [n for n in d.layers if n and isinstance(_get(root, n), nn.ReLU)]
    if not targets:
        return None
    slope = 0.01

    def change(model: nn.Module) -> None:
        for name in targets:
            anatomy.replace(model, name, nn.LeakyReLU(slope))

    rationale = (
        f"{measured(d)}; a dead ReLU has zero gradient for every input and never recovers; LeakyReLU keeps a "
        f"{num(slope)} slope (Maas et al. 2013)."
    )
    return _remedy(
        "leaky_relu",
        {"modules": targets, "negative_slope": slope, "replacement": "LeakyReLU"},
        rationale=rationale,
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


def _median(values: list[float]) -> float:
    return _quantile(values, 50)


@dataclass(frozen=True)
class Healthy:
    """The total norms measured before the fault, and where they end.

    Attributes:
        rows: ``(step, norm)`` of the healthy rows, step order.
        before: The first step that is not healthy (the onset, or where the norms grew).
        grew_at: The step whose norm first exceeded ``GROWN`` × the median before it, if any.
    """

    rows: list[tuple[int, float]]
    before: int
    grew_at: int | None


def healthy_norms(d: Diagnosis, run: Run) -> Healthy:
    """The rows before the onset (the ``onset`` evidence, else the first step of the fault)
    and before the norms grew (a row ``GROWN`` × the median of the rows before it); when
    the onset is step 0 or 1, the step-0 row (the norm before any update)."""
    ev = d.evidence
    onset = _step(ev.get("onset"))
    if onset is None:
        onset = _step(ev.get("first_step"))
    if onset is None:
        onset = d.step
    rows = [(s, n) for s, n in zip(run.norm_steps, run.norms) if math.isfinite(n) and s < max(onset, 1)]
    grew_at = None
    for i in range(1, len(rows)):
        if rows[i][1] > GROWN * _median([n for _, n in rows[:i]]):
            grew_at = rows[i][0]
            rows = rows[:i]
            break
    return Healthy(rows=rows, before=grew_at if grew_at is not None else max(onset, 1), grew_at=grew_at)


def _clipping(d: Diagnosis, run: Run, anat: anatomy.Anatomy) -> Remedy | None:
    healthy = healthy_norms(d, run)
    norms = [n for _, n in healthy.rows]
    q = run.clip_percentile
    params: dict[str, Any] = {"healthy_rows": len(norms), "before_step": healthy.before}
    grew = f" (where the norms grew ×{num(GROWN)} past their median)" if healthy.grew_at is not None else ""
    if len(norms) >= MIN_HEALTHY_ROWS:
        value = round_sig(_quantile(norms, q))
        params.update(basis="percentile", percentile=q)
        basis = (
            f"the threshold {num(value)} is the {num(q)}th percentile of the {len(norms)} total norms measured before step "
            f"{healthy.before}{grew} (they range {num(min(norms))}–{num(max(norms))})"
        )
    else:
        few = (
            f"only {len(norms)} healthy total norm(s) were measured before step {healthy.before}{grew} "
            f"(a percentile needs {MIN_HEALTHY_ROWS}), so the threshold"
        )
        if anat.transformer:
            value = TRANSFORMER_MAX_NORM
            params.update(basis="transformer")
            basis = (
                f"{few} is the common choice for transformers, {num(value)} (Hugging Face Trainer's max_grad_norm "
                f"default, as BERT and GPT-2 were trained; attention modules found: {_names(anat.attention, 2)})"
            )
        elif healthy.rows:
            step, first = healthy.rows[0]
            value = round_sig(first)
            params.update(basis="first_norm", first_step=step)
            basis = f"{few} is the model's own total norm at step {step}, {num(value)}, measured before the fault"
        else:
            value = 1.0
            params.update(basis="default")
            basis = f"{few} is the common default, {num(value)}; measure the norms of a healthy run and set it from them"
    if not value > 0 or not math.isfinite(value):
        return None
    params = {"max_norm": value, **params}
    rationale = f"{measured(d)}{_last_norm(run)}; {basis}; ordinary steps pass unchanged and spikes are scaled down."
    return _remedy("clipping", params, rationale=rationale)


def _last_norm(run: Run) -> str:
    """The last finite total norm with its step (a norm of step 0 is not the last one)."""
    finite = [(s, n) for s, n in zip(run.norm_steps, run.norms) if math.isfinite(n)]
    if not finite:
        return ""
    step, value = finite[-1]
    return f" (the last finite total norm was {num(value)}, at step {step})"


def loss_growth(run: Run) -> tuple[float, int] | None:
    """``(growth per step, since step)``: the least-squares growth of ``log loss`` from the
    loss's minimum to its last finite value, when above ×1.05 per step."""
    rows = []
    for s, v in zip(run.loss_steps, run.losses):
        if not math.isfinite(v) or v <= 0:
            break
        rows.append((s, v))
    if len(rows) < 3:
        return None
    low = min(range(len(rows)), key=lambda i: rows[i][1])
    tail = rows[low:]
    if len(tail) < 2:
        return None
    x = torch.tensor([s for s, _ in tail], dtype=torch.float64)
    y = torch.tensor([math.log(v) for _, v in tail], dtype=torch.float64)
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / xc.square().sum())
    growth = _exp(min(slope, 700.0))
    return (growth, tail[0][0]) if growth > 1.05 else None


def _diverging(run: Run) -> float | None:
    """How many times the loss grew from its lowest value (inf once it is non-finite)."""
    if len(run.losses) < 2:
        return None
    finite = [v for v in run.losses if math.isfinite(v)]
    if len(finite) < len(run.losses):
        return math.inf
    low = min(finite[: max(1, len(finite) // 2)])
    return finite[-1] / low if low > 0 else None


def _lower_lr(d: Diagnosis, run: Run, *, force: bool = False) -> Remedy | None:
    ev = d.evidence
    target = run.target_update_ratio
    ratio, layer, rows, skipped = run.update_ratio, run.update_layer, run.update_rows, run.skipped_zero_weight
    if d.kind == "update_scale" and _number(ev.get("update_ratio")):
        # The detector's judged ratio (zero weights already skipped there).
        ratio = _number(ev.get("update_ratio"))
        per_layer = ev.get("per_layer") or {}
        finite = {k: v for k, v in per_layer.items() if _number(v) is not None}
        layer = max(finite, key=lambda k: finite[k]) if finite else None
        rows = int(_number(ev.get("steps_seen")) or 0)
        skipped = tuple(ev.get("skipped_zero_weight") or ())
        target = _number(ev.get("target")) or target
    elif ratio is None and _number(ev.get("update_ratio")):
        ratio, layer, rows = _number(ev.get("update_ratio")), None, 0  # no history: the evidence's number
    growth = loss_growth(run)
    grew = _diverging(run)
    diverging = bool(ev.get("loss_diverging")) or (grew is not None and grew > 10)
    too_big = ratio is not None and ratio > 10 * target
    if not (diverging or too_big or force):
        return None
    params: dict[str, Any]
    if ratio is not None and ratio > target:
        raw = ratio / target
        divide = min(max(10.0 ** round(math.log10(raw)), 10.0), MAX_LR_DIVISOR)
        at_least = raw > MAX_LR_DIVISOR
        of = f" of {layer!r}" if layer else ""
        over = (f" (median over its {rows} sampled steps)" if rows > 1 else " (on one sampled step)") if rows else ""
        why = f"the update/weight ratio ‖Δw‖/‖w‖{of} was {num(ratio)}{over}, {times(raw)} the ~{num(target)} of a healthy step"
        if at_least:
            why += (
                f"; one remedy divides the rate by at most {num(MAX_LR_DIVISOR)}: lower it at least that much and measure again"
            )
        params = {"basis": "update_ratio", "update_ratio": ratio, "target_update_ratio": target}
    elif growth is not None:
        g, since = growth
        # Gradient descent on a quadratic multiplies the error by |1 - lr·λ| a step and the
        # loss by its square: a loss growing ×g means lr·λ = 1 + √g, and stability needs
        # lr·λ < 2, so the rate is at least (1 + √g)/2 too high.
        raw = (1 + math.sqrt(g)) / 2
        divide = min(max(10.0 ** math.ceil(math.log10(raw)), 10.0), MAX_LR_DIVISOR)
        at_least = True
        why = (
            f"the loss grows {times(g)} per step since step {since}; on a quadratic, gradient descent multiplies the loss "
            f"by (1 − lr·λ)² a step, so the rate is at least {times(raw)} past the stable 2/λ"
        )
        params = {"basis": "loss_growth", "loss_growth_per_step": g, "since_step": since}
    else:
        divide, at_least = 10.0, False
        why = "neither the update/weight ratio nor the loss growth was measured, so the factor is a first step of 10"
        params = {"basis": "first_step"}
    if skipped:
        why += (
            f"; {len(skipped)} layer(s) whose weights were ~0 on a sampled step are not judged ({_names(list(skipped), 3)}): "
            "a ratio to a zero weight says nothing about the learning rate"
        )
    loss_note = (
        f"; the loss grew {times(grew)} from its low"
        if grew is not None and math.isfinite(grew) and grew > 1
        else ("; the loss became non-finite" if grew == math.inf else "")
    )
    params = {"lr_factor": 1.0 / divide, "divide_by": divide, "at_least": at_least, **params}
    return _remedy("lower_lr", params, rationale=f"{measured(d)}{loss_note}; {why}.")


def _too_big(run: Run) -> bool:
    """Updates far larger than a healthy step, or a loss that grew ×10 before going non-finite."""
    if run.update_ratio is not None and run.update_ratio > 10 * run.target_update_ratio:
        return True
    finite = [v for v in run.losses if math.isfinite(v)]
    return (
        len(finite) >= 2
        and min(finite[: max(1, len(finite) // 2)]) > 0
        and max(finite) > 10 * min(finite[: max(1, len(finite) // 2)])
    )


def _grew_before(d: Diagnosis, run: Run) -> bool:
    """Whether the total norms grew before the first non-finite step (``GROWN`` × the
    median of the earlier rows, or a non-finite norm before it)."""
    first = _step(d.evidence.get("first_step"))
    first = d.step if first is None else first
    norms = [n for s, n in zip(run.norm_steps, run.norms) if s < first]
    finite = [n for n in norms if math.isfinite(n)]
    if len(finite) < len(norms):
        return True
    return any(finite[i] > GROWN * _median(finite[:i]) for i in range(1, len(finite)))


# ---------------------------------------------------------------------- non-finite values


def _nonfinite(d: Diagnosis, root: nn.Module, anat: anatomy.Anatomy, run: Run) -> list[Remedy | None]:
    """A value produced inside an op gets advice for that op; clipping and a lower learning
    rate only for a fault the norms grew into."""
    ev = d.evidence
    where = ev.get("where")
    origin = ev.get("origin") if isinstance(ev.get("origin"), Mapping) else None
    grew = _grew_before(d, run)
    found: list[Remedy | None] = []
    if ev.get("produced") and origin is not None:
        found.append(_op_remedy(d, origin, grew))
    elif origin is not None and origin.get("input_finite") is False and origin.get("weights_finite", True):
        found.append(_input_data(d, origin))
    elif where == "gradient" and not grew and d.layers:
        found.append(_backward_epsilon(d, root))
    elif where == "loss" and not grew:
        found.append(_stable_loss(d))
    elif where == "output" and "produced" not in ev and d.layers and not grew:
        # Evidence without the producing op's inputs: the module is known, the op is not.
        params = _op_params(d, {"module": d.layers[0], "output": ev.get("value")})
        found.append(_remedy("op_guard", params, rationale=_unknown_op(d)))
    if grew or (not ev.get("produced") and (_too_big(run) or where == "weights")):
        found += [_clipping(d, run, anat), _lower_lr(d, run, force=True)]
        if grew:
            found.append(_normalization(d, root, anat))
    return found


def _dtype(origin: Mapping[str, Any]) -> str:
    return str(origin.get("input_dtype") or "float32").removeprefix("torch.")


def _op_params(d: Diagnosis, origin: Mapping[str, Any]) -> dict[str, Any]:
    dtype = _dtype(origin)
    return {
        "module": str(origin.get("module") or (d.layers[0] if d.layers else "")),
        "module_type": str(origin.get("module_type") or d.evidence.get("module_type") or ""),
        "dtype": dtype,
        "input_min": _number(origin.get("input_min")),
        "input_max": _number(origin.get("input_max")),
        "output": str(origin.get("output") or "nan"),
        "eps": _EPS.get(dtype, 1e-8),
        "exp_limit": _EXP_LIMIT.get(dtype, 88.7),
    }


def _op_remedy(d: Diagnosis, origin: Mapping[str, Any], grew: bool) -> Remedy:
    """What the producing op most likely was, from its type and the range of its inputs."""
    p = _op_params(d, origin)
    dtype, out, mtype = p["dtype"], p["output"], p["module_type"]
    lo, hi = p["input_min"], p["input_max"]
    peak = max(abs(lo or 0.0), abs(hi or 0.0))
    zero, negative = bool(origin.get("input_has_zero")), bool(origin.get("input_has_negative"))
    seen = (
        f"{measured(d)}; {_module(p)} turned finite inputs (in [{num(lo)}, {num(hi)}], {dtype}) and finite weights into "
        f"{out} in its forward pass, so the fault is in that op"
        + (
            "; the norms grew before it, so clipping and a lower learning rate may keep its inputs in range too"
            if grew
            else ": the norms did not grow into it, and neither clipping nor a lower learning rate changes what the op computes"
        )
    )
    if dtype == "float16" and out in ("inf", "-inf") and peak > 1.0:
        params = {**p, "compute_dtype": "float32", "dtype_max": _HALF_MAX[dtype]}
        why = f"{seen}; {dtype} overflows past {num(_HALF_MAX[dtype])} and its inputs reached {num(peak)}."
        return _remedy("precision", params, rationale=why)
    if _ATTENTION_TYPE.search(mtype) and out == "nan":
        why = (
            f"{seen}; in attention, a query whose keys are all masked with -inf gets softmax([-inf, …, -inf]) = 0/0 = NaN. "
            "A finite mask value (torch.finfo(dtype).min) gives such a row uniform weights instead, and the masked keys "
            "still get ~0 weight everywhere else."
        )
        return _remedy("finite_mask", {**p, "mask_value": "torch.finfo(dtype).min"}, rationale=why)
    if negative and out == "nan":
        why = f"{seen}; its inputs went below 0, and sqrt, log and fractional powers of a negative number are NaN."
        return _remedy("epsilon", {**p, "op": "sqrt"}, rationale=why)
    if zero and out == "-inf":
        why = f"{seen}; its inputs hold exact zeros and log(0) = -inf (NaN once multiplied by 0 downstream)."
        return _remedy("epsilon", {**p, "op": "log"}, rationale=why)
    if zero and out in ("inf", "nan"):
        why = f"{seen}; its inputs hold exact zeros: x / 0 = inf and 0 / 0 = NaN."
        return _remedy("epsilon", {**p, "op": "division"}, rationale=why)
    if out == "inf" and peak > p["exp_limit"] - 1:
        why = f"{seen}; its inputs reached {num(peak)}, and exp overflows {dtype} above {num(p['exp_limit'])}."
        return _remedy("log_space", p, rationale=why)
    why = f"{seen}; no zero or negative input and no overflow range explains it, so look at every log, sqrt, division, exp and pow there."
    return _remedy("op_guard", p, rationale=why)


def _unknown_op(d: Diagnosis) -> str:
    return (
        f"{measured(d)}; the norms did not grow before it, so an op in that module's forward produced it (a log, sqrt "
        "or division at 0, an exp that overflows, a mask of -inf); neither clipping nor a lower learning rate changes "
        "what the op computes."
    )


def _input_data(d: Diagnosis, origin: Mapping[str, Any]) -> Remedy:
    p = _op_params(d, origin)
    why = (
        f"{measured(d)}; the first module to see a non-finite value, {_module(p)}, got it in its inputs (range "
        f"[{num(p['input_min'])}, {num(p['input_max'])}]) with finite weights: it came from outside the model's modules, "
        "most often the batch itself."
    )
    return _remedy("input_data", p, rationale=why)


def _backward_epsilon(d: Diagnosis, root: nn.Module) -> Remedy:
    name = d.layers[0]
    module = _get(root, name)
    dtype = (
        next((str(p.dtype).removeprefix("torch.") for p in module.parameters()), "float32") if module is not None else "float32"
    )
    p = {
        "module": name,
        "module_type": str(d.evidence.get("module_type") or (type(module).__name__ if module is not None else "")),
        "op": "backward",
        "eps": _EPS.get(dtype, 1e-8),
        "dtype": dtype,
    }
    why = (
        f"{measured(d)}; every module output was finite while the gradients were not, and the norms did not grow "
        "before it: an op whose derivative is infinite at a point its input reached (sqrt and norms at 0, pow with "
        "0 < p < 1 at 0, acos/asin at ±1) or a custom backward; an epsilon keeps the input off that point."
    )
    return _remedy("epsilon", p, rationale=why)


def _stable_loss(d: Diagnosis) -> Remedy:
    why = (
        f"{measured(d)}; the loss was non-finite while the model's outputs were finite: the loss function took a log "
        "of 0 (log of a probability that underflowed). cross_entropy and the with_logits losses compute it in log space."
    )
    return _remedy("stable_loss", {"eps": 1e-8}, rationale=why)
