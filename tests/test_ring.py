"""The device ring's memory is bounded whatever report_every says, and no row is lost (issue 12.2)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import GradWatchWarning, stats
from gradwatch.stats import CORE_STATS, StatsRing, ring_rows
from gradwatch.testing import ReportCatcher


def _train(model: nn.Module, steps: int, **options) -> gradwatch.Watcher:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)
        gw = gradwatch.watch(model, opt, report=False, autoload=False, **options)
        for _ in range(steps):
            model(torch.randn(2, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        ring = gw._ring
        gw.detach()
    gw.ring_seen = ring  # type: ignore[attr-defined]
    return gw


def test_a_huge_report_every_allocates_what_is_used() -> None:
    # report_every=10**9 once asked for 10**9 rows up front (8 TB on a large model).
    gw = _train(nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)]), 40, report_every=10**9, stats_every=1)
    ring = gw.ring_seen
    assert ring.capacity == ring_rows(8, 10**9) <= 10**9
    assert ring.core.buffer.shape[0] == 64  # 32 rows, doubled once when the 33rd came
    assert ring.nbytes < 200_000
    assert gw.history.steps.tolist() == list(range(40))


def test_a_model_of_thousands_of_layers_stays_within_the_bound() -> None:
    layers = 3000
    rows = ring_rows(layers, 100_001)
    per_row = 4 * ((len(CORE_STATS) + 2) * layers + 1)
    assert rows * per_row <= stats.RING_BYTES and rows >= stats.MIN_RING_ROWS
    ring = StatsRing(layers, 100_001, torch.device("cpu"))
    for step in range(rows):
        ring.core.write(step, torch.zeros(len(CORE_STATS), layers))
        ring.weight.write(step, torch.zeros(layers))
        ring.update.write(step, torch.zeros(layers))
        ring.total.write(step, torch.zeros(()))
    assert ring.full
    assert ring.nbytes <= stats.RING_BYTES
    window = ring.drain(layers=tuple(map(str, range(layers))), amp_skips=(), first_step=0, last_step=rows - 1, final=False)
    assert len(window) == rows


def test_a_full_ring_ends_the_interval_early_and_loses_no_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats, "RING_BYTES", 1)  # the floor: MIN_RING_ROWS rows per ring
    catcher = ReportCatcher()
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])
    gw = _train(model, 50, report_every=1000, stats_every=1, sample_every=1, plugins=[catcher])
    assert gw.ring_seen.capacity == stats.MIN_RING_ROWS == 16
    assert gw.history.steps.tolist() == list(range(50))
    assert gw.history.update_ratio.steps.tolist() == list(range(50))
    windows = [(r.window.first_step, r.window.last_step) for r in catcher.reports if not r.final]
    assert windows == [(0, 15), (16, 31), (32, 47)]  # three early drains; the rest at the end


def test_two_rows_of_one_step_never_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats, "RING_BYTES", 1)
    ring = StatsRing(2, 1000, torch.device("cpu"))
    for step in range(20):
        ring.write_extra(step, "mine.value", torch.tensor(float(step)))
        ring.write_extra(step, "mine.value", torch.tensor(float(step) + 0.5))  # twice a step: kept
    window = ring.drain(layers=("a", "b"), amp_skips=(), first_step=0, last_step=19, final=False)
    assert window.extras["mine.value"].values.reshape(-1).tolist() == [v for s in range(20) for v in (s, s + 0.5)]
