"""JSONL run log: what ``gradwatch report`` and ``gradwatch plot`` read after the run.

Enabled by ``log="run.jsonl"`` on ``gradwatch.watch()`` and ``GradWatch()``. Written on
rank zero only; the file is opened (and truncated) when the watch is configured, so a bad
path fails before training starts, and closed at detach. Every record is one JSON line,
written with one ``write`` and flushed at once, so a crash loses at most the record in
flight. The records, their encoding and the reader are in :mod:`gradwatch.logfile`
(schema version :data:`gradwatch.logfile.SCHEMA_VERSION`).

Options (``options={"runlog": {...}}``): ``steps`` (bool, default ``True``): write the
per-step ``grad_norm`` matrix (``False`` keeps only the summaries, and ``gradwatch plot``
then draws one column per interval).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

from gradwatch import GradWatchError, Report, StashKey, StepContext, WatchConfig, hookimpl, logfile

_OPTIONS = ("steps",)


@dataclass
class _State:
    path: str
    file: IO[str] | None
    steps: bool = True
    header_written: bool = False
    diagnoses: int = 0
    actions: int = 0

    def write(self, record: Mapping[str, Any]) -> None:
        if self.file is None:
            return
        # One write per record, then flush: a crash loses at most the record in flight.
        self.file.write(logfile.encode(record))
        self.file.flush()


KEY = StashKey[_State]()


@hookimpl
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    options = config.plugin_options("runlog")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise GradWatchError(f"unknown runlog option(s) {unknown}; known options are {list(_OPTIONS)}")
    steps = options.get("steps", True)
    if not isinstance(steps, bool):
        raise GradWatchError(f"runlog option 'steps' takes True or False, got {steps!r}")
    if config.log is None or not ctx.is_rank_zero:
        return
    path = os.fspath(config.log)
    try:
        file = open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise GradWatchError(f"cannot open the run log {path!r} ({exc.strerror}); pass log= a writable file path") from exc
    ctx.stash[KEY] = _State(path=path, file=file, steps=steps)


@hookimpl(trylast=True)
def gradwatch_report(report: Report, ctx: StepContext) -> None:
    state = ctx.stash.get(KEY, None)
    if state is None or state.file is None:
        return
    if not state.header_written:
        state.write(logfile.header_record(report, ctx.config))
        state.header_written = True
    window = report.window
    summary = logfile.summary_rows(report, ctx.config.report_every)
    if len(window):
        state.write(logfile.interval_record(window, final=report.final, summary=summary, steps=state.steps))
        for record in logfile.nonfinite_records(window):
            state.write(record)
    for action in report.actions:
        state.write(logfile.action_record(action))
    for diagnosis in report.diagnoses:
        state.write(logfile.diagnosis_record(diagnosis, at=report.step))
    state.actions += len(report.actions)
    state.diagnoses += len(report.diagnoses)
    if report.final:
        state.write(logfile.end_record(report.step, diagnoses=state.diagnoses, actions=state.actions, summary=summary))


@hookimpl
def gradwatch_unconfigure(ctx: StepContext) -> None:
    state = ctx.stash.get(KEY, None)
    if state is not None and state.file is not None:
        state.file.close()
        state.file = None


@hookimpl
def gradwatch_trial(trials: Any, ctx: StepContext) -> None:
    """A ``trial`` record: ``at`` (the watcher's step when the trial ran) and
    ``Trials.to_dict()`` (steps, batches, source, seed, note, seconds, the untouched
    copy as ``baseline``, and per trial: name, remedy, variant, diagnoses, metric,
    before/after measures, growth, losses, nonfinite_step, flow_effect, loss_effect,
    verdict, reason, seconds; non-finite numbers as the strings ``"nan"``/``"inf"``).
    A trial after the watch ended is appended to the closed log (after its ``end``
    record); readers skip the type."""
    state = ctx.stash.get(KEY, None)
    if state is None:
        return
    record = {"type": "trial", "at": ctx.step, **trials.to_dict()}
    if state.file is not None:
        state.write(record)
        return
    with open(state.path, "a", encoding="utf-8") as file:
        file.write(logfile.encode(record))
