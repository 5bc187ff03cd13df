"""Console reporter: the gradient-flow table, the diagnoses and their remedies.

Printed on rank zero (the report hook runs there only) at the end of a watch, and at a
report interval when new diagnoses arrive (or at every interval when asked). An interval's
report lists that interval's diagnoses and actions (clips); the final report lists every
diagnosis and action of the run. The rows and their numbers come from
:mod:`gradwatch.flow`, the drawing from :mod:`gradwatch.render`, which ``gradwatch report
RUN.jsonl`` uses too to reprint the same report from a run log.

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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gradwatch import Action, GradWatchError, Report, StashKey, StepContext, WatchConfig, hookimpl
from gradwatch.flow import flow_rows
from gradwatch.render import render_report

if TYPE_CHECKING:
    from rich.console import Console

_BOOL_OPTIONS = ("every_interval", "compact", "quiet", "show_all")
_OPTIONS = (*_BOOL_OPTIONS, "max_rows")


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
