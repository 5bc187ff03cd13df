"""The nonfinite detector names the step and the first module that produced NaN/Inf."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch.testing import NaNAt, high_lr_mlp, nan_model, regression_batches, train


def _watch(model, opt, **kw):
    kw.setdefault("console", Console(file=io.StringIO(), width=100))
    kw.setdefault("strict", True)
    return gradwatch.watch(model, opt, **kw)


def _nonfinite(gw):
    return [d for d in gw.diagnoses if d.kind == "nonfinite"]


def _plain_first_nan(model_factory, steps: int, lr: float = 0.01) -> tuple[int, str]:
    """Plain torch: forward hooks that test every output with torch.isfinite (no gradwatch)."""
    model = model_factory()
    found: list[tuple[int, str]] = []
    step = [0]
    names = {m: n for n, m in model.named_modules()}

    def hook(module, args, out):
        if not found and not torch.isfinite(out).all():
            found.append((step[0], names[module]))

    for m in model.modules():
        if m is not model:
            m.register_forward_hook(hook)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batches = regression_batches()
    for step[0] in range(steps):
        x, y = next(batches)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return found[0]


@pytest.mark.parametrize("at", [0, 7, 13])
def test_hook_gradwatch_diagnose_names_nan_module_and_step(at):
    model = nan_model(at=at)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with _watch(model, opt, report_every=10) as gw:
        train(model, at + 6, optimizer=opt, watcher=gw)
    found = _nonfinite(gw)
    assert len(found) == 1, found  # reported once, not once per interval
    d = found[0]
    assert d.layers == ("4",) and d.step == at
    ev = d.evidence
    assert {k: ev[k] for k in ("first_step", "where", "module_type", "value", "produced")} == {
        "first_step": at,
        "where": "output",
        "module_type": "NaNAt",
        "value": "nan",
        "produced": True,
    }
    assert ev["origin"]["module"] == "4" and ev["origin"]["output"] == "nan" and ev["origin"]["input_dtype"] == "float32"
    # The chain: that step's gradients are non-finite too (backward order: the last layer first),
    # and the weights after its update.
    assert ev["gradient_step"] == at and ev["layers_nonfinite"] == ["8", "6", "3", "2", "0"]
    assert ev["weights_after_update"] == at
    assert d.source == "nonfinite" and d.severity is gradwatch.Severity.ERROR
    assert (d.step, d.layers[0]) == _plain_first_nan(lambda: nan_model(at=at), at + 6)


def test_hook_gradwatch_diagnose_high_lr_overflow_names_first_overflowing_layer():
    model = high_lr_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with _watch(model, opt, report_every=10) as gw:
        losses = train(model, 12, optimizer=opt, watcher=gw)
    d = _nonfinite(gw)[0]
    first_bad_loss = next(i for i, x in enumerate(losses) if not math.isfinite(x))
    assert d.step <= first_bad_loss
    assert d.evidence["where"] == "output"
    assert (d.step, d.layers[0]) == _plain_first_nan(high_lr_mlp, 12, lr=0.2)


class _Block(nn.Module):
    """A non-leaf module whose own functional code divides by zero when ``poison`` is set
    (a flag, not a call counter: tracing the model with torch.fx also calls forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)
        self.poison = False

    def forward(self, x):
        h = self.act(self.lin(x))
        return (h / 0.0 if self.poison else h), {"aux": h.detach()}


class _DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.block = _Block()
        self.shared = nn.Linear(8, 8)  # called twice per forward
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h, _ = self.block(self.shared(self.inp(x)))
        return {"out": self.head(self.shared(h)), "aux": h.sum()}


def test_hook_gradwatch_diagnose_tuple_dict_outputs_inplace_relu_shared_module():
    torch.manual_seed(0)
    model = _DictModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with _watch(model, opt, report_every=4) as gw:
        for step in range(9):
            model.block.poison = step == 5
            out = model(torch.randn(16, 4))
            out["out"].square().mean().backward()
            opt.step()
            opt.zero_grad()
    (d,) = _nonfinite(gw)
    # The block's own division made the NaN (0/0 after the ReLU): its children's outputs were finite.
    assert (d.step, d.layers, d.evidence["module_type"], d.evidence["value"]) == (5, ("block",), "_Block", "nan")


class _NaNGrad(torch.autograd.Function):
    """Identity forward; a NaN gradient in backward at one call."""

    calls = 0
    at = 3

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        bad = _NaNGrad.calls == _NaNGrad.at
        _NaNGrad.calls += 1
        return g * float("nan") if bad else g


class _GradNaNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(_NaNGrad.apply(self.a(x)))))


def test_hook_gradwatch_diagnose_gradient_only_nan_names_layer_where_backward_broke():
    _NaNGrad.calls = 0
    model = _GradNaNModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with _watch(model, opt, report_every=10, stats_every=1, sample_every=5) as gw:
        train(model, 4, optimizer=opt, watcher=gw)  # the weights turn NaN after step 3: stop there
    (d,) = _nonfinite(gw)
    assert d.evidence["where"] == "gradient" and d.step == 3
    # Backward entered the NaN between b and a: a's gradient is the one that broke.
    assert d.layers == ("a",) and d.evidence["layers_nonfinite"] == ["a"]


def test_hook_gradwatch_diagnose_finite_run_reports_nothing_and_eval_forwards_are_ignored():
    model = nan_model(at=10**9)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with _watch(model, opt, report_every=5) as gw:
        train(model, 12, optimizer=opt, watcher=gw)
        with torch.no_grad():
            model(torch.full((2, 16), float("nan")))  # an eval forward: not a training step
    assert _nonfinite(gw) == []


def test_amp_skip_is_not_a_nonfinite_error():
    """A step GradScaler skipped (window.amp_skips) holds Inf gradients by design."""
    from gradwatch import Series, StatsWindow
    from gradwatch.testing import diagnose

    model = nan_model(at=10**9)
    layers = gradwatch.Watcher(model, config=gradwatch.WatchConfig(report=False)).model_info.names
    nonfinite_counts = torch.zeros(2, len(layers))
    nonfinite_counts[1] = 1.0  # every layer's gradient non-finite at step 4
    empty = Series(torch.zeros(0, dtype=torch.int64), torch.zeros(0, len(layers)))
    window = StatsWindow(
        layers=layers, steps=torch.tensor([0, 4]), grad_norm=torch.ones(2, len(layers)), grad_rms=torch.ones(2, len(layers)),
        grad_max=torch.ones(2, len(layers)), nonfinite=nonfinite_counts, present=torch.ones(2, len(layers)),
        total_norm=torch.ones(2), weight_norm=empty, update_ratio=empty, amp_skips=(4,), first_step=0, last_step=7,
    )  # fmt: skip

    def found(window):
        with gradwatch.watch(model, report=False) as gw:
            return [d for d in diagnose(gw, window) if d.kind == "nonfinite"], gw.actions

    assert found(window) == ([], [gradwatch.Action(kind="amp_skip", step=4, source="core")])
    (d,), _ = found(dataclasses.replace(window, amp_skips=()))
    # Every layer's gradient, first in backward order (the last layer first); no module produced it.
    assert (d.step, d.evidence["where"], d.layers) == (4, "gradient", tuple(reversed(layers)))
    assert d.evidence["produced"] is False and "origin" not in d.evidence


def test_sampled_mode_names_nan_on_sampled_step_only():
    model = nan_model(at=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with _watch(model, opt, report_every=8, stats_every=2, sample_every=4, options={"nonfinite": {"outputs": "sampled"}}) as gw:
        train(model, 8, optimizer=opt, watcher=gw)
    (d,) = _nonfinite(gw)
    assert (d.step, d.layers) == (4, ("4",))


def test_off_mode_still_sees_the_loss_and_the_gradients():
    model = nan_model(at=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with _watch(model, opt, report_every=8, stats_every=2, sample_every=4, options={"nonfinite": {"outputs": "off"}}) as gw:
        train(model, 8, optimizer=opt, watcher=gw)  # records the loss (observe_loss)
    (d,) = _nonfinite(gw)
    assert (d.evidence["where"], d.step, d.layers) == ("loss", 5, ())  # the loss is read every step
    assert d.evidence["gradient_step"] == 6  # the first statistics step after 5
    assert "the loss was nan at step 5" in d.message and d.message.index("step 5") < d.message.index("step 6")


@pytest.mark.parametrize("options", [{"outputs": "always"}, {"every": 3}])
def test_hook_gradwatch_configure_rejects_bad_options(options):
    model = nan_model()
    with pytest.raises(gradwatch.GradWatchError, match="nonfinite"):
        gradwatch.watch(model, options={"nonfinite": options}, report=False)


def test_hooks_removed_on_detach():
    model = nan_model()
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with _watch(model, opt) as gw:
        train(model, 2, optimizer=opt, watcher=gw)
        during = sum(len(m._forward_hooks) for m in model.modules())
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert during >= len(list(model.modules())) and after == before == 0


def test_state_dict_round_trip_keeps_reported():
    model = nan_model(at=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with _watch(model, opt, report_every=4) as gw:
        train(model, 4, optimizer=opt, watcher=gw)
        state = gw.state_dict()
    assert state["plugins"]["nonfinite"]["armed"] is False
    assert state["plugins"]["nonfinite"]["reported"]["layers"] == ["4"]
    # NaNAt is a module: a sanity check that the builder still poisons where we think.
    assert isinstance(model[4], NaNAt)


class _Huge(nn.Module):
    """Finite outputs whose sum of squares overflows float32 (entries ~1e30)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1e30


def test_hook_gradwatch_diagnose_huge_finite_outputs_are_not_nonfinite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _Huge(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with _watch(model, opt, report=False) as gw:
        for _ in range(3):
            out = model(torch.randn(8, 4))
            assert torch.isfinite(model[1](torch.ones(2))).all()
            (out * 0).sum().backward()  # finite zero gradients: nothing is non-finite
            opt.step()
            opt.zero_grad()
    assert _nonfinite(gw) == []


def _many_modules(at: int) -> nn.Sequential:
    """150 Linear/ReLU modules (over the 128 of "auto"), a NaNAt named "61" in the middle."""
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(75):
        mods += [nn.Linear(16, 16), nn.ReLU()]
    mods.insert(61, NaNAt(at))
    mods[0] = nn.Linear(16, 16)
    mods.append(nn.Linear(16, 1))
    return nn.Sequential(*mods)


@pytest.mark.parametrize("at,located", [(7, True), (37, False), (40, True)])
def test_auto_mode_checks_modules_in_the_dense_start_and_on_sampled_steps(at, located):
    model = _many_modules(at)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hooks = {}

    def count(step):
        hooks[step] = sum(len(m._forward_hooks) for m in model.modules())

    with _watch(model, opt, report_every=16, stats_every=4, sample_every=8) as gw:
        train(model, max(at + 3, 36), optimizer=opt, watcher=gw, callback=count)
    (d,) = _nonfinite(gw)
    assert d.step == at
    if located:
        assert d.layers == ("61",) and d.evidence["where"] == "output" and d.evidence["produced"] is True
    else:
        # After the dense start, between sampled steps, only the model's output is checked: the exact step.
        assert d.layers == () and d.evidence["located"] is False and '"every_step"' in d.message
    assert hooks[5] > 150 and hooks[33] <= 2 and hooks[32] > 150  # dense start, after it, a sampled step


def test_every_step_option_names_the_module_on_a_large_model():
    model = _many_modules(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with _watch(model, opt, report_every=16, options={"nonfinite": {"outputs": "every_step"}}) as gw:
        train(model, 12, optimizer=opt, watcher=gw)
    (d,) = _nonfinite(gw)
    assert (d.step, d.layers) == (7, ("61",))
