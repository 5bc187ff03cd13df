"""The ``gradwatch`` command line, run in a subprocess on logs of real training runs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import gradwatch
from gradwatch.logfile import read_log
from gradwatch.render import fmt
from gradwatch.testing import regression_batches, sigmoid_mlp, train

ENV = {**os.environ, "GRADWATCH_DISABLE_PLUGIN_AUTOLOAD": "1", "COLUMNS": "100"}
ENV.pop("NO_COLOR", None)


def gradwatch_cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gradwatch.cli ARGS`` (or ``code`` with ``sys.argv`` set) as a user would."""
    command = [sys.executable, "-m", "gradwatch.cli", *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str, gradwatch.Watcher]:
    """A real run: an 8-layer sigmoid MLP with clipping, all built-in plugins, a run log."""
    path = tmp_path_factory.mktemp("cli") / "run.jsonl"
    model = sigmoid_mlp(depth=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    console = Console(file=io.StringIO(), width=100, color_system=None)
    with gradwatch.watch(model, opt, stats_every=1, report_every=20, clip=0.5, log=path, console=console, autoload=False) as gw:
        train(model, 45, batches=regression_batches(), optimizer=opt, watcher=gw)
    return path, console.file.getvalue(), gw


def _final_table(text: str) -> list[str]:
    """The last flow table of ``text``: its title, rows, the line under it and the actions line."""
    lines = text[text.rindex("gradwatch - gradient flow - step") :].splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith(("means of", "values of")))
    return lines[: end + 2]


def test_report_reprints_the_final_report(run):
    path, printed, gw = run
    result = gradwatch_cli("report", str(path), "--width", "100")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    # The same table as the watch printed at its end, rebuilt from the log alone; then every
    # diagnosis in full once (the log's reader saw none of the run's own reports) and the summary.
    assert _final_table(out) == _final_table(printed)
    assert "steps 40-44 (final)" in out and "means of 5 statistics steps (40-44)" in out
    assert "summary: " in out and f"full report: gradwatch report {path} --all" in out
    summary = read_log(path).summary()
    for layer in gw.model_info.layers:
        row = next(line for line in out.splitlines() if line.startswith(f"{layer.name} "))
        mine = next(r for r in summary if r.name == layer.name)
        assert f" {fmt(mine.grad_norm)} " in row and f" {fmt(mine.grad_rms)} " in row
    # The last interval (steps 40-44, stats every step): the table's norms are their means.
    last = read_log(path).intervals[-1]
    first_layer = [row[0] for row in last["grad_norm"]]
    assert summary[0].grad_norm == pytest.approx(sum(first_layer) / len(first_layer), rel=1e-5)
    assert gw.diagnoses, "expected the built-in plugins to diagnose a deep sigmoid MLP"
    for diagnosis in gw.diagnoses:
        assert f"+- {diagnosis.severity.value.upper()} {diagnosis.kind} since step {diagnosis.step}" in out
        for remedy in diagnosis.remedies:
            assert remedy.title.split()[0] in out
    clips = [a for a in gw.actions if a.kind == "clip"]
    assert clips and f"clip: {len(clips)} steps" in out
    # The clip events' norms are the total norms logged at those steps (before clipping).
    steps, _, totals = read_log(path).steps()
    total_at = dict(zip(steps, totals))
    assert [a.evidence["norm"] for a in clips] == pytest.approx([total_at[a.step] for a in clips], rel=1e-5)
    assert f"max norm {fmt(max(a.evidence['norm'] for a in clips))}" in out


def test_report_and_plot_load_no_plugin(run, tmp_path):
    """The command line reads logs with the core alone: no built-in plugin is imported."""
    path, _, _ = run
    code = (
        "import sys; from gradwatch.cli import main; import gradwatch.plot; "
        "code = main(sys.argv[1:]); "
        "print('plugins:', sorted(m for m in sys.modules if m.startswith('gradwatch.plugins'))); sys.exit(code)"
    )
    result = gradwatch_cli("report", str(path), "--width", "100", code=code)
    assert result.returncode == 0, result.stderr
    assert "steps 40-44 (final)" in result.stdout
    assert result.stdout.splitlines()[-1] == "plugins: []"


def test_report_options_and_unfinished_run(run, tmp_path):
    path, _, gw = run
    compact = gradwatch_cli("report", str(path), "--compact", "--width", "100")
    assert compact.returncode == 0 and "+-" in compact.stdout and "| type" not in compact.stdout
    lines = path.read_text().splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])  # the end record cut mid-write
    result = gradwatch_cli("report", str(cut), "--width", "100")
    assert result.returncode == 2  # what is whole is shown, and the damage is an error
    assert "the run did not finish" in result.stdout and "gradient flow - steps 40-44" in result.stdout
    assert result.stderr.count("\n") == 1
    assert f"cut.jsonl:{len(lines)}: the last line was cut mid-write" in result.stderr


def test_plot_writes_a_png_of_the_expected_size(run, tmp_path):
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("matplotlib.image")
    path, _, _ = run
    out = tmp_path / "flow.png"
    result = gradwatch_cli("plot", str(path), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}"
    pixels = image.imread(out)
    assert pixels.shape[:2] == (800, 1200)
    assert float(np.var(pixels[..., :3])) > 0.01  # not blank
    small = tmp_path / "small.png"
    assert gradwatch_cli("plot", str(path), "-o", str(small), "--dpi", "50").returncode == 0
    assert image.imread(small).shape[:2] == (400, 600)


def test_plot_without_matplotlib_says_how_to_install(run, tmp_path):
    path, _, _ = run
    code = "import sys; sys.modules['matplotlib'] = None; from gradwatch.cli import main; sys.exit(main(sys.argv[1:]))"
    result = gradwatch_cli("plot", str(path), "-o", str(tmp_path / "x.png"), code=code)
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "gradwatch: error: gradwatch plot needs matplotlib; install it with: pip install gradwatch[plot]"
    )
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args", [(), ("report",), ("plot",), ("plugins",)])
def test_help(args, capsys, monkeypatch):
    # In process: argparse's help needs no training run (the subprocess path is tested above).
    from gradwatch.cli import main

    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith("usage: gradwatch")
    if not args:
        assert all(word in out for word in ("report", "plot", "plugins"))
    if args == ("plot",):
        assert "pip install gradwatch[plot]" in " ".join(out.split()) and "--output" in out


def test_no_command_prints_help_and_exits_2():
    result = gradwatch_cli()
    assert result.returncode == 2 and "usage: gradwatch" in result.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("gradwatch")
    if not script.exists():
        pytest.skip("the gradwatch console script is not installed in this environment")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0 and "report" in result.stdout


HEADER = {"type": "header", "schema": 1, "layers": [{"name": "a", "type": "Linear", "numel": 3}], "config": {}}


def _in_process(*args: str) -> subprocess.CompletedProcess[str]:
    """``main(args)`` in this process, for cases that need no fresh interpreter (torch imports
    take seconds on the shared test machines); returns what a subprocess would."""
    from contextlib import redirect_stderr, redirect_stdout

    from gradwatch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize(
    ("content", "message", "runner"),
    [
        (None, "no such file", gradwatch_cli),
        ("", ":1: the file is empty", _in_process),
        (json.dumps(HEADER) + "\nnot json\n", ":2: not JSON", gradwatch_cli),
        (json.dumps({**HEADER, "schema": 99}) + "\n", ":1: run log schema version 99 is not supported", _in_process),
    ],
)
def test_unreadable_logs_give_one_line_and_exit_2(tmp_path, content, message, runner):
    path = tmp_path / "run.jsonl"
    if content is not None:
        path.write_text(content)
    result = runner("report", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"gradwatch: error: {path}")
    assert message in result.stderr


def test_plot_unreadable_log(tmp_path):
    result = gradwatch_cli("plot", str(tmp_path / "run.jsonl"), "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"gradwatch: error: {tmp_path / 'run.jsonl'}: no such file")


def test_plot_log_without_statistics(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps(HEADER) + "\n")
    result = _in_process("plot", str(path), "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "holds no gradient statistics yet" in result.stderr


# ---------------------------------------------------------------------- issue 14


def test_help_version_and_argument_errors_import_no_torch():
    """`gradwatch --help` and friends start without torch (seconds saved on every call)."""
    code = (
        "import sys, contextlib, io\n"
        "from gradwatch.cli import main\n"
        "for args in (['--help'], ['--version'], ['report', '--help'], ['plot'], ['report', 'a', '--width', 'x'], ['nope']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            main(args)\n"
        "        except SystemExit as exit_:\n"
        "            assert exit_.code == (0 if '--help' in args or '--version' in args else 2), (args, exit_.code)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'rich', 'pluggy', 'matplotlib')))\n"
    )
    result = gradwatch_cli(code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_report_on_a_header_only_log_says_so_and_exits_2(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps(HEADER) + "\n")
    result = _in_process("report", str(path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"gradwatch: error: {path}: the run log holds no report interval yet (only its header)")


def test_plot_to_an_unknown_format_names_the_formats_that_work(run, tmp_path):
    path, _, _ = run
    result = _in_process("plot", str(path), "-o", str(tmp_path / "x.xyz"))
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"gradwatch: error: {tmp_path / 'x.xyz'}: cannot write .xyz images")
    assert ".png, .svg, .pdf" in result.stderr and not (tmp_path / "x.xyz").exists()
    no_suffix = _in_process("plot", str(path), "-o", str(tmp_path / "flow"))
    assert no_suffix.returncode == 0 and no_suffix.stdout.strip() == f"wrote {tmp_path / 'flow.png'}"
    assert (tmp_path / "flow.png").exists()
