"""The run-log format: JSONL records of a run, how they are encoded, and the reader.

The runlog plugin writes these records during a run (``log="run.jsonl"``); ``gradwatch
report`` and ``gradwatch plot`` read them back with :func:`read_log`. Every record is one
JSON line (:func:`encode`). JSON has no NaN or Inf: a NaN number is written as ``null``,
an infinite one as the string ``"inf"`` or ``"-inf"`` (in diagnosis evidence also
``"nan"``).

Records (schema version 1), each with a ``"type"``:

``header`` (first line, written at the first report, once the forward order is known)
    ``schema`` (1), ``gradwatch`` (version), ``time`` (ISO 8601, UTC), ``layers``: list of
    ``{"name", "type", "numel"}`` in forward order (the columns of every matrix below),
    ``config``: ``report_every``, ``stats_every``, ``sample_every``, ``clip``,
    ``on_nonfinite``.
``interval`` (one per report interval that read statistics)
    ``first_step``, ``last_step`` (inclusive), ``final``; ``steps``: the statistics steps
    (every ``stats_every``-th step); ``grad_norm``: per step, the L2 norm of each layer's
    gradient (``[len(steps)][len(layers)]``; left out when the runlog option ``steps`` is
    ``False``); ``total_norm``: per step, the global L2 norm; ``summary``: the rows of the
    flow table for this interval (:meth:`gradwatch.flow.FlowRow.to_dict`), one per layer:
    ``name``, ``type``, ``grad_norm`` and ``grad_rms`` (means over the interval's steps),
    ``update_ratio`` (mean ``‖Δw‖/‖w‖`` over sampled steps), ``nonfinite`` (count),
    ``status``.
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
``resume`` (a run resumed from a checkpoint, or a watcher attached again, appended to its log)
    ``step`` (the first step of the resumed run), ``time``, ``gradwatch``. Records written
    before it about steps ``>= step`` (the earlier run went past its checkpoint, then
    stopped) are superseded: :func:`read_log` drops them from the run it returns (they stay
    in the file) and counts them in :attr:`RunLog.superseded`; an ``end`` record before it
    no longer ends the run. A line cut mid-write right before a ``resume`` is the record
    the earlier run was writing when it stopped, and is skipped.

Readers skip record types they do not know, so later versions may add types; a change of
meaning bumps :data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradwatch.flow import FlowRow, flow_rows
from gradwatch.types import Action, Diagnosis, GradWatchError, Report, StatsWindow

if TYPE_CHECKING:
    from gradwatch.config import WatchConfig

__all__ = [
    "SCHEMA_VERSION",
    "RunLog",
    "RunLogError",
    "action_record",
    "diagnosis_record",
    "encode",
    "end_record",
    "header_record",
    "interval_record",
    "nonfinite_records",
    "number",
    "read_log",
    "resume_record",
    "summary_rows",
]

SCHEMA_VERSION = 1


# ---------------------------------------------------------------------- writing


def encode(record: Mapping[str, Any]) -> str:
    """One record as one line of JSON, newline included (a NaN left in it is an error)."""
    return json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"


def number(value: float) -> float | str | None:
    """A statistic as JSON: 7 significant digits (float32), ``None`` for NaN, ``"inf"``/``"-inf"``."""
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(f"{value:.7g}")


def cadence_record(report: Report) -> dict[str, Any] | None:
    """The cadence of ``report``'s watch as JSON (``description``: the line the console
    prints), or ``None``."""
    return None if report.cadence is None else report.cadence.to_dict()


def header_record(report: Report, config: WatchConfig) -> dict[str, Any]:
    """The ``header`` record: schema, version, time, the layers of ``report``, the options of
    ``config`` and the cadence (as known at the first report; the ``end`` record has the
    final one)."""
    return {
        "type": "header",
        "schema": SCHEMA_VERSION,
        "gradwatch": _version(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "layers": [{"name": layer.name, "type": layer.type_name, "numel": layer.numel} for layer in report.model.layers],
        "config": {
            "report_every": config.report_every,
            "stats_every": config.stats_every,
            "sample_every": config.sample_every,
            "clip": config.clip if config.clip is None or isinstance(config.clip, (int, float, str)) else repr(config.clip),
            "on_nonfinite": config.on_nonfinite,
        },
        "cadence": cadence_record(report),
    }


def summary_rows(report: Report, report_every: int | None = None) -> list[dict[str, Any]]:
    """The ``summary`` of an ``interval`` or ``end`` record: the report's flow rows as JSON."""
    return [row.to_dict() for row in flow_rows(report, report_every)]


def interval_record(
    window: StatsWindow, *, final: bool, summary: Sequence[Mapping[str, Any]], steps: bool = True
) -> dict[str, Any]:
    """The ``interval`` record of a window that read statistics (``steps``: with the per-step ``grad_norm`` matrix)."""
    record: dict[str, Any] = {
        "type": "interval",
        "first_step": window.first_step,
        "last_step": window.last_step,
        "final": final,
        "steps": window.steps.tolist(),
        "total_norm": [number(v) for v in window.total_norm.tolist()],
    }
    if steps:
        record["grad_norm"] = [[number(v) for v in row] for row in window.grad_norm.tolist()]
    record["summary"] = list(summary)
    return record


def nonfinite_records(window: StatsWindow) -> list[dict[str, Any]]:
    """One ``nonfinite`` record per statistics step of ``window`` at which some layer's gradient was not finite."""
    names = window.layers
    bad = window.nonfinite > 0
    return [
        {"type": "nonfinite", "step": int(window.steps[i]), "layers": [names[j] for j in bad[i].nonzero().flatten().tolist()]}
        for i in bad.any(1).nonzero().flatten().tolist()
    ]


def action_record(action: Action) -> dict[str, Any]:
    """The ``action`` record of ``action``."""
    return {"type": "action", **action.to_dict()}


def diagnosis_record(diagnosis: Diagnosis, at: int) -> dict[str, Any]:
    """The ``diagnosis`` record of ``diagnosis``, made by the report of step ``at``."""
    return {"type": "diagnosis", "step": diagnosis.step, "at": at, "diagnosis": diagnosis.to_dict()}


def resume_record(step: int) -> dict[str, Any]:
    """The ``resume`` record: a resumed run appends from step ``step`` on."""
    return {
        "type": "resume",
        "step": step,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gradwatch": _version(),
    }


def end_record(
    step: int,
    *,
    diagnoses: int,
    actions: int,
    summary: Sequence[Mapping[str, Any]],
    cadence: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``end`` record: the last step, the run's diagnosis and action counts, the final
    table rows and the cadence the run had."""
    record = {"type": "end", "step": step, "diagnoses": diagnoses, "actions": actions, "summary": list(summary)}
    if cadence is not None:
        record["cadence"] = dict(cadence)
    return record


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
        resumes: The ``resume`` records (``step``, ``time``), in order.
        superseded: Records dropped because a later ``resume`` re-ran their steps.
        cut_before_resume: Numbers of lines cut mid-write that a ``resume`` followed (skipped).
    """

    path: str
    header: dict[str, Any]
    intervals: list[dict[str, Any]] = field(default_factory=list)
    diagnoses: list[Diagnosis] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    nonfinite: list[tuple[int, list[str]]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    cut_line: int | None = None
    resumes: list[dict[str, Any]] = field(default_factory=list)
    superseded: int = 0
    cut_before_resume: list[int] = field(default_factory=list)
    _made_at: list[int] = field(default_factory=list, repr=False)  # the report step of each diagnosis

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
        for lineno, line in enumerate(file, 1):
            yield lineno, line, line.endswith("\n")


def read_log(path: str | os.PathLike[str]) -> RunLog:
    """Read a run log written by the runlog plugin.

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
    broken: tuple[int, json.JSONDecodeError] | None = None  # a bad line, forgiven only if a resume follows
    for lineno, line, whole in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if not whole:
                if log is None:
                    raise RunLogError(
                        f"{path}:{lineno}: the header line was cut mid-write; the run log holds no record"
                    ) from None
                log.cut_line = lineno
                break
            if log is not None and broken is None:
                broken = (lineno, exc)
                continue
            bad_line, bad = broken or (lineno, exc)
            raise RunLogError(
                f"{path}:{bad_line}: not JSON ({bad.msg} at column {bad.colno}); is this a gradwatch run log?"
            ) from None
        if broken is not None:
            if not (isinstance(record, dict) and record.get("type") == "resume"):
                bad_line, bad = broken
                raise RunLogError(
                    f"{path}:{bad_line}: not JSON ({bad.msg} at column {bad.colno}); is this a gradwatch run log?"
                ) from None
            assert log is not None
            log.cut_before_resume.append(broken[0])  # the record in flight when the earlier run stopped
            broken = None
        if not isinstance(record, dict) or "type" not in record:
            raise RunLogError(
                f"{path}:{lineno}: not a gradwatch record (a JSON object with a 'type'); is this a gradwatch run log?"
            )
        if log is None:
            if record["type"] != "header":
                raise RunLogError(
                    f"{path}:{lineno}: the first record is {record['type']!r}, not a header; is this a gradwatch run log?"
                )
            schema = record.get("schema")
            if schema != SCHEMA_VERSION:
                raise RunLogError(
                    f"{path}:{lineno}: run log schema version {schema!r} is not supported "
                    f"(this gradwatch reads version {SCHEMA_VERSION}); use the gradwatch version that wrote it"
                )
            log = RunLog(path=path, header=record)
            continue
        try:
            _add(log, record)
        except (KeyError, TypeError, ValueError) as exc:
            raise RunLogError(f"{path}:{lineno}: malformed {record['type']!r} record ({type(exc).__name__}: {exc})") from None
    if broken is not None:
        bad_line, bad = broken
        raise RunLogError(f"{path}:{bad_line}: not JSON ({bad.msg} at column {bad.colno}); is this a gradwatch run log?")
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
        log._made_at.append(int(record.get("at", record["step"])))
    elif kind == "action":
        log.actions.append(Action.from_dict(record))
    elif kind == "nonfinite":
        log.nonfinite.append((int(record["step"]), list(record["layers"])))
    elif kind == "end":
        log.end = record
    elif kind == "resume":
        _resume(log, int(record["step"]))
        log.resumes.append(record)
    # Unknown types are skipped: later versions may add records.


def _resume(log: RunLog, step: int) -> None:
    """Drop what the earlier run logged about steps ``>= step``: the resumed run logs them again."""
    before = len(log.intervals) + len(log.diagnoses) + len(log.actions) + len(log.nonfinite) + (log.end is not None)
    kept = []
    for record in log.intervals:
        if record["first_step"] >= step:
            continue
        if record["last_step"] >= step:  # an interval cut by the checkpoint: keep its earlier steps
            keep = [i for i, s in enumerate(record["steps"]) if s < step]
            record = {**record, "last_step": step - 1, "steps": [record["steps"][i] for i in keep]}
            record["total_norm"] = [record["total_norm"][i] for i in keep]
            if "grad_norm" in record:
                record["grad_norm"] = [record["grad_norm"][i] for i in keep]
        kept.append(record)
    log.intervals = kept
    pairs = [(d, at) for d, at in zip(log.diagnoses, log._made_at) if at < step]
    log.diagnoses, log._made_at = [d for d, _ in pairs], [at for _, at in pairs]
    log.actions = [a for a in log.actions if a.step < step]
    log.nonfinite = [(s, layers) for s, layers in log.nonfinite if s < step]
    log.end = None
    after = len(log.intervals) + len(log.diagnoses) + len(log.actions) + len(log.nonfinite)
    # An interval cut short counts as kept; the end record counts as superseded.
    log.superseded += before - after
