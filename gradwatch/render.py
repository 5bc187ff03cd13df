"""Rich rendering of a report: the gradient-flow table, the actions line, the diagnosis panels.

The console plugin prints with :func:`render_report` during a run and ``gradwatch report``
prints the same from a run log, so both show one report the same way. Rendering works
from plain rows (:class:`gradwatch.flow.FlowRow`) and plain diagnoses and actions; it
reads no statistics. Options are the console plugin's (``compact``, ``quiet``,
``show_all``, ``max_rows``). Output that is not a terminal, or not UTF-8, gets no box
drawing or block characters; colour follows the console (``NO_COLOR`` included).

How long a report is (issue 14: read in ten seconds, trusted):

* A diagnosis is printed in full (its box) once per run: a :class:`ReportMemory` keeps
  which diagnoses (by kind, severity and layers: :func:`diagnosis_key`) and which remedies
  were printed, at which step. A diagnosis printed before is referred to in one line; one
  whose kind, severity or layers changed is printed in full again.
* A remedy that answers several diagnoses (the same kind and code) is printed once, under
  the first, which lists the others; the others refer to it.
* A box shows the message, the detector's headline numbers (``Diagnosis.summary``), the
  first remedy in full (rationale, code cut at :data:`SNIPPET_LINES` rendered lines, its
  ``params``) and the others with their rationale; ``show_all`` shows everything (all
  evidence, every snippet whole).
* The final report prints the table, what changed since the last printed report, the
  boxes of diagnoses not printed yet, and ends with a short summary, one line per
  diagnosis of the run.

The bars are proportional to log10 of the gradient norm over a stated range: the decades
below the largest norm of the table (at least :data:`MIN_DECADES`), so norms of 72.7 and
55.2 get bars of about the same length whatever else is in the table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Group
from rich.padding import Padding
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from gradwatch.flow import FlowRow, FlowSpan, collapse, flow_rows
from gradwatch.types import Action, Diagnosis, Remedy, Report

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = [
    "MIN_DECADES",
    "SNIPPET_LINES",
    "ReportMemory",
    "actions_line",
    "bar_length",
    "bar_range",
    "diagnosis_key",
    "diagnosis_panel",
    "flow_table",
    "flow_title",
    "fmt",
    "format_evidence",
    "headline",
    "remedy_key",
    "render_report",
    "table_note",
]

#: Rendered lines of the first remedy's snippet in a box (``show_all`` prints it whole).
SNIPPET_LINES = 8
#: The bars span at least this many decades below the table's largest norm.
MIN_DECADES = 4
_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_STATUS_STYLE = {
    "ok": "green",
    "vanishing": "yellow",
    "exploding": "red",
    "non-finite": "bold red",
    "dead": "magenta",
    "saturated": "magenta",
}
#: What prints the full report, when the caller does not say (the console plugin and the
#: CLI each pass their own).
FULL_HINT = "show_all=True"


def _plain(console: Console) -> bool:
    """No box drawing or block characters when the output is not a terminal."""
    return not console.is_terminal or not console.encoding.lower().startswith("utf")


# ---------------------------------------------------------------------- what was printed


def diagnosis_key(d: Diagnosis) -> tuple[str, str, tuple[str, ...]]:
    """When two diagnoses are "the same" for printing: kind, severity and layers.

    A detector that reports a condition again with new numbers but the same kind,
    severity and layers is referred to; a change of any of the three is printed in full.
    """
    return (d.kind, d.severity.value, tuple(d.layers))


def remedy_key(r: Remedy) -> tuple[str, str]:
    """When two remedies are the same: kind and code (the title when there is no code)."""
    return (r.kind, r.snippet.strip() or r.title)


@dataclass
class ReportMemory:
    """What one console printed during a run, so that a report refers to what it showed.

    Attributes:
        boxes: Diagnosis key (:func:`diagnosis_key`) -> the step of the report that
            printed it in full.
        remedies: Remedy key (:func:`remedy_key`) -> (the diagnosis kind it was printed
            under, the step of that report).
        last_step: The step of the last report printed, or ``None``.
        statuses: Layer name -> its status in the last table printed.
        cadence: Whether the cadence line was printed.
    """

    boxes: dict[tuple[str, str, tuple[str, ...]], int] = field(default_factory=dict)
    remedies: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)
    last_step: int | None = None
    statuses: dict[str, str] = field(default_factory=dict)
    cadence: bool = False


# ---------------------------------------------------------------------- the table


def bar_range(rows: Sequence[FlowRow]) -> tuple[float, int]:
    """``(log10 of the largest finite norm, decades the bars span below it)``.

    The span is the table's own range of finite positive norms rounded up to whole
    decades, at least :data:`MIN_DECADES`.
    """
    finite = [r.grad_norm for r in rows if math.isfinite(r.grad_norm) and r.grad_norm > 0]
    if not finite:
        return 0.0, MIN_DECADES
    top, bottom = math.log10(max(finite)), math.log10(min(finite))
    return top, max(MIN_DECADES, math.ceil(top - bottom - 1e-9))


def bar_length(value: float, top: float, decades: int, width: int) -> int:
    """Characters of the bar of ``value``: ``width × (log10 value − (top − decades)) / decades``,
    rounded, at least 1 for a positive value (0 for zero, NaN or Inf)."""
    if not math.isfinite(value) or value <= 0:
        return 0
    return max(1, min(width, round(width * (math.log10(value) - (top - decades)) / decades)))


def flow_title(span: FlowSpan | int, *, final: bool = False, plain: bool = False) -> str:
    """``gradwatch · gradient flow · steps 50–99 (final)``: the steps the table's means cover."""
    dot, dash = ("-", "-") if plain else ("·", "–")
    if isinstance(span, int):
        steps = f"step {span}"
    else:
        steps = f"step {span.last}" if span.first >= span.last else f"steps {span.first}{dash}{span.last}"
    return f"gradwatch {dot} gradient flow {dot} {steps}" + (" (final)" if final else "")


def table_note(rows: Sequence[FlowRow], span: FlowSpan | None = None) -> str:
    """The line under the table: which steps the means are of, and the range of the bars."""
    top, decades = bar_range(rows)
    parts = []
    if span is not None and span.steps:
        n = len(span.steps)
        if n == 1:
            parts.append(f"values of statistics step {span.steps[0]}")
        else:
            parts.append(f"means of {n} statistics steps ({_steps_text(span.steps, word=False)})")
        if span.nonfinite:
            parts.append(f"non-finite gradients left out of the means at {_steps_text(span.nonfinite)}")
    finite = [r.grad_norm for r in rows if math.isfinite(r.grad_norm) and r.grad_norm > 0]
    if finite:
        parts.append(f"bars: log10, {decades} decades below {fmt(10**top)}")
    return "; ".join(parts)


def _steps_text(steps: Sequence[int], limit: int = 2, word: bool = True) -> str:
    steps = list(steps)
    if len(steps) == 1:
        return f"step {steps[0]}" if word else str(steps[0])
    text = f"{steps[0]}-{steps[-1]}" if len(steps) > limit else ", ".join(map(str, steps))
    return f"steps {text}" if word else text


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
        title = title or flow_title(rows.step)
        rows = flow_rows(rows)
    plain = console is not None and _plain(console)
    dash = "-" if plain else "–"
    top, decades = bar_range(rows)  # of every row, before collapsing: the note states it
    if not options.get("show_all", False):
        rows = collapse(rows, max_rows=int(options.get("max_rows", 40)), dash=dash)
    compact = bool(options.get("compact", False))
    width = console.width if console is not None else 100
    narrow = compact or width < 90
    bar_width = 8 if narrow else 16
    table = Table(
        title=title, title_justify="left", box=box.ASCII if plain else box.SIMPLE_HEAD, pad_edge=False, show_edge=not plain
    )
    table.add_column("layer", no_wrap=True, overflow="fold")
    if not narrow:
        table.add_column("type", no_wrap=True, style="dim")
    table.add_column("grad norm", justify="right", no_wrap=True)
    if not narrow:
        table.add_column("rms", justify="right", no_wrap=True)
    table.add_column("log10 bar" if narrow else "log scale", no_wrap=True, min_width=bar_width)
    if not compact:
        table.add_column("Δw/w" if not plain else "dw/w", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    char = "#" if plain else "█"
    for row in rows:
        name = (row.name or "(root)") + (f" (x{row.count})" if row.count > 1 else "")
        cells: list[RenderableType] = [name]
        if not narrow:
            cells.append(row.type_name)
        cells.append(fmt(row.grad_norm))
        if not narrow:
            cells.append(fmt(row.grad_rms))
        cells.append(_bar(row.grad_norm, top, decades, bar_width, char))
        if not compact:
            cells.append(fmt(row.update_ratio))
        cells.append(Text(row.status, style=_STATUS_STYLE.get(row.status, "yellow")))
        table.add_row(*cells)
    return table


def _bar(value: float, top: float, decades: int, width: int, char: str) -> Text:
    if math.isinf(value):
        return Text("!", style="bold red")
    return Text(char * bar_length(value, top, decades, width), style="green")


# ---------------------------------------------------------------------- the report


def render_report(
    console: Console,
    *,
    rows: Sequence[FlowRow],
    diagnoses: Sequence[Diagnosis],
    actions: Sequence[Action] = (),
    step: int,
    final: bool,
    options: Mapping[str, Any] | None = None,
    memory: ReportMemory | None = None,
    span: FlowSpan | None = None,
    run_diagnoses: Sequence[Diagnosis] | None = None,
    repeat: bool = False,
    cadence: str | None = None,
    full_hint: str = FULL_HINT,
) -> None:
    """Print a report: the flow table, the actions line, the diagnoses and their remedies.

    Args:
        console: Where to print.
        rows: The flow table's rows, one per layer.
        diagnoses: The diagnoses this report is about (an interval's new ones; every one
            of the run for a report from a log), worst first. Each not printed before (by
            ``memory``) gets a box (a line when compact or quiet); one printed before is
            referred to in one line.
        actions: The actions to sum up in one line.
        step: The step of the report.
        final: Whether this is the run's final report: it says what changed since the
            last printed report and ends with a summary of ``run_diagnoses`` (an empty
            one says that no problem was found).
        options: The console plugin's options: ``quiet`` (one line per diagnosis and no
            table), ``compact``, ``show_all`` (the full report), ``max_rows``.
        memory: What was printed before in this run (updated here); ``None`` for a
            report on its own (``gradwatch report``).
        span: The steps the rows are means of (the table's title and note say them).
        run_diagnoses: Every diagnosis of the run, for the final summary (default:
            ``diagnoses``).
        repeat: Print every diagnosis in full even if printed before (a report asked for
            with ``gw.report()``).
        cadence: How the statistics cadence was chosen, printed once per run (filled in
            by the cadence work of issue 10; ``None`` prints nothing).
        full_hint: What prints the full report, named where a box is cut short.
    """
    options = options or {}
    memory = memory if memory is not None else ReportMemory()
    run_diagnoses = list(run_diagnoses) if run_diagnoses is not None else list(diagnoses)
    quiet = bool(options.get("quiet", False))
    compact = bool(options.get("compact", False))
    full = bool(options.get("show_all", False))
    plain = _plain(console)
    todo = _latest(diagnoses)
    if quiet:
        shown = todo if not final else _latest(run_diagnoses)
        for d in shown:
            if repeat or final or diagnosis_key(d) not in memory.boxes:
                console.print(headline(d))
                memory.boxes.setdefault(diagnosis_key(d), step)
        memory.last_step = step
        return
    # The title on its own line: it wraps at the console's width between words (a table's
    # own title wraps at the table's width, narrower than the title in compact mode).
    console.print(Text(flow_title(span if span is not None else step, final=final, plain=plain), style="italic"))
    console.print(flow_table(rows, console, options=options))
    note = table_note(rows, span)
    if note:
        console.print(Text(note, style="dim"))
    if cadence and not memory.cadence:
        console.print(Text(f"cadence: {cadence}", style="dim"))
        memory.cadence = True
    line = actions_line(actions)
    if line:
        console.print(line, highlight=False)
    if final and memory.last_step is not None:
        console.print(_changes(memory, rows, todo), highlight=False)
    new = [d for d in todo if repeat or diagnosis_key(d) not in memory.boxes]
    new_ids = {id(d) for d in new}
    also: dict[tuple[str, str], list[str]] = {}
    for d in new:
        for r in d.remedies:
            also.setdefault(remedy_key(r), []).append(d.kind)
    here: dict[tuple[str, str], str] = {}  # remedies printed in this report -> under which kind
    for d in todo:
        key = diagnosis_key(d)
        if id(d) not in new_ids:
            if not final:  # the final summary lists it
                console.print(_still(d, memory.boxes[key], console.width), highlight=False)
            continue
        seen = {k: f"as for {kind} above" for k, kind in here.items()}
        if not repeat:
            seen.update({k: f"as for {kind} at step {s}" for k, (kind, s) in memory.remedies.items() if k not in here})
        if compact:
            console.print(headline(d))
            for n, remedy in enumerate(d.remedies, 1):
                rkey = remedy_key(remedy)
                ref = seen.get(rkey)
                others = [k for k in dict.fromkeys(also.get(rkey, ())) if k != d.kind]
                text = Text(f"  {n}. {remedy.title}")
                if ref:
                    text.append(f" ({ref})", style="dim")
                elif others:
                    text.append(f" (also for {', '.join(others)})", style="dim")
                    here.setdefault(rkey, d.kind)
                console.print(text, highlight=False)
        else:
            console.print(
                diagnosis_panel(
                    d,
                    plain=plain,
                    full=full,
                    width=console.width,
                    seen=seen,
                    also={k: [x for x in v if x != d.kind] for k, v in also.items()},
                    hint=full_hint,
                )
            )
        memory.boxes[key] = step
        if not compact:  # the remedy a box explains (its rationale and code): later ones refer to it
            explained = next((r for r in d.remedies if remedy_key(r) not in seen), None)
            for remedy in d.remedies if full else [explained] if explained is not None else []:
                rkey = remedy_key(remedy)
                if rkey not in here and rkey not in seen:
                    here[rkey] = d.kind
                    memory.remedies[rkey] = (d.kind, step)
    if final:
        _summary(console, run_diagnoses, memory, step, printed=new, actions=actions, span=span, hint=full_hint, full=full)
    memory.last_step = step
    memory.statuses = {r.name: r.status for r in rows}


def _latest(diagnoses: Sequence[Diagnosis]) -> list[Diagnosis]:
    """One diagnosis per key (the latest: newest numbers), in the order given."""
    latest: dict[tuple[str, str, tuple[str, ...]], Diagnosis] = {}
    for d in diagnoses:
        latest[diagnosis_key(d)] = d
    keep = {id(d) for d in latest.values()}
    return [d for d in diagnoses if id(d) in keep]


def _still(d: Diagnosis, shown_at: int, width: int) -> Text:
    text = Text("still: ", style="dim")
    text.append(f"{d.severity.value.upper()} {d.kind}", style=_SEVERITY_STYLE.get(d.severity.value, ""))
    where = _fit_where(d.layers, max(10, width - 40))
    text.append(f" since step {d.step}{' in ' + where if where else ''}, shown at step {shown_at}")
    if d.summary:
        text.append(f"; now {d.summary}", style="dim")
    return text


def _changes(memory: ReportMemory, rows: Sequence[FlowRow], todo: Sequence[Diagnosis]) -> Text:
    """``since step 49: no new diagnosis; no layer changed status``."""
    new = [d for d in todo if diagnosis_key(d) not in memory.boxes]
    parts = [f"{len(new)} new diagnosis{'es' if len(new) != 1 else ''} (below)" if new else "no new diagnosis"]
    moved = [
        (r.name, memory.statuses[r.name], r.status)
        for r in rows
        if r.name in memory.statuses and memory.statuses[r.name] != r.status
    ]
    if moved:
        listed = ", ".join(f"{n or '(root)'} {a} -> {b}" for n, a, b in moved[:3])
        more = f" and {len(moved) - 3} more" if len(moved) > 3 else ""
        parts.append(f"{len(moved)} layer{'s' if len(moved) != 1 else ''} changed status ({listed}{more})")
    else:
        parts.append("no layer changed status")
    return Text(f"since the report of step {memory.last_step}: " + "; ".join(parts), style="bold")


def _summary(
    console: Console,
    run_diagnoses: Sequence[Diagnosis],
    memory: ReportMemory,
    step: int,
    *,
    printed: Sequence[Diagnosis],
    actions: Sequence[Action],
    span: FlowSpan | None,
    hint: str,
    full: bool,
) -> None:
    """The final summary: counts, one line per diagnosis of the run, and how to see it all."""
    every = _latest(sorted(run_diagnoses, key=lambda d: (-d.severity.rank, d.step)))
    if not every:
        console.print(Text("no gradient problems found", style="green"))
        return
    counts: dict[str, int] = {}
    for d in every:
        counts[d.severity.value] = counts.get(d.severity.value, 0) + 1
    told = ", ".join(f"{n} {sev}{'s' if n != 1 else ''}" for sev, n in sorted(counts.items(), key=lambda kv: -_rank(kv[0])))
    acted = f"{len(actions)} action{'s' if len(actions) != 1 else ''}" if actions else "no action"
    head = Text("summary: ", style="bold")
    head.append(f"{len(every)} diagnos{'es' if len(every) != 1 else 'is'} ({told}); {acted}")
    console.print(head, highlight=False)
    now = {id(d) for d in printed}
    for d in every:
        line = Text("  ")
        line.append(f"{d.severity.value.upper()} {d.kind}", style=_SEVERITY_STYLE.get(d.severity.value, ""))
        n = len(d.layers)
        where = f" in {n} layers" if n > 1 else (f" in {d.layers[0] or '(root)'}" if n == 1 else "")
        line.append(f" since step {d.step}{where}: ")
        line.append(d.summary or d.message)
        at = memory.boxes.get(diagnosis_key(d))
        line.append(
            " (above)" if id(d) in now or at == step else (f" (shown at step {at})" if at is not None else ""), style="dim"
        )
        console.print(line, highlight=False)
    if not full:
        console.print(Text(f"full report: {hint}", style="dim"), highlight=False)


def _rank(severity: str) -> int:
    return {"info": 0, "warning": 1, "error": 2}.get(severity, 0)


# ---------------------------------------------------------------------- diagnoses


def headline(d: Diagnosis) -> Text:
    """One line for a diagnosis: ``WARNING vanishing since step 5 in linear1: message``.

    Printed with word wrapping: a long line wraps between words, never inside a name.
    """
    where = _where(d.layers)
    text = Text(f"{d.severity.value.upper()} ", style=_SEVERITY_STYLE.get(d.severity.value, ""))
    text.append(f"{d.kind} since step {d.step}{' in ' + where if where else ''}: ", style="bold")
    text.append(d.message)
    return text


def _where(layers: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(name or "(root)" for name in layers[:limit])
    return shown + (f" and {len(layers) - limit} more" if len(layers) > limit else "")


def _fit_where(layers: Sequence[str], budget: int) -> str:
    """The layers' names, as many whole names as fit in ``budget`` characters
    (``net.0, net.2 and 9 more``), or ``11 layers`` when not even one fits."""
    if not layers:
        return ""
    names = [name or "(root)" for name in layers]
    whole = ", ".join(names)
    if len(whole) <= budget:
        return whole
    for k in range(len(names) - 1, 0, -1):
        text = ", ".join(names[:k]) + f" and {len(names) - k} more"
        if len(text) <= budget:
            return text
    return f"{len(names)} layers"


def _title(d: Diagnosis, width: int) -> str:
    head = f"{d.severity.value.upper()} {d.kind} since step {d.step}"
    if not d.layers:
        return head
    # The panel draws "+- " before the title and " -+" after it: 8 columns to spare.
    return f"{head} in {_fit_where(d.layers, width - len(head) - 4 - 8)}"


def diagnosis_panel(
    d: Diagnosis,
    *,
    plain: bool = False,
    max_lines: int = SNIPPET_LINES,
    full: bool = False,
    width: int = 100,
    seen: Mapping[tuple[str, str], str] | None = None,
    also: Mapping[tuple[str, str], Sequence[str]] | None = None,
    hint: str = FULL_HINT,
) -> Panel:
    """A diagnosis in a panel: message, headline numbers, and its remedies.

    Args:
        d: The diagnosis.
        plain: ASCII borders (for output that is not a terminal).
        max_lines: The first remedy's snippet is cut after this many rendered lines, with
            a line that says how many more and what prints them (``hint``).
        full: Everything: all evidence, every remedy's snippet whole.
        width: The console width (the title lists as many whole layer names as fit).
        seen: Remedies (by :func:`remedy_key`) printed elsewhere -> where ("as for
            init_scale above"): listed by title only.
        also: Remedies -> the other diagnoses of this report they answer too.
        hint: What prints the full report.
    """
    seen = seen or {}
    also = also or {}
    parts: list[RenderableType] = [Text(d.message)]
    summary = bool(d.summary) and not full
    if full and d.evidence:
        parts.append(Text("evidence: " + format_evidence(d.evidence, limit=1000), style="dim"))
    elif d.summary:
        parts.append(Text("measured: " + d.summary, style="dim"))
    elif d.evidence:
        parts.append(Text("evidence: " + format_evidence(_scalars(d.evidence)), style="dim"))
    detailed = False  # the first remedy not printed elsewhere gets its code
    inner = max(20, width - 4 - 3)  # panel borders and padding, and the remedy indent
    for n, remedy in enumerate(d.remedies, 1):
        key = remedy_key(remedy)
        head = Text(f"{n}. ", style="bold")
        head.append(remedy.title, style="bold")
        if key in seen:
            head.append(f" ({seen[key]})", style="dim")
            parts.append(head)
            continue
        others = list(dict.fromkeys(also.get(key, ())))
        if others:
            head.append(f" (also for {', '.join(others)})", style="dim")
        parts.append(head)
        if detailed and not full:  # the best remedy is explained; the others are listed
            continue
        detailed = True
        rationale = remedy.rationale
        if summary and rationale.startswith(d.summary):  # the "measured:" line above says it
            rationale = rationale[len(d.summary) :].lstrip(";,:. ")
        if rationale:
            parts.append(Padding(Text(rationale), (0, 0, 0, 3)))
        if remedy.snippet:
            lines = remedy.snippet.rstrip("\n").splitlines()
            if not full:
                lines = _cut(lines, max_lines, inner, hint)
            syntax = Syntax("\n".join(lines), "python", theme="ansi_dark", background_color="default", word_wrap=True)
            parts.append(Padding(syntax, (0, 0, 0, 3)))
        if remedy.params:
            shown = format_evidence(remedy.params) if full else format_params(remedy.params)
            parts.append(Padding(Text("params: " + shown, style="dim"), (0, 0, 0, 3)))
    if not full and len(d.remedies) > 1:
        parts.append(Text(f"why and how for each remedy: {hint}", style="dim"))
    return Panel(
        Group(*parts),
        title=Text(_title(d, width), style=_SEVERITY_STYLE.get(d.severity.value, "")),
        title_align="left",
        box=box.ASCII if plain else box.ROUNDED,
        border_style=_SEVERITY_STYLE.get(d.severity.value, ""),
    )


def _cut(lines: list[str], max_lines: int, width: int, hint: str) -> list[str]:
    """The first lines of a snippet that fit in ``max_lines`` rendered lines of ``width``
    columns, and a comment saying how many more there are and what prints them."""
    used, keep = 0, 0
    for line in lines:
        rows = max(1, math.ceil(len(line) / width))
        if used + rows > max_lines - (1 if keep < len(lines) - 1 else 0):
            break
        used += rows
        keep += 1
    if keep >= len(lines):
        return lines
    keep = max(keep, 1)
    return [*lines[:keep], f"# ... {len(lines) - keep} more lines: {hint}"]


def _scalars(evidence: Mapping[str, Any]) -> dict[str, Any]:
    """The evidence entries that are single values (numbers, names, flags)."""
    return {k: v for k, v in evidence.items() if v is None or isinstance(v, (bool, int, float, str))}


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


def format_params(params: Mapping[str, Any], limit: int = 3) -> str:
    """A remedy's ``params`` on one short line: numbers and names as they are, lists cut
    after ``limit`` items, nested mappings (per-layer values) as their size; the full
    mapping is in the run log and on ``Remedy.params``."""
    short: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            short[key] = f"<{len(value)} entries>"
        elif isinstance(value, (list, tuple)) and not value:
            continue
        else:
            short[key] = value
    return format_evidence(short, limit=limit)


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
