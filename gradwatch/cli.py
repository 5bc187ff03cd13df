"""The ``gradwatch`` command line.

``gradwatch report RUN.jsonl`` reprints the final console report from a run log,
``gradwatch plot RUN.jsonl -o flow.png`` draws the gradient-flow heatmap and the total-norm
timeline, ``gradwatch plugins`` lists the plugins a watch loads. A run log that cannot be
read gives a one-line error naming the file and line, and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

# Nothing heavy at import: `gradwatch --help`, `--version` and argument errors never
# import torch (each command imports what it needs).
if TYPE_CHECKING:
    from gradwatch.flow import FlowSpan
    from gradwatch.logfile import RunLog

__all__ = ["main"]


def _cmd_plugins(args: argparse.Namespace) -> int:
    """List the plugins a watch would load, with the hooks each implements."""
    from rich.console import Console
    from rich.table import Table

    from gradwatch.manager import make_plugin_manager

    pm = make_plugin_manager(autoload=not args.no_autoload)
    table = Table(title="gradwatch plugins", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("from")
    table.add_column("hooks")
    for name, plugin in pm.list_name_plugin():
        dist = next((d for p, d in pm.list_plugin_distinfo() if p is plugin), None)
        origin = f"{dist.project_name} {dist.version}" if dist is not None else getattr(plugin, "__name__", "")
        hooks = sorted(c.name.removeprefix("gradwatch_") for c in pm.get_hookcallers(plugin) or ())
        table.add_row(name, origin, ", ".join(hooks))
    Console().print(table)
    return 0


def _cut(log: RunLog) -> int:
    """Say that the last line was cut (the run crashed mid-write), after showing what is whole.

    Exit code 2 like every damaged log, though the whole lines were used: scripts must not
    take a crashed run's log for a complete one.
    """
    if log.cut_line is None:
        return 0
    print(
        f"gradwatch: error: {log.path}:{log.cut_line}: the last line was cut mid-write (the run stopped while "
        f"writing it); the output above uses the {log.cut_line - 1} whole lines before it",
        file=sys.stderr,
    )
    return 2


def _cmd_report(args: argparse.Namespace) -> int:
    """Reprint the console report of a run from its log."""
    from rich.console import Console

    from gradwatch.logfile import read_log
    from gradwatch.render import render_report

    log = read_log(args.log)
    rows = log.summary()
    if not rows:
        print(
            f"gradwatch: error: {log.path}: the run log holds no report interval yet (only its header); "
            "the first is written after report_every steps, or at the end of the run",
            file=sys.stderr,
        )
        return 2
    console = Console(width=args.width) if args.width else Console()
    options = {"compact": args.compact, "show_all": args.all}
    if log.end is None:
        console.print(f"[yellow]the run did not finish (no end record); the report covers steps up to {log.last_step}[/]")
    diagnoses = sorted(log.diagnoses, key=lambda d: (-d.severity.rank, d.step))
    render_report(
        console,
        rows=rows,
        diagnoses=diagnoses,
        actions=log.actions,
        step=log.last_step,
        final=log.end is not None,
        options=options,
        span=_span(log),
        cadence=_cadence(log),
        full_hint=f"gradwatch report {args.log} --all",
    )
    return _cut(log)


def _span(log: RunLog) -> FlowSpan | None:
    """The steps the log's last table rows are the means of: its last interval record."""
    from gradwatch.flow import FlowSpan

    if not log.intervals:
        return None
    last = log.intervals[-1]
    first_step, last_step = int(last["first_step"]), int(last["last_step"])
    if log.end is not None:
        last_step = max(last_step, int(log.end["step"]))
    bad = tuple(s for s, _ in log.nonfinite if int(last["first_step"]) <= s <= int(last["last_step"]))
    return FlowSpan(first=first_step, last=last_step, steps=tuple(last["steps"]), nonfinite=bad)


def _cadence(log: RunLog) -> str | None:
    """The cadence the run log records (its ``end`` record's, else its header's), as the
    console printed it; ``None`` for an explicit cadence or a log without one."""
    cadence = (log.end or {}).get("cadence") or log.header.get("cadence")
    if isinstance(cadence, Mapping) and "auto" not in (cadence.get("stats_every"), cadence.get("sample_every")):
        return None
    if isinstance(cadence, Mapping):
        cadence = cadence.get("description")
    return str(cadence) if cadence else None


def _cmd_plot(args: argparse.Namespace) -> int:
    """Draw the gradient-flow heatmap and the total-norm timeline of a run."""
    from gradwatch.logfile import read_log
    from gradwatch.plot import MissingMatplotlib, check_output, plot_run

    try:
        check_output(args.output)  # a format matplotlib cannot write: say so before reading the log
        log = read_log(args.log)
        path = plot_run(log, args.output, dpi=args.dpi, title=args.title)
    except MissingMatplotlib as exc:
        print(f"gradwatch: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output path that cannot be written
        print(f"gradwatch: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return _cut(log)


def build_parser() -> argparse.ArgumentParser:
    from gradwatch import __version__

    parser = argparse.ArgumentParser(prog="gradwatch", description="Gradient diagnostics for PyTorch.")
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    plugins = sub.add_parser("plugins", help="list the plugins a watch loads and the hooks they implement")
    plugins.add_argument("--no-autoload", action="store_true", help="leave out third-party entry-point plugins")
    plugins.set_defaults(func=_cmd_plugins)
    report = sub.add_parser(
        "report",
        help="reprint the console report of a run from its JSONL log",
        description="Reprint the final console report (gradient-flow table, diagnoses, remedies) from a run log "
        "written with log='RUN.jsonl'.",
    )
    report.add_argument("log", metavar="RUN.jsonl", help="the run log")
    report.add_argument("--all", action="store_true", help="one row per layer, never collapse runs of alike layers")
    report.add_argument("--compact", action="store_true", help="narrow table, one line per diagnosis")
    report.add_argument("--width", type=int, default=None, help="console width in columns (default: the terminal's)")
    report.set_defaults(func=_cmd_report)
    plot = sub.add_parser(
        "plot",
        help="draw per-layer gradient norms over steps and the total-norm timeline (needs matplotlib)",
        description="Draw a heatmap of each layer's gradient norm (log scale) over steps, with diagnoses marked, "
        "above a timeline of the total gradient norm with clip events. Needs matplotlib: pip install gradwatch[plot].",
    )
    plot.add_argument("log", metavar="RUN.jsonl", help="the run log")
    plot.add_argument(
        "-o", "--output", default="flow.png", help="image file to write; the suffix picks the format (default: flow.png)"
    )
    plot.add_argument("--dpi", type=int, default=100, help="dots per inch; the figure is 12 x 8 inches (default: 100)")
    plot.add_argument("--title", default=None, help="figure title (default: the log's file name)")
    plot.set_defaults(func=_cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from gradwatch.types import GradWatchError

    try:
        return int(args.func(args))
    except GradWatchError as exc:  # a run log that cannot be read: one line, never a traceback
        print(f"gradwatch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
