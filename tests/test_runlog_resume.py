"""A resumed run appends to its run log, and the CLI reads the whole file as one run (issue 12.5)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import GradWatchWarning
from gradwatch.cli import main as cli
from gradwatch.logfile import read_log
from gradwatch.testing import TinyModel, regression_batches


def _run(path: Path, steps: range, *, state=None, model=None, crash: bool = False, checkpoint_at: int | None = None):
    """Train ``model`` over ``steps`` (the batch stream is replayed from step 0, so a resumed
    run sees the batches the first one would have). Returns (watcher, model, checkpoint)."""
    if model is None:
        torch.manual_seed(0)
        model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = regression_batches(d_in=8, d_out=2, batch=16)
    for _ in range(steps.start):
        next(batches)
    gw = gradwatch.watch(model, opt, log=str(path), report=False, autoload=False, stats_every=1, report_every=4)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gw.load_state_dict(state["gw"])
    checkpoint = None
    for step in steps:
        if step == checkpoint_at:
            checkpoint = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "gw": gw.state_dict()})
        x, y = next(batches)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    if crash:  # the process dies: no final report, the file is simply left as it is
        gw.pm.hook.gradwatch_unconfigure(config=gw.config, ctx=gw.context())
    else:
        gw.detach()
    return gw, model, checkpoint


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_resume_after_a_crash_appends_and_reads_as_one_run(tmp_path) -> None:
    log = tmp_path / "run.jsonl"
    _, model, ckpt = _run(log, range(0, 14), crash=True, checkpoint_at=10)  # died at 14, checkpoint of step 10
    before = _lines(log)
    whole_gw, *_ = _run(tmp_path / "whole.jsonl", range(0, 20))  # the same run without a crash
    gw, *_ = _run(log, range(10, 20), state=ckpt, model=TinyModel())
    after = _lines(log)
    assert after[: len(before)] == before  # nothing logged before the resume is lost
    assert json.loads(after[len(before)]) == {**json.loads(after[len(before)]), "type": "resume", "step": 10}
    run, whole = read_log(log), read_log(tmp_path / "whole.jsonl")
    assert [r["step"] for r in run.resumes] == [10] and run.superseded > 0
    steps, norms, totals = run.steps()
    assert steps == list(range(20)) == whole.steps()[0]
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(whole.steps()[1]), rtol=1e-6, atol=0)
    assert run.end is not None and run.end["step"] == whole.end["step"] == 19
    assert [(d.kind, d.step) for d in run.diagnoses] == [(d.kind, d.step) for d in whole.diagnoses]
    assert torch.equal(gw.history.grad_norm, whole_gw.history.grad_norm)
    assert cli(["report", str(log)]) == 0
    pytest.importorskip("matplotlib")
    assert cli(["plot", str(log), "-o", str(tmp_path / "flow.png")]) == 0


def test_a_new_run_replaces_the_log(tmp_path) -> None:
    log = tmp_path / "run.jsonl"
    _run(log, range(0, 8))
    _run(log, range(0, 6))
    run = read_log(log)
    assert run.steps()[0] == list(range(6)) and not run.resumes
    assert sum(1 for line in _lines(log) if '"type":"header"' in line) == 1


def test_a_new_run_that_writes_nothing_leaves_the_old_log(tmp_path) -> None:
    log = tmp_path / "run.jsonl"
    _run(log, range(0, 8))
    text = log.read_text()
    gw = gradwatch.watch(TinyModel(), log=str(log), report=False, autoload=False)  # a bad start, no step
    gw.detach()
    assert log.read_text() == text


def test_a_line_cut_by_the_crash_is_skipped_when_the_run_resumes(tmp_path) -> None:
    log = tmp_path / "run.jsonl"
    _, _, ckpt = _run(log, range(0, 10), crash=True, checkpoint_at=8)
    with open(log, "a") as file:
        file.write('{"type":"interval","first_st')  # the record in flight when it died
    cut = len(_lines(log))
    assert cli(["report", str(log)]) == 2  # before the resume: a cut last line, the CLI says so
    _run(log, range(8, 12), state=ckpt, model=TinyModel())
    run = read_log(log)
    assert run.cut_before_resume == [cut] and run.cut_line is None
    assert run.steps()[0] == list(range(12))
    assert cli(["report", str(log)]) == 0


def test_a_resume_into_the_log_of_another_model_keeps_that_log_aside(tmp_path) -> None:
    log = tmp_path / "run.jsonl"
    _run(log, range(0, 8), model=nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)))
    other = log.read_text()
    _, _, ckpt = _run(tmp_path / "mine.jsonl", range(0, 8), checkpoint_at=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(log, range(4, 8), state=ckpt, model=TinyModel())
    assert any("holds a run of other layers" in str(w.message) and issubclass(w.category, GradWatchWarning) for w in caught)
    assert (tmp_path / "run.jsonl.1").read_text() == other
    run = read_log(log)
    assert run.layers == ["linear1", "linear2"] and run.steps()[0] == [4, 5, 6, 7] and not run.resumes


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_resume_from_a_checkpoint_appends_to_the_log(tmp_path) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = TinyModel()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 2, generator=g)), batch_size=8)
    log = tmp_path / "run.jsonl"

    def fit(max_steps: int, ckpt_path=None):
        trainer = pl.Trainer(
            max_steps=max_steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[
                gradwatch.GradWatch(log=str(log), report=False, stats_every=1, report_every=4),
                ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1),
            ],
        )
        trainer.fit(Regressor(), data, ckpt_path=ckpt_path)

    fit(6)  # checkpoints at steps 4; its log goes on to step 5
    fit(10, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    run = read_log(log)
    assert [r["step"] for r in run.resumes] == [4]
    assert run.steps()[0] == list(range(10)) and run.end["step"] == 9
    assert cli(["report", str(log)]) == 0
