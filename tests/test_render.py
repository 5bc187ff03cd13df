"""Rendering helpers shared by the console plugin and ``gradwatch report`` (whole reports are
tested through the console in tests/plugins/test_console.py and the CLI in tests/test_cli.py)."""

from __future__ import annotations

import io
import math

from rich.console import Console

from gradwatch import Action, Diagnosis, Remedy, Severity
from gradwatch.flow import FlowRow
from gradwatch.render import actions_line, diagnosis_panel, flow_table, fmt, format_evidence, headline


def _text(renderable, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    return console.file.getvalue()


def test_fmt_three_significant_digits():
    cases = {0.0: "0", 1.23456: "1.23", 1234.5: "1.23e+03", 12345.0: "1.23e+04", 0.000123: "1.23e-04", 0.00123: "0.00123"}
    assert {v: fmt(v) for v in cases} == cases
    assert (fmt(math.nan), fmt(math.inf), fmt(-math.inf)) == ("-", "inf", "-inf")


def test_format_evidence_shortens_long_values():
    text = format_evidence(
        {"ratio": 2.5e-9, "steps": list(range(10)), "ok": True, "none": None, "by": {str(i): 0.5 for i in range(8)}}
    )
    assert text == (
        "ratio=2.50e-09, steps=[0, 1, 2, 3, 4, 5, ... 4 more], ok=true, none=null, "
        "by={0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.5, ... 2 more}"
    )


def test_actions_line_by_kind_with_the_largest_norm():
    actions = [Action(kind="clip", step=s, evidence={"norm": float(s)}) for s in (9, 3, 4, 5, 7, 8)]
    actions.append(Action(kind="amp_skip", step=6))
    assert actions_line(actions) == "actions: clip: 6 steps (steps 3, 4, 5, 7, 8, ... 9), max norm 9; amp_skip: 1 step (steps 6)"
    assert actions_line([]) == ""


def test_headline_and_panel_cut_long_snippets():
    layers = tuple(f"l{i}" for i in range(8))
    remedy = Remedy(kind="k", title="Do it", rationale="because", snippet="\n".join(f"line{i}" for i in range(20)))
    d = Diagnosis(kind="vanishing", severity=Severity.WARNING, step=5, layers=layers, message="m", remedies=(remedy,))
    assert headline(d).plain == "WARNING vanishing since step 5 in l0, l1, l2, l3, l4, l5 and 2 more: m"
    text = _text(diagnosis_panel(d, plain=True, max_lines=4))
    assert "line2" in text and "line3" not in text and "# ... 17 more lines: show_all=True" in text
    assert "1. Do it" in text and "because" in text and not set(text) & set("─│╭╮╰╯")
    assert "line19" in _text(diagnosis_panel(d, plain=True, max_lines=100))


def test_flow_table_columns_follow_width_and_compact():
    rows = [FlowRow(name="a", type_name="Linear", grad_norm=1.0, grad_rms=0.5, update_ratio=math.nan, nonfinite=0)]
    wide = _text(flow_table(rows, title="t"), width=100)
    assert "type" in wide and "rms" in wide and "Δw/w" in wide
    narrow = _text(flow_table(rows, title="t", options={"compact": True}), width=100)
    assert "type" not in narrow and "Δw/w" not in narrow and "grad norm" in narrow
