"""Gradient-flow pictures from a run log (``gradwatch plot``).

matplotlib is an optional extra (``pip install gradwatch[plot]``) and is imported only
inside :func:`plot_run`, with the non-interactive Agg backend.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from gradwatch.types import GradWatchError

if TYPE_CHECKING:
    from gradwatch.logfile import RunLog

__all__ = ["FIGSIZE", "MissingMatplotlib", "plot_run"]

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
    """Draw the run's per-layer gradient norms and total norm, and save the figure.

    Top: a heatmap of each layer's gradient L2 norm (log colour scale) over the statistics
    steps, layers in forward order from the top; diagnoses are dashed vertical lines at
    the step they were first seen, with a triangle on each layer they name; non-finite
    gradients are red crosses. Bottom: the total gradient norm (log scale) with clip
    events (red triangles at the norm before clipping, the threshold as a line) and AMP
    skips (grey lines).

    Args:
        log: The run log (:func:`gradwatch.logfile.read_log`).
        output: The image file; its suffix picks the format (``.png``, ``.svg``, ``.pdf``).
        dpi: Dots per inch.
        title: The figure title (default: the log's file name).

    Returns:
        The path written.

    Raises:
        MissingMatplotlib: When matplotlib is not installed (the message says how to
            install it).
        GradWatchError: When the log holds no statistics to draw.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never open a window
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError:
        raise MissingMatplotlib("gradwatch plot needs matplotlib; install it with: pip install gradwatch[plot]") from None
    import numpy as np

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
        2, 1, figsize=FIGSIZE, dpi=dpi, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}, constrained_layout=True
    )
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#dddddd")
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
    at_step: dict[int, list[str]] = {}
    span = max(float(edges[-1] - edges[0]), 1.0)
    for diagnosis in log.diagnoses:
        color = _KIND_COLOR.get(diagnosis.kind, "#7f7f7f")
        label = f"{diagnosis.kind} ({diagnosis.severity.value})"
        kinds = at_step.setdefault(diagnosis.step, [])
        for ax in (top, bottom):
            ax.axvline(diagnosis.step, color=color, linestyle="--", linewidth=1.2)
        rows = [index[name] for name in diagnosis.layers if name in index]
        x = diagnosis.step + 0.012 * span * len(kinds)  # diagnoses of one step side by side
        top.scatter(
            [x] * len(rows), rows, marker=">", color=color, s=36, edgecolors="white", linewidths=0.5,
            label=None if label in seen else label, zorder=4,
        )  # fmt: skip
        seen.add(label)
        if diagnosis.kind not in kinds:
            kinds.append(diagnosis.kind)
    for step, kinds in at_step.items():
        top.annotate(
            ", ".join(kinds), (step, len(layers) - 0.5), xytext=(4, 4), textcoords="offset points", rotation=90,
            va="bottom", fontsize=8, fontweight="bold", color="black",
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.75, "linewidth": 0},
        )  # fmt: skip
    if bad or log.diagnoses:
        top.legend(loc="lower right", fontsize=8, framealpha=0.8)
    top.set_title(title if title is not None else f"gradient flow: {os.path.basename(log.path)}", loc="left")

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
    bottom.legend(loc="upper right", fontsize=8, framealpha=0.8)
    bottom.grid(True, which="major", alpha=0.3)

    path = os.fspath(output)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _edges(steps):
    """Cell edges around each step (midpoints), so uneven step spacing is drawn right."""
    import numpy as np

    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate(([steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
