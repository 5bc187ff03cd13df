"""Attach to any ``nn.Module``: the :class:`Watcher` and :func:`watch`.

A step, as the watcher sees it:

1. The first forward after attaching records the order in which layers run.
2. When gradients are final (the optimizer's step pre-hook, after DDP's all-reduce and
   ``GradScaler.unscale_``; or :meth:`Watcher.step`), the watcher computes the step's
   statistics on device (every ``stats_every`` steps) and runs the act stage (clipping).
3. The step closes at the next forward (or the next boundary, or detach): the update
   of a sampled step is measured, the step counter advances, and every
   ``report_every`` steps the device ring is drained once and diagnosed on the host.

A ``GradScaler`` (passed as ``scaler=``) that skips ``optimizer.step()`` is seen at the
next forward: a backward ran, gradients were cleared, no optimizer stepped, and the loss
scale dropped. The step is counted as an AMP skip, apart from genuine non-finite
gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch import _rank
from gradwatch.amp import AmpSkips
from gradwatch.cadence import Cadence, now
from gradwatch.config import WatchConfig
from gradwatch.hooks import Hook, Probes, remove_all
from gradwatch.layers import as_optimizers, check_optimizers, find_layers, unwrap_model
from gradwatch.manager import PluginHost, first_line, plugin_manager
from gradwatch.pipeline import Pipeline
from gradwatch.stash import Stash
from gradwatch.stats import LOSS_KEY, STEP_NORM_KEY, History, Plan, StatsRing, WeightSnapshot
from gradwatch.types import (
    Action,
    Diagnosis,
    GradWatchError,
    GradWatchWarning,
    ModelInfo,
    Remedy,
    Report,
    Series,
    StatsWindow,
    StepContext,
)

if TYPE_CHECKING:
    from rich.console import Console
    from torch.utils.hooks import RemovableHandle

    from gradwatch.trial import BatchKeeper, Trials

__all__ = ["Watcher", "watch"]

# model -> {id(watcher): keys of the step sources it hooks}; weak so models die freely.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, dict[int, frozenset[object]]] = weakref.WeakKeyDictionary()
_EXPLICIT = "explicit gw.step()"
#: Forwards that find gradients, with no step boundary ever seen, before watch() without an
#: optimizer warns that the loop must call gw.step().
STEPLESS_FORWARDS = 3


class Watcher:
    """Watches the gradients of a model; returned by :func:`watch`.

    Use it as a context manager (leaving the block prints the final report and removes
    every hook), or call :meth:`detach` yourself. The watcher holds the step state machine
    (when a step opens and closes, which steps read statistics or sample); the hooks live
    in :mod:`gradwatch.hooks`, the layers in :mod:`gradwatch.layers`, AMP-skip detection in
    :mod:`gradwatch.amp`, the host side in :mod:`gradwatch.pipeline`.

    Attributes:
        config: The options.
        model_info: The unwrapped model and its layers.
        pm: This watcher's own ``pluggy.PluginManager``.
        rank: This process's global rank when the watcher was made.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        *,
        config: WatchConfig,
        console: Console | None = None,
        scaler: torch.amp.GradScaler | None = None,
        params: Iterable[nn.Parameter] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise GradWatchError(
                f"gradwatch.watch() needs an nn.Module, got {type(model).__name__}; pass the model, not its output or parameters"
            )
        self.config = config
        self.outer = model
        inner, compiled = unwrap_model(model)
        self.model = inner
        self.optimizers = as_optimizers(optimizer)
        # ``params``: watch only these (one optimizer's share of a GAN, say); None = all.
        self._keep = None if params is None else frozenset(id(p) for p in params)
        layers = find_layers(inner, keep=self._keep)
        if not layers and self._keep is not None:
            raise GradWatchError(
                f"none of the {len(self._keep)} parameter(s) given as params= is a trainable parameter of "
                f"{type(inner).__name__}; pass parameters of the watched model"
            )
        if not layers:
            raise GradWatchError(
                f"{type(inner).__name__} has no trainable parameters (none with requires_grad=True); "
                "there are no gradients to watch: unfreeze a layer or watch another model"
            )
        check_optimizers(inner, self.optimizers)
        self.amp = AmpSkips(scaler)
        self.model_info = ModelInfo(model=inner, layers=layers, order_known=False, compiled=compiled)
        self._console = console
        self.stash = Stash()
        self.rank = _rank.global_rank()
        self._step = 0
        self._interval_start = 0
        #: Which steps read statistics and sample (decided from cost when "auto").
        self.cadence = Cadence(config.stats_every, config.sample_every)
        self._boundary_at: float | None = None  # host time of the last step boundary
        self._stats_seconds: float | None = None  # the last boundary's statistics pass
        self._probe_seconds = 0.0  # a sampled step's probes, in its forward
        self._snapshot_seconds = 0.0  # and its weight snapshot and measurement, and removing its probes
        self._install_seconds = 0.0  # installing the probes of the step that opened last
        self._attached = False
        self._broken: BaseException | None = None
        self._plan: Plan | None = None
        self._ring: StatsRing | None = None
        self._open = False
        self._stepped: set[int] = set()
        self._snapshot: WeightSnapshot | None = None
        self._amp_skips: list[int] = []
        self._order: list[nn.Module] = []
        self._order_handles: list[RemovableHandle] = []
        self._handles: list[RemovableHandle] = []
        self.probing = False
        # Forwards that found gradients while no step boundary was ever seen; counted only
        # when watch() got no optimizer (the loop must call gw.step()), None otherwise.
        self._stepless: int | None = None
        self.probes = Probes(self)
        # keep_batches: the last forward calls of the root module, for trial(); kept after detach.
        self.kept: BatchKeeper | None = None
        if config.keep_batches:
            from gradwatch.trial import BatchKeeper

            self.kept = BatchKeeper(config.keep_batches, copies=config.keep_copies)
        self._attaches = 0
        self._warned_detached = False
        self._carried: dict[str, Any] | None = None  # plugin state kept from detach to the next attach
        self.pm = plugin_manager(config)
        self.host = PluginHost(self.pm, strict=config.strict)
        self.pipeline = Pipeline(self.host, self.model_info.names, config.history_size)
        # Plugins validate their options here: errors reach the user before training starts.
        self.host.call_historic("gradwatch_configure", config=config, ctx=self.context())

    # ------------------------------------------------------------------ results

    @property
    def diagnoses(self) -> list[Diagnosis]:
        """Every diagnosis so far, oldest first."""
        return self.pipeline.diagnoses

    @property
    def actions(self) -> list[Action]:
        """Every action (clip, skip) so far, oldest first."""
        return self.pipeline.actions

    @property
    def history(self) -> History:
        """Per-layer statistics over steps, on the host (drained each interval)."""
        return self.pipeline.history

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        return self.amp.scaler

    @property
    def world_size(self) -> int:
        """Number of processes (1 without a process group)."""
        return _rank.world_size()

    # ------------------------------------------------------------------ lifecycle

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def step_count(self) -> int:
        """Optimizer steps closed so far (the 0-based index of the current step)."""
        return self._step

    def attach(self) -> Watcher:
        """Register the hooks. Raises if this watcher, or another watcher with the same step
        source (optimizer, or explicit steps), is already attached to the model.

        A watcher attached again after :meth:`detach` behaves like a new one that resumes
        from a checkpoint taken at the detach: its plugins are configured afresh (a new
        ``stash``) and attached, then given back the state they returned at the detach
        (``gradwatch_state_dict``); the step count, history, diagnoses and actions go on.
        """
        if self._attached:
            raise GradWatchError("this watcher is already attached; call detach() before attaching it again")
        sources = frozenset(id(o) for o in self.optimizers) or frozenset({_EXPLICIT})
        if self._keep is not None and not self.optimizers:
            # Explicit steps over a subset: clash only with a watcher of the same parameters.
            sources = frozenset((_EXPLICIT, pid) for pid in self._keep)
        others = _ATTACHED.setdefault(self.model, {})
        for other in others.values():
            clash = other & sources
            if clash:
                what = "the same optimizer" if all(isinstance(k, int) for k in clash) else "explicit steps (no optimizer)"
                raise GradWatchError(
                    f"another gradwatch watcher is already attached to this {type(self.model).__name__} with {what}; "
                    "detach it first (leave its `with` block or call .detach()), or watch a different optimizer"
                )
        others[id(self)] = sources
        self._attached = True
        try:
            if self._attaches:
                self._reconfigure()
            self._handles.append(self.outer.register_forward_pre_hook(Hook(self._on_forward)))
            if self.kept is not None:
                self._handles.append(self.outer.register_forward_pre_hook(Hook(self.kept), with_kwargs=True))
            for optimizer in self.optimizers:
                self._handles.append(optimizer.register_step_pre_hook(Hook(self._on_optimizer_step)))
            self._handles.append(self.amp.watch(self.model_info.layers[0]))
            if not self.model_info.order_known:
                for layer in self.model_info.layers:
                    self._order_handles.append(layer.module.register_forward_pre_hook(Hook(self._record_order)))
            self.host.call("gradwatch_attach", model=self.model_info, ctx=self.context(probes=self.probes))
            carried, self._carried = self._carried, None
            if carried is not None:
                self.host.call("gradwatch_load_state_dict", state=carried, ctx=self.context())
            if self.model_info.compiled and self.probes.has_sampled:
                # Adding and removing hooks every sampled step would recompile the graph.
                warnings.warn(
                    "the model is wrapped by torch.compile: sampled forward probes (activation statistics) are off, "
                    "gradient statistics are unaffected",
                    GradWatchWarning,
                    stacklevel=3,
                )
            self._schedule_probes()
        except BaseException:
            self.detach(report=False)
            raise
        self._attaches += 1
        return self

    def _reconfigure(self) -> None:
        """A second attach: fresh plugin state (a plugin appends its probes and per-module
        state at every attach, issue 12), and the statistics plan rebuilt if the model's
        trainable parameters changed while detached."""
        self._broken = None
        self.stash.clear()
        self.host.configure_again(config=self.config, ctx=self.context())
        if self._plan is not None:
            layers = find_layers(self.model, order=list(dict.fromkeys(self._order)), keep=self._keep)
            same = [(layer.name, layer.param_names) for layer in layers] == [
                (layer.name, layer.param_names) for layer in self.model_info.layers
            ] and [id(p) for p in self._plan.params] == [
                id(layer.module.get_parameter(n)) for layer in layers for n in layer.param_names
            ]
            if not same:
                if not layers:
                    raise GradWatchError(
                        f"{type(self.model).__name__} has no trainable parameters left to watch; unfreeze a layer "
                        "before attaching again"
                    )
                self.model_info = dataclasses.replace(self.model_info, layers=layers)
                self._plan = self._ring = None

    def detach(self, *, report: bool = True) -> None:
        """Close the current step, give the final report and remove every hook (idempotent)."""
        if not self._attached:
            return
        try:
            if report and self._broken is None:
                self._guard(self._finish)
        finally:
            self._remove_hooks()
            with contextlib.suppress(Exception):
                # Kept for a later attach, which gives it back to the freshly configured plugins.
                self._carried = self._plugin_state()
            with contextlib.suppress(Exception):
                self.host.call("gradwatch_unconfigure", config=self.config, ctx=self.context())
            others = _ATTACHED.get(self.model)
            if others is not None:
                others.pop(id(self), None)
                if not others:
                    del _ATTACHED[self.model]
            self._attached = False

    def __enter__(self) -> Watcher:
        if not self._attached:
            self.attach()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def _remove_hooks(self) -> None:
        remove_all(self._handles)
        remove_all(self._order_handles)
        self.amp.remove()
        self.probes.remove_all()
        self.probing = False
        self._snapshot = None

    # ------------------------------------------------------------------ public actions

    def step(self, *, grad_scale: torch.Tensor | None = None) -> None:
        """Mark a step boundary: gradients are final now. Use it when no optimizer is given
        (or from a framework callback); call it after backward and before the update.

        Args:
            grad_scale: The loss scale the gradients still carry, when the optimizer
                unscales them inside its own step (a fused optimizer under a ``GradScaler``
                that was not asked to ``unscale_``): statistics and clipping divide it out
                on device. ``None`` (the default): the gradients are unscaled.
        """
        if not self._attached:
            if not self._warned_detached:
                self._warned_detached = True
                warnings.warn(
                    "gw.step() on a detached watcher (its `with` block ended, or detach() was called) does nothing; "
                    "call gw.attach() to watch again",
                    GradWatchWarning,
                    stacklevel=2,
                )
            return
        self._guard(lambda: self._boundary(grad_scale))

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Record this step's loss on device (no host sync), as ``history.loss``.

        Optional: detectors use it to tell a diverging loss from a converged one. The
        Lightning callback records the training-step loss itself.
        """
        if self._attached and self._broken is None:
            self._guard(lambda: self._record_loss(loss))

    def _record_loss(self, loss: torch.Tensor) -> None:
        self._ensure_plan()
        assert self._ring is not None
        self._ring.write_extra(self._step, LOSS_KEY, loss.detach().reshape(()))

    def report(self, *, show_all: bool = False, new_only: bool = False) -> Report | None:
        """Print the report now (rank zero): the flow table of the latest statistics and
        every diagnosis of the run so far, in full, whenever it is called.

        While attached, the step whose update already ran is closed and the statistics
        recorded since the last report are drained and diagnosed first (a partial report
        interval, which the run log records too). After the ``with`` block it prints the
        run's final state again.

        Args:
            show_all: The full report: every layer (no collapsed rows), all evidence, and
                every remedy's rationale and code.
            new_only: Print only when this call finds new diagnoses, as a scheduled report
                does (``show_all`` is then the console option's).

        Returns:
            The report given to the reporters, or ``None`` when ``new_only`` found nothing
            to drain.
        """
        request = None if new_only else {"show_all": bool(show_all)}
        return self._guard(lambda: self._report_now(request))

    def _report_now(self, request: Mapping[str, Any] | None) -> Report | None:
        if self._attached and self._broken is None:
            if self._open:
                self._close()
            if self._ring is not None and self._interval_start < self._step:
                return self._report_interval(final=False, request=request)
        if request is None:
            return None
        # Nothing new to drain (or the watch is over): the current state, from the history.
        step = max(self._step - 1, 0)
        report = Report(
            step=step,
            window=self._empty_window(),
            diagnoses=(),
            all_diagnoses=tuple(self.diagnoses),
            actions=(),
            model=self.model_info,
            history=self.history,
            request=request,
            cadence=self.cadence,
        )
        ctx = self.context(step=step)
        if ctx.is_rank_zero:
            self.host.call("gradwatch_report", report=report, console=self.console, ctx=ctx)
        return report

    def _empty_window(self) -> StatsWindow:
        names = self.model_info.names
        empty, steps = torch.zeros((0, len(names))), torch.zeros(0, dtype=torch.int64)
        return StatsWindow(
            layers=names,
            steps=steps,
            grad_norm=empty,
            grad_rms=empty,
            grad_max=empty,
            nonfinite=empty,
            present=empty,
            total_norm=torch.zeros(0),
            weight_norm=Series(steps, empty),
            update_ratio=Series(steps, empty),
            first_step=self._step,
            last_step=self._step - 1,
        )

    def advise(self, diagnosis: Diagnosis) -> list[Remedy]:
        """The remedies every plugin suggests for ``diagnosis``, as the host gives them at a
        report (on any rank; the history so far supplies the numbers)."""
        return self.pipeline.advise(diagnosis, self.model_info, self.context())

    def context(self, **changes: Any) -> StepContext:
        """The :class:`StepContext` a plugin hook would be given now (``changes`` override
        fields, as a test or a framework door may need)."""
        values: dict[str, Any] = {
            "step": self._step,
            "rank": self.rank if not _rank.distributed_ready() else _rank.global_rank(),
            "world_size": _rank.world_size(),
            "config": self.config,
            "stash": self.stash,
            "model": self.model_info,
            "sampled": self.cadence.sampled(self._step),
            "cadence": self.cadence,
            "probes": self.probes,
        }
        values.update(changes)
        return StepContext(**values)

    def trial(
        self,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        batches: Iterable[Any] | None = None,
        *,
        steps: int | None = None,
        remedies: Sequence[Remedy | str] | None = None,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        seed: int = 0,
        compute_loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> Trials:
        """Measure each remedy of the diagnoses so far on a copy of the model, ranked.

        Each copy (and an untouched one) trains ``steps`` steps on the same batches from the
        model's current state; the model, optimizer, hooks and RNG state are never touched
        (:mod:`gradwatch.trial` says what is measured and how the verdicts are given). Works
        during and after the ``with`` block; the result goes to the ``gradwatch_trial`` hook
        (the run log records it) on rank zero.

        Args:
            loss_fn: ``loss_fn(output, target)``; ``None`` uses the model's own loss (Hugging
                Face models given ``labels``).
            batches: ``(inputs, target)`` pairs (or keyword dicts); default: the batches
                kept with ``keep_batches``.
            steps: Training steps per copy (default 20).
            remedies: ``Remedy`` objects or remedy kinds to try (default: every remedy of
                the warning and error diagnoses).
            optimizer: The optimizer whose class and hyper-parameters the copies use
                (default: the watcher's).
            seed: The seed each copy trains with.
            compute_loss: ``compute_loss(copy, batch) -> loss`` instead of the forward and
                ``loss_fn`` (the Lightning door passes the module's ``training_step``).

        Returns:
            The :class:`gradwatch.trial.Trials`, best first; ``.print()`` shows the table.

        Example::

            trials = gw.trial(loss_fn, batches=list(itertools.islice(loader, 8)))
            trials.print()
            trials.best.remedy.snippet
        """
        from gradwatch.trial import trial_of  # imported when used: most runs never try

        trials = trial_of(
            self, loss_fn=loss_fn, batches=batches, steps=steps, remedies=remedies, optimizer=optimizer, seed=seed,
            compute_loss=compute_loss,
        )  # fmt: skip
        ctx = self.context()
        if ctx.is_rank_zero:
            self.host.call("gradwatch_trial", trials=trials, ctx=ctx)
        return trials

    def state_dict(self) -> dict[str, Any]:
        """Step count, history, diagnoses and every plugin's state, for a checkpoint.

        A step whose optimizer update already ran is closed first, and the statistics
        recorded so far are drained and diagnosed (a partial report interval), so the
        checkpoint holds everything up to now.
        """
        if self._attached and self._broken is None:
            self._guard(self._flush)
        plugins = self._plugin_state() if self._attached or self._carried is None else dict(self._carried)
        return {
            "version": 1,
            "step": self._step,
            "history": self.history.state_dict(),
            "diagnoses": [d.to_dict() for d in self.diagnoses],
            "actions": [a.to_dict() for a in self.actions],
            "plugins": plugins,
            "cadence": self.cadence.state_dict(),
        }

    def _plugin_state(self) -> dict[str, Any]:
        plugins: dict[str, Any] = {}
        for part in self.host.call("gradwatch_state_dict", ctx=self.context()):
            plugins.update(part or {})
        return plugins

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the run continues at the saved step."""
        if state.get("version") != 1:
            raise GradWatchError(f"unknown gradwatch state version {state.get('version')!r}; expected 1")
        self._step = self._interval_start = int(state["step"])
        self.history.load_state_dict(state["history"])
        self.pipeline.diagnoses[:] = [Diagnosis.from_dict(d) for d in state["diagnoses"]]
        self.pipeline.actions[:] = [Action.from_dict(a) for a in state["actions"]]
        if "cadence" in state:
            self.cadence.load_state_dict(state["cadence"])
        elif self.cadence.auto:
            self.cadence.restart(self._step)  # an older checkpoint: measure afresh from here
        if not self._attached and self._attaches:
            self._carried = dict(state["plugins"])  # detached: the plugins get it at the next attach
            return
        self.host.call("gradwatch_load_state_dict", state=state["plugins"], ctx=self.context())
        self._schedule_probes()

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich import get_console

            return get_console()
        return self._console

    # ------------------------------------------------------------------ hooks (hot path)

    def _record_order(self, module: nn.Module, args: object) -> None:
        if torch.is_grad_enabled():
            self._order.append(module)

    def _on_forward(self, module: nn.Module, args: object) -> None:
        if torch.is_grad_enabled() and self._broken is None:
            self._guard(self._forward_started)

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if self._broken is None:
            self._guard(lambda: self._optimizer_step(optimizer))

    def _forward_started(self) -> None:
        if self._stepless is not None:
            self._count_stepless()
        if self._open:
            self._close()
        elif self.amp.skipped():
            self._ensure_plan()
            self._amp_skips.append(self._step)
            self._advance()
        self.amp.remember_scale()

    def _optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._open and id(optimizer) not in self._stepped:
            self._stepped.add(id(optimizer))  # a second optimizer of the same step
            return
        # A fused optimizer under GradScaler.step() unscales inside its kernel: the scaler sets
        # ``optimizer.grad_scale`` for that call (torch.amp.grad_scaler), so the gradients seen
        # here still carry the loss scale (Lightning-AI/pytorch-lightning#21720).
        scale = getattr(optimizer, "grad_scale", None)
        self._boundary(scale if isinstance(scale, torch.Tensor) else None)
        self._stepped = {id(optimizer)}

    def _count_stepless(self) -> None:
        """Warn once when forwards keep finding gradients but no step boundary ever comes
        (``watch(model)`` without an optimizer and without ``gw.step()``): otherwise the
        run would end with no report and no hint (issue 14)."""
        layer = self.model_info.layers[0]  # one layer's attributes: no loop over the model
        if not any(getattr(layer.module, name).grad is not None for name in layer.param_names):
            return
        self._stepless += 1  # type: ignore[operator]
        if self._stepless >= STEPLESS_FORWARDS:
            self._stepless = None
            warnings.warn(
                f"gradwatch.watch() was given no optimizer and gw.step() was never called: {STEPLESS_FORWARDS} forward "
                "passes ran after a backward but no step boundary was seen, so nothing is measured or reported; "
                "pass the optimizer (gradwatch.watch(model, optimizer)) or call gw.step() after each backward",
                GradWatchWarning,
                stacklevel=_user_stacklevel(),
            )

    @torch.no_grad()
    def _boundary(self, grad_scale: torch.Tensor | None = None) -> None:
        self._stepless = None
        if self._open:
            self._close()
        plan = self._ensure_plan()
        self.amp.backward_seen = False
        self._open = True
        self._stepped = set()
        batch = plan.batch(grad_scale)
        if not len(batch):
            return
        step = self._step
        ring = self._ring
        assert ring is not None
        ctx = self.context(recorder=lambda key, value: ring.write_extra(step, key, value))
        started = now()
        permanent, scheduled = self.probes.take_time()
        if self._boundary_at is not None and self.cadence.dense(step):
            # The step before this one, boundary to boundary: the user's own work, less ours
            # (its statistics pass, the probes of this step's forward, its weight snapshot).
            ours = (self._stats_seconds or 0.0) + permanent + scheduled + self._snapshot_seconds + self._install_seconds
            sampled = self._probe_seconds + self._snapshot_seconds if self.cadence.sampled(step - 1) else None
            self.cadence.observe(step - 1, self._stats_seconds, started - self._boundary_at - ours, sampled)
        # This step's sampled work so far: the probes of its forward (and installing them).
        self._probe_seconds = scheduled + self._install_seconds if self.cadence.sampled(step) else 0.0
        self._snapshot_seconds = self._install_seconds = 0.0
        stats = self.cadence.stats(step)
        if stats:
            ring.write_core(step, batch)
            for extra in self.host.call("gradwatch_collect", grads=batch, ctx=ctx):
                for key, value in (extra or {}).items():
                    ring.write_extra(step, key, value)
        passed = now()
        self.host.call("gradwatch_act", grads=batch, ctx=ctx)
        if not stats and batch.has_norms:
            # Clipping read every gradient norm on a step without statistics: its total feeds
            # the detectors (history.step_norm), with no second pass.
            ring.write_extra(step, STEP_NORM_KEY, batch.total_norm())
        if self.cadence.sampled(step):
            taken = now()
            self._snapshot = WeightSnapshot(plan)
            self._snapshot_seconds += now() - taken
        self._boundary_at, self._stats_seconds = started, (passed - started) if stats else None

    def _close(self) -> None:
        self._open = False
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is not None and self._ring is not None:
            taken = now()
            weight_norm, update_ratio = snapshot.measure()
            self._snapshot_seconds += now() - taken
            self._ring.write_update(self._step, weight_norm, update_ratio)
        self._advance()

    def _advance(self) -> None:
        self._step += 1
        if self.probes.installed:
            taken = now()
            self.probes.uninstall()
            self._snapshot_seconds += now() - taken
        self.probing = False
        if self.cadence.due(self._step):
            device = self._plan.device if self._plan is not None else None
            self.cadence.decide((lambda v: _rank.reduce_max(v, device)) if _rank.distributed_ready() else None)
        if self._step % self.config.report_every == 0 or (self._ring is not None and self._ring.full):
            self._report_interval(final=False)
        self._schedule_probes()

    def _schedule_probes(self) -> None:
        if not self.model_info.compiled:
            self.probing = self.cadence.sampled(self._step)
            taken = now()
            self.probes.install(self._step)
            self._install_seconds = now() - taken

    def _ensure_plan(self) -> Plan:
        if self._plan is None:
            remove_all(self._order_handles)
            if self._order:
                layers = find_layers(self.model, order=list(dict.fromkeys(self._order)), keep=self._keep)
                self.model_info = dataclasses.replace(self.model_info, layers=layers, order_known=True)
            self._plan = Plan(self.model_info)
            capacity = self.config.report_every + 1
            self._ring = StatsRing(self._plan.num_layers, capacity, self._plan.device)
            self.host.shapes.clear()  # statistics of a new plan may take new shapes
            self.pipeline.relayer(self.model_info.names)
            if self._order and self.model_info.layers[0].module is not self.amp.layer:
                # The first layer in forward order gets its gradient last: the flag goes there.
                old = self.amp.handle
                self._handles.append(self.amp.watch(self.model_info.layers[0]))
                if old in self._handles:
                    self._handles.remove(old)
        return self._plan

    # ------------------------------------------------------------------ host side

    def _flush(self) -> None:
        if self._open:
            self._close()
        if self._interval_start < self._step:
            self._report_interval(final=False)

    def _finish(self) -> None:
        if self._open:
            self._close()
        self._report_interval(final=True)

    def _report_interval(self, *, final: bool, request: Mapping[str, Any] | None = None) -> Report | None:
        first, last = self._interval_start, self._step - 1
        self._interval_start = self._step
        if self._ring is None:
            return None
        window = self._ring.drain(
            layers=self.model_info.names, amp_skips=self._amp_skips, first_step=first, last_step=last, final=final
        )
        self._amp_skips = []
        ctx = self.context(step=max(last, 0))
        return self.pipeline.interval(window, self.model_info, ctx, self.console, final=final, request=request)

    def _guard(self, fn: Callable[[], Any]) -> Any:
        """Run gradwatch's own work so that its failure never stops the user's training."""
        try:
            return fn()
        except GradWatchError:
            raise
        except Exception as exc:
            if self.config.strict:
                raise
            self._broken = exc
            self._remove_hooks()
            warnings.warn(
                f"gradwatch stopped watching after an internal error ({type(exc).__name__}: {first_line(exc)}); "
                "training goes on unwatched; pass strict=True to see the traceback",
                GradWatchWarning,
                stacklevel=3,
            )
            return None


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside gradwatch and torch (the user's call
    of the model, for a warning raised from a module hook)."""
    import sys

    ours = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(ours):
        frame, level = frame.f_back, level + 1
    return level


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    *,
    console: Console | None = None,
    scaler: torch.amp.GradScaler | None = None,
    **options: Any,
) -> Watcher:
    """Watch the gradients of ``model`` and attach now.

    Args:
        model: Any ``nn.Module``, also wrapped by ``DistributedDataParallel``,
            ``DataParallel`` or ``torch.compile``.
        optimizer: One optimizer or several; their ``step()`` marks the step boundary.
            Without one, call :meth:`Watcher.step` after each backward.
        console: The rich console for reports (default: ``rich.get_console()``).
        scaler: The ``torch.amp.GradScaler`` of a mixed-precision loop: steps it skips
            (gradients overflowed) are counted as AMP skips, apart from genuine non-finite
            gradients. Without it, such steps are not counted.
        **options: The options every door takes (:class:`gradwatch.WatchConfig`):

            {options}

    Raises:
        GradWatchError: For an unknown option (with the closest known name), a bad value,
            or a model, optimizer or scaler gradwatch cannot watch; the message says what
            to pass instead.

    Example::

        with gradwatch.watch(model, optimizer) as gw:
            for x, y in loader:
                loss_fn(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
        print(gw.diagnoses)
    """
    config = WatchConfig.from_options(options, door="watch()", door_names=("console", "scaler"))
    watcher = Watcher(model, optimizer, config=config, console=console, scaler=scaler)
    if not watcher.optimizers:
        watcher._stepless = 0  # the loop must call gw.step(): say so if it never does
    return watcher.attach()


watch.__doc__ = watch.__doc__.replace("{options}", WatchConfig.options_doc(indent=12))  # type: ignore[union-attr]
