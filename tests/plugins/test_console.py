"""The console report: numbers against plain torch, statuses, panels, collapsing, terminals."""

from __future__ import annotations

import io
import math
import re
import statistics

import pytest
import torch
from rich.console import Console

import gradwatch
from gradwatch import Diagnosis, GradWatchError, Remedy, Severity
from gradwatch.flow import flow_rows
from gradwatch.testing import ReportCatcher, TinyModel, regression_batches, relu_mlp, sigmoid_mlp, train

ONLY = ["console"]  # the other built-ins stay out of the way where a test counts diagnoses


def _console(width: int = 100, **kwargs) -> Console:
    kwargs.setdefault("color_system", None)
    kwargs.setdefault("force_terminal", False)
    return Console(file=io.StringIO(), width=width, **kwargs)


def _others() -> list[str]:
    from gradwatch.manager import BUILTIN_PLUGINS

    return [name for name in BUILTIN_PLUGINS if name not in ONLY]


class Fixed:
    """Makes the given diagnoses at the report of step ``at`` (or at the end), with one remedy each."""

    gradwatch_name = "fixed"

    def __init__(self, diagnoses, at: int | None = None) -> None:
        self.diagnoses, self.at = diagnoses, at

    @gradwatch.hookimpl
    def gradwatch_diagnose(self, window):
        if (window.final and self.at is None) or (self.at is not None and window.first_step <= self.at <= window.last_step):
            return self.diagnoses
        return None

    @gradwatch.hookimpl
    def gradwatch_advise(self, diagnosis):
        return [
            Remedy(
                kind="relu",
                title=f"Fix {diagnosis.kind} in {diagnosis.layers[0]}",
                rationale=f"because the ratio is {diagnosis.evidence.get('ratio', 0):.3g}",
                snippet=f"model.{diagnosis.layers[0]}.reset_parameters()  # {diagnosis.kind}\n",
            )
        ]


def _row(text: str, name: str) -> list[str]:
    """The cells of the table row of layer ``name`` in ASCII-box output."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in:\n{text}")


def _flat(text: str) -> str:
    """Panel text with its borders and line wrapping taken out."""
    return " ".join(" ".join(line.strip().strip("|").split()) for line in text.splitlines())


def _torch_stats(model: TinyModel, steps: int, lr: float = 0.05):
    """Plain-torch per-layer gradient norms, RMS and update ratios, per step."""
    batches = regression_batches(d_in=8, d_out=2, batch=16)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    layers = {"linear1": model.linear1, "linear2": model.linear2}
    norms, rms, ratios = [], [], []
    for _ in range(steps):
        x, y = next(batches)
        torch.nn.functional.mse_loss(model(x), y).backward()
        norms.append({n: torch.sqrt(sum(p.grad.square().sum() for p in m.parameters())).item() for n, m in layers.items()})
        rms.append({n: norms[-1][n] / math.sqrt(sum(p.numel() for p in m.parameters())) for n, m in layers.items()})
        before = {n: [p.detach().clone() for p in m.parameters()] for n, m in layers.items()}
        opt.step()
        opt.zero_grad()
        ratios.append(
            {
                n: (torch.sqrt(sum((p - b).square().sum() for p, b in zip(m.parameters(), before[n])))
                    / torch.sqrt(sum(b.square().sum() for b in before[n]))).item()
                for n, m in layers.items()
            }
        )  # fmt: skip
    return norms, rms, ratios, opt


def test_hook_gradwatch_report_numbers_match_plain_torch():
    torch.manual_seed(0)
    reference = TinyModel()
    model = TinyModel()
    model.load_state_dict(reference.state_dict())
    norms, rms, ratios, _ = _torch_stats(reference, 7)

    console, catch = _console(), ReportCatcher()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(
        model,
        opt,
        stats_every=1,
        sample_every=1,
        report_every=100,
        console=console,
        plugins=[catch],
        disable=_others(),
        autoload=False,
    ):
        train(model, 7, batches=regression_batches(d_in=8, d_out=2, batch=16), optimizer=opt)

    text = console.file.getvalue()
    rows = {row.name: row for row in flow_rows(catch.reports[-1])}
    for name in ("linear1", "linear2"):
        mean_norm = sum(n[name] for n in norms) / len(norms)
        mean_rms = sum(r[name] for r in rms) / len(rms)
        mean_ratio = sum(r[name] for r in ratios) / len(ratios)
        assert rows[name].grad_norm == pytest.approx(mean_norm, rel=1e-5)
        assert rows[name].grad_rms == pytest.approx(mean_rms, rel=1e-5)
        assert rows[name].update_ratio == pytest.approx(mean_ratio, rel=1e-4)
        cells = _row(text, name)
        # layer | type | grad norm | rms | bar | dw/w | status: the printed numbers, 3 digits
        assert cells[1] == "Linear"
        assert float(cells[2]) == pytest.approx(mean_norm, rel=6e-3)
        assert float(cells[3]) == pytest.approx(mean_rms, rel=6e-3)
        assert float(cells[5]) == pytest.approx(mean_ratio, rel=6e-3)
        assert cells[6] == "ok"
    assert "steps 0-6 (final)" in text
    assert "means of 7 statistics steps (0-6)" in text
    assert "no gradient problems found" in text


def test_hook_gradwatch_report_statuses_panels_and_remedies(tiny_model):
    diagnoses = [
        Diagnosis(kind="dead_units", severity=Severity.WARNING, step=2, layers=("act",), message="Most ReLU units are dead.",
                  evidence={"fraction": {"act": 0.875}, "activation": "ReLU", "ratio": 0.5}, source="fixed"),
        Diagnosis(kind="exploding", severity=Severity.ERROR, step=4, layers=("linear2",), message="The gradient norm grows every step.",
                  evidence={"total_norm": 1234.5, "z_score": 9.0, "ratio": 2.0}, source="fixed"),
    ]  # fmt: skip
    console = _console(width=120)
    with gradwatch.watch(tiny_model, console=console, plugins=[Fixed(diagnoses)], disable=_others(), autoload=False) as gw:
        for x, y in (next(regression_batches(d_in=8, d_out=2)) for _ in range(3)):
            torch.nn.functional.mse_loss(tiny_model(x), y).backward()
            gw.step()
    text = console.file.getvalue()
    # The activation "act" is not a layer: its status lands on the layer that feeds it.
    assert _row(text, "linear1")[-1] == "dead"
    assert _row(text, "linear2")[-1] == "exploding"
    # Worst first: the error panel comes before the warning panel.
    assert text.index("ERROR exploding since step 4 in linear2") < text.index("WARNING dead_units since step 2 in act")
    assert "The gradient norm grows every step." in text
    # No summary: the single-valued evidence; per-layer mappings are in the full report.
    assert "total_norm=1.23e+03" in text and "z_score=9" in text and "fraction=" not in text
    assert "1. Fix exploding in linear2" in text and "because the ratio is 2" in text
    assert "model.linear2.reset_parameters()  # exploding" in text


def test_hook_gradwatch_report_printed_on_new_diagnoses_or_every_interval(tiny_model):
    diagnosis = Diagnosis(kind="vanishing", severity=Severity.WARNING, step=5, layers=("linear1",), message="m", source="fixed")

    def run(**options) -> str:
        torch.manual_seed(0)
        model, console = TinyModel(), _console()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with gradwatch.watch(model, opt, report_every=4, console=console, plugins=[Fixed([diagnosis], at=5)],
                             disable=_others(), autoload=False, options={"console": options}):  # fmt: skip
            train(model, 12, batches=regression_batches(d_in=8, d_out=2), optimizer=opt)
        return console.file.getvalue()

    quiet_intervals = run()
    # steps 0-3 and 8-11 have nothing new: only the interval with the diagnosis, and the end.
    assert re.findall(r"gradient flow - steps \d+-(\d+)", quiet_intervals) == ["7", "11"]
    assert re.findall(r"gradient flow - steps \d+-(\d+)", run(every_interval=True)) == ["3", "7", "11", "11"]
    quiet = run(quiet=True)
    assert "gradient flow" not in quiet
    assert quiet.count("WARNING vanishing since step 5 in linear1: m") == 2  # when new, and in the final summary
    compact = run(compact=True)
    assert "  1. Fix vanishing in linear1" in compact and "because the ratio" not in compact
    assert "type" not in compact.splitlines()[1] + compact.splitlines()[2]


def test_collapse_runs_of_alike_layers_and_show_all():
    model = relu_mlp(depth=60, width=8)
    console, catch = _console(width=110), ReportCatcher()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, stats_every=1, console=console, plugins=[catch], disable=_others(), autoload=False):
        train(model, 3, optimizer=opt)
    text = console.file.getvalue()
    rows = flow_rows(catch.reports[-1])
    assert len(rows) == 60
    # First and last layer of the run shown, the 58 between collapsed into one row of medians.
    cells = _row(text, "2-116 (x58)")
    assert float(cells[2]) == pytest.approx(statistics.median(r.grad_norm for r in rows[1:59]), rel=6e-3)
    assert _row(text, "0") and _row(text, "118")
    assert sum(1 for line in text.splitlines() if "| Linear" in line) == 3

    console = _console(width=110)
    with gradwatch.watch(model, opt, console=console, disable=_others(), autoload=False, options={"console": {"show_all": True}}):
        train(model, 3, optimizer=opt)
    text = console.file.getvalue()
    assert all(_row(text, str(2 * k)) for k in range(60))


def _run_sigmoid(console: Console) -> None:
    model = sigmoid_mlp(depth=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, console=console, disable=_others(), autoload=False,
                         plugins=[Fixed([Diagnosis(kind="vanishing", severity=Severity.WARNING, step=0, layers=("0",), message="m")])]):  # fmt: skip
        train(model, 4, optimizer=opt)


def test_no_colour_or_box_drawing_when_not_a_terminal():
    console = Console(file=io.StringIO(), width=100)  # rich's defaults, as for a redirected stdout
    _run_sigmoid(console)
    text = console.file.getvalue()
    assert "\x1b[" not in text
    assert not set(text) & set("─│╭╮╰╯━█–·")
    assert "+-" in text and "#" in text


def test_colour_on_a_terminal_and_no_colour_with_NO_COLOR(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system="standard")
    _run_sigmoid(console)
    coloured = console.file.getvalue()
    assert re.search(r"\x1b\[[0-9;]*3[1-7]m", coloured) and "█" in coloured and "╭" in coloured

    monkeypatch.setenv("NO_COLOR", "1")
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system="standard")
    _run_sigmoid(console)
    plain = console.file.getvalue()
    assert not re.search(r"\x1b\[[0-9;]*3[0-7]m", plain)  # no foreground colour at all
    assert "█" in plain  # still a terminal: the bar and boxes are drawn


@pytest.mark.parametrize("width", [60, 80, 140])
def test_width_aware(width):
    console = _console(width=width)
    _run_sigmoid(console)
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= width
    header = next(line for line in text.splitlines() if "grad norm" in line)
    assert ("type" in header) == (width >= 90)


def test_report_false_prints_nothing(tiny_model):
    console = _console()
    with gradwatch.watch(tiny_model, console=console, report=False, autoload=False) as gw:
        torch.nn.functional.mse_loss(tiny_model(torch.randn(4, 8)), torch.randn(4, 2)).backward()
        gw.step()
    assert console.file.getvalue() == ""


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"colour": True}, "unknown console option"),
        ({"quiet": "yes"}, "'quiet' takes True or False"),
        ({"max_rows": 0}, "'max_rows' takes a positive"),
    ],
)
def test_hook_gradwatch_configure_rejects_bad_options(tiny_model, options, match):
    with pytest.raises(GradWatchError, match=match):
        gradwatch.watch(tiny_model, options={"console": options}, autoload=False)


def test_real_run_report_shows_every_diagnosis_and_remedy():
    """With all built-in plugins: whatever they find in a 20-layer sigmoid MLP is printed:
    every remedy's title in the report, every rationale and snippet in the full report."""
    model = sigmoid_mlp()
    console = _console(width=120)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt, report_every=30, console=console, autoload=False) as gw:
        train(model, 60, optimizer=opt, watcher=gw)
    text = console.file.getvalue()
    assert gw.diagnoses, "the built-in plugins find nothing wrong with a 20-layer sigmoid MLP"
    for diagnosis in gw.diagnoses:
        assert f"{diagnosis.severity.value.upper()} {diagnosis.kind} since step {diagnosis.step}" in text
        for remedy in diagnosis.remedies:
            assert _flat(remedy.title) in _flat(text)
    names = [layer.name for layer in gw.model_info.layers]
    assert all(_row(text, name) for name in names)

    console.file = io.StringIO()
    gw.report(show_all=True)
    full = _flat(console.file.getvalue())
    for diagnosis in gw.diagnoses:
        for remedy in diagnosis.remedies:
            if f"{_flat(remedy.title)} (as for" in full:  # one remedy for two diagnoses: printed under the first
                continue
            assert _flat(remedy.rationale) in full
            assert all(" ".join(line.split()) in full for line in remedy.snippet.splitlines())
