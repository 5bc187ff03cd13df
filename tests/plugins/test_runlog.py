"""The JSONL run log: records of real runs against plain torch, events, flushing, reading back."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console

import gradwatch
from gradwatch import Action, Diagnosis, GradWatchError, Remedy, Severity
from gradwatch.flow import flow_rows
from gradwatch.logfile import SCHEMA_VERSION, read_log
from gradwatch.testing import ReportCatcher, TinyModel, nan_model, regression_batches, train


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=100, color_system=None)


def _records(path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _holds_open(path) -> bool | None:
    """Whether this process holds a file descriptor on ``path``; ``None`` where there is no ``/proc/self/fd``."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        return None
    target = os.path.realpath(path)
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) == target:
                return True
        except OSError:  # the descriptor iterdir itself used, closed since
            continue
    return False


def test_interval_records_match_plain_torch(tmp_path):
    torch.manual_seed(0)
    model = TinyModel()
    reference = TinyModel()
    reference.load_state_dict(model.state_dict())
    # Plain torch: per-step per-layer norms and the global norm, on a copy trained identically.
    batches = regression_batches(d_in=8, d_out=2, batch=16)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    layer_norms, totals = [], []
    for _ in range(12):
        x, y = next(batches)
        torch.nn.functional.mse_loss(reference(x), y).backward()
        layer_norms.append(
            [torch.cat([p.grad.flatten() for p in m.parameters()]).norm().item() for m in (reference.linear1, reference.linear2)]
        )
        totals.append(torch.cat([p.grad.flatten() for p in reference.parameters()]).norm().item())
        opt.step()
        opt.zero_grad()

    log, catch = tmp_path / "run.jsonl", ReportCatcher()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(
        model, opt, stats_every=1, sample_every=1, report_every=5, log=log, console=_quiet(), plugins=[catch], autoload=False
    ):
        train(model, 12, batches=regression_batches(d_in=8, d_out=2, batch=16), optimizer=opt)

    records = _records(log)
    header, *rest = records
    assert header["type"] == "header" and header["schema"] == SCHEMA_VERSION
    assert [layer["name"] for layer in header["layers"]] == ["linear1", "linear2"]
    assert [layer["numel"] for layer in header["layers"]] == [8 * 16 + 16, 16 * 2 + 2]
    assert header["config"] == {"report_every": 5, "stats_every": 1, "sample_every": 1, "clip": None, "on_nonfinite": None}
    intervals = [r for r in rest if r["type"] == "interval"]
    assert [(r["first_step"], r["last_step"], r["final"]) for r in intervals] == [(0, 4, False), (5, 9, False), (10, 11, True)]
    steps = [s for r in intervals for s in r["steps"]]
    assert steps == list(range(12))
    norms = [row for r in intervals for row in r["grad_norm"]]
    assert [v for row in norms for v in row] == pytest.approx([v for row in layer_norms for v in row], rel=1e-5)
    assert [t for r in intervals for t in r["total_norm"]] == pytest.approx(totals, rel=1e-5)
    # The summary is the console's table of the same report.
    for record, report in zip(intervals, catch.reports):
        assert record["summary"] == [row.to_dict() for row in flow_rows(report, 5)]
    assert intervals[0]["summary"][0]["grad_norm"] == pytest.approx(sum(n[0] for n in layer_norms[:5]) / 5, rel=1e-5)
    assert rest[-1]["type"] == "end" and rest[-1]["step"] == 11 and rest[-1]["summary"] == intervals[-1]["summary"]


class Events:
    """A diagnosis and two actions in the first interval."""

    gradwatch_name = "events"
    diagnosis = Diagnosis(
        kind="exploding", severity=Severity.ERROR, step=2, layers=("linear2",), message="boom",
        evidence={"total_norm": 12.5, "z_score": float("inf"), "norm_quantiles": {"p50": 1.0}}, source="events",
    )  # fmt: skip

    @gradwatch.hookimpl
    def gradwatch_diagnose(self, window):
        return [self.diagnosis] if window.first_step == 0 else None

    @gradwatch.hookimpl
    def gradwatch_read_actions(self, window):
        if window.first_step:
            return None
        return [Action(kind="clip", step=1, evidence={"norm": 3.0, "threshold": 1.0, "coefficient": 1 / 3}, source="events"),
                Action(kind="skip", step=3, source="events")]  # fmt: skip

    @gradwatch.hookimpl
    def gradwatch_advise(self):
        return [Remedy(kind="clipping", title="Clip at 1.0", rationale="norm 12.5", snippet="clip=1.0")]


def test_event_records_round_trip(tmp_path, tiny_model):
    log = tmp_path / "run.jsonl"
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.01)
    with gradwatch.watch(
        tiny_model, opt, report_every=4, log=log, console=_quiet(), plugins=[Events()], autoload=False, disable=_detectors()
    ):
        train(tiny_model, 6, batches=regression_batches(d_in=8, d_out=2), optimizer=opt)
    records = _records(log)
    kinds = [r["type"] for r in records]
    assert kinds.count("diagnosis") == 1 and kinds.count("action") == 2
    clip = next(r for r in records if r["type"] == "action")
    assert clip == {
        "type": "action",
        "kind": "clip",
        "step": 1,
        "evidence": {"norm": 3.0, "threshold": 1.0, "coefficient": 1 / 3},
        "source": "events",
    }
    diag = next(r for r in records if r["type"] == "diagnosis")
    assert diag["step"] == 2 and diag["at"] == 3 and diag["diagnosis"]["evidence"]["z_score"] == "inf"

    read = read_log(log)
    (d,) = read.diagnoses
    e = Events.diagnosis
    assert (d.kind, d.severity, d.step, d.layers, d.message, d.source) == (
        e.kind,
        e.severity,
        e.step,
        e.layers,
        e.message,
        e.source,
    )
    assert d.evidence == {"total_norm": 12.5, "z_score": "inf", "norm_quantiles": {"p50": 1.0}}
    assert read.diagnoses[0].remedies[0].title == "Clip at 1.0"
    assert [(a.kind, a.step) for a in read.actions] == [("clip", 1), ("skip", 3)]
    assert read.end is not None and read.end["diagnoses"] == 1 and read.end["actions"] == 2


def _detectors() -> list[str]:
    from gradwatch.manager import BUILTIN_PLUGINS

    return [name for name in BUILTIN_PLUGINS if name not in ("console", "runlog")]


def test_nonfinite_records_and_nan_as_null(tmp_path):
    model = nan_model(at=3)
    log = tmp_path / "run.jsonl"
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, stats_every=1, log=log, console=_quiet(), autoload=False, disable=_detectors()):
        train(model, 5, optimizer=opt)
    records = _records(log)
    bad = [r for r in records if r["type"] == "nonfinite"]
    names = [layer["name"] for layer in records[0]["layers"]]
    assert [r["step"] for r in bad] == [3, 4]  # SGD applies the NaN gradients: step 4's weights are NaN too
    assert bad[0]["layers"] == names  # a NaN loss poisons every gradient
    interval = next(r for r in records if r["type"] == "interval")
    assert all(v is None for v in interval["grad_norm"][3]) and interval["total_norm"][3] is None
    steps, norms, totals = read_log(log).steps()
    assert math.isnan(norms[3][0]) and math.isnan(totals[3]) and math.isfinite(norms[2][0])
    assert (
        interval["summary"][0]["status"] == "non-finite" and interval["summary"][0]["nonfinite"] == 4
    )  # weight and bias, two steps


def test_flushed_on_every_write_and_closed_at_detach(tmp_path, tiny_model):
    log = tmp_path / "run.jsonl"
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.01)
    gw = gradwatch.watch(tiny_model, opt, report_every=2, log=log, console=_quiet(), autoload=False)
    assert log.exists() and log.read_text() == ""  # opened when configured: a bad path fails early
    train(tiny_model, 3, batches=regression_batches(d_in=8, d_out=2), optimizer=opt)
    # Still attached: the first interval is on disk already, whole.
    assert [r["type"] for r in _records(log)][:2] == ["header", "interval"]
    if _holds_open(log) is None:
        pytest.skip("needs /proc/self/fd to see which files this process holds open")
    assert _holds_open(log)
    gw.detach()
    assert not _holds_open(log)  # closed at detach: no file descriptor left behind
    assert _records(log)[-1]["type"] == "end"


def test_rank_zero_only(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log = tmp_path / "run.jsonl"
    with gradwatch.watch(tiny_model, log=log, console=_quiet(), autoload=False) as gw:
        torch.nn.functional.mse_loss(tiny_model(torch.randn(4, 8)), torch.randn(4, 2)).backward()
        gw.step()
    assert not log.exists()


def test_no_log_no_file(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with gradwatch.watch(tiny_model, console=_quiet(), autoload=False) as gw:
        torch.nn.functional.mse_loss(tiny_model(torch.randn(4, 8)), torch.randn(4, 2)).backward()
        gw.step()
    assert list(tmp_path.iterdir()) == []


def test_bad_path_and_options_fail_before_training(tmp_path, tiny_model):
    with pytest.raises(GradWatchError, match="cannot open the run log .*pass log= a writable file path"):
        gradwatch.watch(tiny_model, log=tmp_path / "missing" / "run.jsonl", autoload=False)
    with pytest.raises(GradWatchError, match="unknown runlog option"):
        gradwatch.watch(tiny_model, log=tmp_path / "run.jsonl", options={"runlog": {"every": 1}}, autoload=False)


def test_steps_false_keeps_summaries_only(tmp_path, tiny_model):
    log = tmp_path / "run.jsonl"
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.01)
    with gradwatch.watch(
        tiny_model, opt, report_every=4, log=log, console=_quiet(), autoload=False, options={"runlog": {"steps": False}}
    ):
        train(tiny_model, 8, batches=regression_batches(d_in=8, d_out=2), optimizer=opt)
    intervals = [r for r in _records(log) if r["type"] == "interval"]
    assert intervals and all("grad_norm" not in r for r in intervals)
    steps, norms, _ = read_log(log).steps()
    assert steps == [3, 7] and norms[0] == [row["grad_norm"] for row in intervals[0]["summary"]]


def test_lightning_door_writes_the_log(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from torch.utils.data import DataLoader, TensorDataset

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = TinyModel()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(48, 8, generator=g), torch.randn(48, 2, generator=g)), batch_size=8)
    log = tmp_path / "run.jsonl"
    callback = gradwatch.GradWatch(log=log, report_every=3, stats_every=1, autoload=False, console=_quiet())
    trainer = pl.Trainer(
        max_steps=6, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Regressor(), data)
    read = read_log(log)
    assert read.layers == ["model.linear1", "model.linear2"]
    steps, norms, totals = read.steps()
    assert steps == list(range(6)) and len(norms[0]) == 2 and all(t > 0 for t in totals)
    assert read.end is not None and read.end["step"] == 5


def _ddp_worker(rank: int, world: int, store_path: str, log: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        ddp = torch.nn.parallel.DistributedDataParallel(TinyModel())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)
        # Both ranks are given the same path, as a launcher script does: only rank zero opens it.
        with gradwatch.watch(ddp, opt, stats_every=1, report_every=3, log=log, console=_quiet(), autoload=False):
            opened = _holds_open(log)
            for _ in range(5):
                ddp(torch.randn(8, 8, generator=g)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        with open(f"{log}.rank{rank}", "w") as out:
            out.write(str(opened))
        dist.barrier()  # no rank tears the group down while another still has gloo work in flight
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_one_log_written_by_rank_zero(tmp_path):
    import torch.multiprocessing as mp

    log = tmp_path / "run.jsonl"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(log)), nprocs=2, join=True)
    records = _records(log)
    kinds = [r["type"] for r in records]
    assert kinds.count("header") == 1 and kinds.count("end") == 1 and kinds[0] == "header" and kinds[-1] == "end"
    assert [s for r in records if r["type"] == "interval" for s in r["steps"]] == [0, 1, 2, 3, 4]
    if (tmp_path / "run.jsonl.rank0").read_text() == "None":
        pytest.skip("needs /proc/self/fd to see which files a process holds open")
    assert (tmp_path / "run.jsonl.rank0").read_text() == "True"
    assert (tmp_path / "run.jsonl.rank1").read_text() == "False"  # rank one never opened (or truncated) it
