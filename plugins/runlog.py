"""JSONL run log: what ``gradwatch report`` and ``gradwatch plot`` read after the run.

Enabled by ``log="run.jsonl"`` on ``gradwatch.watch()`` and ``GradWatch()``. Written on
rank zero only; the file is opened (and truncated) when the watch is configured, so a bad
path fails before training starts, and closed at detach. Every record is one JSON line,
written with one ``write`` and flushed at once, so a crash loses at most the record in
flight. JSON has no NaN or Inf: a NaN number is written as ``null``, an infinite one as
the string ``"inf"`` or ``"-inf"`` (in diagnosis evidence also ``"nan"``).

Records (schema version 1), each with a ``"type"``:

``header`` (first line, written at the first report, once the forward order is known)
    ``schema`` (1), ``gradwatch`` (version), ``time`` (ISO 8601, UTC), ``layers``: list of
    ``{"name", "type", "numel"}`` in forward order (the columns of every matrix below),
    ``config``: ``report_every``, ``stats_every``, ``sample_every``, ``clip``,
    ``on_nonfinite``.
``interval`` (one per report interval that read statistics)
    ``first_step``, ``last_step`` (inclusive), ``final``; ``steps``: the statistics steps
    (every ``stats_every``-th step); ``grad_norm``: per step, the L2 norm of each layer's
    gradient (``[len(steps)][len(layers)]``); ``total_norm``: per step, the global L2
    norm; ``summary``: the rows of the console's flow table for this interval, one per
    layer: ``name``, ``type``, ``grad_norm`` and ``grad_rms`` (means over the interval's
    steps), ``update_ratio`` (mean ``‖Δw‖/‖w‖`` over sampled steps), ``nonfinite``
    (count), ``status``.
``diagnosis``
    ``step`` (first step the condition was seen), ``at`` (the step of the report that made
    it), ``diagnosis``: ``Diagnosis.to_dict()`` (kind, severity, step, layers, message,
    evidence, remedies with kind/title/rationale/snippet, source).
``action``
    ``kind`` (``clip``, ``skip``, ``zero``, ``amp_skip`` or a plugin's kind), ``step``,
    ``evidence`` (for a clip: ``norm``, ``threshold``, ``coefficient``…), ``source``.
``nonfinite``
    ``step``, ``layers``: a statistics step at which these layers' gradients held a NaN or
    an Inf.
``end`` (last line of a run that finished)
    ``step`` (last step), ``diagnoses``, ``actions`` (counts over the run), ``summary``: the
    final report's table rows, as in ``interval``.

Readers skip record types they do not know, so later versions may add types; a change of
meaning bumps ``schema``. Options (``options={"runlog": {...}}``): ``steps`` (bool, default
``True``): write the per-step ``grad_norm`` matrix (``False`` keeps only the summaries,
and ``gradwatch plot`` then draws one column per interval).
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gradwatch import Action, Diagnosis, GradWatchError, Report, StashKey, StepContext, WatchConfig, hookimpl
from gradwatch.plugins.console import FlowRow, flow_rows

__all__ = ["SCHEMA_VERSION", "RunLog", "RunLogError", "read_log"]

SCHEMA_VERSION = 1
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
        self.file.write(json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")
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
    config = ctx.config
    if not state.header_written:
        state.write(
            {
                "type": "header",
                "schema": SCHEMA_VERSION,
                "gradwatch": _version(),
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "layers": [{"name": layer.name, "type": layer.type_name, "numel": layer.numel} for layer in report.model.layers],
                "config": {
                    "report_every": config.report_every,
                    "stats_every": config.stats_every,
                    "sample_every": config.sample_every,
                    "clip": config.clip
                    if config.clip is None or isinstance(config.clip, (int, float, str))
                    else repr(config.clip),
                    "on_nonfinite": config.on_nonfinite,
                },
            }
        )
        state.header_written = True
    window = report.window
    summary = [row.to_dict() for row in flow_rows(report, config.report_every)]
    if len(window):
        record: dict[str, Any] = {
            "type": "interval",
            "first_step": window.first_step,
            "last_step": window.last_step,
            "final": report.final,
            "steps": window.steps.tolist(),
            "total_norm": [_num(v) for v in window.total_norm.tolist()],
        }
        if state.steps:
            record["grad_norm"] = [[_num(v) for v in row] for row in window.grad_norm.tolist()]
        record["summary"] = summary
        state.write(record)
        names = window.layers
        bad = window.nonfinite > 0
        for i in bad.any(1).nonzero().flatten().tolist():
            state.write(
                {
                    "type": "nonfinite",
                    "step": int(window.steps[i]),
                    "layers": [names[j] for j in bad[i].nonzero().flatten().tolist()],
                }
            )
    for action in report.actions:
        state.write({"type": "action", **action.to_dict()})
    for diagnosis in report.diagnoses:
        state.write({"type": "diagnosis", "step": diagnosis.step, "at": report.step, "diagnosis": diagnosis.to_dict()})
    state.actions += len(report.actions)
    state.diagnoses += len(report.diagnoses)
    if report.final:
        state.write(
            {"type": "end", "step": report.step, "diagnoses": state.diagnoses, "actions": state.actions, "summary": summary}
        )


@hookimpl
def gradwatch_unconfigure(ctx: StepContext) -> None:
    state = ctx.stash.get(KEY, None)
    if state is not None and state.file is not None:
        state.file.close()
        state.file = None


def _num(value: float) -> float | str | None:
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(f"{value:.7g}")  # float32 statistics: 7 significant digits


def _version() -> str:
    import gradwatch

    return str(gradwatch.__version__)


# ---------------------------------------------------------------------- reading


class RunLogError(GradWatchError):
    """A run log that cannot be read; the message names the file and the line."""


@dataclass
class RunLog:
    """A run log, read back.

    Attributes:
        path: The file.
        header: The header record.
        intervals: The ``interval`` records, in order.
        diagnoses: Every diagnosis of the run, oldest first.
        actions: Every action (clip, skip, amp_skip), oldest first.
        nonfinite: ``(step, layers)`` of each statistics step with non-finite gradients.
        end: The ``end`` record, or ``None`` for a run that did not finish.
        cut_line: The number of a last line that was cut mid-write (and skipped), else ``None``.
    """

    path: str
    header: dict[str, Any]
    intervals: list[dict[str, Any]] = field(default_factory=list)
    diagnoses: list[Diagnosis] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    nonfinite: list[tuple[int, list[str]]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    cut_line: int | None = None

    @property
    def layers(self) -> list[str]:
        return [layer["name"] for layer in self.header["layers"]]

    @property
    def last_step(self) -> int:
        if self.end is not None:
            return int(self.end["step"])
        return int(self.intervals[-1]["last_step"]) if self.intervals else 0

    def summary(self) -> list[FlowRow]:
        """The last table rows written (the final report's, when the run finished)."""
        for record in ([self.end] if self.end else []) + self.intervals[::-1]:
            if record.get("summary"):
                return [FlowRow.from_dict(row) for row in record["summary"]]
        return []

    def steps(self) -> tuple[list[int], list[list[float]], list[float]]:
        """``(steps, grad_norm [S][L], total_norm [S])`` over the whole run; intervals
        written without per-step norms contribute their summary at their last step."""
        steps: list[int] = []
        norms: list[list[float]] = []
        totals: list[float] = []
        for record in self.intervals:
            if "grad_norm" in record:
                steps += record["steps"]
                norms += [[_float(v) for v in row] for row in record["grad_norm"]]
            else:
                steps.append(record["last_step"])
                norms.append([_float(row["grad_norm"]) for row in record["summary"]])
            totals += [_float(v) for v in record["total_norm"]] if "grad_norm" in record else [_float(record["total_norm"][-1])]
        return steps, norms, totals


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _lines(path: str) -> Iterator[tuple[int, str, bool]]:
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, 1):
            yield number, line, line.endswith("\n")


def read_log(path: str | os.PathLike[str]) -> RunLog:
    """Read a run log written by this plugin.

    A last line without its newline that is not valid JSON (the run stopped mid-write) is
    skipped and its number kept in :attr:`RunLog.cut_line`.

    Raises:
        RunLogError: For a missing or empty file, a line that is not JSON, a file that
            does not start with a header, or an unknown schema version; the message is
            one line naming the file and the line number.
    """
    path = os.fspath(path)
    p = Path(path)
    if not p.exists():
        raise RunLogError(f"{path}: no such file; pass the path given as log= to gradwatch.watch() or GradWatch()")
    if p.is_dir():
        raise RunLogError(f"{path}: is a directory; pass the JSONL file given as log=")
    log: RunLog | None = None
    for number, line, whole in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if not whole:
                if log is None:
                    raise RunLogError(
                        f"{path}:{number}: the header line was cut mid-write; the run log holds no record"
                    ) from None
                log.cut_line = number
                break
            raise RunLogError(
                f"{path}:{number}: not JSON ({exc.msg} at column {exc.colno}); is this a gradwatch run log?"
            ) from None
        if not isinstance(record, dict) or "type" not in record:
            raise RunLogError(
                f"{path}:{number}: not a gradwatch record (a JSON object with a 'type'); is this a gradwatch run log?"
            )
        if log is None:
            if record["type"] != "header":
                raise RunLogError(
                    f"{path}:{number}: the first record is {record['type']!r}, not a header; is this a gradwatch run log?"
                )
            schema = record.get("schema")
            if schema != SCHEMA_VERSION:
                raise RunLogError(
                    f"{path}:{number}: run log schema version {schema!r} is not supported "
                    f"(this gradwatch reads version {SCHEMA_VERSION}); use the gradwatch version that wrote it"
                )
            log = RunLog(path=path, header=record)
            continue
        try:
            _add(log, record)
        except (KeyError, TypeError, ValueError) as exc:
            raise RunLogError(f"{path}:{number}: malformed {record['type']!r} record ({type(exc).__name__}: {exc})") from None
    if log is None:
        raise RunLogError(
            f"{path}:1: the file is empty; the run wrote no report yet (reports come every report_every steps and at the end)"
        )
    return log


def _add(log: RunLog, record: dict[str, Any]) -> None:
    kind = record["type"]
    if kind == "interval":
        record["steps"], record["total_norm"], record["summary"]
        log.intervals.append(record)
    elif kind == "diagnosis":
        log.diagnoses.append(Diagnosis.from_dict(record["diagnosis"]))
    elif kind == "action":
        log.actions.append(Action.from_dict(record))
    elif kind == "nonfinite":
        log.nonfinite.append((int(record["step"]), list(record["layers"])))
    elif kind == "end":
        log.end = record
    # Unknown types are skipped: later versions may add records.


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
        file.write(json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")
