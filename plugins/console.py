"""Console reporter: a rich table of per-layer gradient flow.

Printed on rank zero at the end of a watch, and at a report interval when new
diagnoses arrive. Options (``options={"console": {...}}``):

* ``every_interval`` (bool, default False): print at every report interval.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from rich.table import Table
from rich.text import Text

from gradwatch import GradWatchError, Report, StepContext, hookimpl

if TYPE_CHECKING:
    from rich.console import Console

_OPTIONS = {"every_interval"}
_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


@hookimpl
def gradwatch_configure(config, ctx: StepContext) -> None:
    unknown = set(config.plugin_options("console")) - _OPTIONS
    if unknown:
        raise GradWatchError(f"unknown console option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")


@hookimpl(trylast=True)
def gradwatch_report(report: Report, console: Console, ctx: StepContext) -> None:
    if not ctx.config.report:
        return
    every = bool(ctx.config.plugin_options("console").get("every_interval", False))
    if not (report.final or report.diagnoses or every):
        return
    console.print(flow_table(report))
    for diagnosis in report.diagnoses if not report.final else report.all_diagnoses:
        style = _SEVERITY_STYLE.get(diagnosis.severity.value, "")
        where = f" [{', '.join(diagnosis.layers[:4])}{', …' if len(diagnosis.layers) > 4 else ''}]" if diagnosis.layers else ""
        console.print(Text(f"{diagnosis.severity.value.upper()} step {diagnosis.step} {diagnosis.kind}{where}: ", style=style), Text(diagnosis.message))
        for n, remedy in enumerate(diagnosis.remedies, 1):
            console.print(Text(f"  {n}. {remedy.title}", style="bold"), Text(f" — {remedy.rationale}"))


def layer_summary(report: Report) -> dict[str, torch.Tensor]:
    """Per-layer mean of each statistic over the report's rows (the window, or the
    run's history when the window is empty), ignoring steps where a layer had no
    gradient."""
    source = report.window if len(report.window) else report.history
    present = source.grad_norm.new_ones(source.grad_norm.shape) if source is report.history else report.window.present > 0
    out: dict[str, torch.Tensor] = {}
    for key in ("grad_norm", "grad_rms", "grad_max"):
        values = getattr(source, key)
        mask = present & torch.isfinite(values) if values.numel() else present
        count = mask.sum(0)
        total = torch.where(mask, values, torch.zeros_like(values)).sum(0)
        out[key] = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))
    out["nonfinite"] = source.nonfinite.sum(0) if len(source) else torch.zeros(len(report.window.layers))
    ratio = report.window.update_ratio if len(report.window.update_ratio.steps) else report.history.update_ratio
    out["update_ratio"] = ratio.values.mean(0) if len(ratio.steps) else torch.full((len(report.window.layers),), math.nan)
    return out


def flow_table(report: Report) -> Table:
    """One row per layer in forward order: name, type, norm, RMS, a log-scale bar, max, update/weight."""
    stats = layer_summary(report)
    norms = stats["grad_norm"]
    finite = norms[torch.isfinite(norms) & (norms > 0)]
    lo = math.log10(float(finite.min())) if finite.numel() else 0.0
    hi = math.log10(float(finite.max())) if finite.numel() else 1.0
    title = f"gradwatch · gradient flow · step {report.step}" + (" (final)" if report.final else "")
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("layer", no_wrap=True)
    table.add_column("type", no_wrap=True, style="dim")
    table.add_column("grad norm", justify="right")
    table.add_column("rms", justify="right")
    table.add_column("", no_wrap=True)
    table.add_column("max |g|", justify="right")
    table.add_column("Δw/w", justify="right")
    table.add_column("non-finite", justify="right")
    layers = {layer.name: layer for layer in report.model.layers}
    for i, name in enumerate(report.window.layers):
        layer = layers.get(name)
        norm = float(norms[i])
        table.add_row(
            name or "(root)",
            layer.type_name if layer else "",
            _fmt(norm),
            _fmt(float(stats["grad_rms"][i])),
            _bar(norm, lo, hi),
            _fmt(float(stats["grad_max"][i])),
            _fmt(float(stats["update_ratio"][i])),
            str(int(stats["nonfinite"][i])) if float(stats["nonfinite"][i]) else "",
        )
    return table


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "–"
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.2e}"


def _bar(value: float, lo: float, hi: float, width: int = 16) -> Text:
    if not math.isfinite(value) or value <= 0:
        return Text("!" if not math.isfinite(value) and not math.isnan(value) else "", style="bold red")
    span = max(hi - lo, 1e-12)
    filled = max(1, round((math.log10(value) - lo) / span * width))
    return Text("█" * filled, style="green")
