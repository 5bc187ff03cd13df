"""Dead ReLU units and saturated sigmoid/tanh units, from sampled forward hooks."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch.testing import (
    CADENCES,
    EVERY_STEP,
    SPARSE,
    regression_batches,
    relu_mlp,
    residual_convnet,
    sigmoid_mlp,
    train,
    transformer_encoder,
)

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


# ---------------------------------------------------------------------- persistence (issue 10)


def _biased_mlp(bias: float, seed: int = 0) -> nn.Sequential:
    """A 6-layer Kaiming ReLU MLP (width 64) whose third Linear ("4") has bias ``bias``: its
    ReLU ("5") outputs zero for 86-98% of its units on each batch of 32 at -4."""
    model = relu_mlp(depth=6, width=64, seed=seed)
    with torch.no_grad():
        model[4].bias.fill_(bias)
    return model


def _train(model, optimizer, steps, *, batch=32, batches=None, loss_fn=None, **kw):
    options = {"console": Console(file=io.StringIO()), "autoload": False, "strict": True, **kw}
    batches = batches if batches is not None else regression_batches(batch=batch)
    with gradwatch.watch(model, optimizer, **options) as gw:
        train(model, steps, optimizer=optimizer, batches=batches, loss_fn=loss_fn)
    return gw


def _dead(gw):
    return [d for d in gw.diagnoses if d.kind == "dead_units"]


@pytest.mark.parametrize("cadence", CADENCES)
@pytest.mark.parametrize(("optimizer", "batch"), [("sgd", 32), ("adam", 16)])
def test_a_mostly_dead_layer_is_dead_units_in_a_40_step_run(cadence, optimizer, batch):
    """83-98% of the layer's units zero on each batch (never 90% on every one): reported,
    naming its ReLU, and "up to" is the largest per-batch fraction seen."""
    model = _biased_mlp(-4.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01) if optimizer == "sgd" else torch.optim.Adam(model.parameters(), lr=1e-3)
    gw = _train(model, opt, 40, batch=batch, **cadence)
    (d,) = _dead(gw)
    assert d.layers == ("5",) and CONTRACT <= set(d.evidence)
    column = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)].index("5")
    per_batch = gw.history.extras["activations.dead"]
    judged = per_batch.values[torch.isin(per_batch.steps, torch.tensor(d.evidence["judged_steps"])), column]
    top = float(judged.max())
    assert d.evidence["max_fraction"]["5"] == pytest.approx(top) and f"up to {top:.0%}" in d.message
    assert d.evidence["mean_fraction"]["5"] == pytest.approx(float(judged.mean()), rel=1e-5)
    p, b = d.evidence["persistent_fraction"]["5"], d.evidence["batches"]["5"]
    assert f"{p:.0%} of the units of '5' output zero for every sample of all {b} sampled batches" in d.message
    assert d.evidence["steps_seen"] == len(judged) >= 3


def test_units_dead_on_every_batch_are_reported_when_the_mean_is_below_dead():
    """Bias -3.5: 81-95% per batch, a mean of 0.84 (below ``dead``), but 70% of the units zero
    on every one of the 5 sampled batches: the persistent rule reports it."""
    model = _biased_mlp(-3.5)
    gw = _train(model, torch.optim.SGD(model.parameters(), lr=0.01), 40, **SPARSE)
    (d,) = _dead(gw)
    assert d.layers == ("5",) and d.evidence["mean_fraction"]["5"] < 0.85
    assert d.evidence["persistent_fraction"]["5"] >= 0.7 and d.evidence["batches"]["5"] == 5


def test_persistent_fraction_agrees_with_plain_torch():
    """``activations.dead_always``: units zero for every sample of every sampled batch so far,
    the OR of plain torch's per-batch masks; ``dead_batches`` counts the batches."""
    model = _biased_mlp(-3.0)
    masks: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU):
            module.register_forward_hook(lambda m, a, o, name=name: masks.setdefault(name, []).append((o != 0).any(0)) or None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = _train(model, opt, 17, **SPARSE)  # sampled steps 0, 8, 16
    sampled = [0, 8, 16]
    always, count = gw.history.extras["activations.dead_always"], gw.history.extras["activations.dead_batches"]
    assert always.steps.tolist() == sampled and count.values.tolist() == [[k + 1.0] * 5 for k in range(3)]
    for row in range(3):
        expected = []
        for name in masks:
            alive = torch.stack([masks[name][s] for s in sampled[: row + 1]]).any(0)
            expected.append(1.0 - float(alive.float().mean()))
        torch.testing.assert_close(always.values[row], torch.tensor(expected))


def test_the_mask_window_starts_again_after_window_steps():
    model = _biased_mlp(-4.0)
    gw = _train(model, torch.optim.SGD(model.parameters(), lr=0.01), 30, options={"activations": {"window": 10}}, **EVERY_STEP)
    count = gw.history.extras["activations.dead_batches"].values[:, 0].tolist()
    assert count[:12] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 1.0, 2.0]
    assert len(_dead(gw)) == 1  # judged across the new window, reported once


def _healthy():
    yield "kaiming30_sgd", lambda: relu_mlp(depth=30), lambda p: torch.optim.SGD(p, lr=0.01), None, None
    yield "kaiming30_adam", lambda: relu_mlp(depth=30), lambda p: torch.optim.Adam(p, lr=1e-3), None, None
    yield (
        "resnet",
        residual_convnet,
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        _images(),
        nn.functional.cross_entropy,
    )
    yield "transformer", transformer_encoder, lambda p: torch.optim.AdamW(p, lr=3e-4), _tokens(), nn.functional.cross_entropy


def _images():
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(32, 3, 8, 8, generator=g)
        yield x, x.flatten(1)[:, :4].argmax(1)


def _tokens():
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randint(0, 50, (32, 12), generator=g)
        yield x, x[:, 0] % 4


@pytest.mark.parametrize("cadence", [{}, EVERY_STEP], ids=["defaults", "every_step"])
@pytest.mark.parametrize(("name", "make", "optimizer", "batches", "loss_fn"), list(_healthy()), ids=[c[0] for c in _healthy()])
def test_healthy_nets_have_no_dead_units_over_200_steps(name, make, optimizer, batches, loss_fn, cadence):
    model = make()
    gw = _train(model, optimizer(model.parameters()), 210, batches=batches, loss_fn=loss_fn, **cadence)
    assert [d for d in gw.diagnoses if d.source == "activations"] == []
