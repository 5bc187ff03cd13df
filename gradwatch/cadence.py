"""Which steps read gradient statistics and which steps sample: the :class:`Cadence`.

``stats_every="auto"`` and ``sample_every="auto"`` (the defaults) decide from cost:

* **The dense start.** Statistics run on every one of the first :data:`DENSE_STEPS` (32)
  steps, and sampled work (activation probes, the weight snapshot behind ``‖Δw‖/‖w‖``,
  per-module non-finite checks) on a logarithmic schedule, steps 0, 1, 2, 4, 8, 16: faults
  of initialisation show at step 0, an early divergence in the first tens of steps.
* **Measured, then fixed.** During the dense start the watcher times, on the host, the
  statistics pass of each step, the sampled work of each sampled step (the plugins'
  probes in its forward, the weight snapshot and its measurement) and the user's own
  step (from one step boundary to the next, less all of gradwatch's work). At step
  :data:`DENSE_STEPS` it takes the medians of steps 1 to 31 (step 0 builds the plan) and
  chooses, once, the smallest power of two ``S`` with ``pass / S <= max(BUDGET · step,
  FLOOR)`` (1% of the step, or 50 µs a step, whichever allows more: a model whose
  statistics pass is negligible gets statistics every step), and likewise the sampled
  period ``P >= 32`` for the extra cost of a sampled step. Medians and powers of two
  make the choice the same from run to run on one model and machine; under
  ``torch.distributed`` every rank takes the largest ``S`` and ``P`` of all ranks (one
  all-reduce at that step), so that every rank reads the same steps.
* On an accelerator the host times are the launch cost of the work (its kernels run
  asynchronously), which is what a statistics pass costs a step that keeps the device
  busy.

An explicit integer keeps its meaning: ``stats_every=4`` reads steps 0, 4, 8, … (and an
``auto`` sampling then samples among them: 0, 4, 8, 16, then a multiple of 4);
``sample_every=40`` samples steps 0, 40, 80, …. A sampled step always reads statistics.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Cadence", "AUTO", "BUDGET", "DENSE_STEPS", "FLOOR_SECONDS", "MIN_SAMPLE_PERIOD"]

AUTO = "auto"
#: Steps of the dense start: statistics every step, sampled work on steps 0, 1, 2, 4, 8, 16.
DENSE_STEPS = 32
#: Share of the measured step the statistics (and, separately, the sampled work) may cost.
BUDGET = 0.01
#: Cost per step always allowed, whatever the step (a one-parameter net's 30 µs pass).
FLOOR_SECONDS = 50e-6
#: The sampled period after the dense start is at least this many steps.
MIN_SAMPLE_PERIOD = 32
#: The largest periods ``auto`` chooses (a pass costing 64 steps' budget is not seen).
MAX_STATS_PERIOD = 64
MAX_SAMPLE_PERIOD = 512


def _power_of_two(cost: float, allowed: float, least: int, most: int) -> int:
    period = least
    while period < most and cost / period > allowed:
        period *= 2
    return period


@dataclass
class Cadence:
    """The steps that read statistics and the steps that sample, for one watch.

    Args:
        stats_every: Steps between statistics, or ``"auto"``.
        sample_every: Steps between sampled work, or ``"auto"``.

    Attributes:
        stats_period: Steps between statistics after the dense start (``None`` until
            ``auto`` has decided).
        sample_period: Steps between sampled steps after the dense start (likewise).
        measured: What the choice was made from (seconds, medians), once decided.
    """

    stats_every: int | str = AUTO
    sample_every: int | str = AUTO
    stats_period: int | None = None
    sample_period: int | None = None
    measured: dict[str, float] = field(default_factory=dict)
    #: The step the dense start begins at (0; a run resumed from a checkpoint that holds no
    #: cadence measures afresh from its first step).
    origin: int = 0
    _pass: list[float] = field(default_factory=list, repr=False)
    _steps: list[tuple[bool, float]] = field(default_factory=list, repr=False)
    _sampled: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.stats_every != AUTO:
            self.stats_period = int(self.stats_every)
        if self.sample_every != AUTO:
            self.sample_period = int(self.sample_every)

    @property
    def auto(self) -> bool:
        """Whether anything is left to decide from cost."""
        return self.stats_every == AUTO or self.sample_every == AUTO

    @property
    def decided(self) -> bool:
        return self.stats_period is not None and self.sample_period is not None

    def dense(self, step: int) -> bool:
        """Whether ``step`` lies in the dense start of an ``auto`` cadence."""
        return 0 <= step - self.origin < DENSE_STEPS

    def sampled(self, step: int) -> bool:
        """Whether ``step`` samples (activation probes, weight snapshot, module checks)."""
        if self.sample_every != AUTO:
            return step % int(self.sample_every) == 0
        if self.dense(step) or self.sample_period is None:
            k = step - self.origin
            logarithmic = k == 0 or (k > 0 and (k & (k - 1)) == 0)  # 0, 1, 2, 4, 8, 16 from the origin
            # An explicit stats_every keeps its steps: the sampled ones are among them.
            return logarithmic and (self.stats_every == AUTO or step % int(self.stats_every) == 0)
        return step % self.sample_period == 0

    def stats(self, step: int) -> bool:
        """Whether ``step`` reads gradient statistics (every sampled step does)."""
        if self.stats_every != AUTO:
            return step % int(self.stats_every) == 0
        if self.dense(step) or self.stats_period is None:
            return True
        return step % self.stats_period == 0 or self.sampled(step)

    # ------------------------------------------------------------------ measuring

    def observe(self, step: int, stats_seconds: float | None, own_seconds: float, sampled_seconds: float | None) -> None:
        """Record one dense-start step.

        Args:
            step: The step.
            stats_seconds: Its statistics pass (``None`` if it read none).
            own_seconds: The user's own work, boundary to boundary, less everything
                gradwatch did in it (the statistics pass, the probes, the weight snapshot).
            sampled_seconds: A sampled step's sampled work (its forward probes and
                per-module checks, its weight snapshot and its measurement), else ``None``.
        """
        if not self.auto or self.decided or step - self.origin < 1 or not self.dense(step):
            return
        if stats_seconds is not None:
            self._pass.append(stats_seconds)
        self._steps.append((sampled_seconds is not None, own_seconds))
        if sampled_seconds is not None:
            self._sampled.append(sampled_seconds)

    def decide(self, reduce_max: Any = None) -> bool:
        """Choose the periods from what was measured (at the end of the dense start).

        Args:
            reduce_max: ``f(list[float]) -> list[float]``, the element-wise maximum over
                every rank (``None`` in a single process).

        Returns:
            Whether a choice was made now.
        """
        if self.decided:
            return False
        steps = [t for _, t in self._steps]
        step = statistics.median(steps) if steps else 0.0
        pass_ = statistics.median(self._pass) if self._pass else 0.0
        extra = statistics.median(self._sampled) if self._sampled else 0.0
        allowed = max(BUDGET * step, FLOOR_SECONDS)
        stats_period = self.stats_period or _power_of_two(pass_, allowed, 1, MAX_STATS_PERIOD)
        sample_period = self.sample_period or _power_of_two(extra, allowed, MIN_SAMPLE_PERIOD, MAX_SAMPLE_PERIOD)
        if reduce_max is not None:
            stats_period, sample_period = (int(v) for v in reduce_max([float(stats_period), float(sample_period)]))
        if self.sample_every == AUTO:
            # A multiple of the statistics period, so that sampled steps read statistics.
            sample_period = -(-max(sample_period, stats_period) // stats_period) * stats_period
        self.stats_period, self.sample_period = stats_period, sample_period
        self.measured = {"step_seconds": step, "stats_seconds": pass_, "sampled_extra_seconds": extra}
        self._pass, self._steps, self._sampled = [], [], []
        return True

    # ------------------------------------------------------------------ saying it

    def describe(self) -> str:
        """One line: which steps read statistics and sample, and why."""
        why = ""
        if self.measured:
            m = self.measured
            share = m["stats_seconds"] / m["step_seconds"] if m["step_seconds"] > 0 else 0.0
            why = (
                f" ({_seconds(m['stats_seconds'])} = {share:.1%} of a {_seconds(m['step_seconds'])} step; "
                f"budget {BUDGET:.0%} or {_seconds(FLOOR_SECONDS)})"
            )
        if self.stats_every != AUTO:
            stats = f"statistics every {_steps(self.stats_period)} (stats_every)"
        elif self.stats_period is None:
            stats = f"statistics every step to {DENSE_STEPS - 1}, then as the cost allows (not measured yet)"
        else:
            stats = f"statistics every step to {DENSE_STEPS - 1}, then every {_steps(self.stats_period)}{why}"
        if self.sample_every != AUTO:
            sampled = f"sampled every {_steps(self.sample_period)} (sample_every)"
        else:
            then = f"every {self.sample_period}" if self.sample_period is not None else "as the cost allows"
            sampled = f"sampled at {', '.join(str(k) for k in range(DENSE_STEPS) if self.sampled(k))}, then {then}"
        return f"{stats}; {sampled}"

    def to_dict(self) -> dict[str, Any]:
        """What the run log records."""
        return {
            "stats_every": self.stats_every,
            "sample_every": self.sample_every,
            "stats_period": self.stats_period,
            "sample_period": self.sample_period,
            "dense_steps": DENSE_STEPS if self.auto else 0,
            "budget": BUDGET,
            "floor_seconds": FLOOR_SECONDS,
            "measured": dict(self.measured),
            "description": self.describe(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "stats_period": self.stats_period,
            "sample_period": self.sample_period,
            "measured": dict(self.measured),
            "origin": self.origin,
        }

    def __repr__(self) -> str:
        return f"Cadence({self.describe()})"

    def due(self, step: int) -> bool:
        """Whether an ``auto`` cadence has measured its dense start by ``step`` and not decided yet."""
        return self.auto and not self.decided and step - self.origin >= DENSE_STEPS

    def restart(self, step: int) -> None:
        """Measure afresh from ``step`` (a resumed run whose checkpoint holds no cadence)."""
        if self.stats_every == AUTO:
            self.stats_period = None
        if self.sample_every == AUTO:
            self.sample_period = None
        self.origin, self.measured = step, {}
        self._pass, self._steps, self._sampled = [], [], []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.stats_every == AUTO and state.get("stats_period") is not None:
            self.stats_period = int(state["stats_period"])
        if self.sample_every == AUTO and state.get("sample_period") is not None:
            self.sample_period = int(state["sample_period"])
        self.measured = dict(state.get("measured") or {})
        self.origin = int(state.get("origin", 0))


def _steps(period: int | None) -> str:
    return "step" if period == 1 else f"{period} steps"


def _seconds(value: float) -> str:
    if value >= 1.0:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} µs"


def now() -> float:
    """The host clock the cadence is measured with."""
    return time.perf_counter()
