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
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradwatch import _rank
from gradwatch.config import WatchConfig
from gradwatch.manager import PluginHost, plugin_manager
from gradwatch.stash import Stash
from gradwatch.stats import History, Plan, StatsRing, WeightSnapshot
from gradwatch.types import (
    Action,
    Diagnosis,
    GradWatchError,
    GradWatchWarning,
    LayerInfo,
    ModelInfo,
    Remedy,
    Report,
    StepContext,
)

if TYPE_CHECKING:
    from collections.abc import Set as AbstractSet

    from rich.console import Console

    from gradwatch.trial import BatchKeeper, Trials

__all__ = ["Probes", "Watcher", "watch", "unwrap_model", "find_layers"]

# model -> {id(watcher): keys of the step sources it hooks}; weak so models die freely.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, dict[int, frozenset[object]]] = weakref.WeakKeyDictionary()
_EXPLICIT = "explicit gw.step()"


def _inert(*args: object, **kwargs: object) -> None:
    """What a gradwatch hook becomes in a deep copy or a pickle of an attached model."""
    return None


class _Hook:
    """A hook registered by gradwatch.

    A watcher's own methods are held weakly, so a watcher that is dropped without
    ``detach()`` can still be collected (its hooks then do nothing). A deep copy or a
    pickle of the model (an EMA copy taken mid-training, a checkpoint) gets an inert
    hook instead of a copy of the watcher.
    """

    __slots__ = ("_fn", "_method")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._method = weakref.WeakMethod(fn) if hasattr(fn, "__self__") and hasattr(fn, "__func__") else None
        self._fn = None if self._method is not None else fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self._fn if self._method is None else self._method()
        return None if fn is None else fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, object]) -> Callable[..., None]:
        return _inert

    def __reduce__(self) -> tuple[Callable[..., None], tuple[()]]:
        return _inert_factory, ()


def _inert_factory() -> Callable[..., None]:
    return _inert


def unwrap_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """Strip ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile`` wrappers.

    Returns:
        The inner module and whether a ``torch.compile`` wrapper was found.
    """
    compiled = False
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            # Checked by name: importing torch._dynamo would cost every user its import time.
            model = model._orig_mod
            compiled = True
        else:
            return model, compiled


def find_layers(root: nn.Module, order: Sequence[nn.Module] = (), keep: AbstractSet[int] | None = None) -> tuple[LayerInfo, ...]:
    """The modules that own trainable parameters directly, in ``order`` first (forward
    order), then the rest in ``named_modules()`` order. A shared parameter belongs to the
    first layer that owns it. With ``keep`` (ids of parameters), only those are watched."""
    named = [(name, module) for name, module in root.named_modules(remove_duplicate=True)]
    rank = {id(m): k for k, m in enumerate(order)}
    named.sort(key=lambda item: rank.get(id(item[1]), len(rank)))
    seen: set[int] = set()
    layers: list[LayerInfo] = []
    for name, module in named:
        own = []
        for pname, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen and (keep is None or id(param) in keep):
                seen.add(id(param))
                own.append((pname, param))
        if own:
            layers.append(
                LayerInfo(
                    index=len(layers),
                    name=name,
                    module=module,
                    type_name=type(module).__name__,
                    param_names=tuple(p for p, _ in own),
                    numel=sum(p.numel() for _, p in own),
                )
            )
    return tuple(layers)


class Probes:
    """Module hooks registered by plugins through the watcher, so detach removes them.

    Sampled hooks are installed only for the forward passes of sampled steps (every
    ``sample_every`` steps) and removed when the step closes, so other steps pay nothing.
    """

    def __init__(self, watcher: Watcher) -> None:
        self._watcher = weakref.ref(watcher)
        self._sampled: list[tuple[nn.Module, str, Callable[..., Any], dict[str, Any]]] = []
        self._installed: list[RemovableHandle] = []
        self.permanent: list[RemovableHandle] = []

    def forward_hook(self, module: nn.Module, fn: Callable[..., Any], *, sampled: bool = True, **kwargs: Any) -> None:
        """Register ``fn`` as a forward hook of ``module`` (``kwargs`` as for
        ``nn.Module.register_forward_hook``)."""
        self._add(module, "register_forward_hook", fn, sampled, kwargs)

    def forward_pre_hook(self, module: nn.Module, fn: Callable[..., Any], *, sampled: bool = True, **kwargs: Any) -> None:
        """Register ``fn`` as a forward pre-hook of ``module``."""
        self._add(module, "register_forward_pre_hook", fn, sampled, kwargs)

    def add_handle(self, handle: RemovableHandle) -> None:
        """Keep any other removable handle (a tensor hook, say) to remove on detach."""
        self.permanent.append(handle)

    def _add(self, module: nn.Module, method: str, fn: Callable[..., Any], sampled: bool, kwargs: dict[str, Any]) -> None:
        fn = _Hook(fn)
        if sampled:
            self._sampled.append((module, method, fn, kwargs))
            watcher = self._watcher()
            if watcher is not None and watcher._probing:
                self._installed.append(getattr(module, method)(fn, **kwargs))
        else:
            self.permanent.append(getattr(module, method)(fn, **kwargs))

    @property
    def installed(self) -> bool:
        return bool(self._installed)

    def install(self) -> None:
        if not self._installed:
            self._installed = [getattr(m, method)(fn, **kw) for m, method, fn, kw in self._sampled]

    def uninstall(self) -> None:
        for handle in self._installed:
            handle.remove()
        self._installed = []

    def remove_all(self) -> None:
        self.uninstall()
        for handle in self.permanent:
            handle.remove()
        self.permanent = []
        self._sampled = []


class Watcher:
    """Watches the gradients of a model; returned by :func:`watch`.

    Use it as a context manager (leaving the block prints the final report and removes
    every hook), or call :meth:`detach` yourself.

    Attributes:
        config: The options.
        model_info: The unwrapped model and its layers.
        diagnoses: Every diagnosis so far, oldest first.
        actions: Every action (clip, skip) so far, oldest first.
        history: Per-layer statistics over steps, on the host (drained each interval).
        pm: This watcher's own ``pluggy.PluginManager``.
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
        self.optimizers = _as_optimizers(optimizer)
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
        _check_optimizers(inner, self.optimizers)
        if scaler is not None and not (hasattr(scaler, "get_scale") and hasattr(scaler, "_scale")):
            raise GradWatchError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.model_info = ModelInfo(model=inner, layers=layers, order_known=False, compiled=compiled)
        self._console = console
        self.stash = Stash()
        self.diagnoses: list[Diagnosis] = []
        self.actions: list[Action] = []
        self.history = History(tuple(layer.name for layer in layers), max_rows=config.history_size)
        self.rank = _rank.global_rank()
        self._step = 0
        self._interval_start = 0
        self._attached = False
        self._broken: BaseException | None = None
        self._plan: Plan | None = None
        self._ring: StatsRing | None = None
        self._open = False
        self._stepped: set[int] = set()
        self._snapshot: WeightSnapshot | None = None
        self._backward_seen = False
        self.scaler = scaler
        self._scale_seen: torch.Tensor | None = None
        self._sentinel: nn.Parameter | None = None
        self._sentinel_layer: nn.Module | None = None
        self._sentinel_handle: RemovableHandle | None = None
        self._amp_skips: list[int] = []
        self._order: list[nn.Module] = []
        self._order_handles: list[RemovableHandle] = []
        self._handles: list[RemovableHandle] = []
        self._probing = False
        self.probes = Probes(self)
        # keep_batches: the last forward calls of the root module, for trial(); kept after detach.
        self.kept: BatchKeeper | None = None
        if config.keep_batches:
            from gradwatch.trial import BatchKeeper

            self.kept = BatchKeeper(config.keep_batches, copies=config.keep_copies)
        self.pm = plugin_manager(config)
        self.host = PluginHost(self.pm, strict=config.strict)
        # Plugins validate their options here: errors reach the user before training starts.
        self.host.call_historic("gradwatch_configure", config=config, ctx=self._ctx())

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
        source (optimizer, or explicit steps), is already attached to the model."""
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
            self._handles.append(self.outer.register_forward_pre_hook(_Hook(self._on_forward)))
            if self.kept is not None:
                self._handles.append(self.outer.register_forward_pre_hook(_Hook(self.kept), with_kwargs=True))
            for optimizer in self.optimizers:
                self._handles.append(optimizer.register_step_pre_hook(_Hook(self._on_optimizer_step)))
            self._watch_backward(self.model_info.layers[0])
            if not self.model_info.order_known:
                for layer in self.model_info.layers:
                    self._order_handles.append(layer.module.register_forward_pre_hook(_Hook(self._record_order)))
            self.host.call("gradwatch_attach", model=self.model_info, ctx=self._ctx(probes=self.probes))
            if self.model_info.compiled and self.probes._sampled:
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
        return self

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
                self.host.call("gradwatch_unconfigure", config=self.config, ctx=self._ctx())
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
        for handle in (*self._handles, *self._order_handles):
            handle.remove()
        self._handles = []
        self._order_handles = []
        self._sentinel = self._sentinel_layer = self._sentinel_handle = None
        self.probes.remove_all()
        self._probing = False
        self._snapshot = None

    # ------------------------------------------------------------------ public actions

    def step(self) -> None:
        """Mark a step boundary: gradients are final now. Use it when no optimizer is given
        (or from a framework callback); call it after backward and before the update."""
        self._guard(self._boundary)

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Record this step's loss on device (no host sync), as ``window.extras["core.loss"]``.

        Optional: detectors use it to tell a diverging loss from a converged one. The
        Lightning callback records the training-step loss itself.
        """
        if self._attached and self._broken is None:
            self._guard(lambda: self._record_loss(loss))

    def _record_loss(self, loss: torch.Tensor) -> None:
        self._ensure_plan()
        assert self._ring is not None
        self._ring.write_extra(self._step, "core.loss", loss.detach().reshape(()))

    def report(self) -> Report | None:
        """Drain the statistics so far, diagnose them and print the report now (rank zero)."""
        return self._guard(lambda: self._report_interval(final=False))

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
        ctx = self._ctx()
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
        plugins: dict[str, Any] = {}
        for part in self.host.call("gradwatch_state_dict", ctx=self._ctx()):
            plugins.update(part)
        return {
            "version": 1,
            "step": self._step,
            "history": self.history.state_dict(),
            "diagnoses": [d.to_dict() for d in self.diagnoses],
            "actions": [a.to_dict() for a in self.actions],
            "plugins": plugins,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the run continues at the saved step."""
        if state.get("version") != 1:
            raise GradWatchError(f"unknown gradwatch state version {state.get('version')!r}; expected 1")
        self._step = self._interval_start = int(state["step"])
        self.history.load_state_dict(state["history"])
        self.diagnoses = [Diagnosis.from_dict(d) for d in state["diagnoses"]]
        self.actions = [Action.from_dict(a) for a in state["actions"]]
        self.host.call("gradwatch_load_state_dict", state=state["plugins"], ctx=self._ctx())
        self._schedule_probes()

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

    def _on_backward_done(self, param: torch.Tensor) -> None:
        self._backward_seen = True

    def _forward_started(self) -> None:
        if self._open:
            self._close()
        elif self._backward_seen and self._sentinel is not None and self._sentinel.grad is None:
            # A backward ran, its gradients were cleared, and no optimizer stepped: either
            # GradScaler skipped the step, or the user discarded the gradients (a GAN's
            # generator pass through the discriminator). Only a drop of the loss scale
            # tells them apart: one host read, on such steps only.
            self._backward_seen = False
            if self._scaler_skipped():
                self._ensure_plan()
                self._amp_skips.append(self._step)
                self._advance()
        if self.scaler is not None and self.scaler._scale is not None:
            # Remember the scale on device (no sync) for the comparison above.
            if self._scale_seen is None:
                self._scale_seen = self.scaler._scale.detach().clone()
            else:
                self._scale_seen.copy_(self.scaler._scale)

    def _scaler_skipped(self) -> bool:
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled() or scaler._scale is None:
            return False
        previous = float(self._scale_seen) if self._scale_seen is not None else float(scaler._init_scale)
        return float(scaler._scale) < previous

    def _optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._open and id(optimizer) not in self._stepped:
            self._stepped.add(id(optimizer))  # a second optimizer of the same step
            return
        self._boundary()
        self._stepped = {id(optimizer)}

    @torch.no_grad()
    def _boundary(self) -> None:
        if self._open:
            self._close()
        plan = self._ensure_plan()
        self._backward_seen = False
        self._open = True
        self._stepped = set()
        batch = plan.batch()
        if not len(batch):
            return
        step = self._step
        ring = self._ring
        assert ring is not None
        ctx = self._ctx(recorder=lambda key, value: ring.write_extra(step, key, value))
        if step % self.config.stats_every == 0:
            ring.write_core(step, batch)
            for extra in self.host.call("gradwatch_collect", grads=batch, ctx=ctx):
                for key, value in (extra or {}).items():
                    ring.write_extra(step, key, value)
        self.host.call("gradwatch_act", grads=batch, ctx=ctx)
        if step % self.config.sample_every == 0:
            self._snapshot = WeightSnapshot(plan)

    def _close(self) -> None:
        self._open = False
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is not None and self._ring is not None:
            weight_norm, update_ratio = snapshot.measure()
            self._ring.write_update(self._step, weight_norm, update_ratio)
        self._advance()

    def _advance(self) -> None:
        self._step += 1
        self.probes.uninstall()
        self._probing = False
        if self._step % self.config.report_every == 0 or (self._ring is not None and self._ring.full):
            self._report_interval(final=False)
        self._schedule_probes()

    def _schedule_probes(self) -> None:
        if self._step % self.config.sample_every == 0 and not self.model_info.compiled:
            self._probing = True
            self.probes.install()

    def _ensure_plan(self) -> Plan:
        if self._plan is None:
            for handle in self._order_handles:
                handle.remove()
            self._order_handles = []
            if self._order:
                layers = find_layers(self.model, order=list(dict.fromkeys(self._order)), keep=self._keep)
                self.model_info = dataclasses.replace(self.model_info, layers=layers, order_known=True)
            self._plan = Plan(self.model_info)
            capacity = self.config.report_every + 1
            self._ring = StatsRing(self._plan.num_layers, capacity, self._plan.device)
            if self.history.layers != self.model_info.names:
                self.history = History(self.model_info.names, max_rows=self.history.max_rows)
            if self._order and self.model_info.layers[0].module is not self._sentinel_layer:
                self._watch_backward(self.model_info.layers[0])
        return self._plan

    def _watch_backward(self, layer: LayerInfo) -> None:
        """Put the "a backward ran" flag on ``layer``'s first parameter (the first layer in
        forward order once known: it gets its gradient last). A flag only; statistics are
        never read in a tensor hook (it fires before accumulation and DDP's all-reduce)."""
        if self._sentinel_handle is not None:
            self._sentinel_handle.remove()
            self._handles.remove(self._sentinel_handle)
        self._sentinel_layer = layer.module
        self._sentinel = layer.module.get_parameter(layer.param_names[0])
        self._sentinel_handle = self._sentinel.register_post_accumulate_grad_hook(_Hook(self._on_backward_done))
        self._handles.append(self._sentinel_handle)

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

    def _report_interval(self, *, final: bool) -> Report | None:
        first, last = self._interval_start, self._step - 1
        self._interval_start = self._step
        if self._ring is None:
            return None
        window = self._ring.drain(
            layers=self.model_info.names, amp_skips=self._amp_skips, first_step=first, last_step=last, final=final
        )
        self._amp_skips = []
        self.history.extend(window)
        ctx = self._ctx(step=max(last, 0))
        actions = [a for part in self.host.call("gradwatch_actions", window=window, ctx=ctx) for a in part or ()]
        actions += [Action(kind="amp_skip", step=s, source="core") for s in window.amp_skips]
        diagnoses = [
            d for part in self.host.call("gradwatch_diagnose", window=window, model=self.model_info, ctx=ctx) for d in part or ()
        ]
        rank_zero = ctx.is_rank_zero
        if rank_zero:
            diagnoses = [d.with_remedies(self._advise(d, ctx)) for d in diagnoses]
        diagnoses.sort(key=lambda d: (-d.severity.rank, d.step))
        self.diagnoses.extend(diagnoses)
        self.actions.extend(actions)
        report = Report(
            step=max(last, 0),
            window=window,
            diagnoses=tuple(diagnoses),
            all_diagnoses=tuple(self.diagnoses),
            actions=tuple(actions),
            model=self.model_info,
            final=final,
            history=self.history,
        )
        if rank_zero:
            self.host.call("gradwatch_report", report=report, console=self.console, ctx=ctx)
        return report

    def _advise(self, diagnosis: Diagnosis, ctx: StepContext) -> list[Remedy]:
        remedies: list[Remedy] = []
        kinds: set[str] = set()
        for part in self.host.call("gradwatch_advise", diagnosis=diagnosis, model=self.model_info, ctx=ctx):
            for remedy in part or ():
                if remedy.kind not in kinds:
                    kinds.add(remedy.kind)
                    remedies.append(remedy)
        return remedies

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich import get_console

            return get_console()
        return self._console

    def _ctx(self, **changes: Any) -> StepContext:
        values: dict[str, Any] = {
            "step": self._step,
            "rank": self.rank if not _rank.distributed_ready() else _rank.global_rank(),
            "world_size": _rank.world_size(),
            "config": self.config,
            "stash": self.stash,
            "model": self.model_info,
            "sampled": self._step % self.config.sample_every == 0,
            "probes": self.probes,
        }
        values.update(changes)
        return StepContext(**values)

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
                f"gradwatch stopped watching after an internal error ({type(exc).__name__}: {exc}); "
                "training goes on unwatched; pass strict=True to see the traceback",
                GradWatchWarning,
                stacklevel=3,
            )
            return None


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
    return Watcher(model, optimizer, config=config, console=console, scaler=scaler).attach()


watch.__doc__ = watch.__doc__.replace("{options}", WatchConfig.options_doc(indent=12))  # type: ignore[union-attr]


def _as_optimizers(optimizer: object) -> tuple[torch.optim.Optimizer, ...]:
    if optimizer is None:
        return ()
    if isinstance(optimizer, torch.optim.Optimizer):
        return (optimizer,)
    if isinstance(optimizer, Iterable) and not isinstance(optimizer, (str, bytes, nn.Module)):
        optimizers = tuple(optimizer)
        if optimizers and all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            return optimizers
    raise GradWatchError(f"optimizer must be a torch.optim.Optimizer, a list of them, or None, got {type(optimizer).__name__}")


def _check_optimizers(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    owned = {id(p) for p in model.parameters()}
    for optimizer in optimizers:
        foreign = sum(1 for group in optimizer.param_groups for p in group["params"] if id(p) not in owned)
        if foreign:
            raise GradWatchError(
                f"{type(optimizer).__name__} holds {foreign} parameter(s) that are not in the watched "
                f"{type(model).__name__}; pass the optimizer that trains this model (or watch each model with its own optimizer)"
            )
