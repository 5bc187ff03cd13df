"""Remedy trials (issue 15): each remedy measured on a copy of the model, ranked.

The diagnoses come from ``gradwatch.watch`` with default options over a short run, as a
user gets them; each number a trial reports is checked against a plain-torch computation
on a copy of the same model; the live model, optimizer, hooks and RNG are compared bit
for bit before and after.
"""

from __future__ import annotations

import copy
import gc
import io
import itertools
import json
import random
import statistics
import weakref

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch import GradWatchError, Remedy
from gradwatch.testing import high_lr_mlp, regression_batches, relu_mlp, sequence_batches, sigmoid_mlp, train, vanilla_rnn
from gradwatch.trial import HELPS, HURTS, NOT_APPLIED, Trials

mse = nn.functional.mse_loss


def watched(model, steps, *, batches=None, optimizer=None, **options):
    """Train under ``gradwatch.watch`` with default options (reports at the end of the block)."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, optimizer, console=Console(file=io.StringIO()), **options) as gw:
        train(model, steps, batches=batches, optimizer=optimizer)
    return gw, optimizer


def grad_norm(module):
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in module.parameters(recurse=False)])
    )


def plain_run(model, optimizer_class, hyper, batches, steps, ratio, *, seed=0, apply=None):
    """What a trial does to one copy, written out in plain torch: the ratio and loss per step."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    if apply is not None:
        model = apply(model)
    opt = optimizer_class(model.parameters(), **hyper)
    torch.manual_seed(seed)
    ratios, losses = [], []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = mse(model(x), y)
        loss.backward()
        ratios.append(float(ratio(model)))
        losses.append(float(loss.detach()))
        opt.step()
    return ratios, losses


def tail(values, steps=20):
    return values[-max(1, steps // 4) :]


# ---------------------------------------------------------------------- the scenarios


def test_sigmoid_mlp_relu_normalization_residual_raise_the_ratio_and_rank_above_reinit():
    model = sigmoid_mlp(depth=20)
    gw, opt = watched(model, 40, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3))
    assert {"relu", "normalization", "residual", "reinit"} <= {r.kind for d in gw.diagnoses for r in d.remedies}
    batches = list(itertools.islice(regression_batches(seed=1), 20))
    trials = gw.trial(mse, batches)
    base = trials.baseline
    ranks = {t.name: i for i, t in enumerate(trials)}
    for kind in ("relu", "normalization", "residual"):
        (t,) = trials.of_kind(kind)
        assert t.verdict == HELPS and t.metric == "grad_ratio", t.reason
        # Orders of magnitude over the untouched copy, which stays vanished.
        assert t.value("after") > 1e3 * base.value("after", "grad_ratio")
        assert t.flow_effect >= 3
        assert all(ranks[kind] < ranks[r.name] for r in trials.of_kind("reinit"))
    assert base.value("after", "grad_ratio") < 1e-10

    # The untouched copy is the live model as it is: the same numbers in plain torch.
    hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    ratios, losses = plain_run(model, torch.optim.Adam, hyper, batches, 20, lambda m: grad_norm(m[0]) / grad_norm(m[-1]))
    assert base.before.grad_ratio == pytest.approx(ratios[0], rel=1e-5)
    assert base.after.grad_ratio == pytest.approx(statistics.median(tail(ratios)), rel=1e-5)
    assert base.after.loss == pytest.approx(statistics.fmean(tail(losses)), rel=1e-5)
    assert list(base.losses) == pytest.approx(losses, rel=1e-5)

    # The relu copy: the remedy applied under the same seed, then the same training.
    (relu,) = trials.of_kind("relu")
    ratios, losses = plain_run(
        model, torch.optim.Adam, hyper, batches, 20, lambda m: grad_norm(m[0]) / grad_norm(m[-1]), apply=relu.remedy.apply
    )
    assert relu.before.grad_ratio == pytest.approx(ratios[0], rel=1e-5)
    assert relu.after.grad_ratio == pytest.approx(statistics.median(tail(ratios)), rel=1e-5)
    assert relu.after.loss == pytest.approx(statistics.fmean(tail(losses)), rel=1e-5)


def test_a_remedy_that_restores_the_flow_but_diverges_is_judged_on_its_loss():
    # Plain SGD at lr 0.01: x + sigmoid(Wx) adds a positive mean in each of 18 blocks, the output
    # grows, and the residual copy's own loss climbs while its gradient ratio is near 1.
    model = sigmoid_mlp(depth=20)
    gw, _ = watched(model, 40)
    trials = gw.trial(mse, regression_batches(seed=1))
    (residual,) = trials.of_kind("residual")
    assert residual.flow_effect >= 10 and residual.verdict == HURTS
    assert residual.after.loss > residual.before.loss and "diverges" in residual.reason
    (relu,) = trials.of_kind("relu")
    assert relu.verdict == HELPS and trials.trials.index(relu) < trials.trials.index(residual)


def test_lecun_relu_mlp_reinit_restores_the_backprop_signal():
    model = relu_mlp(depth=30, init="lecun")
    gw, _ = watched(model, 40)
    batches = list(itertools.islice(regression_batches(seed=1), 20))
    trials = gw.trial(mse, batches)
    # init_scale and vanishing each give a Kaiming re-init (their quoted stds differ: at
    # attach, and now); each one is tried, and each restores the signal.
    found = trials.of_kind("reinit")
    assert found and all("Kaiming" in r.remedy.title and r.verdict == HELPS for r in found)
    reinit = found[0]
    assert reinit.metric == "signal_ratio"
    assert 0.1 < reinit.value("after") < 10
    assert trials.baseline.value("after", "signal_ratio") < 1e-3

    # The backprop signal in plain torch: the gradient reaching the first and last Linear outputs.
    twin = copy.deepcopy(model)
    torch.manual_seed(0)
    twin = reinit.remedy.apply(twin)
    outs = {}

    def keep_grad(key):
        def hook(module, args, out):
            out.register_hook(lambda g: outs.__setitem__(key, g.norm()))

        return hook

    for key, layer in (("first", twin[0]), ("last", twin[-1])):
        layer.register_forward_hook(keep_grad(key))
    x, y = batches[0]
    mse(twin(x), y).backward()
    assert reinit.before.signal_ratio == pytest.approx(float(outs["first"] / outs["last"]), rel=1e-5)


def test_healthy_network_gets_no_trial_of_anything():
    model = relu_mlp(depth=30, init="kaiming")
    gw, _ = watched(model, 40)
    assert not [d for d in gw.diagnoses if d.severity.value in ("warning", "error")]
    trials = gw.trial(mse)  # no batches needed when there is nothing to try
    assert len(trials) == 0 and trials.baseline is None and trials.best is None
    assert "nothing to try" in trials.note
    console = Console(file=io.StringIO(), width=100)
    trials.print(console)
    assert "nothing to try" in console.file.getvalue()


def test_vanilla_rnn_lstm_with_forget_bias_raises_the_time_ratio_and_without_it_is_worse():
    model = vanilla_rnn(radius=0.5)
    gw, _ = watched(model, 20, batches=sequence_batches(seq_len=100, batch=16))
    batches = list(itertools.islice(sequence_batches(seq_len=100, batch=16, seed=1), 20))
    trials = gw.trial(mse, batches)
    with_bias, without = (next(t for t in trials.of_kind("lstm_gru") if t.variant == v) for v in ("", "no gate bias"))
    assert with_bias.metric == without.metric == "time_ratio"
    assert with_bias.verdict == HELPS
    assert with_bias.value("after") > 1e-3 > 1e3 * without.value("after")
    assert trials.trials.index(with_bias) < trials.trials.index(without)
    # The new cell really is an LSTM with the forget slice at the advised bias, and without it at PyTorch's.
    base_ratio = trials.baseline.value("after", "time_ratio")
    assert base_ratio < 1e-20

    # The time-gradient ratio in plain torch, at the input of the recurrent module.
    torch.manual_seed(0)
    twin = with_bias.remedy.apply(copy.deepcopy(model))
    assert isinstance(twin.rnn, nn.LSTM)
    x, y = batches[0]
    x = x.clone().requires_grad_(True)
    mse(twin(x), y).backward()
    per_step = x.grad.movedim(1, 0).flatten(1).norm(dim=1)
    assert with_bias.before.time_ratio == pytest.approx(float(per_step[0] / per_step[-1]), rel=1e-5)


def test_far_too_high_learning_rate_lower_lr_and_clipping_stay_finite():
    model = high_lr_mlp()
    start = copy.deepcopy(model.state_dict())
    gw, _ = watched(model, 40, optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    assert "nonfinite" in {d.kind for d in gw.diagnoses}
    # A trial starts from the current weights: NaN ones are refused with a message ...
    refused = gw.trial(mse, regression_batches(seed=1))
    assert len(refused) == 0 and "non-finite" in refused.note and "checkpoint" in refused.note
    # ... so the user restores the weights from before the fault (a checkpoint) and tries.
    model.load_state_dict(start)
    trials = gw.trial(mse, regression_batches(seed=1))
    assert trials.baseline.nonfinite_step is not None
    for kind in ("lower_lr", "clipping"):
        assert trials.of_kind(kind), kind
        for t in trials.of_kind(kind):  # one per diagnosis that suggests it (exploding, nonfinite)
            assert t.nonfinite_step is None and t.after.finite and t.verdict == HELPS, t.reason
            assert all(map(lambda v: v == v and abs(v) < float("inf"), t.losses))
    lower = trials.of_kind("lower_lr")[0]
    factor = lower.remedy.params["lr_factor"]
    # The lower learning rate in plain torch: the same copy, SGD at lr 0.5 * factor.
    batches = list(itertools.islice(regression_batches(seed=1), 20))
    total = lambda m: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()]))  # noqa: E731
    norms, losses = plain_run(model, torch.optim.SGD, {"lr": 0.5 * factor}, batches, 20, total)
    assert list(lower.losses) == pytest.approx(losses, rel=1e-5)
    assert lower.growth == pytest.approx(max(norms) / norms[0], rel=1e-5)
    assert lower.after.total_norm == pytest.approx(statistics.median(tail(norms)), rel=1e-5)


def test_dead_units_are_measured_as_plain_torch_counts_them_and_leaky_relu_revives_them():
    from gradwatch import Diagnosis, Severity
    from gradwatch.trial import run_trial

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        model[2].bias[:48] = -20.0  # 48 of the second layer's 64 units never fire
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def leaky(twin):
        for i in (1, 3):
            twin[i] = nn.LeakyReLU(0.01)
        return twin

    remedy = Remedy(kind="leaky_relu", title="Replace the ReLUs with LeakyReLU(0.01)", rationale="test", apply=leaky)
    dead = Diagnosis(kind="dead_units", severity=Severity.WARNING, step=0, layers=("3",), message="dead", remedies=(remedy,))
    batches = list(itertools.islice(regression_batches(seed=1), 5))
    trials = run_trial(model, [opt], [dead], batches, loss_fn=mse, steps=5)
    (trial,) = trials
    assert trial.metric == "dead_fraction" and trial.verdict == HELPS, trial.reason
    x, _ = batches[0]
    with torch.no_grad():
        h1 = model[1](model[0](x))
        h2 = model[3](model[2](h1))
    expected = (int((h1 == 0).all(0).sum()) + int((h2 == 0).all(0).sum())) / 128
    assert expected >= 48 / 128
    assert trials.baseline.before.dead_fraction == pytest.approx(expected)
    assert trial.before.dead_fraction is None  # no ReLU left in the copy: counted as none dead


# ---------------------------------------------------------------------- the live state, untouched


def _state(model, opt):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "opt": copy.deepcopy(opt.state_dict()),
        "hooks": [
            (name, attr, list(getattr(m, attr).items()))
            for name, m in model.named_modules()
            for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")
        ],
        "param_hooks": [list((getattr(p, "_post_accumulate_grad_hooks", None) or {}).items()) for p in model.parameters()],
        "torch_rng": torch.get_rng_state(),
        "random": random.getstate(),
        "numpy": np.random.get_state(),
    }


def _bitwise(a, b):
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_bitwise(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_bitwise(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a is b or a == b


def test_live_model_optimizer_hooks_and_rng_are_bitwise_unchanged_and_copies_freed():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Sigmoid())], nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen = {}

    def spy(twin):
        seen["copy"] = weakref.ref(twin)
        seen["hooks"] = [fn for m in twin.modules() for d in (m._forward_pre_hooks, m._forward_hooks) for fn in d.values()]
        return twin

    probe = Remedy(kind="spy", title="look at the copy", rationale="test", apply=spy)
    batches = regression_batches(seed=2)
    with gradwatch.watch(model, opt, console=Console(file=io.StringIO()), keep_batches=4) as gw:
        train(model, 12, batches=batches, optimizer=opt)
        x, y = next(batches)
        mse(model(x), y).backward()  # gradients pending, as in the middle of a step
        random.seed(5)
        np.random.seed(5)
        before = _state(model, opt)
        trials = gw.trial(mse, regression_batches(seed=1), remedies=[probe], steps=5)
        after = _state(model, opt)
        opt.step()
        opt.zero_grad()
        train(model, 4, batches=batches, optimizer=opt)  # the watch goes on
    for key in before:
        assert _bitwise(before[key], after[key]), key
    assert trials[0].verdict != NOT_APPLIED, trials[0].reason
    # The copy held none of the watcher's hooks (they become inert functions in a deep copy).
    assert not [fn for fn in seen["hooks"] if getattr(fn, "__name__", "") == "_inert"]
    gc.collect()
    assert seen["copy"]() is None
    assert gw.step_count >= 16


def test_a_remedy_that_cannot_be_applied_is_reported_never_a_crash():
    def broken(twin):
        raise ValueError("no such layer")

    model = sigmoid_mlp(depth=6)
    gw, _ = watched(model, 10)
    remedies = [
        Remedy(kind="broken", title="raises", rationale="test", apply=broken),
        Remedy(kind="words", title="only words", rationale="test", snippet="# by hand"),
        Remedy(kind="odd", title="returns a string", rationale="test", apply=lambda m: "done"),
        Remedy(kind="lower_lr", title="lower", rationale="test", params={"lr_factor": 0.1}),
    ]
    trials = gw.trial(mse, regression_batches(seed=1), remedies=remedies, steps=5)
    by_kind = {t.remedy.kind: t for t in trials}
    assert by_kind["broken"].verdict == NOT_APPLIED and "ValueError: no such layer" in by_kind["broken"].reason
    assert by_kind["words"].verdict == NOT_APPLIED and "no apply()" in by_kind["words"].reason
    assert by_kind["odd"].verdict == NOT_APPLIED and "returned str" in by_kind["odd"].reason
    assert by_kind["lower_lr"].verdict != NOT_APPLIED
    assert [t.remedy.kind for t in trials][-3:] == ["broken", "words", "odd"]  # ranked last, in order given
    console = Console(file=io.StringIO(), width=100)
    trials.print(console)
    assert "no such layer" in console.file.getvalue()


def test_remedies_by_kind_and_bad_arguments():
    model = sigmoid_mlp(depth=20)
    gw, _ = watched(model, 40)
    only = gw.trial(mse, regression_batches(seed=1), remedies=["relu"], steps=4)
    assert [t.remedy.kind for t in only] == ["relu"]
    with pytest.raises(GradWatchError, match="no diagnosis so far has a 'dropout' remedy; the remedies suggested are: "):
        gw.trial(mse, regression_batches(seed=1), remedies=["dropout"])
    with pytest.raises(GradWatchError, match="positive integer"):
        gw.trial(mse, regression_batches(seed=1), steps=0)
    with pytest.raises(GradWatchError, match="has no batches: pass trial"):
        gw.trial(mse)
    with pytest.raises(GradWatchError, match=r"the untouched copy cannot train \(step 0 raised TypeError"):
        gw.trial(lambda out, target: out.sum() + "oops", regression_batches(seed=1))
    explicit = gradwatch.watch(sigmoid_mlp(depth=20), console=Console(file=io.StringIO()))
    explicit.detach()
    with pytest.raises(GradWatchError, match="pass trial\\(optimizer=your_optimizer\\)"):
        explicit.trial(
            mse, regression_batches(seed=1), remedies=[Remedy(kind="x", title="x", rationale="x", params={"lr_factor": 0.5})]
        )


# ---------------------------------------------------------------------- kept batches


def test_keep_batches_keeps_references_to_the_last_forward_calls_and_detach_removes_the_hook():
    model = sigmoid_mlp(depth=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hooks_before = len(model._forward_pre_hooks)
    inputs = []
    with gradwatch.watch(model, opt, console=Console(file=io.StringIO()), keep_batches=3) as gw:
        for x, y in itertools.islice(regression_batches(), 5):
            inputs.append(x)
            mse(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            model(torch.zeros(2, 16))  # an evaluation pass is not kept
    assert len(model._forward_pre_hooks) == hooks_before
    kept = list(gw.kept.batches)
    assert len(kept) == 3
    assert [b.args[0].data_ptr() for b in kept] == [x.data_ptr() for x in inputs[-3:]]  # references, not copies
    assert all(not b.args[0].requires_grad for b in kept) and all(b.target is None for b in kept)

    with gradwatch.watch(model, opt, console=Console(file=io.StringIO()), keep_batches=2, keep_copies=True) as gw2:
        x = torch.randn(4, 16)
        model(x)
    assert gw2.kept.batches[0].args[0].data_ptr() != x.data_ptr() and torch.equal(gw2.kept.batches[0].args[0], x)

    for bad in (-1, 2.5, True):
        with pytest.raises(GradWatchError, match="keep_batches must be"):
            gradwatch.watch(model, opt, keep_batches=bad)
    with pytest.raises(GradWatchError, match="did you mean 'keep_batches'"):
        gradwatch.watch(model, opt, keep_batch=8)
    assert "keep_batches" in gradwatch.watch.__doc__


def test_kept_batches_without_targets_ask_for_batches_and_a_model_with_its_own_loss_needs_none():
    model = sigmoid_mlp(depth=20)
    gw, _ = watched(model, 40, keep_batches=8)
    assert len(gw.kept) == 8
    with pytest.raises(GradWatchError, match=r"pass batches= \(inputs, targets\) pairs|carries no loss of its own"):
        gw.trial(mse)

    class SelfScoring(nn.Module):
        """Computes its own loss from (x, y), as models that take their targets do."""

        def __init__(self) -> None:
            super().__init__()
            self.net = sigmoid_mlp(depth=20)

        def forward(self, x, y):
            return mse(self.net(x), y)

    scored = SelfScoring()
    opt = torch.optim.Adam(scored.parameters(), lr=1e-3)
    with gradwatch.watch(scored, opt, console=Console(file=io.StringIO()), keep_batches=4) as gw:
        for x, y in itertools.islice(regression_batches(), 40):
            scored(x, y).backward()
            opt.step()
            opt.zero_grad()
    assert all(b.target is not None for b in gw.kept.batches)
    trials = gw.trial(remedies=["relu"])  # the model's own loss on the 4 kept (x, y) calls
    assert trials.source == "4 kept batches" and trials.batches == 4
    assert trials[0].verdict == HELPS
    first = gw.kept.batches[0]
    assert trials.baseline.before.loss == pytest.approx(float(copy.deepcopy(scored)(*first.args).detach()), rel=1e-6)


def test_hugging_face_model_uses_its_own_loss_on_kept_batches_with_labels():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, opt, console=Console(file=io.StringIO()), keep_batches=3) as gw:
        for _ in range(6):
            ids = torch.randint(0, 64, (4, 16), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    lower = Remedy(kind="lower_lr", title="Lower the learning rate by ×10", rationale="test", params={"lr_factor": 0.1})
    trials = gw.trial(remedies=[lower], steps=3)
    assert trials[0].verdict != NOT_APPLIED, trials[0].reason
    kept = gw.kept.batches[0]
    assert "labels" in kept.kwargs
    twin = copy.deepcopy(model).train()
    torch.manual_seed(0)
    assert trials.baseline.before.loss == pytest.approx(float(twin(**kept.kwargs).loss.detach()), rel=1e-5)


# ---------------------------------------------------------------------- output


def test_table_and_run_log_record_show_the_measured_numbers(tmp_path):
    path = tmp_path / "run.jsonl"
    model = sigmoid_mlp(depth=20)
    gw, _ = watched(model, 40, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), log=str(path))
    trials = gw.trial(mse, regression_batches(seed=1), remedies=["relu", "reinit"])
    assert isinstance(trials, Trials)
    console = Console(file=io.StringIO(), width=100)
    trials.print(console)
    text = console.file.getvalue()
    from gradwatch.trial import fmt

    relu = trials.of_kind("relu")[0]
    assert f"{fmt(relu.before.grad_ratio)} -> {fmt(relu.after.grad_ratio)}" in text
    assert fmt(trials.baseline.after.grad_ratio) in text
    assert f"{fmt(relu.before.loss)} -> {fmt(relu.after.loss)}" in text
    assert "1. relu (for vanishing): Replace" in text and "untouched" in text and "baseline" in text
    assert max(len(line) for line in text.splitlines()) <= 100

    # Appended after the end record of the closed log; the reader skips it.
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["type"] for r in records][-2:] == ["end", "trial"]
    record = {k: v for k, v in records[-1].items() if k not in ("type", "at")}
    assert record == json.loads(json.dumps(trials.to_dict()))
    assert records[-1]["trials"][0]["name"] == trials[0].name
    from gradwatch.logfile import read_log

    assert read_log(path).end is not None


# ---------------------------------------------------------------------- Lightning


def test_lightning_trial_true_in_a_real_trainer(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from torch.utils.data import DataLoader, TensorDataset

    class Sigmoid(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = sigmoid_mlp(depth=20)
            self.steps_run = 0

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            self.steps_run += 1
            x, y = batch
            loss = mse(self(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class Snapshot(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            self.params = [p.detach().clone() for p in pl_module.parameters()]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 16, generator=g)
    data = DataLoader(TensorDataset(x, x @ torch.randn(16, 1, generator=g) / 4), batch_size=8)
    module = Sigmoid()
    console = Console(file=io.StringIO(), width=100)
    callback = gradwatch.GradWatch(trial=True, console=console)
    snapshot = Snapshot()
    trainer = pl.Trainer(
        max_steps=40, callbacks=[snapshot, callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    trials = callback.trials
    assert trials is not None and trials.source == "8 kept batches"
    assert module.steps_run == 40  # the copies ran their own training_step, not the live module's
    (relu,) = trials.of_kind("relu")
    assert relu.verdict == HELPS and relu.flow_effect >= 3
    assert all(torch.equal(a, b) for a, b in zip(snapshot.params, module.parameters()))
    text = console.file.getvalue()
    assert "gradwatch trial" in text and "relu" in text
    with pytest.raises(GradWatchError, match="trial takes True or False"):
        gradwatch.GradWatch(trial="yes")


DDP_SCRIPT = """
import json, sys
from pathlib import Path
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import gradwatch
from gradwatch.testing import sigmoid_mlp


class Sigmoid(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = sigmoid_mlp(depth=20)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Dump(pl.Callback):
    def teardown(self, trainer, pl_module, stage):
        gw = next(c for c in trainer.callbacks if isinstance(c, gradwatch.GradWatch))
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "trials": None if gw.trials is None else [t.name for t in gw.trials],
            "relu": None if gw.trials is None else gw.trials.of_kind("relu")[0].verdict,
            "params": [p.detach().flatten()[:8].tolist() for p in pl_module.parameters()],
        }))


out = Path(sys.argv[1])
g = torch.Generator().manual_seed(0)
x = torch.randn(640, 16, generator=g)
data = TensorDataset(x, x @ torch.randn(16, 1, generator=g) / 4)
trainer = pl.Trainer(
    strategy="ddp", accelerator="cpu", devices=2, max_steps=40, callbacks=[gradwatch.GradWatch(trial=True), Dump()],
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
)
trainer.fit(Sigmoid(), DataLoader(data, batch_size=8, shuffle=False))
"""


@pytest.mark.slow
def test_lightning_trial_runs_on_rank_zero_only_under_ddp(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "trial_ddp.py"
    script.write_text(DDP_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["trials"] and ranks[0]["relu"] == HELPS
    assert ranks[1]["trials"] is None
    # The trial on rank zero left its live module as DDP left it: the same weights as rank one's.
    assert ranks[0]["params"] == ranks[1]["params"]
    assert run.stdout.count("gradwatch trial") == 1


@pytest.mark.requires_cuda
def test_trial_on_cuda_restores_the_device_rng_and_moves_cpu_batches():
    model = sigmoid_mlp(depth=20).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gw, _ = watched(model, 40, optimizer=opt, batches=((x.cuda(), y.cuda()) for x, y in regression_batches()))
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
    trials = gw.trial(mse, regression_batches(seed=1))  # CPU batches: moved to the model's device
    assert torch.equal(torch.get_rng_state(), cpu) and torch.equal(torch.cuda.get_rng_state(), cuda)
    assert trials.of_kind("relu")[0].verdict == HELPS
