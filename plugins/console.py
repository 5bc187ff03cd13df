"""Console reporter: the gradient-flow table, the diagnoses and their remedies.

Printed on rank zero (the report hook runs there only) at the end of a watch, and at a
report interval when new diagnoses arrive (or at every interval when asked). An interval's
report lists that interval's diagnoses and actions (clips); the final report lists every
diagnosis and action of the run. Rendering
works from plain rows (:class:`FlowRow`), so ``gradwatch report RUN.jsonl`` reprints the
same report from a run log.

Options (``options={"console": {...}}``):

* ``every_interval`` (bool, default ``False``): print at every report interval, not only
  when there is a new diagnosis.
* ``compact`` (bool, default ``False``): a narrow table (layer, grad norm, bar, status) and
  one line per diagnosis with its remedy titles, no rationale or snippet.
* ``quiet`` (bool, default ``False``): no table; one line per new diagnosis, and at the
  end one line per diagnosis of the run.
* ``show_all`` (bool, default ``False``): one row per layer even in very deep models, and
  remedy snippets in full (else cut after 12 lines).
* ``max_rows`` (int, default 40): above this many layers, runs of alike layers (same
  type, status and name pattern, e.g. ``blocks.3–47``) collapse into one row that shows
  their medians.

What the numbers are: per layer, the mean over the interval's statistics steps of the
gradient L2 norm and RMS (``norm / sqrt(numel)``), skipping steps where the layer had no
gradient or a non-finite one; the mean update-to-weight ratio ``‖Δw‖/‖w‖`` over the
interval's sampled steps. The final report of a watch whose last interval is empty uses
the previous interval's rows; an interval without a sampled step shows the update ratio
of the latest sampled step.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from rich import box
from rich.console import Group
from rich.padding import Padding
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from gradwatch import Action, Diagnosis, GradWatchError, Report, StashKey, StepContext, WatchConfig, hookimpl

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = ["FlowRow", "flow_rows", "flow_table", "layer_status", "render_report"]

_BOOL_OPTIONS = ("every_interval", "compact", "quiet", "show_all")
_OPTIONS = (*_BOOL_OPTIONS, "max_rows")
_SNIPPET_LINES = 12
_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
#: Status shown in the table for each diagnosis kind (plugin kinds show their own name).
STATUS = {
    "vanishing": "vanishing",
    "exploding": "exploding",
    "nonfinite": "non-finite",
    "dead_units": "dead",
    "saturation": "saturated",
    "init_scale": "init",
}
_STATUS_STYLE = {
    "ok": "green",
    "vanishing": "yellow",
    "exploding": "red",
    "non-finite": "bold red",
    "dead": "magenta",
    "saturated": "magenta",
}


@dataclass(frozen=True, slots=True)
class FlowRow:
    """One row of the gradient-flow table (a layer, or a collapsed run of alike layers).

    Attributes:
        name: Qualified layer name, or a collapsed name such as ``blocks.3–47``.
        type_name: Module type.
        grad_norm: Mean gradient L2 norm over the interval's statistics steps.
        grad_rms: Mean gradient RMS.
        update_ratio: Mean ``‖Δw‖/‖w‖`` over the interval's sampled steps (NaN if none).
        nonfinite: Number of (step, tensor) gradients that held a NaN or an Inf.
        status: ``ok``, ``vanishing``, ``exploding``, ``non-finite``, ``dead``, ``saturated``…
        count: Number of layers the row stands for (1 unless collapsed).
    """

    name: str
    type_name: str
    grad_norm: float
    grad_rms: float
    update_ratio: float
    nonfinite: int
    status: str = "ok"
    count: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type_name,
            "grad_norm": _num(self.grad_norm),
            "grad_rms": _num(self.grad_rms),
            "update_ratio": _num(self.update_ratio),
            "nonfinite": self.nonfinite,
            "status": self.status,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlowRow:
        return cls(
            name=d["name"],
            type_name=d.get("type", ""),
            grad_norm=_unnum(d.get("grad_norm")),
            grad_rms=_unnum(d.get("grad_rms")),
            update_ratio=_unnum(d.get("update_ratio")),
            nonfinite=int(d.get("nonfinite", 0)),
            status=d.get("status", "ok"),
        )


# ---------------------------------------------------------------------- hooks


@dataclass
class _State:
    actions: list[Action] = field(default_factory=list)  # the run's, for the final report


KEY = StashKey[_State]()


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    ctx.stash[KEY] = _State()
    options = config.plugin_options("console")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise GradWatchError(f"unknown console option(s) {unknown}; known options are {sorted(_OPTIONS)}")
    for name in _BOOL_OPTIONS:
        if name in options and not isinstance(options[name], bool):
            raise GradWatchError(f"console option {name!r} takes True or False, got {options[name]!r}")
    rows = options.get("max_rows", 40)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise GradWatchError(f"console option 'max_rows' takes a positive integer of table rows, got {rows!r}")


@hookimpl(trylast=True)
def gradwatch_report(report: Report, console: Console, ctx: StepContext) -> None:
    if not ctx.config.report:
        return
    options = ctx.config.plugin_options("console")
    state = ctx.stash.setdefault(KEY, _State())
    state.actions.extend(report.actions)
    if not (report.final or report.diagnoses or options.get("every_interval", False)):
        return
    render_report(
        console,
        rows=flow_rows(report, ctx.config.report_every),
        diagnoses=report.all_diagnoses if report.final else report.diagnoses,
        actions=state.actions if report.final else report.actions,
        step=report.step,
        final=report.final,
        options=options,
    )


# ---------------------------------------------------------------------- statistics


def layer_summary(report: Report, report_every: int | None = None) -> dict[str, torch.Tensor]:
    """Per-layer means of the interval (see the module docstring), as ``[L]`` tensors.

    Args:
        report: The report.
        report_every: Steps per interval; when the report's window is empty (a run that
            ended on an interval boundary), the history rows of the last ``report_every``
            steps are used instead (all of the history when ``None``).
    """
    window = report.window
    if len(window) or report.history is None:
        norm, rms, nonfinite = window.grad_norm, window.grad_rms, window.nonfinite
        present = window.present > 0
        ratio = window.update_ratio
    else:
        history = report.history
        keep = history.steps > report.step - report_every if report_every else torch.ones_like(history.steps, dtype=torch.bool)
        norm, rms, nonfinite = history.grad_norm[keep], history.grad_rms[keep], history.nonfinite[keep]
        present = torch.ones_like(norm, dtype=torch.bool)
        ratio = history.update_ratio
        keep = ratio.steps > report.step - report_every if report_every else torch.ones_like(ratio.steps, dtype=torch.bool)
        ratio = type(ratio)(ratio.steps[keep], ratio.values[keep])
    out: dict[str, torch.Tensor] = {}
    for key, values in (("grad_norm", norm), ("grad_rms", rms)):
        mask = present & torch.isfinite(values)
        count = mask.sum(0)
        total = torch.where(mask, values, torch.zeros_like(values)).sum(0)
        out[key] = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))
    layers = len(window.layers)
    out["nonfinite"] = nonfinite.sum(0) if nonfinite.numel() else torch.zeros(layers)
    if not len(ratio.steps) and report.history is not None and len(report.history.update_ratio.steps):
        ratio = report.history.update_ratio  # no sampled step in this interval: the latest one
        ratio = type(ratio)(ratio.steps[-1:], ratio.values[-1:])
    out["update_ratio"] = ratio.values.mean(0) if len(ratio.steps) else torch.full((layers,), math.nan)
    return out


def layer_status(report: Report) -> list[str]:
    """The status of each layer of ``report.window.layers`` from the run's diagnoses so far.

    A diagnosis naming a module that is not a layer (an activation) marks the layer that
    runs before it; one naming a container marks every layer inside it.
    """
    names = list(report.window.layers)
    return statuses(names, report.all_diagnoses, _module_order(report))


def statuses(names: Sequence[str], diagnoses: Iterable[Diagnosis], modules: Sequence[str] = ()) -> list[str]:
    """Status per layer name; the worst diagnosis wins, ``non-finite`` over all."""
    status = ["ok"] * len(names)
    rank = {name: i for i, name in enumerate(names)}
    weight = ["ok", "init", "saturated", "dead", "vanishing", "exploding", "non-finite"]
    for diagnosis in diagnoses:
        label = STATUS.get(diagnosis.kind, diagnosis.kind)
        for target in diagnosis.layers:
            for i in _layers_for(target, names, rank, modules):
                old = status[i]
                if (weight.index(label) if label in weight else 1) > (weight.index(old) if old in weight else 1):
                    status[i] = label
    return status


def _layers_for(target: str, names: Sequence[str], rank: Mapping[str, int], modules: Sequence[str]) -> list[int]:
    if target in rank:
        return [rank[target]]
    inside = [i for i, name in enumerate(names) if name.startswith(target + ".") or target == ""]
    if inside:
        return inside
    if target in modules:  # an activation module: the nearest layer before it
        for name in reversed(modules[: modules.index(target)]):
            if name in rank:
                return [rank[name]]
    return []


def _module_order(report: Report) -> list[str]:
    model = getattr(report.model, "model", None)
    return [name for name, _ in model.named_modules()] if model is not None else []


def flow_rows(report: Report, report_every: int | None = None) -> list[FlowRow]:
    """The table rows of ``report``, one per layer in forward order (``report_every`` as
    for :func:`layer_summary`)."""
    stats = layer_summary(report, report_every)
    status = layer_status(report)
    types = {layer.name: layer.type_name for layer in report.model.layers}
    return [
        FlowRow(
            name=name,
            type_name=types.get(name, ""),
            grad_norm=float(stats["grad_norm"][i]),
            grad_rms=float(stats["grad_rms"][i]),
            update_ratio=float(stats["update_ratio"][i]),
            nonfinite=int(stats["nonfinite"][i]),
            status="non-finite" if stats["nonfinite"][i] > 0 else status[i],
        )
        for i, name in enumerate(report.window.layers)
    ]


# ---------------------------------------------------------------------- collapsing


def _template(name: str) -> str:
    # Numbered components ("blocks.3.fc1" -> "blocks.#.fc1"): "fc1" and "fc2" stay apart.
    return ".".join("#" if part.isdigit() else part for part in name.split("."))


def _key(row: FlowRow) -> tuple[str, str, str]:
    return (_template(row.name), row.type_name, row.status)


def collapse(rows: Sequence[FlowRow], *, max_rows: int = 40, dash: str = "–") -> list[FlowRow]:
    """Collapse repeated blocks of alike rows when there are more than ``max_rows`` rows.

    A block of ``p`` rows (``p`` ≤ 8) repeated ``r`` ≥ 4 times in a row keeps its first and
    last repeat; the repeats between become ``p`` rows named like ``blocks.3–47.fc``
    that show the medians of the rows they stand for.
    """
    if len(rows) <= max_rows:
        return list(rows)
    keys = [_key(r) for r in rows]
    out: list[FlowRow] = []
    i = 0
    while i < len(rows):
        best_p, best_r = 0, 0
        for p in range(1, 9):
            r = 1
            while i + (r + 1) * p <= len(rows) and keys[i + r * p : i + (r + 1) * p] == keys[i : i + p]:
                r += 1
            if r >= 4 and r * p > best_r * best_p:
                best_p, best_r = p, r
        if not best_p:
            out.append(rows[i])
            i += 1
            continue
        p, r = best_p, best_r
        out.extend(rows[i : i + p])
        for j in range(p):
            members = [rows[i + k * p + j] for k in range(1, r - 1)]
            out.append(_merge(members, dash))
        out.extend(rows[i + (r - 1) * p : i + r * p])
        i += r * p
    return out


def _merge(members: Sequence[FlowRow], dash: str) -> FlowRow:
    first, last = members[0].name.split("."), members[-1].name.split(".")
    name = ".".join(a if a == b else f"{a}{dash}{b}" for a, b in zip(first, last))

    def med(values: list[float]) -> float:
        finite = [v for v in values if not math.isnan(v)]
        return statistics.median(finite) if finite else math.nan

    return FlowRow(
        name=name,
        type_name=members[0].type_name,
        grad_norm=med([m.grad_norm for m in members]),
        grad_rms=med([m.grad_rms for m in members]),
        update_ratio=med([m.update_ratio for m in members]),
        nonfinite=sum(m.nonfinite for m in members),
        status=members[0].status,
        count=len(members),
    )


# ---------------------------------------------------------------------- rendering


def _plain(console: Console) -> bool:
    """No box drawing or block characters when the output is not a terminal."""
    return not console.is_terminal or not console.encoding.lower().startswith("utf")


def flow_table(
    rows: Sequence[FlowRow] | Report, console: Console | None = None, *, title: str = "", options: Mapping[str, Any] | None = None
) -> Table:
    """The gradient-flow table: one row per layer (or collapsed run) in forward order."""
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
    """Print a report: the flow table, the actions line, the diagnoses and their remedies."""
    options = options or {}
    if options.get("quiet", False):
        for diagnosis in diagnoses:
            console.print(_headline(diagnosis), soft_wrap=True)
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
            console.print(_headline(diagnosis), soft_wrap=True)
            for n, remedy in enumerate(diagnosis.remedies, 1):
                console.print(f"  {n}. {remedy.title}", soft_wrap=True, highlight=False)
            continue
        console.print(_panel(diagnosis, plain, 10**6 if options.get("show_all", False) else _SNIPPET_LINES))


def _headline(d: Diagnosis) -> Text:
    where = _where(d.layers)
    text = Text(f"{d.severity.value.upper()} ", style=_SEVERITY_STYLE.get(d.severity.value, ""))
    text.append(f"{d.kind} since step {d.step}{' in ' + where if where else ''}: ", style="bold")
    text.append(d.message)
    return text


def _where(layers: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(name or "(root)" for name in layers[:limit])
    return shown + (f" and {len(layers) - limit} more" if len(layers) > limit else "")


def _panel(d: Diagnosis, plain: bool, max_lines: int) -> Panel:
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
    """One line summing up the interval's actions: ``clipped 12 steps (max norm 5.31)``."""
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
    """A number in 3 significant digits (scientific outside 1e-3..1e4)."""
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


def _num(value: float) -> float | str | None:
    """JSON has no NaN or Inf: ``None`` for NaN, ``"inf"``/``"-inf"`` strings."""
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _unnum(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)  # float("inf") / float("nan") read the strings back
