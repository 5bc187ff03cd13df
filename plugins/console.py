"""Console reporter: the gradient-flow table, the diagnoses and their remedies.

Printed on rank zero (the report hook runs there only) at the end of a watch, at a report
interval when new diagnoses arrive (or at every interval when asked), and whenever
``gw.report()`` asks. A diagnosis is printed in full once per run: a later report refers
to it in one line unless its kind, severity or layers changed; a remedy that answers
several diagnoses is printed once, listing them. The final report prints the table, what
changed since the last printed report, the diagnoses not printed yet, and a short
summary of the run. ``gw.report()`` prints the current state in full whenever it is
called (``gw.report(show_all=True)``: every layer, all evidence, every remedy's code). The
rows and their numbers come from :mod:`gradwatch.flow`, the drawing from
:mod:`gradwatch.render`, which ``gradwatch report RUN.jsonl`` uses too to reprint the
report from a run log.

Options (``options={"console": {...}}``, on ``watch()`` and ``GradWatch()`` alike):

* ``every_interval`` (bool, default ``False``): print at every report interval, not only
  when there is a new diagnosis.
* ``compact`` (bool, default ``False``): a narrow table (layer, grad norm, bar, status) and
  one line per diagnosis with its remedy titles, no rationale or snippet.
* ``quiet`` (bool, default ``False``): no table; one line per new diagnosis, and at the
  end one line per diagnosis of the run.
* ``show_all`` (bool, default ``False``): the full report: one row per layer even in very
  deep models, all evidence, every remedy's rationale and snippet in full (else the first
  remedy's snippet is cut after 8 lines and the others show no code).
* ``max_rows`` (int, default 40): above this many layers, runs of alike layers (same
  type, status and name pattern, e.g. ``blocks.3–47``) collapse into one row that shows
  their medians.

What the numbers are: per layer, the mean over the interval's statistics steps of the
gradient L2 norm and RMS (``norm / sqrt(numel)``), skipping steps where the layer had no
gradient or a non-finite one; the mean update-to-weight ratio ``‖Δw‖/‖w‖`` over the
interval's sampled steps. The table's title names the steps the means cover and the line
under it the statistics steps and the bars' range (log10, decades below the largest
norm). The final report of a watch whose last interval is empty uses the previous
interval's rows; an interval without a sampled step shows the update ratio of the latest
sampled step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradwatch import Action, GradWatchError, Report, StashKey, StepContext, WatchConfig, hookimpl
from gradwatch._door import LogTap
from gradwatch.flow import flow_rows, flow_span
from gradwatch.render import ReportMemory, render_report

if TYPE_CHECKING:
    from rich.console import Console

_BOOL_OPTIONS = ("every_interval", "compact", "quiet", "show_all")
_OPTIONS = (*_BOOL_OPTIONS, "max_rows")


@dataclass
class _State:
    actions: list[Action] = field(default_factory=list)  # the run's, for the final report
    memory: ReportMemory = field(default_factory=ReportMemory)  # what was printed, for "see above"


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
    options: dict[str, Any] = dict(ctx.config.plugin_options("console"))
    state = ctx.stash.setdefault(KEY, _State())
    state.actions.extend(report.actions)
    request = report.request
    if request is not None:
        if request.get("show_all"):
            options["show_all"] = True
    elif not (report.final or report.diagnoses or options.get("every_interval", False)):
        return
    history = report.history
    if not len(report.window) and (history is None or not len(history)):
        console.print(
            f"gradwatch: no gradient statistics yet at step {report.step}: no step boundary was seen; "
            "pass the optimizer to watch(), or call gw.step() after each backward",
            highlight=False,
        )
        return
    if request is not None or report.final:
        # Every diagnosis of the run: those printed before are referred to (the final
        # summary), any never printed (restored from a checkpoint, say) get their box.
        diagnoses = sorted(report.all_diagnoses, key=lambda d: (-d.severity.rank, d.step))
    else:
        diagnoses = list(report.diagnoses)
    render_report(
        console,
        rows=flow_rows(report, ctx.config.report_every),
        diagnoses=diagnoses,
        actions=state.actions if report.final or request is not None else report.actions,
        step=report.step,
        final=report.final,
        options=options,
        memory=state.memory,
        span=flow_span(report, ctx.config.report_every),
        run_diagnoses=report.all_diagnoses,
        repeat=request is not None,
        cadence=_cadence(report),
        full_hint=_full_hint(ctx.config),
    )


def _full_hint(config: WatchConfig) -> str:
    """What prints the full report: the run log's command when there is one (any door);
    else ``gw.report(show_all=True)`` for ``watch()``, the console option for a framework
    door (its watcher is the callback's, which adds its log tap to the plugins)."""
    if config.log:
        return f"gradwatch report {config.log} --all"
    if any(isinstance(plugin, LogTap) for plugin in config.plugins):
        return "options={'console': {'show_all': True}}"
    return "gw.report(show_all=True)"


def _cadence(report: Report) -> str | None:
    """How an ``auto`` cadence was chosen, once it is known (it decides at step 32; a
    shorter run says so at its end)."""
    cadence = report.cadence
    if cadence is None or not cadence.auto or not (cadence.decided or report.final):
        return None  # explicit integers: the user chose it
    return cadence.describe()
