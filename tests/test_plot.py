"""The gradient-flow picture (issue 14): labels cover no data, markers only on the layers a diagnosis names."""

from __future__ import annotations

import json
import math

import pytest

from gradwatch import Diagnosis, Severity
from gradwatch.logfile import diagnosis_record, encode, read_log

pytest.importorskip("matplotlib")

LAYERS = [f"net.{i}" for i in range(10)]


def _log(tmp_path, diagnoses):
    """A run log of 30 statistics steps over 10 layers, written record by record."""
    steps = list(range(30))
    norms = [[10.0 ** (-i / 2) * (1 + 0.1 * math.sin(s + i)) for i in range(len(LAYERS))] for s in steps]
    header = {"type": "header", "schema": 1, "layers": [{"name": n, "type": "Linear", "numel": 4} for n in LAYERS], "config": {}}
    interval = {
        "type": "interval", "first_step": 0, "last_step": 29, "final": True, "steps": steps,
        "total_norm": [math.sqrt(sum(v * v for v in row)) for row in norms], "grad_norm": norms,
        "summary": [{"name": n, "type": "Linear", "grad_norm": 1.0, "grad_rms": 1.0, "update_ratio": None,
                     "nonfinite": 0, "status": "ok"} for n in LAYERS],
    }  # fmt: skip
    path = tmp_path / "run.jsonl"
    records = [header, interval, *(diagnosis_record(d, at=29) for d in diagnoses)]
    path.write_text("".join(encode(r) for r in records))
    return read_log(path)


def _diag(kind, step, layers):
    return Diagnosis(kind=kind, severity=Severity.WARNING, step=step, layers=tuple(layers), message="m")


def test_labels_cover_no_data_and_markers_sit_on_the_named_layers_only(tmp_path):
    from gradwatch.plot import draw_run

    diagnoses = [
        _diag("vanishing", 28, LAYERS[7:9]),  # late in the run, on the last layers: where the old label sat
        _diag("exploding", 28, LAYERS),  # the whole model: no per-layer marker
        _diag("dead_units", 29, LAYERS[9:]),
        _diag("saturation", 2, LAYERS[:1]),
    ]
    log = _log(tmp_path, diagnoses)
    fig = draw_run(log, dpi=50)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        top, bottom = fig.axes[0], fig.axes[1]
        data = [ax.get_window_extent(renderer) for ax in (top, bottom)]
        labels = [t for t in top.texts if t.get_gid() == "diagnosis-label"]
        assert sorted(t.get_text() for t in labels) == ["dead_units", "saturation", "vanishing, exploding"]
        boxes = [t.get_window_extent(renderer) for t in labels]
        for box in boxes:
            assert not any(box.overlaps(area) for area in data), "a label covers the heatmap or the timeline"
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]), "labels overlap each other"
        legend = fig.legends[0].get_window_extent(renderer)
        assert not any(legend.overlaps(area) for area in data), "the legend covers data"

        marks = {c.get_gid(): c.get_offsets() for c in top.collections if (c.get_gid() or "").startswith("diagnosis-markers")}
        assert sorted(marks) == ["diagnosis-markers-0", "diagnosis-markers-2", "diagnosis-markers-3"]  # none for exploding
        assert sorted(marks["diagnosis-markers-0"][:, 1].tolist()) == [7.0, 8.0]
        assert marks["diagnosis-markers-2"][:, 1].tolist() == [9.0]
        assert marks["diagnosis-markers-3"][:, 1].tolist() == [0.0]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_plot_run_writes_the_figure(tmp_path):
    from gradwatch.plot import plot_run

    log = _log(tmp_path, [_diag("vanishing", 3, LAYERS[:2])])
    out = plot_run(log, tmp_path / "flow.svg", dpi=40)
    assert out == str(tmp_path / "flow.svg") and (tmp_path / "flow.svg").read_text().startswith("<?xml")
    assert json.loads((tmp_path / "run.jsonl").read_text().splitlines()[0])["type"] == "header"
