"""The flow rows: means of a report's interval, statuses from diagnoses, collapsing alike rows."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import gradwatch
from gradwatch import Diagnosis, Severity
from gradwatch.flow import FlowRow, collapse, flow_rows, statuses
from gradwatch.testing import ReportCatcher, TinyModel, regression_batches, train


def _rows(names_and_status, norm=1.0):
    return [FlowRow(name=n, type_name="Linear", grad_norm=norm * (k + 1), grad_rms=0.1, update_ratio=math.nan,
                    nonfinite=0, status=s) for k, (n, s) in enumerate(names_and_status)]  # fmt: skip


def test_collapse_repeated_blocks():
    rows = _rows([(f"blocks.{i}.{part}", "ok") for i in range(30) for part in ("fc1", "fc2")])
    out = collapse(rows, max_rows=40)
    assert [r.name for r in out] == [
        "blocks.0.fc1",
        "blocks.0.fc2",
        "blocks.1–28.fc1",
        "blocks.1–28.fc2",
        "blocks.29.fc1",
        "blocks.29.fc2",
    ]
    assert out[2].count == 28 and out[2].grad_norm == statistics.median(r.grad_norm for r in rows[2:58:2])
    assert collapse(rows, max_rows=60) == rows  # short enough: nothing collapses


def test_collapse_never_merges_across_a_status_change():
    rows = _rows([(f"layers.{i}", "vanishing" if i < 10 else "ok") for i in range(50)])
    out = [r.name for r in collapse(rows, max_rows=40, dash="-")]
    assert out == ["layers.0", "layers.1-8", "layers.9", "layers.10", "layers.11-48", "layers.49"]


def _diagnosis(kind: str, *layers: str) -> Diagnosis:
    return Diagnosis(kind=kind, severity=Severity.WARNING, step=0, layers=layers, message="m")


def test_statuses_worst_wins_and_names_map_to_layers():
    names = ["embed", "blocks.0.fc", "blocks.1.fc", "head"]
    modules = ["", "embed", "blocks", "blocks.0", "blocks.0.fc", "blocks.0.act", "blocks.1", "blocks.1.fc", "head"]
    diagnoses = [
        _diagnosis("vanishing", "blocks"),  # a container: every layer inside it
        _diagnosis("dead_units", "blocks.0.act"),  # an activation: the layer that runs before it
        _diagnosis("nonfinite", "blocks.1.fc"),  # worse than vanishing
        _diagnosis("my_plugin_kind", "head"),  # a plugin's own kind shows its own name
        _diagnosis("exploding", "not_a_module"),  # names nothing in the table
    ]
    assert statuses(names, diagnoses, modules) == ["ok", "vanishing", "non-finite", "my_plugin_kind"]
    assert statuses(names, [_diagnosis("saturation", "")], modules) == ["saturated"] * 4  # the root: every layer


def test_flow_row_dict_round_trip_keeps_nan_and_inf():
    row = FlowRow(name="a", type_name="Linear", grad_norm=math.inf, grad_rms=0.25, update_ratio=math.nan, nonfinite=3,
                  status="non-finite")  # fmt: skip
    d = row.to_dict()
    assert d == {"name": "a", "type": "Linear", "grad_norm": "inf", "grad_rms": 0.25, "update_ratio": None, "nonfinite": 3,
                 "status": "non-finite"}  # fmt: skip
    back = FlowRow.from_dict(d)
    assert back.grad_norm == math.inf and math.isnan(back.update_ratio) and back.nonfinite == 3 and back.status == "non-finite"


def test_final_report_with_an_empty_window_shows_the_last_interval():
    torch.manual_seed(0)
    model, catch = TinyModel(), ReportCatcher()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(
        model, opt, stats_every=1, sample_every=1, report_every=5, plugins=[catch], report=False, autoload=False
    ):
        train(model, 10, batches=regression_batches(d_in=8, d_out=2, batch=16), optimizer=opt)
    *_, last_interval, final = catch.reports
    assert final.final and len(final.window) == 0 and last_interval.window.last_step == 9
    rows, expected = flow_rows(final, 5), flow_rows(last_interval, 5)
    assert [r.name for r in rows] == ["linear1", "linear2"]
    for row, want in zip(rows, expected):
        assert row.grad_norm == pytest.approx(want.grad_norm, rel=1e-6) and row.grad_rms == pytest.approx(want.grad_rms, rel=1e-6)
        assert row.update_ratio == pytest.approx(want.update_ratio, rel=1e-6)
    # The interval's own mean, over its five statistics steps.
    norms = last_interval.window.grad_norm[:, 0]
    assert rows[0].grad_norm == pytest.approx(float(norms.mean()), rel=1e-6)
