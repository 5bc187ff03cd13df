"""The report a person reads (issue 14): printed once, true to its numbers, doing what it says.

Whole reports through the console plugin with inline plugins that make known diagnoses,
so each test pins one behaviour in a few hundred milliseconds; the quickstart's length is
pinned in tests/test_examples.py.
"""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
from rich.console import Console

import gradwatch
from gradwatch import Diagnosis, Remedy, Severity
from gradwatch.flow import FlowRow
from gradwatch.render import MIN_DECADES, bar_length, bar_range, flow_table, headline
from gradwatch.testing import TinyModel, nan_model, regression_batches, relu_mlp, train

ONLY = ("console",)


def _others(keep: tuple[str, ...] = ONLY) -> list[str]:
    from gradwatch.manager import BUILTIN_PLUGINS

    return [name for name in BUILTIN_PLUGINS if name not in keep]


def _console(width: int = 100) -> Console:
    return Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)


XAVIER = Remedy(kind="reinit", title="Re-initialise 2 layers with Xavier init", rationale="std ×0.5 of the expectation",
                snippet="nn.init.xavier_normal_(model.linear1.weight)\n", params={"init": "xavier_normal_", "gain": 1.0})  # fmt: skip
RELU = Remedy(kind="relu", title="Replace the Sigmoid with ReLU", rationale="a sigmoid's derivative is at most 0.25",
              snippet="model.act = nn.ReLU()\n", params={"activation": "ReLU"})  # fmt: skip


class Scripted:
    """Makes the diagnoses scripted for each interval (by its last step, or ``"final"``)
    and answers each kind with the remedies scripted for it."""

    gradwatch_name = "scripted"

    def __init__(self, script, remedies=None) -> None:
        self.script, self.remedies = script, remedies or {}

    @gradwatch.hookimpl
    def gradwatch_diagnose(self, window):
        return self.script.get("final" if window.final else window.last_step)

    @gradwatch.hookimpl
    def gradwatch_advise(self, diagnosis):
        return self.remedies.get(diagnosis.kind)


def _diag(kind="vanishing", severity=Severity.WARNING, layers=("linear1",), summary="ratio 2.5e-09", step=0):
    return Diagnosis(kind=kind, severity=severity, step=step, layers=layers, message=f"{kind} message", summary=summary)


def _run(
    script, remedies=None, steps=12, report_every=4, options=None, keep=ONLY, width=100, **kw
) -> tuple[str, gradwatch.Watcher]:
    torch.manual_seed(0)
    model, console = TinyModel(), _console(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, report_every=report_every, console=console, plugins=[Scripted(script, remedies)],
                         disable=_others(keep), autoload=False, options={"console": options or {}}, **kw) as gw:  # fmt: skip
        train(model, steps, batches=regression_batches(d_in=8, d_out=2), optimizer=opt)
    return console.file.getvalue(), gw


def _boxes(text: str, title: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("+- ") and title in line)


# ---------------------------------------------------------------------- length


def test_a_diagnosis_box_is_printed_once_per_run_unless_it_changed():
    same = _diag()
    worse = _diag(severity=Severity.ERROR)  # the same condition, now an error: changed
    text, gw = _run({3: [same], 7: [same], "final": [worse]}, {"vanishing": [RELU]})
    assert _boxes(text, "WARNING vanishing since step 0 in linear1") == 1
    assert _boxes(text, "ERROR vanishing since step 0 in linear1") == 1
    # The interval of step 7 refers to the box of step 3 in one line, with its numbers now.
    assert "still: WARNING vanishing since step 0 in linear1, shown at step 3; now ratio 2.5e-09" in text
    # The remedy was printed in full once; the changed diagnosis's box refers to it.
    assert text.count("model.act = nn.ReLU()") == 1
    assert "1. Replace the Sigmoid with ReLU (as for vanishing at step 3)" in text
    assert len(gw.diagnoses) == 3


def test_one_remedy_for_two_diagnoses_is_printed_once_listing_both():
    both = [_diag("init_scale", layers=("linear1", "linear2"), summary="depth gain 0.25"), _diag()]
    text, _ = _run({3: both}, {"init_scale": [XAVIER], "vanishing": [RELU, XAVIER]})
    assert text.count("nn.init.xavier_normal_(model.linear1.weight)") == 1
    assert "1. Re-initialise 2 layers with Xavier init (also for vanishing)" in text
    assert "2. Re-initialise 2 layers with Xavier init (as for init_scale above)" in text
    # Remedy.params, one dim line under the remedy printed in full.
    assert "params: init=xavier_normal_, gain=1" in text and "params: activation=ReLU" in text
    compact, _ = _run({3: both}, {"init_scale": [XAVIER], "vanishing": [RELU, XAVIER]}, options={"compact": True})
    assert "  1. Re-initialise 2 layers with Xavier init (also for vanishing)" in compact
    assert "  2. Re-initialise 2 layers with Xavier init (as for init_scale above)" in compact


def test_remedy_params_reach_the_run_log(tmp_path):
    from gradwatch.logfile import read_log

    _run({3: [_diag()]}, {"vanishing": [RELU, XAVIER]}, keep=("console", "runlog"), log=tmp_path / "run.jsonl")
    (logged,) = read_log(tmp_path / "run.jsonl").diagnoses
    assert [dict(r.params) for r in logged.remedies] == [dict(RELU.params), dict(XAVIER.params)]


def test_final_report_says_what_changed_and_ends_with_a_short_summary():
    text, gw = _run({3: [_diag()], "final": [_diag("exploding", layers=("linear2",), summary="total norm 1e+03")]})
    final = text[text.rindex("gradwatch - gradient flow") :]
    lines = final.splitlines()
    # The last report printed was step 3's (step 7's interval had nothing new).
    flat = " ".join(final.split())
    assert "since the report of step 3: 1 new diagnosis (below); 1 layer changed status (linear2 ok -> exploding)" in flat
    assert "WARNING exploding since step 0 in linear2" in final and "WARNING vanishing since step 0 in linear1 " not in final
    summary = lines.index(next(line for line in lines if line.startswith("summary:")))
    assert lines[summary] == "summary: 2 diagnoses (2 warnings); no action"
    assert lines[summary + 1 :] == [
        "  WARNING vanishing since step 0 in linear1: ratio 2.5e-09 (shown at step 3)",
        "  WARNING exploding since step 0 in linear2: total norm 1e+03 (above)",
        "full report: gw.report(show_all=True)",
    ]
    assert len(gw.diagnoses) == 2


def test_compact_mode_from_watch_options_is_short_and_keeps_every_diagnosis():
    text, gw = _run({3: [_diag()], 7: [_diag("exploding", layers=("linear2",))]}, {"vanishing": [RELU, XAVIER]},
                    options={"compact": True})  # fmt: skip
    assert "| type" not in text and "| rms" not in text
    assert "WARNING vanishing since step 0 in linear1: vanishing message" in text
    assert "  1. Replace the Sigmoid with ReLU" in text and "  2. Re-initialise 2 layers with Xavier init" in text
    assert "a sigmoid's derivative" not in text and "model.act" not in text  # no rationale, no code
    full, _ = _run({3: [_diag()], 7: [_diag("exploding", layers=("linear2",))]}, {"vanishing": [RELU, XAVIER]})
    assert len(text.splitlines()) < len(full.splitlines())


# ---------------------------------------------------------------------- true to its numbers


def test_the_table_names_its_steps_and_leaves_out_an_all_nan_last_step():
    """The last step's gradients are all NaN: the title names the steps the means cover, the
    line under it says the NaN step is left out of the means, and the numbers are those
    means (plain torch)."""
    torch.manual_seed(0)
    model, console = nan_model(at=5), _console()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    plain = []
    with gradwatch.watch(model, opt, stats_every=1, report_every=100, console=console, disable=_others(), autoload=False):
        for x, y in (next(regression_batches()) for _ in range(6)):
            torch.nn.functional.mse_loss(model(x), y).backward()
            plain.append(torch.sqrt(sum(p.grad.square().sum() for p in model[0].parameters())).item())
            opt.step()
            opt.zero_grad()
    text = console.file.getvalue()
    assert math.isnan(plain[-1]) and all(math.isfinite(v) for v in plain[:-1])
    assert "gradwatch - gradient flow - steps 0-5 (final)" in text
    assert "means of 6 statistics steps (0-5); non-finite gradients left out of the means at step 5" in text
    row = next(line for line in text.splitlines() if line.startswith("0 "))
    assert float(row.split("|")[2]) == pytest.approx(sum(plain[:-1]) / 5, rel=6e-3)


def test_log_scale_bars_are_proportional_to_log10_over_stated_decades():
    norms = [72.7, 55.2, 3.1, 1e-3, 2.5e-9]
    rows = [FlowRow(name=f"l{i}", type_name="Linear", grad_norm=v, grad_rms=v, update_ratio=math.nan, nonfinite=0)
            for i, v in enumerate(norms)]  # fmt: skip
    top, decades = bar_range(rows)
    assert top == pytest.approx(math.log10(72.7)) and decades == math.ceil(math.log10(72.7 / 2.5e-9))
    console = _console(width=100)
    console.print(flow_table(rows, console, title="t"))
    text = console.file.getvalue()
    for i, v in enumerate(norms):
        cells = [c.strip() for c in next(line for line in text.splitlines() if line.startswith(f"l{i} ")).split("|")]
        assert len(cells[4]) == round(16 * (math.log10(v) - (top - decades)) / decades) or len(cells[4]) == 1
    # Equal-looking norms look equal: the two largest differ by less than a tenth of a decade each.
    two = [FlowRow(name=n, type_name="", grad_norm=v, grad_rms=v, update_ratio=math.nan, nonfinite=0)
           for n, v in (("a", 72.7), ("b", 55.2))]  # fmt: skip
    top, decades = bar_range(two)
    assert decades == MIN_DECADES
    assert abs(bar_length(72.7, top, decades, 8) - bar_length(55.2, top, decades, 8)) <= 1
    assert bar_length(72.7, top, decades, 16) - bar_length(55.2, top, decades, 16) <= 1


def test_titles_shorten_by_whole_names_and_compact_lines_wrap_at_40_columns():
    names = tuple(f"net.{i}" for i in range(14))
    d = Diagnosis(kind="vanishing", severity=Severity.WARNING, step=0, layers=names, message="gradients shrink toward the input")
    text, _ = _run({3: [d]}, options={})
    title = next(line for line in text.splitlines() if line.startswith("+- WARNING vanishing"))
    assert len(title) <= 100
    listed = re.match(r"\+- WARNING vanishing since step 0 in (.*?) -+\+$", title).group(1)
    *shown, more = listed.split(", ")[:-1] + listed.split(", ")[-1].split(" and ")
    assert all(name in names for name in shown) and re.fullmatch(r"\d+ more", more)
    assert len(shown) + int(more.split()[0]) == len(names)

    console = _console(width=40)
    console.print(headline(d))
    lines = console.file.getvalue().splitlines()
    assert len(lines) > 1 and max(len(line) for line in lines) <= 40
    words = " ".join(lines).split()
    assert words == headline(d).plain.split()  # wrapped between words: every name whole

    compact, _ = _run({3: [d]}, options={"compact": True}, width=40)
    lines = compact.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 40
    final = lines.index(next(line for line in lines if line.startswith("gradwatch - gradient flow - steps 8-11")))
    assert " ".join(lines[final : final + 2]).split() == "gradwatch - gradient flow - steps 8-11 (final)".split()


# ---------------------------------------------------------------------- gw.report()


def test_report_prints_the_current_state_now_always():
    diagnosis = _diag()
    torch.manual_seed(0)
    model, console = TinyModel(), _console()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = regression_batches(d_in=8, d_out=2)
    with gradwatch.watch(model, opt, report_every=4, console=console, plugins=[Scripted({3: [diagnosis]}, {"vanishing": [RELU]})],
                         disable=_others(), autoload=False) as gw:  # fmt: skip
        train(model, 6, batches=batches, optimizer=opt)
        console.file = io.StringIO()
        report = gw.report()  # steps 4-5 are drained now; nothing new, printed anyway
        mid = console.file.getvalue()
        assert report is not None and report.request == {"show_all": False}
        assert "gradient flow - steps 4-5" in mid and _boxes(mid, "WARNING vanishing since step 0") == 1
        console.file = io.StringIO()
        assert gw.report(new_only=True) is None and console.file.getvalue() == ""  # nothing new: quiet
        train(model, 2, batches=batches, optimizer=opt)
    console.file = io.StringIO()
    gw.report()  # after the block: the final state again
    after = console.file.getvalue()
    assert "gradient flow - steps 4-7" in after and _boxes(after, "WARNING vanishing since step 0") == 1
    console.file = io.StringIO()
    gw.report(show_all=True)
    full = console.file.getvalue()
    assert "model.act = nn.ReLU()" in full and "a sigmoid's derivative is at most 0.25" in full
    assert "more lines" not in full and "show_all" not in full  # nothing cut, so no hint


def test_the_cut_snippet_names_what_prints_it_whole():
    long = Remedy(kind="relu", title="Replace them", rationale="because", snippet="".join(f"line_{i} = {i}\n" for i in range(30)))
    text, gw = _run({3: [_diag()]}, {"vanishing": [long]})
    cut = next(line for line in text.splitlines() if "more lines:" in line)
    assert "gw.report(show_all=True)" in cut
    assert "line_29 = 29" not in text
    console = gw.console
    console.file = io.StringIO()
    gw.report(show_all=True)  # what the hint names works
    assert "line_29 = 29" in console.file.getvalue()


# ---------------------------------------------------------------------- the console's own numbers


def test_the_console_numbers_equal_what_they_count():
    diagnoses = {3: [_diag(), _diag("exploding", Severity.ERROR, ("linear2",))], 7: [_diag("dead_units", layers=("act",))]}
    text, gw = _run(diagnoses, clip=1e-3, stats_every=1, keep=("console", "clipping"))
    clips = [a for a in gw.actions if a.kind == "clip"]
    assert clips and f"clip: {len(clips)} steps" in text
    summary = next(line for line in text.splitlines() if line.startswith("summary:"))
    errors = sum(d.severity is Severity.ERROR for d in gw.diagnoses)
    warnings = sum(d.severity is Severity.WARNING for d in gw.diagnoses)
    assert summary == f"summary: {len(gw.diagnoses)} diagnoses ({errors} error, {warnings} warnings); {len(gw.actions)} actions"
    final_steps = gw.history.steps[gw.history.steps >= 8].tolist()
    assert f"means of {len(final_steps)} statistics steps ({final_steps[0]}-{final_steps[-1]})" in text


def test_a_deep_table_states_its_bar_range_of_every_row_before_collapsing():
    model = relu_mlp(depth=50, width=8)
    console = _console(width=110)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, stats_every=1, console=console, disable=_others(), autoload=False) as gw:
        train(model, 3, optimizer=opt)
    text = console.file.getvalue()
    norms = gw.history.grad_norm.mean(0)
    decades = max(MIN_DECADES, math.ceil(math.log10(float(norms.max() / norms.min())) - 1e-9))
    assert f"bars: log10, {decades} decades below" in text
