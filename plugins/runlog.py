"""JSONL run log: what ``gradwatch report`` and ``gradwatch plot`` read after the run.

Enabled by ``log="run.jsonl"`` on ``gradwatch.watch()`` and ``GradWatch()``. Written on
rank zero only; the file is opened when the watch is configured, so a bad path fails before
training starts, and closed at detach. A new run replaces the file's records when it writes
its first one. A run resumed from a checkpoint (``load_state_dict``: plain ``watch()``,
Lightning's ``ckpt_path=``, a watcher attached again) appends instead: a ``resume`` record
(step, time), then its own records, so nothing logged before is lost, and ``gradwatch
report``/``plot`` read the whole file as one run (:func:`gradwatch.logfile.read_log`). A
log whose header lists other layers than the resumed run's is another run: it is kept as
``<log>.1`` (the first free number) and a new log starts. Every record is one JSON line,
written with one ``write`` and flushed at once, so a crash loses at most the record in
flight. The records, their encoding and the reader are in :mod:`gradwatch.logfile`
(schema version :data:`gradwatch.logfile.SCHEMA_VERSION`).

Options (``options={"runlog": {...}}``): ``steps`` (bool, default ``True``): write the
per-step ``grad_norm`` matrix (``False`` keeps only the summaries, and ``gradwatch plot``
then draws one column per interval).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

from gradwatch import GradWatchError, GradWatchWarning, Report, StashKey, StepContext, WatchConfig, hookimpl, logfile

_OPTIONS = ("steps",)


@dataclass
class _State:
    path: str
    file: IO[str] | None
    steps: bool = True
    header_written: bool = False
    diagnoses: int = 0
    actions: int = 0
    resumed: int | None = None  # the step a checkpoint restored, before the first write

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
        # Append mode, nothing truncated yet: whether this run replaces the file or resumes it is
        # known at the first write (a checkpoint is loaded after configure).
        file = open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise GradWatchError(f"cannot open the run log {path!r} ({exc.strerror}); pass log= a writable file path") from exc
    ctx.stash[KEY] = _State(path=path, file=file, steps=steps)


@hookimpl(trylast=True)
def gradwatch_report(report: Report, ctx: StepContext) -> None:
    state = ctx.stash.get(KEY, None)
    if state is None or state.file is None:
        return
    if not state.header_written:
        _start(state, report, ctx)
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
        state.write(
            logfile.end_record(
                report.step,
                diagnoses=state.diagnoses,
                actions=state.actions,
                summary=summary,
                cadence=logfile.cadence_record(report),
            )
        )


def _start(state: _State, report: Report, ctx: StepContext) -> None:
    """The first write of this watch: a new log, or a ``resume`` record after the old one."""
    assert state.file is not None
    header = logfile.header_record(report, ctx.config)
    old = _old_header(state.path) if state.resumed is not None else None
    if old is not None and [layer["name"] for layer in old.get("layers", ())] != [layer["name"] for layer in header["layers"]]:
        kept = _keep_aside(state)
        warnings.warn(
            f"the run log {state.path} holds a run of other layers than this resumed one; it is kept as {kept} "
            "and a new log starts",
            GradWatchWarning,
            stacklevel=2,
        )
        old = None
    if old is None:
        state.file.seek(0)
        state.file.truncate()
        state.write(header)
        return
    if not _ends_with_newline(state.path):
        state.file.write("\n")  # the run stopped mid-write: the cut line stays, on a line of its own
    state.write(logfile.resume_record(state.resumed or 0))


def _old_header(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            first = file.readline()
        record = json.loads(first)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("type") == "header" else None


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        if file.tell() == 0:
            return True
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def _keep_aside(state: _State) -> str:
    assert state.file is not None
    state.file.close()
    n = 1
    while os.path.exists(f"{state.path}.{n}"):
        n += 1
    os.replace(state.path, f"{state.path}.{n}")
    state.file = open(state.path, "a", encoding="utf-8")
    return f"{state.path}.{n}"


@hookimpl
def gradwatch_state_dict(ctx: StepContext) -> dict[str, Any] | None:
    state = ctx.stash.get(KEY, None)
    if state is None:
        return None
    return {"runlog": {"diagnoses": state.diagnoses, "actions": state.actions}}


@hookimpl
def gradwatch_load_state_dict(state: Mapping[str, Any], ctx: StepContext) -> None:
    own = ctx.stash.get(KEY, None)
    if own is None:
        return
    saved = state.get("runlog") or {}
    own.diagnoses, own.actions = int(saved.get("diagnoses", 0)), int(saved.get("actions", 0))
    if own.header_written:
        own.write(logfile.resume_record(ctx.step))  # a checkpoint loaded mid-watch: the steps go back
    else:
        own.resumed = ctx.step  # the next write appends after what the earlier run logged


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
