"""The vanishing detector: deep sigmoid and under-initialised ReLU stacks, not Kaiming ones."""

from __future__ import annotations

import io
import math

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch.testing import regression_batches, relu_mlp, sigmoid_mlp, train

CONTRACT = {"ratio", "decay_per_layer", "depth", "signal", "early_rms", "late_rms", "threshold"}


def _run(model, steps, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kw.setdefault("report_every", 12)
    kw.setdefault("sample_every", 4)
    with gradwatch.watch(model, opt, console=Console(file=io.StringIO()), strict=True, **kw) as gw:
        train(model, steps, optimizer=opt, watcher=gw)
    return gw, [d for d in gw.diagnoses if d.kind == "vanishing" and d.source == "vanishing"]


def test_hook_gradwatch_diagnose_sigmoid_mlp_vanishes():
    gw, found = _run(sigmoid_mlp(depth=20), 24)
    assert len(found) == 1  # reported once over two intervals and the final one
    d = found[0]
    assert CONTRACT <= set(d.evidence) and d.evidence["signal"] == "backprop"
    assert d.evidence["ratio"] < 1e-6 and d.evidence["decay_per_layer"] < 0.3 and d.evidence["depth"] == 20
    assert d.layers[0] == "0" and d.step == 0 and d.severity is gradwatch.Severity.WARNING


def test_hook_gradwatch_diagnose_lecun_relu_vanishes_kaiming_does_not():
    _, lecun = _run(relu_mlp(depth=30, init="lecun"), 24)
    (d,) = lecun
    assert d.evidence["signal"] == "backprop"  # the weight gradients do not show it (below)
    # He et al. 2015: std sqrt(1/fan_in) halves the signal variance per ReLU layer.
    assert 0.6 < d.evidence["decay_per_layer"] < 0.8
    assert d.layers[0] == "0" and len(d.layers) >= 10
    gw, kaiming = _run(relu_mlp(depth=30, init="kaiming"), 24)
    assert kaiming == []
    bad = [
        x
        for x in gw.diagnoses
        if x.severity >= gradwatch.Severity.WARNING and x.source in ("vanishing", "exploding", "nonfinite", "activations")
    ]
    assert bad == []


def test_weight_gradient_signal_without_backprop_probes():
    """With the probes off the weight gradients decide. In this builder (zero biases, the
    bias gradient is the backprop signal itself) they show the same ×0.7 decay; the
    Kaiming net stays quiet on them too."""
    _, found = _run(relu_mlp(depth=30, init="lecun"), 24, options={"vanishing": {"backprop": False}})
    (d,) = found
    assert d.evidence["signal"] == "weight_grad" and 0.6 < d.evidence["decay_per_layer"] < 0.8
    _, found = _run(relu_mlp(depth=30, init="kaiming"), 24, options={"vanishing": {"backprop": False}})
    assert found == []


def test_backprop_rms_agrees_with_plain_torch():
    model = relu_mlp(depth=8, width=16, init="lecun")
    reference = relu_mlp(depth=8, width=16, init="lecun")
    x, y = next(regression_batches(batch=32))
    outs = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            outs[name] = out

        return hook

    for name, module in reference.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(keep(name))
    nn.functional.mse_loss(reference(x), y).backward()
    expected = torch.tensor([outs[n].grad.double().square().mean().sqrt().item() for n in outs])
    gw = gradwatch.watch(model, report=False, strict=True)
    nn.functional.mse_loss(model(x), y).backward()
    gw.step()
    gw.detach()
    series = gw.history.extras["vanishing.backprop_rms"]
    assert series.steps.tolist() == [0]
    torch.testing.assert_close(series.values[0].double(), expected.float().double(), rtol=1e-5, atol=0)


def test_backprop_signal_does_not_underflow():
    """Gradients of 1e-25 square to 1e-50, below float32's smallest number: kept in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])
    gw = gradwatch.watch(model, report=False, strict=True)
    (model(torch.randn(8, 4)).sum() * 1e-25).backward()
    gw.step()
    gw.detach()
    values = gw.history.extras["vanishing.backprop_rms"].values[0]
    assert (values > 0).all() and torch.isfinite(values).all()
    assert math.isclose(float(values[-1]), 1e-25, rel_tol=1e-5)  # d(sum)/d(out) = 1 per entry


def test_inplace_relu_shared_module_frozen_and_unused_layers():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = nn.Linear(8, 8).requires_grad_(False)
            self.shared = nn.Linear(8, 8)
            self.act = nn.ReLU(inplace=True)
            self.unused = nn.Linear(8, 8)
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            h = self.act(self.shared(self.frozen(x)))
            return (self.head(self.act(self.shared(h))), h)

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with gradwatch.watch(model, opt, report=False, strict=True, sample_every=4, report_every=8) as gw:
        for _ in range(9):
            out, _ = model(torch.randn(4, 8))
            out.sum().backward()
            opt.step()
            opt.zero_grad()
    series = gw.history.extras["vanishing.backprop_rms"]
    col = {n: k for k, n in enumerate(gw.model_info.names)}
    assert torch.isfinite(series.values[:, col["shared"]]).all()
    assert torch.isnan(series.values[:, col["unused"]]).all()  # no gradient: ignored, not zero


@pytest.mark.parametrize("options", [{"ratio": -1}, {"max_decay": 1.5}, {"min_depth": 0}, {"backprop": "yes"}, {"ratios": 1e-3}])
def test_hook_gradwatch_configure_rejects_bad_options(options):
    with pytest.raises(gradwatch.GradWatchError, match="vanishing"):
        gradwatch.watch(sigmoid_mlp(depth=3), options={"vanishing": options}, report=False)


def test_hook_gradwatch_diagnose_tiny_gradients_on_a_loss_plateau():
    """A sigmoid output saturated by huge weights: every gradient is ~0 and the loss stays
    high. Shallow (no depth trend to fit): only the absolute rule can see it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1), nn.Sigmoid())
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(1e3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = ((x, torch.full((64, 1), 0.5)) for x, _ in regression_batches())
    with gradwatch.watch(model, opt, report_every=40, stats_every=1, report=False, disable=["activations"]) as gw:
        train(model, 80, optimizer=opt, batches=batches, watcher=gw)
    (d,) = [d for d in gw.diagnoses if d.kind == "vanishing"]
    assert d.evidence["signal"] == "absolute" and d.evidence["max_rms"] < 1e-7
    assert d.layers == ("0", "2")
    # Plain torch agrees: the gradients are tiny and the loss sits at 0.25.
    model(torch.randn(64, 16)).sub(0.5).pow(2).mean().backward()
    assert max(p.grad.abs().max().item() for p in model.parameters()) < 1e-6
    assert abs(d.evidence["loss_after"] - 0.25) < 0.01
    assert any(r.kind for r in d.remedies)


def test_hook_gradwatch_diagnose_no_absolute_verdict_without_a_loss_or_when_learning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt, report_every=40, stats_every=1, report=False) as gw:
        train(model, 80, optimizer=opt, watcher=gw)  # healthy: learning, normal gradients
    assert not [d for d in gw.diagnoses if d.kind == "vanishing"]
