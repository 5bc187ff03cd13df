"""What plugins share, built-in and third-party alike (not a plugin itself).

* :func:`plugin_options`: one validator for ``options={"<plugin>": {...}}``, with a
  "did you mean" for a misspelled name and a message that says what to pass;
* :func:`profile` and :func:`fit_decay`: per-layer geometric means over steps and the
  per-layer decay of a log-linear fit over depth, the numbers the depth rules judge;
* :func:`num` and :func:`times`: how a number and a ratio are written in a message (the one
  rule for every ``message``, ``summary``, ``title`` and ``rationale``, checked on every
  built-in template by tests/test_messages.py); :func:`power` writes a bound like ``0.25^19``
  without underflow, :func:`round_sig` rounds a number a remedy carries in ``params`` to the
  figures :func:`num` shows.

Weight layers (what "depth" counts) are defined once, in :mod:`gradwatch.anatomy`
(:func:`~gradwatch.anatomy.weight_layers`), and re-exported here.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from gradwatch.anatomy import is_weight_layer, weight_layers
from gradwatch.types import GradWatchError

if TYPE_CHECKING:
    from gradwatch.config import WatchConfig

__all__ = [
    "fit_decay",
    "float_tensors",
    "is_weight_layer",
    "num",
    "plugin_options",
    "power",
    "profile",
    "round_sig",
    "times",
    "weight_layers",
]


def plugin_options(
    config: WatchConfig,
    plugin: str,
    defaults: Mapping[str, Any],
    *,
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
    choices: Mapping[str, tuple[Any, ...]] | None = None,
) -> dict[str, Any]:
    """The options of ``plugin``, merged over ``defaults`` and validated.

    The default's type says what a value must be: a ``bool`` takes ``True``/``False``; an
    ``int`` a whole number (at least 1 unless ``bounds`` says otherwise, bounds inclusive);
    a ``float`` a finite number (above 0 unless ``bounds`` says otherwise, bounds
    exclusive); a name in ``choices`` one of the values listed.

    Args:
        config: The watch's configuration (``config.plugin_options(plugin)`` is read).
        plugin: The plugin's name, for messages.
        defaults: Every option the plugin knows, with its default.
        bounds: ``(low, high)`` per option (``None`` = unbounded on that side).
        choices: Allowed values per option.

    Raises:
        GradWatchError: For an unknown option (with the closest known name) or a bad value.
    """
    given = dict(config.plugin_options(plugin))
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, list(defaults), 1)
            hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
        raise GradWatchError(f"unknown {plugin} option(s) {', '.join(hints)}; known: {', '.join(sorted(defaults))}")
    bounds = bounds or {}
    choices = choices or {}
    merged = {**defaults, **given}
    for name, default in defaults.items():
        value = merged[name]
        if name in choices:
            if value not in choices[name]:
                allowed = ", ".join(map(repr, choices[name]))
                raise GradWatchError(f"{plugin} option {name} must be one of {allowed}, got {value!r}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise GradWatchError(f"{plugin} option {name} must be True or False, got {value!r}")
        elif isinstance(default, int):
            low, high = bounds.get(name, (1, None))
            ok = not isinstance(value, bool) and isinstance(value, int)
            if not ok or (low is not None and value < low) or (high is not None and value > high):
                raise GradWatchError(f"{plugin} option {name} must be {_range(low, high, True, 'a whole number')}, got {value!r}")
        elif isinstance(default, float):
            low, high = bounds.get(name, (0.0, None))
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not ok or (low is not None and not value > low) or (high is not None and not value < high):
                raise GradWatchError(
                    f"{plugin} option {name} must be {_range(low, high, False, 'a number')} (default {default:g}), got {value!r}"
                )
            merged[name] = float(value)
    return merged


def _range(low: float | None, high: float | None, inclusive: bool, what: str) -> str:
    lo, hi = (">=", "<=") if inclusive else (">", "<")
    parts = [f"{lo} {low:g}" if low is not None else "", f"{hi} {high:g}" if high is not None else ""]
    return f"{what} " + " and ".join(p for p in parts if p) if any(parts) else what


def profile(rows: torch.Tensor, columns: list[int] | None = None) -> torch.Tensor:
    """Geometric mean over rows (steps) of each column, in float64, ignoring zero, missing
    (NaN) and non-finite values; NaN for a column with none left.

    Args:
        rows: ``[S, L]`` per-step, per-layer values.
        columns: The columns to keep (default: all).
    """
    values = (rows if columns is None else rows[:, columns]).double()
    ok = torch.isfinite(values) & (values > 0)
    logs = torch.where(ok, values.clamp_min(1e-300).log(), torch.zeros_like(values))
    count = ok.sum(0)
    return torch.where(count > 0, (logs.sum(0) / count.clamp_min(1)).exp(), math.nan)


def exp(x: float) -> float:
    """``math.exp`` that saturates: ``inf`` past the float range instead of raising
    ``OverflowError`` (a gain multiplied over 130 layers, a bound over 10⁴ time steps)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def fit_decay(v: torch.Tensor) -> float:
    """``exp(-slope)`` of the least-squares fit of ``log v`` over depth (finite, positive
    entries): the factor by which the value shrinks per layer toward the input."""
    x = torch.arange(v.numel(), dtype=torch.float64)
    ok = torch.isfinite(v) & (v > 0)
    x, y = x[ok], v[ok].double().log()
    if x.numel() < 2:
        return math.nan
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / xc.square().sum())
    return exp(-slope)


def float_tensors(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a module's output (a tensor, or tuples, lists and
    dicts of them, nested), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in float_tensors(item)]
    if isinstance(out, Mapping):
        return [t for item in out.values() for t in float_tensors(item)]
    return []


def num(value: float | int | None) -> str:
    """A number as messages write it: 3 significant figures (whole numbers from 100 to
    9999 are written whole), scientific notation below 1e-3 and from 1e4 on,
    ``nan``/``inf`` spelled out."""
    if value is None:
        return "n/a"
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if 100 <= abs(value) < 1e4:
        return f"{value:.0f}"
    if value == 0 or 1e-3 <= abs(value) < 100:
        return f"{value:.3g}"
    return f"{value:.2e}"


#: Ratios beyond this are written as ``≫ 1000×``: a message that says "3e+39×" is no more
#: useful, and quotes a number no healthy step produced.
TIMES_CAP = 1000.0


def times(ratio: float | None, cap: float = TIMES_CAP) -> str:
    """A ratio as messages write it: ``×3.1``, ``×0.002``, and ``≫ 1000×`` (or ``≪ 1/1000×``)
    past ``cap``; ``n/a`` when unknown."""
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return "n/a"
    ratio = float(ratio)
    if ratio > cap:
        return f"≫ {num(cap)}×"
    if 0 <= ratio < 1 / cap:
        return f"≪ 1/{num(cap)}×"
    return f"×{num(ratio)}"


def round_sig(value: float, digits: int = 3) -> float:
    """``value`` rounded to ``digits`` significant figures (what :func:`num` shows), so a
    number a remedy carries in ``params`` and the text that quotes it agree."""
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{digits - 1}e}")


def power(base: float, exponent: float) -> str:
    """``base ** exponent`` as messages write it (:func:`num`), computed in log space so a
    bound like ``0.25 ** 600`` is written ``1e-361`` instead of underflowing to 0."""
    if base <= 0:
        return num(base**exponent)
    log10 = exponent * math.log10(base)
    if -300 < log10 < 300:
        return num(10.0**log10)
    return f"1e{round(log10):+d}"
