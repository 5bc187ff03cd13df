"""The numbers remedies carry: from healthy steps, bounded, stated, and in ``params``.

Seeded models of this module's own, trained under ``gradwatch.watch`` with every number
compared with a plain-torch computation; where a history is needed that no short run gives
(a language model's healthy 0.25–0.37 norms before a blow-up), it is written into the
watcher's history by hand.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch import Diagnosis, Severity, StatsWindow
from gradwatch.kit import num, times
from gradwatch.stats import LOSS_KEY
from gradwatch.testing import regression_batches, relu_mlp, transformer_encoder
from gradwatch.types import Series


def watcher(model, optimizer=None, **kw):
    options = {"autoload": False, "report": False, "console": Console(file=io.StringIO()), "strict": True, **kw}
    return gradwatch.watch(model, optimizer, **options)


def plain_total_norm(model) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])))


def fill_history(gw, steps, totals, losses=None):
    """Write rows into ``gw.history`` as a drained window would (per-layer columns zero)."""
    layers = gw.model_info.names
    n = len(steps)
    zeros = torch.zeros(n, len(layers))
    extras = {}
    if losses is not None:
        extras[LOSS_KEY] = Series(torch.tensor(steps[: len(losses)]), torch.tensor(losses, dtype=torch.float32))
    empty = Series(torch.zeros(0, dtype=torch.int64), torch.zeros(0, len(layers)))
    gw.history.extend(
        StatsWindow(
            layers=layers,
            steps=torch.tensor(steps),
            grad_norm=zeros,
            grad_rms=zeros,
            grad_max=zeros,
            nonfinite=zeros,
            present=torch.ones(n, len(layers)),
            total_norm=torch.tensor(totals, dtype=torch.float32),
            weight_norm=empty,
            update_ratio=empty,
            extras=extras,
            first_step=steps[0],
            last_step=steps[-1],
        )
    )


def exploding(step, **evidence):
    return Diagnosis(
        kind="exploding",
        severity=Severity.ERROR,
        step=step,
        layers=("0",),
        message="exploding",
        summary="exploding",
        evidence={"onset": step, **evidence},
    )


def nonfinite(step, **evidence):
    return Diagnosis(
        kind="nonfinite",
        severity=Severity.ERROR,
        step=step,
        layers=("0",),
        message="nonfinite",
        summary=f"first non-finite gradient at step {step}",
        evidence={"first_step": step, **evidence},
    )


def by_kind(remedies):
    return {r.kind: r for r in remedies}


def quantile(values, q):
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


# ---------------------------------------------------------------------- clipping thresholds


def test_clipping_threshold_from_norms_before_the_onset_of_a_diverging_mlp():
    # 12 healthy SGD steps at lr 0.01, then lr 0.15: the norm grows ×20-100 a step and is NaN
    # within a few; statistics every step.
    model = relu_mlp(depth=4, width=64, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = regression_batches(seed=0)
    plain = {}
    with watcher(model, opt, stats_every=1, sample_every=1, report_every=4) as gw:
        for step in range(24):
            if step == 12:
                opt.param_groups[0]["lr"] = 0.15
            x, y = next(batches)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            plain[step] = plain_total_norm(model)
            gw.observe_loss(loss)
            opt.step()
            opt.zero_grad()
    clips = [(d, r) for d in gw.diagnoses if d.kind in ("exploding", "nonfinite") for r in d.remedies if r.kind == "clipping"]
    assert clips, [(d.kind, d.message) for d in gw.diagnoses]
    healthy = [plain[s] for s in range(12)]
    for d, clip in clips:
        p = clip.params
        assert p["basis"] == "percentile" and p["percentile"] == 90.0, (d.kind, p)
        before = p["before_step"]
        assert 6 <= before <= 14, p  # where the learning rate was raised (12), give or take the detection
        expected = quantile([plain[s] for s in range(before)], 0.9)
        assert p["max_norm"] == pytest.approx(expected, rel=6e-3)  # 3 significant figures of the plain-torch percentile
        # Within a small factor of the healthy norms, and nowhere near the exploded ones.
        assert min(healthy) / 3 < p["max_norm"] < 3 * max(healthy)
        exploded = [n for s, n in plain.items() if s >= 12 and math.isfinite(n)]
        assert max(exploded) > 100 * p["max_norm"]
        assert f"Clip the global gradient norm at {num(p['max_norm'])}" == clip.title
        assert f"90th percentile of the {p['healthy_rows']} total norms measured before step {before}" in clip.rationale


def test_clipping_threshold_ignores_the_rows_the_norms_grew_into():
    # An LSTM language model's shape: healthy 0.25-0.37 for 20 steps, then ×16 a step to a NaN;
    # the non-finite diagnosis is at the NaN, the growth starts 4 steps before.
    torch.manual_seed(0)
    gw = watcher(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)))
    g = torch.Generator().manual_seed(0)
    healthy = (0.25 + 0.12 * torch.rand(20, generator=g)).tolist()
    totals = [*healthy, 5.0, 80.0, 2560.0, 4.1e4, math.nan]
    fill_history(gw, list(range(25)), totals)
    remedies = by_kind(gw.advise(nonfinite(24, where="gradient")))
    gw.detach()
    clip = remedies["clipping"]
    assert clip.params["before_step"] == 20 and clip.params["healthy_rows"] == 20
    assert clip.params["max_norm"] == pytest.approx(quantile(healthy, 0.9), rel=5e-3)
    assert 0.25 <= clip.params["max_norm"] <= 0.37
    assert "where the norms grew ×10 past their median" in clip.rationale
    assert f"the last finite total norm was {num(4.1e4)}, at step 23" in clip.rationale
    # The norms grew into it: a lower learning rate too, and no op-specific advice.
    assert {"clipping", "lower_lr"} <= set(remedies) and "epsilon" not in remedies


def test_too_few_healthy_rows_give_a_conventional_value_with_its_source():
    # A transformer: 1.0, as transformers are trained.
    enc = transformer_encoder()
    gw = watcher(enc)
    fill_history(gw, [0, 1], [0.8, 40.0])
    clip = by_kind(gw.advise(exploding(1)))["clipping"]
    gw.detach()
    assert clip.params == {"max_norm": 1.0, "healthy_rows": 1, "before_step": 1, "basis": "transformer"}
    assert "only 1 healthy total norm(s) were measured before step 1" in clip.rationale
    assert "common choice for transformers" in clip.rationale and "max_grad_norm" in clip.rationale
    # Any other model: its own step-0 norm, measured by plain torch.
    model = relu_mlp(depth=4, width=32, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = regression_batches(seed=1)
    with watcher(model, opt, stats_every=1, sample_every=1) as gw:
        x, y = next(batches)
        nn.functional.mse_loss(model(x), y).backward()
        first = plain_total_norm(model)
        opt.step()
        opt.zero_grad()
        gw.report()  # drain the step into the history
        clip = by_kind(gw.advise(exploding(0)))["clipping"]
    assert clip.params["basis"] == "first_norm" and clip.params["first_step"] == 0
    assert clip.params["max_norm"] == pytest.approx(first, rel=5e-3)
    assert f"the model's own total norm at step 0, {num(clip.params['max_norm'])}" in clip.rationale


# ---------------------------------------------------------------------- learning-rate factors


def test_lr_factor_from_an_absurd_update_ratio_is_bounded_and_says_at_least():
    gw = watcher(relu_mlp(depth=3, width=16))
    lower = by_kind(gw.advise(exploding(5, update_ratio=3e36, loss_diverging=True)))["lower_lr"]
    gw.detach()
    assert lower.params["divide_by"] == 1000 and lower.params["lr_factor"] == pytest.approx(1e-3)
    assert lower.params["at_least"] is True and lower.title == "Lower the learning rate by at least ×1000"
    assert "≫ 1000× the ~0.001 of a healthy step" in lower.rationale and "e+36" not in lower.rationale.split("was")[1][:4]
    assert "at most 1000" in lower.rationale


@pytest.mark.parametrize(("ratio", "divide", "at_least"), [(80.0, 1000, True), (0.05, 100, False), (0.012, 10, False)])
def test_update_scale_gets_lower_lr_from_the_judged_ratio(ratio, divide, at_least):
    gw = watcher(relu_mlp(depth=3, width=16))
    d = Diagnosis(
        kind="update_scale",
        severity=Severity.WARNING,
        step=0,
        layers=("0",),
        message="updates dwarf the weights",
        summary=f"update/weight ratio {num(ratio)}",
        evidence={
            "update_ratio": ratio,
            "per_layer": {"0": ratio, "2": ratio / 10},
            "target": 1e-3,
            "steps_seen": 5,
            "skipped_zero_weight": ["4"],
        },
    )
    (lower,) = gw.advise(d)
    gw.detach()
    assert (lower.kind, lower.params["divide_by"], lower.params["at_least"]) == ("lower_lr", divide, at_least)
    assert lower.params["update_ratio"] == ratio and lower.params["basis"] == "update_ratio"
    assert f"‖Δw‖/‖w‖ of '0' was {num(ratio)} (median over its 5 sampled steps), {times(ratio / 1e-3)}" in lower.rationale
    assert "1 layer(s) whose weights were ~0 on a sampled step are not judged ('4')" in lower.rationale
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    exec(lower.snippet, {"optimizer": optimizer})
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lower.params["lr_factor"])


def _loss_fit(losses):
    x = torch.arange(len(losses), dtype=torch.float64)
    y = torch.tensor(losses, dtype=torch.float64).log()
    xc = x - x.mean()
    return math.exp(float((xc * (y - y.mean())).sum() / xc.square().sum()))


@pytest.mark.parametrize(("growth", "divide"), [(10.0, 10), (1e4, 100), (6.08e9, 1000)])
def test_lr_factor_from_loss_growth_when_no_update_ratio_was_measured(growth, divide):
    gw = watcher(relu_mlp(depth=3, width=16))
    losses = [2.0 * growth**k for k in range(5)]
    fill_history(gw, list(range(5)), [1.0] * 5, losses=losses)
    lower = by_kind(gw.advise(exploding(1, loss_diverging=True)))["lower_lr"]
    gw.detach()
    g = lower.params["loss_growth_per_step"]
    assert g == pytest.approx(_loss_fit(losses), rel=1e-4) and g == pytest.approx(growth, rel=1e-3)
    # On a quadratic the loss grows (1 - lr·λ)² a step: the rate is (1 + √g)/2 past the stable 2/λ.
    assert lower.params["divide_by"] == divide and lower.params["at_least"] is True
    assert f"the loss grows {times(g)} per step since step 0" in lower.rationale
    assert f"at least {times((1 + math.sqrt(g)) / 2)} past the stable 2/λ" in lower.rationale


def test_zero_initialised_head_is_skipped_and_the_factor_comes_from_the_other_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    nn.init.zeros_(model[4].weight)
    nn.init.zeros_(model[4].bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = regression_batches(seed=0)
    plain: dict[str, list[float]] = {"0": [], "2": [], "4": []}
    with watcher(model, opt, stats_every=1, sample_every=1, report_every=5) as gw:
        for _ in range(10):
            x, y = next(batches)
            nn.functional.mse_loss(model(x), y).backward()
            before = {n: [p.detach().clone() for p in model.get_submodule(n).parameters()] for n in plain}
            opt.step()
            opt.zero_grad()
            for n, old in before.items():
                now = [p.detach() for p in model.get_submodule(n).parameters()]
                w = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in old]))
                dw = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a - b) for a, b in zip(now, old)]))
                plain[n].append(float(dw / w) if w > 0 else math.inf)
    # The zero-initialised head's ratio at step 0 is a division by ~0.
    assert gw.history.update_ratio.steps.tolist() == list(range(10))
    assert float(gw.history.update_ratio.values.max()) > 1e30
    lower = by_kind(gw.advise(exploding(5, loss_diverging=True)))["lower_lr"]
    medians = {n: float(torch.tensor(v).median()) for n, v in plain.items() if n != "4"}  # torch's lower median, as nanmedian
    worst = max(medians, key=medians.get)
    assert lower.params["update_ratio"] == pytest.approx(medians[worst], rel=1e-3)
    assert f"‖Δw‖/‖w‖ of {worst!r} was {num(medians[worst])}" in lower.rationale
    assert "('4')" in lower.rationale and "a ratio to a zero weight says nothing" in lower.rationale
    assert lower.params["divide_by"] <= 1000 and "e+3" not in lower.rationale


# ---------------------------------------------------------------------- what the rationale quotes


def test_the_last_norm_quoted_is_the_last_finite_one_with_its_step():
    # SGD at lr 0.15 diverges in 4 steps; statistics every 4th step see step 0 (finite) and then NaN.
    model = relu_mlp(depth=4, width=64, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.15)
    batches = regression_batches(seed=0)
    plain = {}
    with watcher(model, opt, stats_every=4, report_every=8) as gw:
        for step in range(16):
            x, y = next(batches)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            plain[step] = plain_total_norm(model)
            gw.observe_loss(loss)
            opt.step()
            opt.zero_grad()
    steps, norms = gw.history.steps.tolist(), gw.history.total_norm.tolist()
    last = max(s for s, n in zip(steps, norms) if math.isfinite(n))
    assert last == 0 and not math.isfinite(norms[1])
    quoted = f"the last finite total norm was {num(plain[last])}, at step {last}"
    clips = [r for d in gw.diagnoses for r in d.remedies if r.kind == "clipping"]
    assert clips and all(quoted in r.rationale for r in clips)
    lowers = [r for d in gw.diagnoses for r in d.remedies if r.kind == "lower_lr"]
    assert lowers and all(r.params["divide_by"] <= 1000 for r in lowers)


# ---------------------------------------------------------------------- params


def test_params_are_json_and_render_the_title_and_snippet():
    model = relu_mlp(depth=8, width=16, init="lecun")
    gw = watcher(model)
    fill_history(gw, list(range(6)), [1.0, 1.1, 0.9, 1.2, 30.0, 900.0], losses=[1, 1, 1, 1, 10, 100])
    render = gw.pm.get_plugin("advisor").render
    diagnoses = [
        exploding(4, update_ratio=0.2, loss_diverging=True),
        nonfinite(6, where="output", produced=True, origin={"module": "3", "module_type": "Linear", "output": "inf"}),
        Diagnosis(kind="vanishing", severity=Severity.WARNING, step=0, layers=("0",), message="v", evidence={}),
        Diagnosis(kind="dead_units", severity=Severity.WARNING, step=0, layers=("1",), message="d", evidence={}),
    ]
    remedies = [r for d in diagnoses for r in gw.advise(d)]
    gw.detach()
    assert {"clipping", "lower_lr", "reinit", "normalization", "residual", "leaky_relu", "op_guard"} <= {r.kind for r in remedies}
    for remedy in remedies:
        assert remedy.params, remedy.kind
        assert render(remedy.kind, remedy.params) == (remedy.title, remedy.snippet), remedy.kind
        assert json.loads(json.dumps(remedy.to_dict()))["params"] == json.loads(json.dumps(remedy.to_dict()["params"]))
    by = by_kind(remedies)
    assert num(by["clipping"].params["max_norm"]) in by["clipping"].title
    assert times(by["lower_lr"].params["divide_by"]) in by["lower_lr"].title
    for name, spec in by["reinit"].params["layers"].items():
        assert f'model.get_submodule("{name}").weight' in by["reinit"].snippet
        assert spec["std"] == pytest.approx(math.sqrt(2 / model.get_submodule(name).in_features))
