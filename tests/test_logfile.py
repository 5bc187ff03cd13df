"""The run-log format: record encoding and the reader's errors (records of real runs are in
tests/plugins/test_runlog.py)."""

from __future__ import annotations

import json
import math

import pytest

from gradwatch import Action, Diagnosis, Severity
from gradwatch.logfile import RunLogError, action_record, diagnosis_record, encode, end_record, number, read_log


def _write(path, *lines: str, newline: bool = True) -> str:
    path.write_text("\n".join(lines) + ("\n" if newline else ""))
    return str(path)


HEADER = json.dumps({"type": "header", "schema": 1, "layers": [{"name": "a", "type": "Linear", "numel": 3}], "config": {}})
INTERVAL = json.dumps({"type": "interval", "first_step": 0, "last_step": 0, "final": False, "steps": [0], "total_norm": [1.0],
                       "grad_norm": [[1.0]], "summary": [{"name": "a", "type": "Linear", "grad_norm": 1.0, "grad_rms": 0.5,
                                                          "update_ratio": None, "nonfinite": 0, "status": "ok"}]})  # fmt: skip


def test_read_log_truncated_last_line(tmp_path):
    path = _write(tmp_path / "run.jsonl", HEADER, INTERVAL, INTERVAL[:40], newline=False)
    log = read_log(path)
    assert log.cut_line == 3 and len(log.intervals) == 1 and log.end is None
    assert log.summary()[0].grad_rms == 0.5 and math.isnan(log.summary()[0].update_ratio)


@pytest.mark.parametrize(
    ("lines", "newline", "message"),
    [
        ((), False, ":1: the file is empty"),
        ((HEADER, "{not json", INTERVAL), True, ":2: not JSON"),
        ((HEADER, INTERVAL[:40]), True, ":2: not JSON"),  # a cut line that is not the last one
        ((HEADER.replace('"schema": 1', '"schema": 7'),), True, ":1: run log schema version 7 is not supported"),
        ((INTERVAL,), True, ":1: the first record is 'interval', not a header"),
        ((HEADER, "[1, 2]"), True, ":2: not a gradwatch record"),
        ((HEADER, '{"type": "interval"}'), True, ":2: malformed 'interval' record"),
    ],
)
def test_read_log_errors_name_the_line(tmp_path, lines, newline, message):
    path = (
        _write(tmp_path / "run.jsonl", *lines, newline=newline)
        if lines
        else str((tmp_path / "run.jsonl").touch() or tmp_path / "run.jsonl")
    )
    with pytest.raises(RunLogError) as info:
        read_log(path)
    assert str(info.value).startswith(path + message) and "\n" not in str(info.value)


def test_read_log_missing_file(tmp_path):
    with pytest.raises(RunLogError, match="no such file"):
        read_log(tmp_path / "nope.jsonl")


def test_numbers_are_json_with_seven_digits_and_no_nan():
    assert [number(v) for v in (math.nan, math.inf, -math.inf, 0.1234567891, 3.0)] == [None, "inf", "-inf", 0.1234568, 3.0]
    line = encode({"type": "x", "v": number(math.nan)})
    assert line == '{"type":"x","v":null}\n'
    with pytest.raises(ValueError):
        encode({"v": math.nan})  # a NaN left in a record never reaches the file as invalid JSON


def test_event_records_read_back(tmp_path):
    diagnosis = Diagnosis(kind="exploding", severity=Severity.ERROR, step=2, layers=("a",), message="boom",
                          evidence={"z": math.inf}, source="me")  # fmt: skip
    action = Action(kind="clip", step=1, evidence={"norm": 3.0, "threshold": 1.0}, source="me")
    lines = [HEADER, encode(action_record(action)), encode(diagnosis_record(diagnosis, at=3)),
             encode(end_record(4, diagnoses=1, actions=1, summary=[]))]  # fmt: skip
    path = tmp_path / "run.jsonl"
    path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines))
    log = read_log(path)
    assert log.actions == [action]
    (back,) = log.diagnoses
    assert (back.kind, back.step, back.layers, back.message, back.evidence) == ("exploding", 2, ("a",), "boom", {"z": "inf"})
    assert log.end == {"type": "end", "step": 4, "diagnoses": 1, "actions": 1, "summary": []} and log.last_step == 4
    assert json.loads(lines[2])["at"] == 3
