"""The advisor: model-aware remedies whose snippets run and whose apply() works.

Diagnoses are built by hand per the evidence contract of the detectors, so the
advisor is tested on its own; tests/plugins/test_scenarios.py runs it end to end.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch import Diagnosis, Severity
from gradwatch.testing import TinyModel, regression_batches, relu_mlp, residual_convnet, sigmoid_mlp, train, vanilla_rnn


def _watcher(model, steps=0, batches=None, lr=0.01, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gw = gradwatch.watch(
        model, opt, strict=True, autoload=False, report=False, report_every=4, console=Console(file=io.StringIO()), **kw
    )
    if steps:
        train(model, steps, batches=batches, optimizer=opt, watcher=gw)
        gw.report()
    return gw


def advise(gw, diagnosis):
    """The remedies the whole default plugin set gives ``diagnosis`` (as the host does)."""
    return gw.advise(diagnosis)


def vanishing(layers=("0",), ratio=2.5e-9, depth=20):
    return Diagnosis(
        kind="vanishing",
        severity=Severity.WARNING,
        step=3,
        layers=layers,
        message="vanishing",
        summary=f"early/late gradient RMS ratio {ratio:.2g} over {depth} layers",
        source="vanishing",
        evidence={
            "ratio": ratio,
            "decay_per_layer": 0.35,
            "depth": depth,
            "signal": "backprop",
            "early_rms": 1e-9,
            "late_rms": 0.4,
            "threshold": 1e-3,
        },
    )


def exploding(step=10, **extra):
    evidence = {
        "total_norm": 5e3,
        "z_score": 9.0,
        "onset": step,
        "growth_per_step": 1.4,
        "norm_quantiles": {"p50": 1.0, "p90": 2.0, "p99": 50.0},
        "update_ratio": None,
        "loss_diverging": None,
    }
    evidence.update(extra)
    return Diagnosis(
        kind="exploding",
        severity=Severity.ERROR,
        step=step,
        layers=("0",),
        message="exploding",
        summary=f"total gradient norm {evidence['total_norm']:.3g}",
        source="exploding",
        evidence=evidence,
    )


def check_snippets(model, remedies, x, loss=lambda out: out.float().pow(2).mean()):
    """Exec every snippet on a deep copy (model, optimizer, torch, nn in scope), then a
    forward and backward; the same for apply()."""
    for remedy in remedies:
        assert remedy.snippet, remedy.kind
        clone = copy.deepcopy(model)
        ns = {"model": clone, "torch": torch, "nn": nn, "optimizer": torch.optim.SGD(clone.parameters(), lr=0.1)}
        exec(remedy.snippet, ns)
        loss(ns["model"](x)).backward()
        if remedy.apply is not None:
            other = copy.deepcopy(model)
            changed = remedy.apply(other)
            loss(changed(x)).backward()
            assert all(p.grad is not None for p in changed.parameters() if p.requires_grad)


def early_late(model, batches=None, steps=3):
    """Plain torch: first-layer over last-layer weight-gradient RMS, averaged over a few batches."""
    from gradwatch.testing import regression_batches

    batches = batches or regression_batches(batch=64, seed=1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    ratios = []
    for _ in range(steps):
        x, y = next(batches)
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        rms = [m.weight.grad.pow(2).mean().sqrt().item() for m in (linears[0], linears[-2])]
        ratios.append(rms[0] / rms[1])
    return sum(ratios) / len(ratios)


def test_hook_advise_sigmoid_mlp():
    model = sigmoid_mlp(depth=20)
    gw = _watcher(model)
    remedies = advise(gw, vanishing())
    gw.detach()
    kinds = [r.kind for r in remedies]
    assert {"relu", "normalization", "residual", "reinit"} <= set(kinds)
    assert kinds[0] == "relu"
    by = {r.kind: r for r in remedies}
    sigmoids = [n for n, m in model.named_modules() if isinstance(m, nn.Sigmoid)]
    assert f"{len(sigmoids)} Sigmoid" in by["relu"].title and repr(sigmoids) in by["relu"].snippet
    assert "torch.fx traced the model" in by["relu"].rationale
    assert "no normalisation layer" in by["normalization"].rationale and "nn.LayerNorm(32)" in by["normalization"].snippet
    assert "torch.fx found no addition" in by["residual"].rationale
    for r in remedies:
        assert "2.5e-09" in r.rationale, r.kind  # each rationale quotes the measured number
    check_snippets(model, remedies, torch.randn(8, 16))


def test_relu_apply_raises_the_early_late_ratio_by_an_order_of_magnitude():
    model = sigmoid_mlp(depth=20)
    gw = _watcher(model)
    (relu,) = [r for r in advise(gw, vanishing()) if r.kind == "relu"]
    gw.detach()
    before = early_late(copy.deepcopy(model))
    fixed = relu.apply(copy.deepcopy(model))
    assert not any(isinstance(m, nn.Sigmoid) for m in fixed.modules())
    after = early_late(fixed)
    assert after > 10 * before, (before, after)


def test_reinit_apply_restores_kaiming_scale():
    model = relu_mlp(depth=30, init="lecun")
    gw = _watcher(model)
    (reinit,) = [r for r in advise(gw, vanishing(depth=30)) if r.kind == "reinit"]
    gw.detach()
    assert "kaiming" in reinit.title.lower() and "0.707" not in reinit.rationale
    assert "measured vs" in reinit.rationale
    fixed = reinit.apply(copy.deepcopy(model))
    for _name, m in fixed.named_modules():
        if isinstance(m, nn.Linear) and m.out_features > 1:
            assert m.weight.std().item() == pytest.approx(math.sqrt(2 / m.in_features), rel=0.1)
    # The init plugin no longer complains about the repaired copy.
    again = _watcher(fixed, steps=4)
    gw.detach()
    again.detach()
    assert [d for d in again.diagnoses if d.kind == "init_scale"] == []
    check_snippets(model, [reinit], torch.randn(8, 16))


def test_hook_advise_healthy_architecture_gets_no_structural_remedies():
    model = residual_convnet()
    gw = _watcher(model)
    kinds = [r.kind for r in advise(gw, vanishing(layers=("0",), depth=10)) or []]
    gw.detach()
    assert "normalization" not in kinds and "residual" not in kinds and "relu" not in kinds


def test_hook_advise_lstm_gru_with_forget_bias():
    model = vanilla_rnn(radius=0.5)
    gw = _watcher(model)
    d = Diagnosis(
        kind="vanishing",
        severity=Severity.WARNING,
        step=0,
        layers=("rnn",),
        message="rnn vanishing",
        source="recurrent",
        evidence={
            "recurrent": True,
            "module_type": "RNN",
            "spectral_radius": {"weight_hh_l0": 0.5},
            "max_derivative": 1.0,
            "gain": 0.5,
            "seq_len": 100,
            "bound": 0.5**100,
        },
    )
    remedies = advise(gw, d)
    gw.detach()
    assert [r.kind for r in remedies] == ["lstm_gru", "reinit"]
    lstm = remedies[0]
    assert "'rnn'" in lstm.title and "0.5^100 = 7.89e-31" in lstm.rationale and "forget" in lstm.rationale
    assert "nn.LSTM(4, 32" in lstm.snippet and "p[32:64].fill_(4.6)" in lstm.snippet
    fixed = lstm.apply(copy.deepcopy(model))
    assert isinstance(fixed.rnn, nn.LSTM)
    assert torch.all(fixed.rnn.bias_ih_l0[32:64] == 4.6) and torch.all(fixed.rnn.bias_hh_l0[32:64] == 0)
    ns = {"model": copy.deepcopy(model), "torch": torch, "nn": nn}
    exec(lstm.snippet, ns)
    assert isinstance(ns["model"].rnn, nn.LSTM) and torch.all(ns["model"].rnn.bias_ih_l0[32:64] == 4.6)
    check_snippets(model, remedies, torch.randn(2, 100, 4))
    orth = remedies[1].apply(copy.deepcopy(model))
    assert torch.linalg.eigvals(orth.rnn.weight_hh_l0.detach()).abs().max().item() == pytest.approx(1.0, abs=1e-4)


def test_hook_advise_clipping_threshold_is_the_stated_percentile():
    torch.manual_seed(0)
    model = TinyModel()
    gw = _watcher(model, steps=12, batches=regression_batches(d_in=8, d_out=2))
    assert gw.history.steps.tolist() == list(range(12))  # the dense start: every step
    onset = 9
    remedies = advise(gw, exploding(step=onset))
    gw.detach()
    (clip,) = [r for r in remedies if r.kind == "clipping"]
    expected = torch.quantile(torch.tensor(gw.history.total_norm[:onset].tolist(), dtype=torch.float64), 0.9).item()
    # The threshold comes from the history the core measured (tests/test_stats.py checks it against plain torch).
    assert f"max_norm={float(f'{expected:.3g}'):g}" in clip.snippet
    assert "90th percentile of the 9 total norms measured before step 9" in clip.rationale
    check_snippets(model, [clip], torch.randn(4, 8))


def test_hook_advise_clipping_without_healthy_rows_says_so():
    # No norm measured before the onset: the detector's quantiles (over exploded rows too)
    # are not a threshold; a conventional value is, with its source.
    gw = _watcher(TinyModel())
    (clip,) = [r for r in advise(gw, exploding(step=0)) if r.kind == "clipping"]
    gw.detach()
    assert clip.params == {"max_norm": 1.0, "healthy_rows": 0, "before_step": 1, "basis": "default"}
    assert "max_norm=1)" in clip.snippet and "max_norm=2)" not in clip.snippet
    assert "only 0 healthy total norm(s) were measured before step 1" in clip.rationale
    assert "so the threshold is the common default, 1" in clip.rationale


def test_hook_advise_lower_lr_factor_from_update_ratio():
    gw = _watcher(TinyModel())
    remedies = advise(gw, exploding(update_ratio=0.3, loss_diverging=True))
    gw.detach()
    (lower,) = [r for r in remedies if r.kind == "lower_lr"]
    assert lower.title == "Lower the learning rate by ×100"  # 0.3 / 1e-3 = 300 -> 10^round(2.48)
    assert "was 0.3, ×300 the ~0.001 of a healthy step" in lower.rationale
    assert lower.params["lr_factor"] == pytest.approx(0.01) and lower.params["at_least"] is False
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    exec(lower.snippet, {"optimizer": opt})
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_hook_advise_no_lower_lr_without_divergence():
    gw = _watcher(TinyModel())
    kinds = [r.kind for r in advise(gw, exploding(update_ratio=5e-4, loss_diverging=False))]
    gw.detach()
    assert "lower_lr" not in kinds and "clipping" in kinds


class _FunctionalSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(8))

    def forward(self, x):
        for layer in self.layers:
            x = torch.sigmoid(layer(x))
        return x


class _Untraceable(_FunctionalSigmoid):
    def forward(self, x):
        for layer in self.layers:
            x = torch.sigmoid(layer(x)) if x.sum() > -1e9 else x
        return x


def test_hook_advise_functional_activations_named_via_fx():
    model = _FunctionalSigmoid()
    gw = _watcher(model)
    remedies = advise(gw, vanishing(layers=("layers.0",), depth=8))
    gw.detach()
    (relu,) = [r for r in remedies if r.kind == "relu"]
    assert "functional torch.sigmoid after 'layers.0'" in relu.rationale and relu.apply is None
    check_snippets(model, remedies, torch.randn(4, 16))


def test_hook_advise_untraceable_model_says_so():
    model = _Untraceable()
    gw = _watcher(model)
    remedies = advise(gw, vanishing(layers=("layers.0",), depth=8))
    gw.detach()
    by = {r.kind: r for r in remedies}
    assert "relu" not in by  # functional activations cannot be seen without fx
    assert "module heuristic" in by["residual"].rationale and "could not trace" in by["residual"].rationale
    check_snippets(model, remedies, torch.randn(4, 16))


def test_hook_advise_init_scale_and_dead_units():
    model = relu_mlp(depth=8, init="lecun")
    gw = _watcher(model)
    d = Diagnosis(
        kind="dead_units",
        severity=Severity.WARNING,
        step=0,
        layers=("1", "3"),
        message="dead",
        summary="90% of the units of '1' dead",
        source="activations",
        evidence={"fraction": {"1": 0.9, "3": 0.8}, "activation": "ReLU", "threshold": 0.7, "steps_seen": 3},
    )
    remedies = advise(gw, d)
    assert remedies[0].kind == "leaky_relu" and "90% of the units of '1' dead" in remedies[0].rationale
    check_snippets(model, remedies, torch.randn(4, 16))
    assert advise(gw, Diagnosis(kind="mystery", severity=Severity.INFO, step=0, message="?")) == []
    gw.detach()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"clip_percentile": 0}, "clip_percentile"),
        ({"target_update_ratio": 2}, "target_update_ratio"),
        ({"x": 1}, "unknown advisor option"),
    ],
)
def test_hook_configure_rejects_bad_options(options, match):
    with pytest.raises(gradwatch.GradWatchError, match=match):
        gradwatch.watch(TinyModel(), options={"advisor": options}, autoload=False)


def test_third_party_remedy_wins_and_duplicates_are_dropped():
    class Mine:
        gradwatch_name = "mine"

        @gradwatch.hookimpl
        def gradwatch_advise(self, diagnosis):
            return [gradwatch.Remedy(kind="clipping", title="my clip", rationale="mine")]

    gw = _watcher(TinyModel(), plugins=[Mine()])
    remedies = advise(gw, exploding())
    gw.detach()
    assert remedies[0].title == "my clip" and [r.kind for r in remedies].count("clipping") == 1


def test_anatomy_residuals_norms_and_side_effect_free_tracing():
    from gradwatch import anatomy
    from gradwatch.testing import nan_model, transformer_encoder

    conv = anatomy.anatomy(residual_convnet())
    assert conv.traced and conv.residual_source == "fx" and len(conv.residuals) == 4  # one x + f(x) per block
    assert "1" in conv.norms and "3.conv1" in conv.normed
    enc = anatomy.anatomy(transformer_encoder())
    assert any("TransformerEncoderLayer" in r for r in enc.residuals) and enc.norms
    assert anatomy.anatomy(sigmoid_mlp(depth=6)).residuals == []
    model = nan_model(at=0)
    anatomy.anatomy(model)
    assert model[4].calls == 0  # a childless module is an fx leaf: its forward never ran while tracing


def test_hook_advise_plain_conv_stack():
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.Tanh()]
    for _ in range(7):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    gw = _watcher(model)
    remedies = advise(gw, vanishing(layers=("0",), depth=9))
    gw.detach()
    by = {r.kind: r for r in remedies}
    assert {"relu", "normalization", "residual"} <= set(by)
    assert "nn.BatchNorm2d(8)" in by["normalization"].snippet
    assert "'2', '4', '6', '8'" in by["residual"].title  # the 3->8 first conv changes shape: not wrapped
    check_snippets(model, remedies, torch.randn(2, 3, 6, 6))
