"""Gradient clipping and the non-finite gradient policy, at the act stage.

Switched on by ``clip=`` (a max global norm, ``"autoclip"``, ``"zclip"``, ``"agc"`` or a
:mod:`gradwatch.clip` config object) and by ``on_nonfinite=``; a no-op otherwise.
Runs once per optimizer step, when gradients are final (after DDP's all-reduce,
gradient accumulation and ``GradScaler.unscale_``), before ``optimizer.step()``.

Every decision is a clamped coefficient computed and multiplied in on device, as
``torch.nn.utils.clip_grad_norm_`` does: no host read per step. AutoClip's history and
ZClip's EMA live on the gradients' device in this watch's stash; every rank computes
them from the same (all-reduced) gradients, so every rank takes the same decision.
The exceptions, on purpose: ``on_nonfinite="skip"``, ``"zero"`` and ``"raise"`` read one
boolean on the host per step (a device sync) to decide; ``"warn"`` reads nothing and
warns at the next report interval. AGC stacks the gradients and weights of each
distinct parameter shape (unit norms are row norms, which no foreach kernel gives): a
few kernels per shape, and one extra copy of the clipped gradients and weights.

The global norm is reduced in ``model.parameters()`` order, so ``clip=<float>`` equals
``clip_grad_norm_(model.parameters(), max_norm)`` bit for bit (one device, one dtype).
Non-finite norms never enter AutoClip's history (they count as ``+inf``) or ZClip's EMA.

Each step records ``clipping.step`` = ``[norm before, threshold, coefficient,
non-finite]`` (float32 ``[4]``; AGC also ``clipping.agc`` = ``[clipped units, units]``),
and the host turns clipped steps into ``Action(kind="clip")`` records once per interval.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gradwatch import Action, GradWatchError, GradWatchWarning, StashKey, StepContext, WatchConfig, hookimpl
from gradwatch.clip import AGC, AutoClip, ClipConfig, ClipNorm, ZClip, resolve_clip, resolve_nonfinite

if TYPE_CHECKING:
    from collections.abc import Mapping

    from rich.console import Console

    from gradwatch import GradBatch, Report, StatsWindow

#: Columns of the per-step record ``clipping.step``.
COLUMNS = ("norm", "threshold", "coefficient", "nonfinite")
RECORD = "clipping.step"
AGC_RECORD = "clipping.agc"
_F32 = torch.float32
_INF = math.inf


@dataclass
class ClipState:
    """Per-watch clipping state; ``tensors`` live on the gradients' device."""

    clip: ClipConfig | None
    policy: str | None
    steps: int = 0  # optimizer steps acted on; host-known, so positions need no sync
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    exclude: frozenset[int] | None = None  # AGC: ids of parameters not clipped
    agc_groups: dict[tuple[int, ...], _AgcLayout] = field(default_factory=dict)
    order: dict[int, int] | None = None  # id(parameter) -> position in model.parameters()
    perms: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    clipped: int = 0
    seen: int = 0
    biggest: tuple[float, int] | None = None


KEY = StashKey[ClipState]()


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    if config.plugin_options("clipping"):
        raise GradWatchError(
            f"the clipping plugin takes no options ({sorted(config.plugin_options('clipping'))}); "
            "pass clip=gradwatch.ZClip(...) (or AutoClip, AGC, ClipNorm) and on_nonfinite= instead"
        )
    clip = resolve_clip(config.clip)
    if isinstance(clip, AGC):
        _check_agc_shards(ctx)
    if isinstance(clip, AGC) and clip.exclude:
        unknown = sorted(set(clip.exclude) - set(ctx.model.names))
        if unknown:
            raise GradWatchError(f"AGC exclude names unknown layer(s) {unknown}; layers are: {', '.join(ctx.model.names)}")
    ctx.stash[KEY] = ClipState(clip=clip, policy=resolve_nonfinite(config.on_nonfinite))


def _check_agc_shards(ctx: StepContext) -> None:
    """AGC's units are the rows of a weight: under FSDP2 they are whole on each rank only
    when the weight is sharded on dim 0 (``fully_shard``'s default)."""
    for layer in ctx.model.layers:
        for pname in layer.param_names:
            param = layer.module.get_parameter(pname)
            placements = getattr(param, "placements", None)
            if placements is None or param.dim() < 2:
                continue
            dims = [
                getattr(p, "dim", 0) for p in placements if type(p).__name__ == "Shard" or getattr(p, "is_shard", lambda: False)()
            ]
            if any(d != 0 for d in dims):
                raise GradWatchError(
                    f"clip='agc' needs each weight's rows whole on a rank, but {layer.name}.{pname} is sharded on dim "
                    f"{dims[0]}; shard on dim 0 (fully_shard's default) or use clip=<max norm>, 'autoclip' or 'zclip'"
                )


@hookimpl
def gradwatch_act(grads: GradBatch, ctx: StepContext) -> None:
    state = ctx.stash.get(KEY, None)
    if state is None or (state.clip is None and state.policy is None):
        return
    norm = _total_norm(state, grads, ctx)
    finite = torch.isfinite(norm)
    _to_device(state, norm.device)
    clip = state.clip
    if clip is None:
        threshold, coef = norm.new_full((), _INF), norm.new_ones(())
    elif isinstance(clip, AGC):
        threshold, coef = _agc(state, clip, grads, ctx)
    else:
        if isinstance(clip, ClipNorm):
            # clip_grad_norm_'s formula, to the bit: a Python float over the tensor, clamped at 1.
            threshold, coef = norm.new_full((), clip.max_norm), torch.clamp(clip.max_norm / (norm + 1e-6), max=1.0)
        else:
            threshold = _autoclip(state, clip, norm, finite) if isinstance(clip, AutoClip) else _zclip(state, clip, norm, finite)
            coef = torch.clamp(threshold / (norm + 1e-6), max=1.0)
        grads.mul_(coef)
    state.steps += 1
    ctx.record(RECORD, torch.stack((norm, threshold.to(_F32), coef.to(_F32), (~finite).to(_F32))))
    if state.policy in ("skip", "zero", "raise") and not bool(finite):  # the documented one host read per step
        _nonfinite(state.policy, grads, ctx)


def _total_norm(state: ClipState, grads: GradBatch, ctx: StepContext) -> torch.Tensor:
    """The global norm as ``clip_grad_norm_(model.parameters())`` computes it, to the bit:
    the per-tensor norms reduced in the model's parameter order (gradwatch's own order is
    the forward order, and a float32 sum depends on its order)."""
    ids = tuple(map(id, grads.params))  # a host-side pass building a key; no kernel per parameter
    perm = state.perms.get(ids)
    if perm is None:
        if state.order is None:
            state.order = {id(p): k for k, p in enumerate(ctx.model.model.parameters())}
        rank = [state.order.get(i, len(state.order)) for i in ids]
        perm = state.perms[ids] = torch.tensor(sorted(range(len(ids)), key=rank.__getitem__), device=grads.norms().device)
    return torch.linalg.vector_norm(grads.norms().index_select(0, perm), 2.0)


def _to_device(state: ClipState, device: torch.device) -> None:
    # After load_state_dict the tensors are on the host; move them once (a host check, no sync).
    for name, value in state.tensors.items():
        if value.device != device:
            state.tensors[name] = value.to(device)


def _nonfinite(policy: str, grads: GradBatch, ctx: StepContext) -> None:
    if policy == "zero":
        torch._foreach_zero_(grads.tensors)
    elif policy == "skip":
        # Optimizers skip parameters without a gradient: no update, no momentum or decay.
        for param in grads.params:
            param.grad = None
    else:
        bad = torch.isfinite(grads.maxabs()).logical_not().tolist()
        layers = ctx.model.names
        names = sorted({layers[i] for i, b in zip(grads.layer_index.tolist(), bad) if b})
        raise GradWatchError(
            f"non-finite gradients at step {ctx.step} in {', '.join(names) or 'some layer'} "
            "(on_nonfinite='raise'); the update was not applied. Lower the learning rate, use clip=, "
            "or on_nonfinite='skip' to skip such steps"
        )


def _percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """``numpy.percentile(values, percentile)`` (linear interpolation) with two
    selections; the positions are known on the host, so nothing is read back."""
    pos = (values.numel() - 1) * (percentile / 100.0)
    k = math.floor(pos)
    frac = pos - k
    lower = torch.kthvalue(values, k + 1).values
    if frac == 0 or k + 1 >= values.numel():
        return lower
    upper = torch.kthvalue(values, k + 2).values
    return torch.where(upper == lower, lower, lower + (upper - lower) * frac)  # inf - inf would be NaN


def _autoclip(state: ClipState, clip: AutoClip, norm: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    history = state.tensors.get("history")
    n = state.steps
    # A non-finite norm counts as +inf: a spike, and never a NaN in the percentile.
    value = torch.where(finite, norm, norm.new_full((), _INF))
    if clip.history is None:
        size = 0 if history is None else history.numel()
        if n >= size:  # grow geometrically; the buffer size is host-known
            grown = norm.new_zeros(max(256, 2 * size))
            if history is not None:
                grown[:size].copy_(history)
            history = state.tensors["history"] = grown
        history[n].copy_(value)
        valid = history[: n + 1]
    else:
        if history is None:
            history = state.tensors["history"] = norm.new_zeros(clip.history)
        history[n % clip.history].copy_(value)
        valid = history[: min(n + 1, clip.history)]
    return _percentile(valid, clip.percentile)


def _zclip(state: ClipState, clip: ZClip, norm: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    t = state.tensors
    n = state.steps
    cap = norm.new_full((), _INF if clip.max_norm is None else clip.max_norm)
    if n < clip.warmup:
        if clip.warmup_max_norm is not None:
            cap = torch.clamp(cap, max=clip.warmup_max_norm)  # the authors' package clips warm-up at its max_grad_norm
        warm = t.get("warm")
        if warm is None:
            warm = t["warm"] = norm.new_full((clip.warmup,), math.nan)
        warm[n].copy_(torch.where(finite, norm, norm.new_full((), math.nan)))
        if n == clip.warmup - 1:
            t["mean"] = torch.nanmean(warm)
            t["var"] = torch.nanmean((warm - t["mean"]).square())
            del t["warm"]
        return cap  # no adaptive clipping during warm-up
    mean, var = t["mean"], t["var"]
    std = var.sqrt()
    z = (norm - mean) / (std + clip.eps)
    spike = z > clip.z
    adaptive = mean + clip.z * std / (z / clip.z)
    effective = torch.where(spike, adaptive, norm)
    new_mean = clip.alpha * mean + (1 - clip.alpha) * effective
    new_var = clip.alpha * var + (1 - clip.alpha) * (effective - new_mean).square()
    # Only finite norms update the statistics; a NaN mean (all warm-up norms were NaN) restarts from this norm.
    ok = finite & torch.isfinite(mean)
    t["mean"] = torch.where(ok, new_mean, torch.where(finite, norm, mean))
    t["var"] = torch.where(ok, new_var, torch.where(finite, torch.zeros_like(var), var))
    # The recorded threshold is the clip target on a spike, else the norm above which clipping starts.
    threshold = torch.where(spike, adaptive, mean + clip.z * (std + clip.eps))
    return torch.minimum(threshold, cap)


@dataclass(frozen=True)
class _AgcLayout:
    """Where AGC's work goes for one layout of present gradients (cached per layout)."""

    rows: list[list[int]]  # positions clipped unit-wise on this rank, by (shape, dtype, device)
    spread: list[tuple[Any, list[int]]]  # FSDP2: 0-/1-d shards (one unit over ranks), by shard group
    joint: torch.Tensor | None  # positions clipped together at exclude_max_norm (excluded, sparse)
    joint_positions: list[int]


def _agc_groups(state: ClipState, grads: GradBatch, clip: AGC, ctx: StepContext) -> _AgcLayout:
    """Positions of the clipped gradients, grouped by (shape, dtype, device); cached per
    layout of present gradients, so the grouping pass runs once, not every step."""
    ids = tuple(map(id, grads.params))
    layout = state.agc_groups.get(ids)
    if layout is None:
        if state.exclude is None:
            names = set(clip.exclude) if clip.exclude is not None else {ctx.model.layers[-1].name}
            state.exclude = frozenset(
                id(layer.module.get_parameter(p)) for layer in ctx.model.layers if layer.name in names for p in layer.param_names
            )
        by_kind: dict[tuple[Any, ...], list[int]] = {}
        spread: dict[int, tuple[Any, list[int]]] = {}
        joint: list[int] = []
        for k, (g, i, group) in enumerate(zip(grads.tensors, ids, grads.shard_groups)):
            if i in state.exclude or g.layout != torch.strided:
                joint.append(k)  # sparse gradients too: their rows are not split here
            elif group is not None and g.dim() < 2:
                # FSDP2 shards a bias (one unit) over the ranks: its norms are all-reduced.
                spread.setdefault(id(group), (group, []))[1].append(k)
            else:
                # Rows of a weight are whole on each rank (FSDP2 shards dim 0, checked at configure).
                by_kind.setdefault((tuple(g.shape), g.dtype, g.device), []).append(k)
        device = grads.norms().device
        positions = torch.tensor(joint, dtype=torch.int64, device=device) if joint else None
        layout = state.agc_groups[ids] = _AgcLayout(list(by_kind.values()), list(spread.values()), positions, joint)
    return layout


def _agc_coef(clip: AGC, g_norm: torch.Tensor, w_norm: torch.Tensor) -> torch.Tensor:
    return (w_norm.clamp_min(clip.eps) * clip.clipping / g_norm.clamp_min(1e-6)).clamp_max(1.0)


def _agc(state: ClipState, clip: AGC, grads: GradBatch, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _agc_groups(state, grads, clip, ctx)
    tensors, weights = grads.tensors, grads.weights
    inv = grads.inv_scale  # gradients still multiplied by a loss scale (fp16, fused optimizer): divided out
    coefs = []
    with torch.no_grad():
        # One stacked computation per distinct parameter shape (a 200-layer MLP has two),
        # not one per parameter: unit norms are row norms, which no foreach kernel gives.
        for group in layout.rows:
            gs = [tensors[k] for k in group]
            g = torch.stack(gs)
            w = torch.stack([weights[k].detach() for k in group])
            units = g.shape[1] if g.dim() > 2 else 1  # rows of a weight; a bias is one unit
            g_norm = torch.linalg.vector_norm(g.reshape(len(group), units, -1), dim=2, keepdim=True, dtype=_F32)
            w_norm = torch.linalg.vector_norm(w.reshape(len(group), units, -1), dim=2, keepdim=True, dtype=_F32)
            coef = _agc_coef(clip, g_norm if inv is None else g_norm * inv, w_norm)
            dims = g.dim() - 1  # of each parameter; the coefficient broadcasts over the fan-in
            shaped = coef.reshape(len(group), *((units,) + (1,) * (dims - 1) if dims else ()))
            torch._foreach_mul_(gs, list(shaped.to(g.dtype).unbind(0)))
            coefs.append(coef.reshape(-1))
        for shard_group, group in layout.spread:
            gs, ws = [tensors[k] for k in group], [weights[k].detach() for k in group]
            sq = torch.stack(
                (torch.stack(torch._foreach_norm(gs, 2.0, dtype=_F32)), torch.stack(torch._foreach_norm(ws, 2.0, dtype=_F32)))
            ).square()
            import torch.distributed as dist

            # Every rank holds the same spread positions (same model), so the collectives match.
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=shard_group)
            g_norm, w_norm = sq.sqrt().unbind(0)
            coef = _agc_coef(clip, g_norm if inv is None else g_norm * inv, w_norm)
            torch._foreach_mul_(gs, list(coef.to(gs[0].dtype).unbind(0)))
            coefs.append(coef)
        if layout.joint is not None and clip.exclude_max_norm is not None:
            norm = torch.linalg.vector_norm(grads.norms().index_select(0, layout.joint), 2.0)
            joint = torch.clamp(clip.exclude_max_norm / (norm + 1e-6), max=1.0)
            torch._foreach_mul_([tensors[k] for k in layout.joint_positions], joint.to(tensors[0].dtype))
            coefs.append(joint.reshape(1))
    if not coefs:
        one = grads.norms().new_ones(())
        ctx.record(AGC_RECORD, one.new_zeros(2))
        return one.new_full((), clip.clipping), one
    flat = torch.cat(coefs)
    ctx.record(AGC_RECORD, torch.stack(((flat < 1).sum().to(_F32), flat.new_full((), float(flat.numel())))))
    return flat.new_full((), clip.clipping), flat.min()


# ---------------------------------------------------------------------- host side


@hookimpl
def gradwatch_read_actions(window: StatsWindow, ctx: StepContext) -> list[Action] | None:
    state = ctx.stash.get(KEY, None)
    series = window.extras.get(RECORD)
    if state is None or series is None:
        return None
    mode = _mode(state.clip)
    units = window.extras.get(AGC_RECORD)
    unit_rows = dict(zip(units.steps.tolist(), units.values.tolist())) if units is not None else {}
    actions: list[Action] = []
    bad_steps: list[int] = []
    for step, (norm, threshold, coef, bad) in zip(series.steps.tolist(), series.values.tolist()):
        state.seen += 1
        if bad:
            bad_steps.append(step)
            if state.policy in ("skip", "zero"):
                actions.append(Action(kind=state.policy, step=step, evidence={"norm": norm}, source="clipping"))
                continue
        agc = unit_rows.get(step)
        # A clip event is a norm over its threshold (AGC: a unit over its own), not a
        # coefficient of n / (n + 1e-6) when the threshold equals the norm.
        if (agc[0] > 0) if agc is not None else (norm > threshold and coef < 1):
            evidence: dict[str, Any] = {"mode": mode, "norm": norm, "threshold": threshold, "coefficient": coef}
            if agc is not None:
                evidence["clipped_units"], evidence["units"] = int(agc[0]), int(agc[1])
            actions.append(Action(kind="clip", step=step, evidence=evidence, source="clipping"))
            state.clipped += 1
            if state.biggest is None or norm > state.biggest[0]:
                state.biggest = (norm, step)
    if bad_steps and state.policy == "warn":
        warnings.warn(
            f"non-finite gradients at step(s) {bad_steps[:10]}{' …' if len(bad_steps) > 10 else ''} "
            f"({len(bad_steps)} in steps {window.first_step}-{window.last_step}); the updates were applied. "
            "Use on_nonfinite='skip' to skip such steps, or lower the learning rate",
            GradWatchWarning,
            stacklevel=2,
        )
    return actions


@hookimpl(trylast=True)  # after the console's table (registered later, so called first)
def gradwatch_report(report: Report, console: Console, ctx: StepContext) -> None:
    state = ctx.stash.get(KEY, None)
    if state is None or state.clip is None or not report.final or not ctx.config.report:
        return
    line = f"clipping ({_mode(state.clip)}): {state.clipped} of {state.seen} steps clipped"
    if state.biggest is not None:
        line += f"; largest norm clipped {state.biggest[0]:.4g} at step {state.biggest[1]}"
    console.print(line)


def _mode(clip: ClipConfig | None) -> str:
    if isinstance(clip, ClipNorm):
        return f"max_norm={clip.max_norm:g}"
    return type(clip).__name__.lower() if clip is not None else "none"


# ---------------------------------------------------------------------- checkpoints


@hookimpl
def gradwatch_state_dict(ctx: StepContext) -> Mapping[str, Any] | None:
    state = ctx.stash.get(KEY, None)
    if state is None or state.clip is None:
        return None
    tensors = dict(state.tensors)
    if isinstance(state.clip, AutoClip) and state.clip.history is None and "history" in tensors:
        tensors["history"] = tensors["history"][: state.steps]  # drop the unused capacity
    return {
        "clipping": {
            "mode": type(state.clip).__name__,
            "steps": state.steps,
            "tensors": {k: v.detach().cpu().clone() for k, v in tensors.items()},
            "counts": (state.clipped, state.seen),
        }
    }


@hookimpl
def gradwatch_load_state_dict(state: Mapping[str, Any], ctx: StepContext) -> None:
    mine = ctx.stash.get(KEY, None)
    saved = state.get("clipping")
    if mine is None or mine.clip is None or saved is None:
        return
    if saved["mode"] != type(mine.clip).__name__:
        warnings.warn(
            f"the checkpoint's clipping state is for {saved['mode']}, this watch clips with {type(mine.clip).__name__}; "
            "the saved state is ignored and clipping starts afresh",
            GradWatchWarning,
            stacklevel=2,
        )
        return
    mine.steps = int(saved["steps"])
    mine.tensors = {k: v.clone() for k, v in saved["tensors"].items()}
    mine.clipped, mine.seen = saved.get("counts", (0, 0))
