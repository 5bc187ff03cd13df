"""Gradient-flow pictures from a run log (``gradwatch plot``).

matplotlib is an optional extra (``pip install gradwatch[plot]``) and is imported only
inside :func:`plot_run` / :func:`draw_run`, with the non-interactive Agg backend.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from gradwatch.types import GradWatchError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from gradwatch.logfile import RunLog

__all__ = ["FIGSIZE", "MissingMatplotlib", "check_output", "draw_run", "plot_run"]

#: Figure size in inches: at the default 100 dpi the image is 1200 x 800 pixels.
FIGSIZE = (12.0, 8.0)
_KIND_COLOR = {
    "vanishing": "#ff7f0e",
    "exploding": "#d62728",
    "nonfinite": "#e377c2",
    "dead_units": "#9467bd",
    "saturation": "#8c564b",
    "init_scale": "#17becf",
}


class MissingMatplotlib(GradWatchError):
    """matplotlib is not installed."""


def plot_run(log: RunLog, output: str | os.PathLike[str], *, dpi: int = 100, title: str | None = None) -> str:
    """Draw the run's per-layer gradient norms and total norm (:func:`draw_run`), and save it.

    Args:
        log: The run log (:func:`gradwatch.logfile.read_log`).
        output: The image file; its suffix picks the format (``.png``, ``.svg``, ``.pdf``
            and whatever else matplotlib writes; none: ``.png`` is added).
        dpi: Dots per inch.
        title: The figure title (default: the log's file name).

    Returns:
        The path written.

    Raises:
        MissingMatplotlib: When matplotlib is not installed (the message says how to
            install it).
        GradWatchError: When the suffix names a format matplotlib cannot write (the message
            lists those it can), or the log holds no statistics to draw.
    """
    path = check_output(output)
    fig = draw_run(log, dpi=dpi, title=title)
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return path


def check_output(output: str | os.PathLike[str]) -> str:
    """The path an image will be written to (``.png`` added to a name without a suffix).

    Raises:
        MissingMatplotlib: When matplotlib is not installed.
        GradWatchError: When matplotlib cannot write the format the suffix names; the
            message lists the formats it can write.
    """
    path = os.fspath(output)
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    formats = _formats()
    if not suffix:
        return f"{path}.png"  # what matplotlib would write, named as written
    if suffix not in formats:
        raise GradWatchError(
            f"{path}: cannot write .{suffix} images; the suffix of -o picks the format: " + ", ".join(f".{f}" for f in formats)
        )
    return path


def _formats() -> list[str]:
    """The image formats matplotlib can write here (``png``, ``svg``, ``pdf``, ...)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never open a window
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise MissingMatplotlib("gradwatch plot needs matplotlib; install it with: pip install gradwatch[plot]") from None
    common = ["png", "svg", "pdf"]
    return common + sorted(set(FigureCanvasBase.get_supported_filetypes()) - set(common))


def draw_run(log: RunLog, *, dpi: int = 100, title: str | None = None) -> Figure:
    """The figure of :func:`plot_run`, not saved (the caller closes it).

    Top: a heatmap of each layer's gradient L2 norm (log colour scale) over the statistics
    steps, layers in forward order from the top. Each diagnosis is a dashed vertical line
    at the step it was first seen, labelled above the heatmap (never over a cell), with a
    triangle on each layer it names; a diagnosis of the whole model (it names every
    layer) gets the line alone. Non-finite gradients are red crosses. Bottom: the total
    gradient norm (log scale) with clip events (red triangles at the norm before clipping,
    the threshold as a line) and AMP skips (grey lines). The legend sits outside both.

    Raises:
        MissingMatplotlib: When matplotlib is not installed.
        GradWatchError: When the log holds no statistics to draw.
    """
    _formats()
    import matplotlib
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    steps, norms, totals = log.steps()
    if not steps:
        raise GradWatchError(f"{log.path}: the run log holds no gradient statistics yet; nothing to plot")
    layers = log.layers
    step_arr = np.asarray(steps, dtype=float)
    grid = np.asarray(norms, dtype=float).T  # [L, S]
    finite = grid[np.isfinite(grid) & (grid > 0)]
    masked = np.ma.masked_where(~np.isfinite(grid) | (grid <= 0), grid)
    edges = _edges(step_arr)

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=FIGSIZE, dpi=dpi, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}, layout="constrained"
    )
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max())) if finite.size else None
    mesh = top.pcolormesh(edges, np.arange(len(layers) + 1) - 0.5, masked, cmap=cmap, norm=norm, shading="flat")
    top.set_ylim(len(layers) - 0.5, -0.5)  # first layer at the top
    every = max(1, math.ceil(len(layers) / 30))
    top.set_yticks(range(0, len(layers), every), [layers[i] or "(root)" for i in range(0, len(layers), every)], fontsize=7)
    top.set_ylabel("layer (forward order)")
    fig.colorbar(mesh, ax=top, label="gradient L2 norm (log)", pad=0.01)
    index = {name: i for i, name in enumerate(layers)}

    bad = [(s, index[name]) for s, names in log.nonfinite for name in names if name in index]
    if bad:
        top.scatter([s for s, _ in bad], [i for _, i in bad], marker="x", color="red", s=30, label="non-finite", zorder=3)
    seen: set[str] = set()
    at_step: dict[int, list[tuple[str, str]]] = {}
    span = max(float(edges[-1] - edges[0]), 1.0)
    for n, diagnosis in enumerate(log.diagnoses):
        color = _KIND_COLOR.get(diagnosis.kind, "#7f7f7f")
        label = f"{diagnosis.kind} ({diagnosis.severity.value})"
        kinds = at_step.setdefault(diagnosis.step, [])
        for ax in (top, bottom):
            ax.axvline(
                diagnosis.step, color=color, linestyle="--", linewidth=1.2,
                label=None if ax is bottom or label in seen else label,
            )  # fmt: skip
        seen.add(label)
        rows = sorted({index[name] for name in diagnosis.layers if name in index})
        if rows and len(rows) < len(layers):  # naming every layer says nothing per layer
            x = diagnosis.step + 0.012 * span * len(kinds)  # diagnoses of one step side by side
            top.scatter(
                [x] * len(rows), rows, marker=">", color=color, s=36, edgecolors="white", linewidths=0.5,
                zorder=4, gid=f"diagnosis-markers-{n}",
            )  # fmt: skip
        if diagnosis.kind not in [k for k, _ in kinds]:
            kinds.append((diagnosis.kind, color))
    _labels(top, at_step, float(edges[0]), float(edges[-1]))
    fig.suptitle(title if title is not None else f"gradient flow: {os.path.basename(log.path)}", x=0.01, ha="left")

    total = np.asarray(totals, dtype=float)
    bottom.plot(step_arr, np.where(total > 0, total, np.nan), color="#1f77b4", linewidth=1.2, label="total grad norm")
    clips = [a for a in log.actions if a.kind == "clip"]
    if clips:
        xs = [a.step for a in clips]
        ys = [
            float(a.evidence["norm"]) if _is_number(a.evidence.get("norm")) else float(np.interp(a.step, step_arr, total))
            for a in clips
        ]
        bottom.scatter(xs, ys, marker="v", color="#d62728", s=24, label=f"clipped ({len(clips)} steps)", zorder=3)
        limits = [(a.step, float(a.evidence["threshold"])) for a in clips if _is_number(a.evidence.get("threshold"))]
        if limits:
            bottom.plot(
                [s for s, _ in limits],
                [t for _, t in limits],
                color="#d62728",
                linewidth=0.8,
                linestyle=":",
                label="clip threshold",
            )
    for k, action in enumerate(a for a in log.actions if a.kind == "amp_skip"):
        bottom.axvline(action.step, color="grey", linewidth=0.8, alpha=0.6, label="AMP skip" if k == 0 else None)
    if np.any(np.isfinite(total) & (total > 0)):
        bottom.set_yscale("log")
    bottom.set_ylabel("total norm")
    bottom.set_xlabel("step")
    bottom.grid(True, which="major", alpha=0.3)
    # One legend for both panels, outside them: it covers no cell and no point of the timeline.
    fig.legend(loc="outside right upper", fontsize=8, framealpha=0.8)
    return fig


def _labels(ax: Axes, at_step: dict[int, list[tuple[str, str]]], first: float, last: float) -> None:
    """Write each step's diagnosis kinds above the heatmap, in the kinds' colours, on as
    many rows as it takes for labels of nearby steps not to overlap."""
    if not at_step:
        return
    span = max(last - first, 1.0)
    per_char = 0.0068  # axes fraction of one 8-point bold character on the default 12-inch figure
    taken: list[list[tuple[float, float]]] = []  # per row of labels: the (left, right) extents taken
    for step, kinds in sorted(at_step.items()):
        text = ", ".join(k for k, _ in kinds)
        where = (step - first) / span
        width = per_char * len(text)
        left = where if where + width <= 1.0 else where - width  # near the right edge: end at the line
        extent = (left - 0.005, left + width + 0.005)
        row = next(
            (i for i, spans in enumerate(taken) if all(extent[1] < a or extent[0] > b for a, b in spans)),
            len(taken),
        )
        if row == len(taken):
            taken.append([])
        taken[row].append(extent)
        ax.annotate(
            text, xy=(step, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 3 + 11 * row), textcoords="offset points",
            ha="left" if left == where else "right", va="bottom", fontsize=8, fontweight="bold",
            color=kinds[0][1] if len(kinds) == 1 else "black", annotation_clip=False, gid="diagnosis-label",
        )  # fmt: skip


def _edges(steps):
    """Cell edges around each step (midpoints), so uneven step spacing is drawn right."""
    import numpy as np

    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate(([steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
