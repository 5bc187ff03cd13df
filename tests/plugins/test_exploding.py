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
from gradwatch.testing import diagnose, high_lr_mlp, relu_mlp, residual_convnet, train, transformer_encoder

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


def _spike_run(spikes):
    """Norms near 1 (±10%) at steps 0, 4, 8, …, with ``{index: value}`` spikes, fed to a
    watch in three report intervals of 20 rows; the exploding diagnoses of each interval."""
    gw = gradwatch.watch(relu_mlp(depth=4, width=8), report=False)
    layers = gw.model_info.names
    g = torch.Generator().manual_seed(0)
    totals = (1.0 + 0.1 * torch.randn(60, generator=g)).tolist()
    for index, value in spikes.items():
        totals[index] = value
    steps = [4 * k for k in range(60)]
    out = []
    for lo in range(0, 60, 20):
        w = _window(steps[lo : lo + 20], totals[lo : lo + 20], layers, steps[lo + 19] + 3)
        out.append([d for d in diagnose(gw, w) if d.source == "exploding"])
    gw.detach(report=False)
    return out, totals


def test_spikes_against_ema_are_reported_once_with_quantiles():
    """Two ×50 spikes: a spike verdict dated at the first, reported once; numbers as seen."""
    out, totals = _spike_run({30: 50.0, 35: 60.0})
    assert out[0] == [] and out[2] == []  # reported once
    (d,) = out[1]
    assert d.evidence["pattern"] == "spike" and d.step == d.evidence["onset"] == 120
    assert d.severity is gradwatch.Severity.WARNING and d.evidence["loss_diverging"] is None
    assert d.evidence["z_score"] > 6  # above the default threshold
    seen = torch.tensor(totals[:40], dtype=torch.float32).double()
    assert math.isclose(d.evidence["norm_quantiles"]["p99"], float(seen.quantile(0.99)), rel_tol=1e-5)
    assert d.evidence["total_norm"] == pytest.approx(totals[39], rel=1e-6)


def test_one_spike_does_not_hide_the_next():
    """The EMA takes a spike in clamped, so a second spike five rows later still counts:
    unclamped, the first ×50 would inflate the variance until the second scored below z."""
    alone, _ = _spike_run({35: 30.0})
    assert alone == [[], [], []]  # a single spike is not a verdict (min_spikes=2)
    both, _ = _spike_run({30: 50.0, 35: 30.0})
    (d,) = both[1]
    assert "spiked 2 times" in d.message


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
