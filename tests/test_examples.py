"""Every example runs, and says what it promises."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_quickstart_reports_vanishing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    module = runpy.run_path(str(EXAMPLES / "quickstart.py"))
    gw = module["main"](str(tmp_path / "run.jsonl"))
    kinds = {d.kind for d in gw.diagnoses}
    assert "vanishing" in kinds
    vanishing = next(d for d in gw.diagnoses if d.kind == "vanishing")
    assert {"relu", "normalization", "residual"} <= {r.kind for r in vanishing.remedies}
    assert (tmp_path / "run.jsonl").stat().st_size > 0


@pytest.mark.slow
def test_lightning_one_line_runs(capsys) -> None:
    runpy.run_path(str(EXAMPLES / "lightning_one_line.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "gradient flow" in out and "vanishing" in out
