"""Updates that dwarf the weights (kind ``update_scale``): the update/weight ratio ``‖Δw‖/‖w‖``.

On sampled steps the core copies the weights before ``optimizer.step()`` and measures, per
layer, ``‖w‖`` before the update (``history.weight_norm``) and ``‖Δw‖/‖w‖`` across it
(``history.update_ratio``). A healthy step moves a layer by about 1e-3 of its norm (the
rule of thumb the advisor's ``target_update_ratio`` states). Adam-type optimizers normalise
the gradient, so a learning rate far too high leaves the gradient norms tame and shows here:
every element moves by about the learning rate on the first steps, whatever the gradient.

A layer is judged on a sampled step where it was measured (finite ratio), except on a step
where its weights were ~0 (``‖w‖`` at most ``zero_weight`` of that step's median layer
norm: a zero-initialised head, whose ratio is 1e+39 on its first update and means nothing).
Two patterns are a diagnosis:

* **overrun**: on one sampled step, the layers whose update was at least ``max_ratio`` ×
  their weights carry at least ``min_share`` of the step's update (``Σ‖Δw‖²``). The first
  update of a run with a rate far too high replaces the weights by the update itself, and
  the ratio then falls like ``1/k`` as the wrecked weights grow (a 2-layer GPT-2 under
  AdamW at lr 1.0: 101 at step 0, 0.74, 0.54, 0.37 at steps 1, 2, 3, while its loss goes
  from 6.9 to 120-280): the step is the verdict, not persistence. The share keeps out
  small-init layers (LayerScale at 1e-5 moves ×100 under Adam at 1e-3 on its first step,
  but carries a negligible part of the update).
* **sustained**: one layer's ratio is at least ``max_ratio`` on each of its last
  ``min_samples`` measured sampled steps.

``max_ratio`` 3.0 is from measurement (every step sampled, 200 steps, seed 0): Adam and
AdamW at lr 1e-3 and 3e-4 and SGD (lr 0.1, and 0.01 with momentum 0.9) on an 8-layer ReLU
MLP, a residual conv net with BatchNorm, a transformer encoder, an LSTM and a GPT-2 from
``GPT2Config(n_layer=2, n_embd=64, n_head=2)`` at vocabularies 100 and 1000 gave at most
0.41 on any step and layer (GPT-2, SGD lr 0.1; Adam at most 0.10, GPT-2's first step: lr
over the weights' 0.01-0.02 std); SGD lr 0.5 with momentum 0.9 on the conv net at most
0.71; GPT-2 under AdamW at lr 3e-3 0.30 and at lr 1e-2 1.0 (it still learns). At lr 0.1
the first update is 10 × the weights (it does not learn) and at lr 1.0, 101.

The severity is a warning, an error when the recorded loss diverges: the mean of the last
quarter of the losses recorded after the first judged step is above ``diverge`` × the
loss recorded at that step (before its update), or one of them is non-finite. The loss is
seen when the loop records it: ``gw.observe_loss(loss)`` after ``loss.backward()`` in a plain
loop; the Lightning callback (``GradWatch``) and the Hugging Face door
(``gradwatch.hf.GradWatchCallback``) record the training loss themselves.

Evidence (read by the advisor's ``lower_lr``): ``update_ratio`` (the judged ratio: per named
layer the median of its ratio over the sampled steps it was judged on, the largest over
layers), ``per_layer`` (those medians), ``steps_seen`` (how many sampled steps the largest
is a median over), ``skipped_zero_weight`` (layers whose weights were ~0 on a sampled step),
``target`` (1e-3), and ``max_ratio``, ``update_share`` (the largest share of an overrun
step), ``judged_steps``, ``steps_measured``, ``pattern``, ``loss_diverging`` and
``loss_growth``.

Options (``options={"updates": {...}}``) and defaults: ``max_ratio`` 3.0, ``min_share`` 0.5,
``min_samples`` 3, ``target`` 1e-3, ``diverge`` 2.0, ``zero_weight`` 1e-6.

A condition is reported once per set of layers; diagnose runs at every report interval and
at the final report, so a 40-step run is judged at its end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gradwatch import Diagnosis, ModelInfo, Severity, StashKey, StatsWindow, StepContext, WatchConfig, hookimpl
from gradwatch.kit import num, plugin_options

if TYPE_CHECKING:
    from gradwatch.stats import History

_DEFAULTS: dict[str, Any] = {
    "max_ratio": 3.0,
    "min_share": 0.5,
    "min_samples": 3,
    "target": 1e-3,
    "diverge": 2.0,
    "zero_weight": 1e-6,
}


@dataclass
class _State:
    opts: dict[str, Any]
    reported: tuple[str, ...] | None = None


KEY = StashKey[_State]()


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    # min_share, target, zero_weight: fractions in (0, 1).
    fraction = (0.0, 1.0)
    opts = plugin_options(
        config, "updates", _DEFAULTS, bounds={"min_share": fraction, "target": fraction, "zero_weight": fraction}
    )
    ctx.stash[KEY] = _State(opts=opts)


def _measured(history: History, zero_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(steps, ratio, weight, zero)`` of the sampled steps: the ratio NaN where it was not
    measured or the weights were ~0 (``zero``)."""
    ratio, weight = history.update_ratio, history.weight_norm
    r, w = ratio.values.double(), weight.values.double()
    if r.shape != w.shape or not torch.equal(ratio.steps, weight.steps):
        empty = torch.zeros((0, r.shape[-1] if r.dim() == 2 else 0), dtype=torch.float64)
        return ratio.steps[:0], empty, empty, empty.bool()
    positive = torch.where(w > 0, w, torch.nan)
    median = torch.nan_to_num(positive.nanmedian(dim=1, keepdim=True).values, nan=0.0) if len(w) else w
    zero = torch.isfinite(w) & ~(w > zero_weight * median)
    r = torch.where(torch.isfinite(r) & torch.isfinite(w) & ~zero, r, torch.nan)
    return ratio.steps, r, w, zero


@hookimpl
def gradwatch_diagnose(window: StatsWindow, model: ModelInfo, history: History, ctx: StepContext) -> list[Diagnosis] | None:
    state = ctx.stash[KEY]
    opts = state.opts
    layers = history.layers
    steps, r, w, zero = _measured(history, opts["zero_weight"])
    if not len(steps) or r.shape[-1] != len(layers):
        return None
    limit = opts["max_ratio"]
    over = r >= limit
    # Overrun steps: the layers past the limit carry min_share of the step's update.
    update_sq = torch.nan_to_num(r * w, nan=0.0).square()
    total = update_sq.sum(1)
    share = torch.where(total > 0, (update_sq * over).sum(1) / total.clamp_min(1e-300), 0.0)
    overrun = share >= opts["min_share"]
    judged = over & overrun.unsqueeze(1)
    # Sustained: a layer past the limit on each of its last min_samples measured steps.
    sustained = []
    for c in range(len(layers)):
        rows = torch.nonzero(torch.isfinite(r[:, c])).flatten()[-opts["min_samples"] :]
        if len(rows) == opts["min_samples"] and bool(over[rows, c].all()):
            judged[rows, c] = True
            sustained.append(c)
    cols = [c for c in range(len(layers)) if bool(judged[:, c].any())]
    names = tuple(layers[c] for c in cols)
    if not names:
        state.reported = None
        return None
    if names == state.reported:
        return None
    state.reported = names
    per_layer = {layers[c]: float(r[judged[:, c], c].median()) for c in cols}
    worst = max(cols, key=lambda c: per_layer[layers[c]])
    ratio, seen = per_layer[layers[worst]], int(judged[:, worst].sum())
    used = judged.any(1)
    first = int(steps[used][0])
    skipped = [layers[c] for c in torch.nonzero(zero.any(0)).flatten().tolist()]
    diverging, growth = _diverging(history, first, opts["diverge"])
    severity = Severity.ERROR if diverging else Severity.WARNING
    pattern = "+".join(p for p, hit in (("overrun", bool(overrun.any())), ("sustained", bool(sustained))) if hit)
    peak = int(steps[int(torch.where(overrun, share, -1.0).argmax())]) if bool(overrun.any()) else None
    top_share = float(share[overrun].max()) if bool(overrun.any()) else None
    target = opts["target"]
    shown = ", ".join(repr(n) for n in names[:4]) + (", …" if len(names) > 4 else "")
    why = (
        f"; on step {peak} the layers whose update was at least {num(limit)} times their weights carried "
        f"{top_share:.0%} of the update"
        if peak is not None and top_share is not None
        else f"; it stayed at least {num(limit)} times the weights on each of its last {seen} sampled steps"
    )
    if diverging and growth is not None:
        tail = f", and the loss diverges (its last quarter averages {num(growth)} times the loss of step {first})"
    elif diverging:
        tail = f", and the loss became non-finite after step {first}"
    else:
        tail = ""
    message = (
        f"updates dwarf the weights in {len(names)} layer(s) ({shown}): ‖Δw‖/‖w‖ of {layers[worst]!r} was {num(ratio)} "
        f"(median over {seen} sampled step(s) from step {first}), against the ~{num(target)} of a healthy step{why}{tail}"
    )
    return [
        Diagnosis(
            kind="update_scale",
            severity=severity,
            step=first,
            layers=names,
            message=message,
            summary=f"‖Δw‖/‖w‖ {num(ratio)} in {layers[worst]!r} (healthy ~{num(target)})",
            evidence={
                "update_ratio": ratio,
                "per_layer": per_layer,
                "steps_seen": seen,
                "skipped_zero_weight": skipped,
                "target": target,
                "max_ratio": limit,
                "update_share": top_share,
                "judged_steps": [int(s) for s in steps[used].tolist()],
                "steps_measured": int(torch.isfinite(r).any(1).sum()),
                "pattern": pattern,
                "loss_diverging": diverging,
                "loss_growth": growth,
            },
            source="updates",
        )
    ]


def _diverging(history: History, first: int, factor: float) -> tuple[bool | None, float | None]:
    """Whether the loss recorded after step ``first`` diverges from the loss of that step
    (recorded before its update), and the ratio of the last quarter's mean to it."""
    loss = history.loss
    before, after = loss.before(first + 1).values.double(), loss.since(first + 1).values.double()
    if not len(before) or len(after) < 2:
        return None, None
    if not bool(torch.isfinite(after).all()):
        return True, None
    reference = float(before[-1])
    if not math.isfinite(reference) or reference <= 0:
        return None, None
    tail = after[-max(1, len(after) // 4) :]
    growth = float(tail.mean()) / reference
    return growth > factor, growth


@hookimpl
def gradwatch_state_dict(ctx: StepContext) -> dict[str, Any] | None:
    s = ctx.stash[KEY]
    return {"updates": {"reported": list(s.reported) if s.reported is not None else None}}


@hookimpl
def gradwatch_load_state_dict(state: dict[str, Any], ctx: StepContext) -> None:
    mine = state.get("updates")
    if mine:
        reported = mine.get("reported")
        ctx.stash[KEY].reported = tuple(reported) if reported is not None else None
