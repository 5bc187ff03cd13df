"""The issue's scenarios end to end: real training under ``gradwatch.watch`` with the
default plugin set, asserting diagnosis kinds AND remedies, in both directions; and the
issue's bad input (never a crash of the user's training)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch.testing import (
    exploding_rnn,
    high_lr_mlp,
    lstm_model,
    nan_model,
    relu_mlp,
    residual_convnet,
    sequence_batches,
    sigmoid_mlp,
    train,
    transformer_encoder,
    vanilla_rnn,
)


def run(model, steps, batches=None, lr=0.01, report_every=20, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    console = Console(file=io.StringIO(), width=120)
    with gradwatch.watch(model, opt, autoload=False, report_every=report_every, console=console, **kw) as gw:
        train(model, steps, batches=batches, optimizer=opt, watcher=gw)
    gw.console_text = console.file.getvalue()
    return gw


def kinds(gw, severities=("warning", "error")):
    return {d.kind for d in gw.diagnoses if d.severity.value in severities}


def remedies(gw, kind):
    return {r.kind for d in gw.diagnoses if d.kind == kind for r in d.remedies}


def loud(gw):
    return [(d.kind, d.source, d.message) for d in gw.diagnoses if d.severity.value in ("warning", "error")]


# ---------------------------------------------------------------------- recurrences (recurrent + advisor)


def test_vanilla_rnn_radius_half_on_length_100_vanishes_with_lstm_gru():
    gw = run(vanilla_rnn(radius=0.5), 20, batches=sequence_batches(seq_len=100, batch=16), strict=True)
    (d,) = [d for d in gw.diagnoses if d.kind == "vanishing" and d.source == "recurrent"]
    assert d.layers == ("rnn",) and d.step == 0
    assert [r.kind for r in d.remedies][0] == "lstm_gru"
    assert "forget" in d.remedies[0].rationale
    assert "lstm_gru" in gw.console_text or "LSTM" in gw.console_text


def test_same_task_with_lstm_has_no_vanishing_error():
    gw = run(lstm_model(), 20, batches=sequence_batches(seq_len=100, batch=16), strict=True)
    assert not [d for d in gw.diagnoses if d.kind == "vanishing" and d.severity.value == "error"]
    assert loud(gw) == []
    # Only an info note: PyTorch's default forget-gate bias forgets over 100 steps.
    assert [(d.kind, d.severity.value) for d in gw.diagnoses if d.source == "recurrent"] == [("forget_gate", "info")]


def test_exploding_rnn_gets_clipping():
    gw = run(exploding_rnn(radius=3.0), 20, batches=sequence_batches(seq_len=50, batch=16), strict=True)
    assert "exploding" in kinds(gw)
    assert "clipping" in remedies(gw, "exploding")


# ---------------------------------------------------------------------- with the detectors


def test_sigmoid_mlp_vanishes_with_relu_normalization_residual():
    gw = run(sigmoid_mlp(depth=20), 40)
    assert "vanishing" in kinds(gw), loud(gw)
    assert {"relu", "normalization", "residual"} <= remedies(gw, "vanishing")


def test_relu_remedy_applied_to_a_copy_removes_the_vanishing_diagnosis():
    model = sigmoid_mlp(depth=20)
    gw = run(copy.deepcopy(model), 40)
    (relu,) = [r for d in gw.diagnoses if d.kind == "vanishing" for r in d.remedies if r.kind == "relu"][:1]
    again = run(relu.apply(copy.deepcopy(model)), 40)
    assert not [d for d in again.diagnoses if d.kind == "vanishing" and d.source == "vanishing"], loud(again)


def test_lecun_relu_mlp_vanishes_with_reinit_and_kaiming_is_quiet():
    model = relu_mlp(depth=30, init="lecun")
    gw = run(copy.deepcopy(model), 40)
    assert "vanishing" in kinds(gw), loud(gw)
    reinit = [r for d in gw.diagnoses if d.kind == "vanishing" for r in d.remedies if r.kind == "reinit"]
    assert reinit and "Kaiming" in reinit[0].title
    assert "init_scale" in kinds(gw)
    # The remedy applied to a copy: the vanishing warning is gone.
    fixed = run(reinit[0].apply(copy.deepcopy(model)), 40)
    assert not [d for d in fixed.diagnoses if d.kind == "vanishing"], loud(fixed)
    healthy = run(relu_mlp(depth=30, init="kaiming"), 40)
    assert loud(healthy) == []


def test_high_lr_mlp_explodes_then_nonfinite_with_clipping_and_lower_lr():
    # lr=0.15 takes the loss from 3.6 to 1e8 in one step and to NaN by step 4. Statistics on every
    # step: at the default stats_every=4 the only norm read before the NaN is step 0's.
    gw = run(high_lr_mlp(), 40, lr=0.15, stats_every=1, sample_every=4)
    found = kinds(gw)
    assert {"exploding", "nonfinite"} <= found, loud(gw)
    first = {k: min(d.step for d in gw.diagnoses if d.kind == k) for k in ("exploding", "nonfinite")}
    assert first["exploding"] <= first["nonfinite"]
    advice = remedies(gw, "exploding") | remedies(gw, "nonfinite")
    assert {"clipping", "lower_lr"} <= advice


def test_nan_module_is_named_with_its_step():
    gw = run(nan_model(at=7), 20)
    (d,) = [d for d in gw.diagnoses if d.kind == "nonfinite"][:1]
    assert d.layers == ("4",) and d.step == 7 and d.evidence["first_step"] == 7
    # The NaN comes from the module's own forward at lr 0.01, not from growing gradients:
    # neither clipping nor a lower learning rate would help, and the advisor says nothing.
    assert {r.kind for r in d.remedies}.isdisjoint({"clipping", "lower_lr"})


def test_healthy_residual_convnet_is_quiet():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 8 * 8, 4, generator=g) / 14

    def batches():
        while True:
            x = torch.randn(16, 3, 8, 8, generator=g)
            yield x, x.flatten(1) @ w

    gw = run(residual_convnet(), 200, batches=batches(), lr=0.05, report_every=50)
    assert loud(gw) == []


def test_healthy_transformer_encoder_is_quiet():
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            tokens = torch.randint(0, 50, (16, 8), generator=g)
            yield tokens, nn.functional.one_hot(tokens[:, 0] % 4, 4).float()

    gw = run(transformer_encoder(), 200, batches=batches(), lr=0.05, report_every=50)
    assert loud(gw) == []


# ---------------------------------------------------------------------- bad input: never a crash


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(16, 32)
        self.frozen.requires_grad_(False)
        self.body = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(32, 32), nn.ReLU(inplace=True))
        self.unused = nn.Linear(32, 32)  # never called: its gradients stay None
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        return self.head(self.body(self.frozen(x)))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16, sparse=True)
        self.rnn = nn.RNN(16, 16, batch_first=True)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.embed.weight  # tied weights

    def forward(self, tokens):
        h, _ = self.rnn(self.embed(tokens))
        return {"logits": self.out(h[:, -1]), "hidden": h}


class _Tuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 1)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: torch.fx cannot trace this model
            x = x * 0
        h = torch.tanh(self.a(x))
        return self.b(h), h


def _run_raw(model, steps, make_batch, loss_fn, optimizer):
    """Train under a watch with statistics every 2nd step; keep plain torch's per-layer
    gradient norms of every step (NaN for a layer without gradients) to compare."""
    console = Console(file=io.StringIO(), width=120)
    plain = {}
    with gradwatch.watch(
        model,
        optimizer,
        autoload=False,
        report_every=4,
        sample_every=4,
        stats_every=2,
        console=console,
        strict=True,
    ) as gw:
        for step in range(steps):
            loss = loss_fn(model(make_batch()))
            loss.backward()
            plain[step] = _plain_norms(model, [name for name, _ in model.named_modules()])
            optimizer.step()
            optimizer.zero_grad()
    return gw, plain


def _plain_norms(model, names):
    """Per module name, the L2 norm of the gradients of its own trainable parameters."""
    out = {}
    for name in names:
        module = model.get_submodule(name)
        grads = [p.grad for p in module.parameters(recurse=False) if p.requires_grad and p.grad is not None]
        out[name] = (
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else math.nan
        )
    return out


def assert_history_matches_plain(gw, plain, steps):
    history = gw.history
    assert history.steps.tolist() == list(range(0, steps, 2))
    for row, step in enumerate(history.steps.tolist()):
        expected = torch.tensor([plain[step][name] for name in history.layers])
        present = history.present[row] > 0
        assert torch.equal(present, torch.isfinite(expected)), step
        torch.testing.assert_close(history.grad_norm[row][present], expected[present].float(), rtol=1e-5, atol=1e-7)


def test_bad_input_frozen_unused_inplace():
    torch.manual_seed(0)
    model = _Frozen()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    gw, plain = _run_raw(model, 9, lambda: torch.randn(8, 16), lambda out: out.pow(2).mean(), opt)
    assert gw.step_count == 9
    assert "frozen" not in gw.history.layers and "unused" in gw.history.layers
    assert_history_matches_plain(gw, plain, 9)
    assert not (gw.history.present[:, gw.history.layers.index("unused")] > 0).any()


def test_bad_input_tied_sparse_embedding_dict_output():
    torch.manual_seed(0)
    model = _Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    gw, plain = _run_raw(
        model, 9, lambda: torch.randint(0, 50, (4, 12), generator=g), lambda out: out["logits"].logsumexp(1).mean(), opt
    )
    assert gw.step_count == 9
    assert "out" not in gw.history.layers  # the tied weight is watched once, for its first owner
    assert_history_matches_plain(gw, plain, 9)


def test_bad_input_tuple_output_untraceable():
    torch.manual_seed(0)
    model = _Tuple()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw, plain = _run_raw(model, 9, lambda: torch.randn(8, 16), lambda out: out[0].pow(2).mean() + out[1].mean(), opt)
    assert gw.step_count == 9
    assert_history_matches_plain(gw, plain, 9)
    from gradwatch import anatomy

    anat = anatomy.anatomy(model)
    assert not anat.traced and "could not trace" in anat.fx_note


@pytest.mark.parametrize("make", [_Frozen, _Tied, _Tuple])
def test_bad_input_advice_runs(make):
    """Every remedy the advisor gives these models has a snippet that runs on a copy."""
    from gradwatch import Diagnosis, Severity

    torch.manual_seed(0)
    model = make()
    gw = gradwatch.watch(model, autoload=False, report=False, strict=True)
    evidence = {
        "ratio": 1e-6,
        "decay_per_layer": 0.3,
        "depth": 3,
        "signal": "backprop",
        "total_norm": 1e4,
        "z_score": 8.0,
        "onset": 0,
        "growth_per_step": 2.0,
        "norm_quantiles": {"p50": 1.0, "p90": 2.0, "p99": 3.0},
        "update_ratio": 0.5,
        "loss_diverging": True,
    }
    names = [n for n, _ in model.named_modules() if n]
    x = torch.randint(0, 50, (4, 12)) if make is _Tied else torch.randn(8, 16)
    ran = {}
    for kind in ("vanishing", "exploding", "saturation", "dead_units", "init_scale"):
        d = Diagnosis(kind=kind, severity=Severity.WARNING, step=0, layers=tuple(names[:2]), message=kind, evidence=evidence)
        for remedy in gw.advise(d):
            ran.setdefault(kind, []).append(remedy.kind)
            clone = copy.deepcopy(model)
            ns = {
                "model": clone,
                "torch": torch,
                "nn": nn,
                "optimizer": torch.optim.SGD([p for p in clone.parameters() if p.requires_grad], lr=0.1),
            }
            exec(remedy.snippet, ns)
            out = ns["model"](x)
            first = out["logits"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out
            first.float().pow(2).mean().backward()
    gw.detach()
    # Exploding gets clipping from the detector's quantiles (no run measured yet) and a
    # lower learning rate (the evidence says the loss diverges), whatever the model.
    assert {"clipping", "lower_lr"} <= set(ran["exploding"]), ran
