"""Hints at the doors (issue 14): what a new user gets wrong, told in one line, and a History
that shows what it holds."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from rich.console import Console

import gradwatch
from gradwatch import GradWatchError, GradWatchWarning
from gradwatch.testing import TinyModel, regression_batches, train


def _console() -> Console:
    return Console(file=io.StringIO(), width=100, color_system=None)


def test_watch_without_optimizer_or_step_warns_once_after_a_few_forwards():
    model = TinyModel()
    with pytest.warns(GradWatchWarning, match=r"no optimizer and gw\.step\(\) was never called.*pass the optimizer") as seen:
        with gradwatch.watch(model, console=_console(), autoload=False):
            for x, y in (next(regression_batches(d_in=8, d_out=2)) for _ in range(8)):
                torch.nn.functional.mse_loss(model(x), y).backward()
    ours = [w for w in seen if issubclass(w.category, GradWatchWarning)]
    assert len(ours) == 1
    assert ours[0].filename == __file__  # points at the user's forward call, not into gradwatch or torch


@pytest.mark.parametrize("how", ["optimizer", "step", "no_backward"])
def test_no_warning_when_steps_are_seen_or_no_gradient_exists(how):
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)
        with gradwatch.watch(model, opt if how == "optimizer" else None, console=_console(), autoload=False) as gw:
            for x, y in (next(regression_batches(d_in=8, d_out=2)) for _ in range(8)):
                loss = torch.nn.functional.mse_loss(model(x), y)
                if how != "no_backward":
                    loss.backward()
                if how == "step":
                    gw.step()
                if how == "optimizer":
                    opt.step()
                    opt.zero_grad()


def test_parameters_instead_of_optimizer_say_pass_the_optimizer_itself():
    model = TinyModel()
    for wrong in (model.parameters(), list(model.parameters()), [{"params": list(model.parameters())}]):
        with pytest.raises(
            GradWatchError, match=r"got parameters .* pass the optimizer itself: gradwatch\.watch\(model, optimizer\)"
        ):
            gradwatch.watch(model, wrong, autoload=False)
    with pytest.raises(GradWatchError, match="optimizer must be a torch.optim.Optimizer"):
        gradwatch.watch(model, "sgd", autoload=False)


@pytest.mark.parametrize(
    ("typo", "meant"), [("reprot_every", "report_every"), ("consle", "console"), ("stat_every", "stats_every")]
)
def test_keyword_typos_suggest_the_name_at_watch(typo, meant):
    with pytest.raises(GradWatchError, match=rf"watch\(\) got unknown option\(s\) '{typo}' \(did you mean '{meant}'\?\)"):
        gradwatch.watch(TinyModel(), **{typo: 1})


def test_keyword_typos_suggest_the_name_at_gradwatch():
    pytest.importorskip("pytorch_lightning")
    with pytest.raises(
        GradWatchError, match=r"GradWatch\(\) got unknown option\(s\) 'log_layer' \(did you mean 'log_layers'\?\)"
    ):
        gradwatch.GradWatch(log_layer="all")
    with pytest.raises(GradWatchError, match=r"'reportevery' \(did you mean 'report_every'\?\)"):
        gradwatch.GradWatch(reportevery=3)


def test_history_repr_getitem_and_to_dict_match_the_tensors():
    torch.manual_seed(0)
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, stats_every=2, sample_every=4, report_every=8, console=_console(), autoload=False) as gw:
        train(model, 10, batches=regression_batches(d_in=8, d_out=2), optimizer=opt, watcher=gw)
    h = gw.history
    assert repr(h).startswith("History(5 steps x 2 layers, steps 0..8; layers ['linear1', 'linear2']; ")
    assert "[5, 2]" in repr(h) and "update_ratio on 3 sampled steps" in repr(h)
    assert h["grad_norm"] is h.grad_norm and h["loss"].values.tolist() == h.loss.values.tolist()
    with pytest.raises(KeyError, match="a History holds steps, grad_norm"):
        h["gradnorm"]

    d = h.to_dict()
    rows = len(h) * len(h.layers)
    assert all(len(column) == rows for column in d.values())
    assert d["step"][:4] == [0, 0, 2, 2] and d["layer"][:4] == ["linear1", "linear2", "linear1", "linear2"]
    for i in range(rows):
        s, col = divmod(i, len(h.layers))
        assert d["grad_norm"][i] == h.grad_norm[s, col].item() and d["total_norm"][i] == h.total_norm[s].item()
    sampled = dict(zip(h.update_ratio.steps.tolist(), h.update_ratio.values.tolist()))
    for i, step in enumerate(d["step"]):
        ratio = sampled.get(step)
        assert math.isnan(d["update_ratio"][i]) if ratio is None else d["update_ratio"][i] == ratio[i % 2]
    losses = dict(zip(h.loss.steps.tolist(), h.loss.values.tolist()))
    assert [d["loss"][i] for i in range(0, rows, 2)] == [losses[s] for s in h.steps.tolist()]
