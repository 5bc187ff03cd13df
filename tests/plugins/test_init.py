"""The init plugin: weight std against Kaiming/Xavier, and the product of gains over depth."""

from __future__ import annotations

import io
import math

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch.testing import relu_mlp, residual_convnet, sigmoid_mlp, train, transformer_encoder


def _run(model, steps=4, batches=None, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    with gradwatch.watch(
        model, opt, strict=True, autoload=False, report_every=4, console=Console(file=io.StringIO()), **kw
    ) as gw:
        train(model, steps, batches=batches, optimizer=opt, watcher=gw)
    return [d for d in gw.diagnoses if d.source == "init"]


def test_hook_diagnose_lecun_relu_mlp_matches_plain_torch():
    model = relu_mlp(depth=30, init="lecun")
    initial = {n: m.weight.detach().std().item() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    (d,) = _run(model)
    assert (d.kind, d.severity.value, d.step) == ("init_scale", "warning", 0)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert d.layers == tuple(linears[:-1])  # the head feeds the loss, not an activation
    ev = d.evidence
    assert ev["scheme"] == "kaiming" and set(ev["activation"].values()) == {"relu"}
    product = 1.0
    for name in d.layers:
        fan_in = model.get_submodule(name).in_features
        assert ev["std"][name] == pytest.approx(initial[name], rel=1e-5)  # measured at attach
        assert ev["expected_std"][name] == pytest.approx(math.sqrt(2 / fan_in))
        product *= initial[name] / math.sqrt(2 / fan_in)
    assert ev["depth_gain"] == pytest.approx(product, rel=1e-4)
    assert 1e-5 < ev["depth_gain"] < 1e-4  # ~0.707^29
    assert ev["activation_source"] == "fx"
    (reinit,) = [r for r in d.remedies if r.kind == "reinit"]
    assert 'nn.init.kaiming_normal_(model.get_submodule("0").weight, nonlinearity="relu")' in reinit.snippet


def test_hook_diagnose_kaiming_relu_mlp_is_quiet():
    assert _run(relu_mlp(depth=30, init="kaiming")) == []


def test_hook_diagnose_sigmoid_mlp_against_xavier():
    model = sigmoid_mlp(depth=20)
    (d,) = _run(model)
    name = "2"
    w = model.get_submodule(name).weight
    assert d.evidence["scheme"] == "xavier"
    assert d.evidence["expected_std"][name] == pytest.approx(math.sqrt(2 / (w.shape[0] + w.shape[1])))


def test_hook_diagnose_normalised_nets_are_quiet():
    conv = residual_convnet()
    assert _run(conv, batches=iter(lambda: (torch.randn(8, 3, 8, 8), torch.randn(8, 4)), None)) == []
    enc = transformer_encoder()
    g = torch.Generator().manual_seed(0)
    batches = iter(lambda: (torch.randint(0, 50, (8, 6), generator=g), torch.randn(8, 4, generator=g)), None)
    assert _run(enc, batches=batches) == []


def test_shallow_default_init_is_at_most_info():
    # PyTorch's default Linear init is ×0.41 of Kaiming for ReLU: three such layers are not an emergency.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    found = _run(model)
    assert all(d.severity.value == "info" for d in found)


class _Functional(nn.Module):
    def __init__(self, depth: int = 12) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(nn.Linear(32, 32) for _ in range(depth))
        self.head = nn.Linear(32, 1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.5 / math.sqrt(m.in_features))

    def forward(self, x):
        x = torch.tanh(self.first(x))
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


class _Untraceable(_Functional):
    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace this
            x = torch.tanh(self.first(x))
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def test_functional_activations_through_fx():
    (d,) = _run(_Functional())
    assert d.evidence["activation_source"] == "fx"
    assert set(d.evidence["activation"].values()) == {"tanh"} and d.evidence["scheme"] == "xavier"
    gain = nn.init.calculate_gain("tanh")
    assert d.evidence["expected_std"]["blocks.0"] == pytest.approx(gain * math.sqrt(2 / 64))


def test_untraceable_model_falls_back_without_crash():
    # Module order finds no activation modules (they are functional): nothing judged, no crash.
    assert _run(_Untraceable()) == []


@pytest.mark.parametrize(
    ("options", "match"),
    [({"depth_gain": 0.5}, "depth_gain"), ({"info_gain": 1000}, "info_gain"), ({"nope": 1}, "unknown init option")],
)
def test_hook_configure_rejects_bad_options(options, match):
    with pytest.raises(gradwatch.GradWatchError, match=match):
        gradwatch.watch(relu_mlp(depth=3), options={"init": options}, autoload=False)


def test_options_change_the_verdict():
    # The LeCun net gains 4e-5 over depth: a warning at the default 100, only info at depth_gain=1e6.
    found = _run(relu_mlp(depth=30, init="lecun"), options={"init": {"depth_gain": 1e6}})
    assert [d.severity.value for d in found] == ["info"]
