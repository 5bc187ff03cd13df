"""Recurrences: vanishing and exploding gradients through time in ``nn.RNN``.

Vanishing through time is invisible in parameter gradients (the fused ``nn.RNN`` gives
no per-step recurrent gradient), so this plugin analyses the recurrence itself. For a
vanilla RNN, the gradient that flows back ``T`` steps is bounded by
``‖∏ W_hhᵀ diag(σ′)‖ ≤ (γ · max σ′)^T`` (Pascanu, Mikolov & Bengio 2013), where ``γ`` is
the spectral radius of the recurrent weight and ``max σ′ = 1`` for tanh and ReLU:

* **vanishing** (warning) when the bound over the longest sequence seen in forward is
  below ``vanish_bound``;
* **exploding** risk (warning) when ``γ · max σ′ > explode_gain``: necessary, not
  sufficient, for explosion (a saturating tanh can still keep the state bounded).

The sequence length comes from a sampled forward probe on each recurrent module (shape
metadata only, no host sync). ``nn.LSTM`` and ``nn.GRU`` are gated: their cell path is
additive and the bound does not apply, so they get no diagnosis here
(:func:`spectral_radii` still measures their square gate blocks).
γ is recomputed on the host at every report interval (one ``eigvals`` per recurrent
weight, float64 on CPU). Each condition is reported once per module.

Options (``options={"recurrent": {...}}``):

* ``vanish_bound`` (float, default ``1e-6``): the bound below which gradients through
  time are judged vanished.
* ``explode_gain`` (float, default ``1.2``): ``γ · max σ′`` above which an exploding risk is
  reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from gradwatch import Diagnosis, ModelInfo, Severity, StashKey, StatsWindow, StepContext, WatchConfig, hookimpl
from gradwatch.kit import num, plugin_options

_DEFAULTS = {"vanish_bound": 1e-6, "explode_gain": 1.2}


@dataclass
class RecurrentState:
    """Per-watch state: options, longest sequence seen per module, what was reported."""

    vanish_bound: float
    explode_gain: float
    seq_len: dict[str, int] = field(default_factory=dict)
    initial_gain: dict[str, float] = field(default_factory=dict)
    reported: set[tuple[str, str]] = field(default_factory=set)


KEY = StashKey[RecurrentState]()


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    values = plugin_options(config, "recurrent", _DEFAULTS, bounds={"vanish_bound": (0.0, 1.0), "explode_gain": (1.0, None)})
    bound, gain = values["vanish_bound"], values["explode_gain"]
    ctx.stash[KEY] = RecurrentState(vanish_bound=float(bound), explode_gain=float(gain))


def sequence_length(module: nn.RNNBase, x: Any) -> int | None:
    """Time steps of an RNN input (tensor or ``PackedSequence``), from its shape only."""
    if isinstance(x, PackedSequence):
        return len(x.batch_sizes)
    if isinstance(x, torch.Tensor):
        if x.dim() == 2:  # unbatched: [T, features]
            return int(x.shape[0])
        if x.dim() == 3:
            return int(x.shape[1] if module.batch_first else x.shape[0])
    return None


@hookimpl
def gradwatch_attach(model: ModelInfo, ctx: StepContext) -> None:
    state = ctx.stash[KEY]
    for name, module in model.model.named_modules():
        if isinstance(module, nn.RNN):
            radii = [r for r in spectral_radii(module).values() if math.isfinite(r)]
            if radii:  # at attach: the initialisation, to date a condition present from the start
                state.initial_gain[name] = max(radii)
        if isinstance(module, nn.RNNBase):

            def probe(mod: nn.Module, args: tuple[Any, ...], output: Any, name: str = name) -> None:
                # Shape metadata only: no tensor value is read, so no host sync.
                length = sequence_length(mod, args[0]) if args else None
                if length is not None and length > state.seq_len.get(name, 0):
                    state.seq_len[name] = length

            ctx.probes.forward_hook(module, probe, sampled=True)


def spectral_radii(module: nn.RNNBase) -> dict[str, float]:
    """Spectral radius of each recurrent weight (per layer and direction); for gated
    modules, of each gate's square block, keyed ``weight_hh_l0[f]`` and so on."""
    out: dict[str, float] = {}
    gates = {"LSTM": "ifgo", "GRU": "rzn"}.get(type(module).__name__, "")
    for pname, param in module.named_parameters():
        if not pname.startswith("weight_hh"):
            continue
        w = param.detach().to("cpu", torch.float64)
        if not torch.isfinite(w).all():
            out[pname] = math.nan
            continue
        if not gates:
            out[pname] = float(torch.linalg.eigvals(w).abs().max())
            continue
        h = w.shape[1]
        for k, gate in enumerate(gates):
            block = w[k * h : (k + 1) * h]
            if block.shape[0] == block.shape[1]:
                out[f"{pname}[{gate}]"] = float(torch.linalg.eigvals(block).abs().max())
    return out


@hookimpl
def gradwatch_diagnose(window: StatsWindow, model: ModelInfo, ctx: StepContext) -> list[Diagnosis] | None:
    state = ctx.stash[KEY]
    found = []
    for name, module in model.model.named_modules():
        if isinstance(module, (nn.LSTM, nn.GRU)) and name in state.seq_len and (name, "forget_gate") not in state.reported:
            note = _gate_note(name, module, state, window)
            if note is not None:
                state.reported.add((name, "forget_gate"))
                found.append(note)
        if not isinstance(module, nn.RNN) or name not in state.seq_len:
            continue  # gated cells (LSTM, GRU) keep an additive path: the bound does not hold
        radii = spectral_radii(module)
        finite = [r for r in radii.values() if math.isfinite(r)]
        if not finite:
            continue
        seq_len = state.seq_len[name]
        gamma = max(finite)
        max_derivative = 1.0  # tanh′(0) = 1 and relu′ = 1 on its active side
        gain = gamma * max_derivative
        # (γ·max σ′)^T in log space: γ = 3 over T = 1000 steps is 1e477, past any float (issue 12).
        log_bound = log_power(gain, seq_len)
        bound = from_log(log_bound)
        # Steps over which the bound stays above 1e-3: how far back the RNN can learn.
        start = state.initial_gain.get(name, math.nan)
        horizon = math.log(1e-3) / math.log(gain) if 0 < gain < 1 else math.inf
        evidence = {
            "recurrent": True,
            "module_type": type(module).__name__,
            "spectral_radius": radii,
            "max_derivative": max_derivative,
            "nonlinearity": module.nonlinearity,
            "gain": gain,
            "seq_len": seq_len,
            "bound": bound,
            "log10_bound": log_bound / math.log(10) if math.isfinite(log_bound) else log_bound,
            "horizon": horizon if math.isfinite(horizon) else None,
            "threshold": state.vanish_bound if gain < 1 else state.explode_gain,
            "initial_gain": start if math.isfinite(start) else None,
        }
        if bound < state.vanish_bound and (name, "vanishing") not in state.reported:
            state.reported.add((name, "vanishing"))
            found.append(
                Diagnosis(
                    kind="vanishing",
                    severity=Severity.WARNING,
                    step=0 if log_power(start, seq_len) < math.log(state.vanish_bound) else window.first_step,
                    layers=(name,),
                    message=(
                        f"gradients through time vanish in {name!r}: recurrent spectral radius {num(gamma)} "
                        f"bounds a gradient over the {seq_len} steps seen by {_power_text(log_bound)} "
                        f"(it cannot learn dependencies beyond about {num(horizon)} steps)"
                    ),
                    summary=f"gradient bound (γ·max σ′)^T = {_power_text(log_bound)} over T = {seq_len} steps (γ·max σ′ = {num(gain)})",
                    evidence=evidence,
                    source="recurrent",
                )
            )
        elif gain > state.explode_gain and (name, "exploding") not in state.reported:
            state.reported.add((name, "exploding"))
            found.append(
                Diagnosis(
                    kind="exploding",
                    severity=Severity.WARNING,
                    step=0 if start > state.explode_gain else window.first_step,
                    layers=(name,),
                    message=(
                        f"gradients through time can explode in {name!r}: recurrent spectral radius {num(gamma)} "
                        f"(γ·max σ′ = {num(gain)} > 1) allows growth up to {_power_text(log_bound)}× over {seq_len} steps"
                    ),
                    summary=f"recurrent γ·max σ′ = {num(gain)} over T = {seq_len} steps",
                    evidence=evidence,
                    source="recurrent",
                )
            )
    return found or None


def gate_bias(module: nn.RNNBase) -> dict[str, float]:
    """Mean bias (``bias_ih + bias_hh``) of the gate that keeps the memory, per layer and
    direction: the forget gate of an LSTM (slice ``[H:2H]`` of ``i, f, g, o``), the update
    gate ``z`` of a GRU (slice ``[H:2H]`` of ``r, z, n``)."""
    h = module.hidden_size
    params = dict(module.named_parameters())
    out = {}
    for pname, bias in params.items():
        if pname.startswith("bias_ih"):
            other = params.get(pname.replace("bias_ih", "bias_hh"))
            total = bias.detach()[h : 2 * h].double() + (other.detach()[h : 2 * h].double() if other is not None else 0.0)
            out[pname.replace("bias_ih_", "")] = float(total.mean())
    return out


def _gate_note(name: str, module: nn.RNNBase, state: RecurrentState, window: StatsWindow) -> Diagnosis | None:
    """Info: at zero input, a cell keeps σ(b)^T of its memory over T steps; PyTorch's default
    bias (±1/sqrt(H)) gives σ(b) ≈ 0.5, which forgets long sequences."""
    if not module.bias:
        return None
    biases = gate_bias(module)
    if not biases:
        return None
    seq_len = state.seq_len[name]
    b = min(biases.values())
    # σ(b)^T in log space: a bias of -800 (a diverged run) overflows exp(-b) (issue 12).
    log_keep = seq_len * log_sigmoid(b)
    if not log_keep < math.log(state.vanish_bound):  # also False for a NaN bias: nothing to say
        return None
    keep = from_log(log_keep)
    gate = "forget" if isinstance(module, nn.LSTM) else "update (z)"
    return Diagnosis(
        kind="forget_gate",
        severity=Severity.INFO,
        step=window.first_step,
        layers=(name,),
        message=(
            f"the {gate} gate bias of {name!r} averages {num(b)}, so at zero input a cell keeps σ({num(b)})^{seq_len} = "
            f"{_power_text(log_keep)} of its memory over the {seq_len} steps seen; a larger bias keeps long-range gradients"
        ),
        summary=f"σ(forget bias)^T = {_power_text(log_keep)} over T = {seq_len} steps",
        evidence={
            "recurrent": True,
            "module_type": type(module).__name__,
            "gate_bias": biases,
            "seq_len": seq_len,
            "keep": keep,
            "log10_keep": log_keep / math.log(10),
            "threshold": state.vanish_bound,
        },
        source="recurrent",
    )


def log_power(base: float, exponent: int) -> float:
    """``log(base ** exponent)`` for ``base >= 0``, never overflowing: ``-inf`` for a zero
    base, NaN for a NaN or negative one."""
    if not base >= 0:
        return math.nan
    return exponent * math.log(base) if base > 0 else -math.inf


def log_sigmoid(x: float) -> float:
    """``log σ(x)``, stable for any float: ``x - log1p(e^x)`` below 0, ``-log1p(e^-x)`` above."""
    if math.isnan(x):
        return math.nan
    if x == -math.inf:
        return -math.inf
    return x - math.log1p(math.exp(x)) if x < 0 else -math.log1p(math.exp(-x))


def from_log(value: float) -> float:
    """``e^value`` as a float: ``inf`` past the float range, 0 below it (no OverflowError)."""
    if math.isnan(value):
        return math.nan
    return math.inf if value > 709.0 else math.exp(value)


def _power_text(log_value: float) -> str:
    """A power written from its log: ``num()`` within the float range, ``1e+477`` past it."""
    value = from_log(log_value)
    if value == 0.0 or math.isinf(value):
        if not math.isfinite(log_value):
            return num(value)
        return f"1e{log_value / math.log(10):+.0f}"
    return num(value)


@hookimpl
def gradwatch_state_dict(ctx: StepContext) -> dict[str, Any] | None:
    state = ctx.stash[KEY]
    return {"recurrent": {"seq_len": dict(state.seq_len), "reported": sorted(map(list, state.reported))}}


@hookimpl
def gradwatch_load_state_dict(state: dict[str, Any], ctx: StepContext) -> None:
    saved = state.get("recurrent")
    if saved:
        own = ctx.stash[KEY]
        own.seq_len.update(saved.get("seq_len", {}))
        own.reported.update(tuple(item) for item in saved.get("reported", ()))
