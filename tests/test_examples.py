"""Every example runs, and says what it promises."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


#: Lines the quickstart printed before issue 14 (80 columns, piped): the report of step 49
#: again in full at the end, and the same Xavier snippet twice in one report.
QUICKSTART_LINES_BEFORE = 347


def test_quickstart_reports_vanishing_in_under_a_third_of_the_lines(tmp_path, monkeypatch) -> None:
    import io

    import rich
    from rich.console import Console

    monkeypatch.chdir(tmp_path)
    out = Console(file=io.StringIO(), width=80)  # what `python examples/quickstart.py | cat` gets
    monkeypatch.setattr(rich, "_console", out)
    module = runpy.run_path(str(EXAMPLES / "quickstart.py"))
    gw = module["main"]("run.jsonl")  # as `python examples/quickstart.py` writes it, in the working directory
    kinds = {d.kind for d in gw.diagnoses}
    assert "vanishing" in kinds
    vanishing = next(d for d in gw.diagnoses if d.kind == "vanishing")
    assert {"relu", "normalization", "residual"} <= {r.kind for r in vanishing.remedies}
    assert (tmp_path / "run.jsonl").stat().st_size > 0
    text = out.file.getvalue()
    flat = " ".join(" ".join(line.strip().strip("|").split()) for line in text.splitlines())  # panel borders out
    assert len(text.splitlines()) < QUICKSTART_LINES_BEFORE / 3, text
    # Nothing a reader needs is lost: each diagnosis in full once, every remedy by title,
    # the final table, the summary, and where the full report is.
    for d in gw.diagnoses:
        assert sum(line.startswith(f"+- {d.severity.value.upper()} {d.kind} since step") for line in text.splitlines()) == 1
        assert all(" ".join(r.title.split()) in flat for r in d.remedies)
    assert "steps 50-99 (final)" in text and "summary: " in text
    assert "full report: gradwatch report run.jsonl --all" in flat


@pytest.mark.slow
def test_lightning_one_line_runs(capsys) -> None:
    runpy.run_path(str(EXAMPLES / "lightning_one_line.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "gradient flow" in out and "vanishing" in out


def test_hf_trainer_diagnoses_and_logs(capsys) -> None:
    trainer = runpy.run_path(str(EXAMPLES / "hf_trainer.py"))["main"]()
    callback = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "GradWatchCallback")
    assert "exploding" in {d.kind for d in callback.diagnoses}
    last = trainer.state.log_history[-2]  # the last training entry, before the run summary
    assert last["grad/diagnoses/exploding"] >= 1.0 and last["grad/norm_total"] == pytest.approx(last["grad_norm"], rel=1e-6)
    out = capsys.readouterr().out
    assert "gradient flow" in out and "exploding" in out


def test_accelerate_loop_counts_accumulated_steps(capsys) -> None:
    gw = runpy.run_path(str(EXAMPLES / "accelerate_loop.py"))["main"]()
    # 16 optimizer steps of 4 micro-batches each, all in the dense start: statistics every step.
    assert gw.step_count == 16 and gw.history.steps.tolist() == list(range(16)) and not gw.attached
    assert "16 optimizer steps watched" in capsys.readouterr().out
