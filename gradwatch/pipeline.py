"""The host side of a watch: one report interval, from the drained window to the report.

```
window (one device-to-host read) -> history -> read_actions -> diagnose -> advise -> report
```

Every rank extends its history, reads its actions and diagnoses (cheap; diagnoses stay
local to the rank); advise and report run on rank zero only. The pipeline owns what a
watch accumulates on the host: the :class:`~gradwatch.stats.History`, the diagnoses and the
actions of the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gradwatch.stats import History
from gradwatch.types import Action, Diagnosis, ModelInfo, Remedy, Report, StatsWindow, StepContext

if TYPE_CHECKING:
    from rich.console import Console

    from gradwatch.manager import PluginHost

__all__ = ["Pipeline"]


class Pipeline:
    """Diagnoses, advice and reports of one watch, on the host.

    Args:
        host: The watch's plugin host.
        layers: The layer names (the history's columns).
        history_size: Rows the history keeps.

    Attributes:
        history: Per-layer statistics of the run so far.
        diagnoses: Every diagnosis so far, oldest first.
        actions: Every action (clip, skip) so far, oldest first.
    """

    def __init__(self, host: PluginHost, layers: tuple[str, ...], history_size: int) -> None:
        self.host = host
        self.history = History(layers, max_rows=history_size)
        self.diagnoses: list[Diagnosis] = []
        self.actions: list[Action] = []

    def relayer(self, layers: tuple[str, ...]) -> None:
        """Start the history over for new columns (the forward order became known)."""
        if self.history.layers != layers:
            self.history = History(layers, max_rows=self.history.max_rows)

    def interval(
        self,
        window: StatsWindow,
        model: ModelInfo,
        ctx: StepContext,
        console: Console,
        *,
        final: bool,
        request: Mapping[str, Any] | None = None,
    ) -> Report:
        """Run one report interval on ``window`` and give the report (rank zero);
        ``request``: see :attr:`Report.request`."""
        actions, diagnoses = self.diagnose(window, model, ctx)
        report = Report(
            step=ctx.step,
            window=window,
            diagnoses=tuple(diagnoses),
            all_diagnoses=tuple(self.diagnoses),
            actions=tuple(actions),
            model=model,
            final=final,
            history=self.history,
            request=request,
            cadence=ctx.cadence,
        )
        if ctx.is_rank_zero:
            self.host.call("gradwatch_report", report=report, console=console, ctx=ctx)
        return report

    def diagnose(self, window: StatsWindow, model: ModelInfo, ctx: StepContext) -> tuple[list[Action], list[Diagnosis]]:
        """Add ``window`` to the history, read the interval's actions, diagnose it and (on
        rank zero) advise each diagnosis; both lists are kept and returned, worst first."""
        self.history.extend(window)
        actions = [a for part in self.host.call("gradwatch_read_actions", window=window, ctx=ctx) for a in part or ()]
        actions += [a for part in self.host.call("gradwatch_actions", window=window, ctx=ctx) for a in part or ()]
        actions += [Action(kind="amp_skip", step=s, source="core") for s in window.amp_skips]
        found = self.host.call("gradwatch_diagnose", window=window, model=model, history=self.history, ctx=ctx)
        diagnoses = [d for part in found for d in part or ()]
        if ctx.is_rank_zero:
            diagnoses = [d.with_remedies(self.advise(d, model, ctx)) for d in diagnoses]
        diagnoses.sort(key=lambda d: (-d.severity.rank, d.step))
        self.diagnoses.extend(diagnoses)
        self.actions.extend(actions)
        return actions, diagnoses

    def advise(self, diagnosis: Diagnosis, model: ModelInfo, ctx: StepContext) -> list[Remedy]:
        """Every plugin's remedies for ``diagnosis``, best first; a remedy kind given by an
        earlier plugin (a third party's, since the built-in advice is ``trylast``) wins."""
        remedies: list[Remedy] = []
        kinds: set[str] = set()
        for part in self.host.call("gradwatch_advise", diagnosis=diagnosis, model=model, history=self.history, ctx=ctx):
            for remedy in part or ():
                if remedy.kind not in kinds:
                    kinds.add(remedy.kind)
                    remedies.append(remedy)
        return remedies
