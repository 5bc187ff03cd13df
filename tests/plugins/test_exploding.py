"""The exploding detector, and the healthy models on which no detector may cry wolf."""

from __future__ import annotations

import io
import math
from itertools import count

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch.testing import high_lr_mlp, relu_mlp, residual_convnet, train, transformer_encoder

CONTRACT = {"total_norm", "z_score", "onset", "growth_per_step", "norm_quantiles", "update_ratio", "loss_diverging"}
MINE = ("vanishing", "exploding", "nonfinite", "activations")


def _watch(model, opt, **kw):
    return gradwatch.watch(model, opt, console=Console(file=io.StringIO()), strict=True, **kw)


def test_hook_gradwatch_diagnose_high_lr_explodes_then_nonfinite():
    model = high_lr_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)  # stable below ~0.1
    with _watch(model, opt, report_every=10) as gw:
        losses = train(model, 20, optimizer=opt, watcher=gw)
    kinds = {d.kind: d for d in gw.diagnoses if d.source in MINE}
    exploding, nonfinite = kinds["exploding"], kinds["nonfinite"]
    assert CONTRACT <= set(exploding.evidence)
    assert exploding.step < nonfinite.step and exploding.severity is gradwatch.Severity.ERROR
    assert exploding.evidence["loss_diverging"] is True and exploding.evidence["onset"] == exploding.step
    # The fitted growth agrees with the recorded losses (plain float math on train()'s output).
    finite = [x for x in losses if math.isfinite(x)]
    assert exploding.evidence["growth_per_step"] > 10 and finite[-1] > 100 * finite[0]
    assert len([d for d in gw.diagnoses if d.kind == "exploding"]) == 1


def _window(steps, totals, layers, last_step):
    from gradwatch import Series, StatsWindow

    n, L = len(steps), len(layers)
    norms = torch.tensor(totals, dtype=torch.float32)[:, None].expand(n, L) / math.sqrt(L)
    empty = Series(torch.zeros(0, dtype=torch.int64), torch.zeros(0, L))
    return StatsWindow(
        layers=layers, steps=torch.tensor(steps), grad_norm=norms.clone(), grad_rms=norms.clone(), grad_max=norms.clone(),
        nonfinite=torch.zeros(n, L), present=torch.ones(n, L), total_norm=torch.tensor(totals, dtype=torch.float32),
        weight_norm=empty, update_ratio=empty, first_step=steps[0], last_step=last_step,
    )  # fmt: skip


def test_spikes_against_ema_are_reported_once_with_quantiles():
    """Norms near 1 with two ×50 spikes: a spike verdict with the onset; reported once."""
    from gradwatch.plugins import exploding

    gw = gradwatch.watch(relu_mlp(depth=4, width=8), report=False)
    layers, ctx = gw.model_info.names, gw._ctx()
    g = torch.Generator().manual_seed(0)
    totals = (1.0 + 0.1 * torch.randn(60, generator=g)).tolist()
    totals[30], totals[35] = 50.0, 60.0
    steps = [4 * k for k in range(60)]
    out = []
    for lo in range(0, 60, 20):
        w = _window(steps[lo : lo + 20], totals[lo : lo + 20], layers, steps[lo + 19] + 3)
        out.append(exploding.gradwatch_diagnose(window=w, model=gw.model_info, ctx=ctx))
    gw.detach(report=False)
    assert out[0] is None and out[2] is None  # reported once
    (d,) = out[1]
    assert d.evidence["pattern"] == "spike" and d.step == d.evidence["onset"] == 120
    assert d.severity is gradwatch.Severity.WARNING and d.evidence["loss_diverging"] is None
    # The EMA z-score of the second spike, recomputed in plain Python.
    mean, var = totals[0], 0.0
    zs = []
    for k, x in enumerate(totals[:36]):
        if k == 0:
            continue
        std = math.sqrt(var) + 1e-12 * abs(mean) + 1e-30
        zs.append((x - mean) / std)
        x = min(x, mean + 6 * std) if k >= 8 else x
        mean, var = mean + 0.05 * (x - mean), 0.95 * (var + 0.05 * (x - mean) ** 2)
    assert math.isclose(d.evidence["z_score"], max(zs), rel_tol=1e-6)
    seen = torch.tensor(totals[:40], dtype=torch.float32).double()
    assert math.isclose(d.evidence["norm_quantiles"]["p99"], float(seen.quantile(0.99)), rel_tol=1e-5)
    assert d.evidence["total_norm"] == pytest.approx(totals[39], rel=1e-6)


@pytest.mark.parametrize("name", ["residual_convnet", "transformer_encoder", "kaiming_mlp"])
def test_healthy_models_get_no_warning(name):
    torch.manual_seed(0)
    if name == "residual_convnet":
        model = residual_convnet()
        batches = ((torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in count())
        loss_fn = nn.functional.cross_entropy
    elif name == "transformer_encoder":
        model = transformer_encoder()
        batches = ((torch.randint(0, 50, (8, 12)), torch.randint(0, 4, (8,))) for _ in count())
        loss_fn = nn.functional.cross_entropy
    else:
        model, batches, loss_fn = relu_mlp(depth=8, width=32), None, None
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with _watch(model, opt, report_every=50, sample_every=20) as gw:
        losses = train(model, 200, batches=batches, optimizer=opt, loss_fn=loss_fn, watcher=gw)
    assert all(math.isfinite(x) for x in losses)
    bad = [d for d in gw.diagnoses if d.source in MINE and d.severity >= gradwatch.Severity.WARNING]
    assert bad == [], [(d.kind, d.message) for d in bad]
    assert "vanishing.backprop_rms" in gw.history.extras  # the probes did run


@pytest.mark.parametrize("options", [{"z": 0}, {"ema": 1.5}, {"growth_rows": 1}, {"warmup": 2.5}, {"zz": 1}])
def test_hook_gradwatch_configure_rejects_bad_options(options):
    with pytest.raises(gradwatch.GradWatchError, match="exploding"):
        gradwatch.watch(high_lr_mlp(), options={"exploding": options}, report=False)
