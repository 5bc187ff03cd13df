"""Dead ReLU units and saturated sigmoid/tanh units, from sampled forward hooks."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch.testing import relu_mlp, sigmoid_mlp, train

CONTRACT = {"fraction", "activation", "threshold", "steps_seen"}


def _run(model, steps, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(
        model, opt, console=Console(file=io.StringIO()), strict=True, report_every=12, sample_every=4, **kw
    ) as gw:
        train(model, steps, optimizer=opt, watcher=gw)
    return gw


def _dead_model():
    """Layer "2" gets a bias of -100: its ReLU ("3") outputs zero for every sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(inplace=True), nn.Linear(32, 1))
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    return model


def test_hook_gradwatch_diagnose_dead_relu_layer_named_once():
    gw = _run(_dead_model(), 24)
    found = [d for d in gw.diagnoses if d.kind == "dead_units"]
    assert len(found) == 1
    d = found[0]
    assert d.layers == ("3",) and CONTRACT <= set(d.evidence) and d.source == "activations"
    assert d.evidence["fraction"] == {"3": 1.0} and d.evidence["activation"] == "ReLU" and d.evidence["steps_seen"] >= 3


def test_dead_fraction_agrees_with_plain_torch():
    model = relu_mlp(depth=6, width=16)
    x = torch.randn(64, 16)
    outs = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU):
            module.register_forward_hook(lambda m, a, o, name=name: outs.__setitem__(name, o.detach().clone()) or None)
    gw = gradwatch.watch(model, report=False, strict=True)
    model(x).sum().backward()
    gw.step()
    gw.detach()
    expected = torch.tensor([float((outs[n] == 0).all(0).float().mean()) for n in outs])
    torch.testing.assert_close(gw.history.extras["activations.dead"].values[0], expected)


def test_saturated_sigmoid_reported_and_healthy_nets_are_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Sigmoid(), nn.Linear(32, 1))
    with torch.no_grad():
        model[0].weight.mul_(200.0)  # pre-activations of hundreds: sigmoid pinned at 0 or 1
    gw = _run(model, 16)
    (d,) = [d for d in gw.diagnoses if d.kind == "saturation"]
    assert d.layers == ("1",) and d.evidence["activation"] == "Sigmoid" and d.evidence["fraction"]["1"] > 0.9
    # The 20-layer sigmoid MLP vanishes but is not saturated; a Kaiming ReLU net has no dead layer.
    for healthy in (sigmoid_mlp(depth=20), relu_mlp(depth=30)):
        gw = _run(healthy, 16)
        assert [d for d in gw.diagnoses if d.source == "activations"] == []


@pytest.mark.parametrize("options", [{"dead": 1.5}, {"min_samples": 0}, {"deadly": 0.5}])
def test_hook_gradwatch_configure_rejects_bad_options(options):
    with pytest.raises(gradwatch.GradWatchError, match="activations"):
        gradwatch.watch(relu_mlp(depth=3), options={"activations": options}, report=False)
