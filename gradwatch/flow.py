"""The gradient-flow rows: one per layer, the numbers every report shows.

The console table, the run log's ``summary`` records, ``gradwatch report`` and any other
reporter work from these plain rows (:class:`FlowRow`), computed from a :class:`Report`
(:func:`flow_rows`) or read back from a run log (:meth:`FlowRow.from_dict`), so a report
reprinted from a log shows the same numbers as the one printed during the run.

What the numbers are: per layer, the mean over the interval's statistics steps of the
gradient L2 norm and RMS (``norm / sqrt(numel)``), skipping steps where the layer had no
gradient or a non-finite one; the mean update-to-weight ratio ``‖Δw‖/‖w‖`` over the
interval's sampled steps. The final report of a watch whose last interval is empty uses
the previous interval's rows; an interval without a sampled step shows the update ratio
of the latest sampled step. A layer's status comes from every diagnosis of the run so far.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradwatch.types import Diagnosis, Report

__all__ = ["STATUS", "FlowRow", "FlowSpan", "collapse", "flow_rows", "flow_span", "layer_status", "layer_summary", "statuses"]

#: Status shown in the table for each diagnosis kind (plugin kinds show their own name).
STATUS = {
    "vanishing": "vanishing",
    "exploding": "exploding",
    "nonfinite": "non-finite",
    "dead_units": "dead",
    "saturation": "saturated",
    "init_scale": "init",
}
# Worst last: a layer named by several diagnoses shows the worst; a plugin's own kind ranks as "init".
_WEIGHT = ["ok", "init", "saturated", "dead", "vanishing", "exploding", "non-finite"]


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
        """The row as JSON values (the run log's ``summary`` rows): NaN as ``None``, an
        infinite number as ``"inf"``/``"-inf"``."""
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
        """Rebuild a row from :meth:`to_dict` output."""
        return cls(
            name=d["name"],
            type_name=d.get("type", ""),
            grad_norm=_unnum(d.get("grad_norm")),
            grad_rms=_unnum(d.get("grad_rms")),
            update_ratio=_unnum(d.get("update_ratio")),
            nonfinite=int(d.get("nonfinite", 0)),
            status=d.get("status", "ok"),
        )


@dataclass(frozen=True, slots=True)
class FlowSpan:
    """Which steps a flow table's numbers are the means of, so that its title can say so.

    Attributes:
        first: First step of the interval the rows cover (inclusive).
        last: Last step of that interval (inclusive).
        steps: The statistics steps among them (the rows the means are taken over).
        nonfinite: The statistics steps at which some layer's gradient held a NaN or an
            Inf; a layer's mean leaves such a step out, so a table whose last step was
            all NaN still shows finite means of the steps before it, and says so.
    """

    first: int
    last: int
    steps: tuple[int, ...] = ()
    nonfinite: tuple[int, ...] = ()


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


# ---------------------------------------------------------------------- from a report


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
    """Status per layer name; the worst diagnosis wins, ``non-finite`` over all.

    Args:
        names: The layer names, in table order.
        diagnoses: The diagnoses whose ``layers`` mark them.
        modules: Every module name in ``named_modules()`` order, so that a diagnosis of a
            module that is not a layer (an activation) can mark the layer before it.
    """
    status = ["ok"] * len(names)
    rank = {name: i for i, name in enumerate(names)}
    for diagnosis in diagnoses:
        label = STATUS.get(diagnosis.kind, diagnosis.kind)
        for target in diagnosis.layers:
            for i in _layers_for(target, names, rank, modules):
                old = status[i]
                if (_WEIGHT.index(label) if label in _WEIGHT else 1) > (_WEIGHT.index(old) if old in _WEIGHT else 1):
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


def flow_span(report: Report, report_every: int | None = None) -> FlowSpan:
    """The steps :func:`flow_rows` of ``report`` are the means of (``report_every`` as for
    :func:`layer_summary`: an empty window falls back on the history's last interval)."""
    window = report.window
    if len(window) or report.history is None:
        steps, bad = window.steps, window.nonfinite
        first, last = window.first_step, window.last_step
    else:
        history = report.history
        keep = history.steps > report.step - report_every if report_every else torch.ones_like(history.steps, dtype=torch.bool)
        steps, bad = history.steps[keep], history.nonfinite[keep]
        last = report.step
        first = max(0, report.step - report_every + 1) if report_every else (int(steps[0]) if len(steps) else 0)
    nonfinite = steps[(bad > 0).any(1)] if bad.numel() else steps[:0]
    return FlowSpan(first=int(first), last=int(last), steps=tuple(steps.tolist()), nonfinite=tuple(nonfinite.tolist()))


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
    that show the medians of the rows they stand for. Rows are alike when they have the
    same name pattern (numbers aside), type and status.
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
