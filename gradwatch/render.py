"""Rich rendering of a report: the gradient-flow table, the actions line, the diagnosis panels.

The console plugin prints with :func:`render_report` during a run and ``gradwatch report``
prints the same from a run log, so both show one report the same way. Rendering works
from plain rows (:class:`gradwatch.flow.FlowRow`) and plain diagnoses and actions; it
reads no statistics. Options are the console plugin's (``compact``, ``quiet``,
``show_all``, ``max_rows``). Output that is not a terminal, or not UTF-8, gets no box
drawing or block characters; colour follows the console (``NO_COLOR`` included).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Group
from rich.padding import Padding
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from gradwatch.flow import FlowRow, collapse, flow_rows
from gradwatch.types import Action, Diagnosis, Report

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = ["actions_line", "diagnosis_panel", "flow_table", "fmt", "format_evidence", "headline", "render_report"]

_SNIPPET_LINES = 12
_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_STATUS_STYLE = {
    "ok": "green",
    "vanishing": "yellow",
    "exploding": "red",
    "non-finite": "bold red",
    "dead": "magenta",
    "saturated": "magenta",
}


def _plain(console: Console) -> bool:
    """No box drawing or block characters when the output is not a terminal."""
    return not console.is_terminal or not console.encoding.lower().startswith("utf")


def flow_table(
    rows: Sequence[FlowRow] | Report, console: Console | None = None, *, title: str = "", options: Mapping[str, Any] | None = None
) -> Table:
    """The gradient-flow table: one row per layer (or collapsed run) in forward order.

    Args:
        rows: The rows, or a report to compute them from (:func:`gradwatch.flow.flow_rows`).
        console: The console it will be printed on (its width and whether it is a
            terminal shape the table); ``None`` draws for a 100-column terminal.
        title: The table title (for a report, by default its step).
        options: The console plugin's options (``compact``, ``show_all``, ``max_rows``).
    """
    options = options or {}
    if isinstance(rows, Report):
        title = title or f"gradwatch · gradient flow · step {rows.step}"
        rows = flow_rows(rows)
    plain = console is not None and _plain(console)
    dash = "-" if plain else "–"
    if not options.get("show_all", False):
        rows = collapse(rows, max_rows=int(options.get("max_rows", 40)), dash=dash)
    compact = bool(options.get("compact", False))
    width = console.width if console is not None else 100
    narrow = compact or width < 90
    bar_width = 8 if narrow else 16
    finite = [r.grad_norm for r in rows if math.isfinite(r.grad_norm) and r.grad_norm > 0]
    lo, hi = (math.log10(min(finite)), math.log10(max(finite))) if finite else (0.0, 1.0)
    table = Table(title=title, title_justify="left", box=box.ASCII if plain else box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", no_wrap=True, overflow="fold")
    if not narrow:
        table.add_column("type", no_wrap=True, style="dim")
    table.add_column("grad norm", justify="right", no_wrap=True)
    if not narrow:
        table.add_column("rms", justify="right", no_wrap=True)
    table.add_column("log scale", no_wrap=True, min_width=bar_width)
    if not compact:
        table.add_column("Δw/w" if not plain else "dw/w", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for row in rows:
        name = (row.name or "(root)") + (f" (x{row.count})" if row.count > 1 else "")
        cells: list[RenderableType] = [name]
        if not narrow:
            cells.append(row.type_name)
        cells.append(fmt(row.grad_norm))
        if not narrow:
            cells.append(fmt(row.grad_rms))
        cells.append(_bar(row.grad_norm, lo, hi, bar_width, "#" if plain else "█"))
        if not compact:
            cells.append(fmt(row.update_ratio))
        cells.append(Text(row.status, style=_STATUS_STYLE.get(row.status, "yellow")))
        table.add_row(*cells)
    return table


def render_report(
    console: Console,
    *,
    rows: Sequence[FlowRow],
    diagnoses: Sequence[Diagnosis],
    actions: Sequence[Action] = (),
    step: int,
    final: bool,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Print a report: the flow table, the actions line, the diagnoses and their remedies.

    Args:
        console: Where to print.
        rows: The flow table's rows, one per layer.
        diagnoses: The diagnoses to show, in order (each a panel, or a line when compact
            or quiet).
        actions: The actions to sum up in one line.
        step: The step of the report (in the table title).
        final: Whether this is the run's final report (the title says so, and an empty
            report says that no problem was found).
        options: The console plugin's options: ``quiet`` (one line per diagnosis and no
            table), ``compact``, ``show_all``, ``max_rows``.
    """
    options = options or {}
    if options.get("quiet", False):
        for diagnosis in diagnoses:
            console.print(headline(diagnosis), soft_wrap=True)
        return
    plain = _plain(console)
    title = f"gradwatch · gradient flow · step {step}" + (" (final)" if final else "")
    console.print(flow_table(rows, console, title=title if not plain else title.replace("·", "-"), options=options))
    line = actions_line(actions)
    if line:
        console.print(line)
    compact = bool(options.get("compact", False))
    if not diagnoses and final:
        console.print(Text("no gradient problems found", style="green"))
    for diagnosis in diagnoses:
        if compact:
            console.print(headline(diagnosis), soft_wrap=True)
            for n, remedy in enumerate(diagnosis.remedies, 1):
                console.print(f"  {n}. {remedy.title}", soft_wrap=True, highlight=False)
            continue
        console.print(
            diagnosis_panel(diagnosis, plain=plain, max_lines=10**6 if options.get("show_all", False) else _SNIPPET_LINES)
        )


def headline(d: Diagnosis) -> Text:
    """One line for a diagnosis: ``WARNING vanishing since step 5 in linear1: message``."""
    where = _where(d.layers)
    text = Text(f"{d.severity.value.upper()} ", style=_SEVERITY_STYLE.get(d.severity.value, ""))
    text.append(f"{d.kind} since step {d.step}{' in ' + where if where else ''}: ", style="bold")
    text.append(d.message)
    return text


def _where(layers: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(name or "(root)" for name in layers[:limit])
    return shown + (f" and {len(layers) - limit} more" if len(layers) > limit else "")


def diagnosis_panel(d: Diagnosis, *, plain: bool = False, max_lines: int = _SNIPPET_LINES) -> Panel:
    """A diagnosis in a panel: message, evidence, and each remedy with its rationale and snippet.

    Args:
        d: The diagnosis.
        plain: ASCII borders (for output that is not a terminal).
        max_lines: Snippets longer than this are cut, with a line saying how many more.
    """
    parts: list[RenderableType] = [Text(d.message)]
    if d.evidence:
        parts.append(Text("evidence: " + format_evidence(d.evidence), style="dim"))
    for n, remedy in enumerate(d.remedies, 1):
        head = Text(f"{n}. ", style="bold")
        head.append(remedy.title, style="bold")
        parts.append(head)
        parts.append(Padding(Text(remedy.rationale), (0, 0, 0, 3)))
        if remedy.snippet:
            lines = remedy.snippet.rstrip("\n").splitlines()
            if len(lines) > max_lines:  # the whole snippet is in the run log and on the Remedy
                lines = [*lines[: max_lines - 1], f"# ... {len(lines) - max_lines + 1} more lines (show_all=True prints them)"]
            syntax = Syntax("\n".join(lines), "python", theme="ansi_dark", background_color="default", word_wrap=True)
            parts.append(Padding(syntax, (0, 0, 0, 3)))
    where = _where(d.layers)
    title = f"{d.severity.value.upper()} {d.kind} since step {d.step}" + (f" in {where}" if where else "")
    return Panel(
        Group(*parts),
        title=Text(title, style=_SEVERITY_STYLE.get(d.severity.value, "")),
        title_align="left",
        box=box.ASCII if plain else box.ROUNDED,
        border_style=_SEVERITY_STYLE.get(d.severity.value, ""),
    )


def format_evidence(evidence: Mapping[str, Any], limit: int = 6) -> str:
    """``key=value`` pairs with numbers to 3 significant digits; long mappings shortened."""

    def one(value: Any) -> str:
        if isinstance(value, bool) or value is None:
            return str(value).lower() if value is not None else "null"
        if isinstance(value, (int, float)):
            return fmt(float(value)) if isinstance(value, float) else str(value)
        if isinstance(value, Mapping):
            items = list(value.items())
            body = ", ".join(f"{k}: {one(v)}" for k, v in items[:limit])
            return "{" + body + (f", ... {len(items) - limit} more" if len(items) > limit else "") + "}"
        if isinstance(value, (list, tuple)):
            body = ", ".join(one(v) for v in value[:limit])
            return "[" + body + (f", ... {len(value) - limit} more" if len(value) > limit else "") + "]"
        return str(value)

    return ", ".join(f"{k}={one(v)}" for k, v in evidence.items())


def actions_line(actions: Sequence[Action]) -> str:
    """One line summing up actions by kind: ``actions: clip: 7 steps (steps 3, 4, 5, 8, 9, ... 40), max norm 5.31``."""
    if not actions:
        return ""
    by_kind: dict[str, list[Action]] = {}
    for action in actions:
        by_kind.setdefault(action.kind, []).append(action)
    parts = []
    for kind, acts in by_kind.items():
        steps = sorted(a.step for a in acts)
        text = f"{kind}: {len(acts)} step{'s' if len(acts) != 1 else ''} ({_steps(steps)})"
        norms = [float(a.evidence["norm"]) for a in acts if isinstance(a.evidence.get("norm"), (int, float))]
        if norms:
            text += f", max norm {fmt(max(norms))}"
        parts.append(text)
    return "actions: " + "; ".join(parts)


def _steps(steps: Sequence[int], limit: int = 5) -> str:
    shown = ", ".join(map(str, steps[:limit]))
    return "steps " + shown + (f", ... {steps[-1]}" if len(steps) > limit else "")


def fmt(value: float) -> str:
    """A number in 3 significant digits (scientific outside 1e-3..1e4); NaN as ``-``."""
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.2e}"


def _bar(value: float, lo: float, hi: float, width: int, char: str) -> Text:
    if not math.isfinite(value):
        return Text("" if math.isnan(value) else "!", style="bold red")
    if value <= 0:
        return Text("")
    span = max(hi - lo, 1e-12)
    filled = max(1, round((math.log10(value) - lo) / span * (width - 1)) + 1)
    return Text(char * filled, style="green")
