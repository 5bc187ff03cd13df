"""The Lightning callback: ``Trainer(callbacks=[gradwatch.GradWatch()])``.

One implementation, :class:`GradWatchCallback`, holds every hook; the classes the
Trainers accept are built from it on first use, one per Lightning package, because each
Trainer checks ``isinstance(callback, Callback)`` against its *own* package:

* ``gradwatch.GradWatch`` (= ``gradwatch.lightning.GradWatch``) derives from
  ``pytorch_lightning.Callback`` (from ``lightning.pytorch.Callback`` when only the
  unified ``lightning`` package is installed);
* ``gradwatch.lightning.LightningGradWatch`` derives from ``lightning.pytorch.Callback``.

Importing this module imports no Lightning package; resolving one of those names
imports the package it is built for, and only that one (mixing the two in one run is
what Lightning#17485 warns about).

Where a step is seen: ``on_before_optimizer_step``, once per optimizer step, after the
closure ran (so after every accumulated backward), after DDP's all-reduce and after the
AMP scaler's ``unscale_``, before Lightning's own gradient clipping. No optimizer hook is
used: under automatic optimisation Lightning runs forward and backward *inside*
``optimizer.step(closure)``, so an optimizer step pre-hook would fire before the
gradients exist.
"""

from __future__ import annotations

import importlib
import io
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch._door import (
    LogTap,
    capture_console,
    check_log_layers,
    count_metrics,
    log_metrics,
    pending_scale,
    print_text,
    take_text,
)
from gradwatch.config import WatchConfig
from gradwatch.manager import plugin_manager
from gradwatch.trial import DEFAULT_TRIAL_BATCHES, BatchKeeper, Trials, lightning_trial
from gradwatch.types import Diagnosis, GradWatchError, GradWatchWarning
from gradwatch.watch import Watcher

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["GradWatch", "GradWatchCallback", "LightningGradWatch", "callback_class"]

#: ``state_key`` of the callback in checkpoints; the same for both packages, so a
#: checkpoint written under ``pytorch_lightning`` resumes under ``lightning.pytorch``.
STATE_KEY = "GradWatch"

_PACKAGES = ("pytorch_lightning", "lightning.pytorch")


class GradWatchCallback:
    """Watch the gradients of a ``LightningModule``: statistics, diagnoses, remedies, logs.

    The Lightning face of :func:`gradwatch.watch`, with the same options, the same core and
    plugins. Gradient statistics are taken in ``on_before_optimizer_step`` (final,
    unscaled, accumulated gradients; once per optimizer step). The training loss is
    recorded on device from ``on_train_batch_end``. Each optimizer gets its own watcher
    over the parameters it trains (two optimizers, GAN style, are reported separately and
    logged under ``grad/opt<i>/``).

    Logged through ``pl_module.log_dict(..., rank_zero_only=True)`` under ``grad/``, only
    on the steps the Trainer writes logs (``log_every_n_steps``): ``norm_total`` and
    per-layer ``norm/<layer>`` (see ``log_layers``) as on-device tensors of *that* step,
    read by Lightning when it writes (no extra host sync); ``diagnoses/<kind>`` and
    ``clips`` as running counts, which change once per report interval (that is when
    the host reads the statistics).

    Args:
        console: A rich console to print reports to, as is (default: reports are
            rendered off-screen and printed through the Trainer's progress bar, so a
            TQDM or rich bar is not garbled).
        log_metrics: Log to the Trainer's loggers.
        log_layers: Per-layer norms to log: ``"all"``; an ``int`` k: the k largest
            layer norms of the step (one small host read of their indices per logging
            step); ``"aggregate"``: ``norm_min``, ``norm_max``, ``norm_mean`` over
            layers; ``"none"``; ``"auto"`` (default): all up to 32 layers, aggregates
            beyond.
        trial: At the end of fit (``on_train_end``, after the final report), on rank zero
            only, try each remedy of the run's warning and error diagnoses on a copy of the
            module (:meth:`gradwatch.Watcher.trial`): each copy computes its loss with its own
            ``training_step`` on the last ``keep_batches`` training batches (8 when
            ``keep_batches`` is 0; references, kept on rank zero). The table is printed and
            the result kept as ``callback.trials``. At the end, not at the first error: a
            trial mid-run would hold the other ranks at their next collective for its
            duration. It starts from the final weights, so after a non-finite step it says
            that instead of measuring. Automatic optimisation and one optimizer only; not
            run when fit ends with an exception.
        **options: The options every door takes (:class:`gradwatch.WatchConfig`);
            ``clip`` conflicts with ``Trainer(gradient_clip_val=...)``, and ``plugins``
            serve every optimizer's watcher (keep their state in ``ctx.stash``):

            {options}

    Raises:
        GradWatchError: For an unknown option (the message lists the known ones) or a
            bad value, here; for a module without trainable parameters or ``clip=``
            together with ``Trainer(gradient_clip_val=...)``, at ``setup``.

    Example::

        import gradwatch
        import pytorch_lightning as pl

        trainer = pl.Trainer(callbacks=[gradwatch.GradWatch()])
        trainer.fit(model)
    """

    _lightning_package: str = ""

    def __init__(
        self,
        *,
        console: Console | None = None,
        log_metrics: bool = True,
        log_layers: str | int = "auto",
        trial: bool = False,
        **options: Any,
    ) -> None:
        check_log_layers(log_layers)
        if not isinstance(trial, bool):
            raise GradWatchError(f"trial takes True or False, got {trial!r}")
        self.config = WatchConfig.from_options(
            options, door="GradWatch()", door_names=("console", "log_metrics", "log_layers", "trial")
        )
        plugin_manager(self.config)  # the plugin set resolved now: bad names fail here, not at setup
        self.log_metrics = log_metrics
        self.log_layers = log_layers
        self._user_console = console
        self.watchers: list[Watcher] = []
        self._taps: list[LogTap] = []
        self._buffers: list[io.StringIO] = []
        self._labels: list[str] = []
        self._by_optimizer: dict[int, int] = {}
        self._taken: list[int] = []
        self._pending: Mapping[str, Any] | None = None
        self._progress_bar: Any = None
        self._stepped = False
        self._loss: torch.Tensor | None = None
        self.trial = trial
        self.trials: Trials | None = None
        self._kept = (
            BatchKeeper(self.config.keep_batches or DEFAULT_TRIAL_BATCHES, copies=self.config.keep_copies) if trial else None
        )
        self._spawned = False  # pickled into processes (ddp_spawn): the results live there
        self._spawn_warned = False

    # ------------------------------------------------------------------ results

    @property
    def diagnoses(self) -> list[Diagnosis]:
        """Every diagnosis so far, of every optimizer's watcher, oldest first.

        Under ``strategy="ddp_spawn"`` the training ran in processes Lightning started, each
        with its own copy of this callback, and the copy in the main process never saw a
        step: there, after ``fit``, the diagnoses are read back from the run log that rank
        zero wrote (``log="run.jsonl"``; its history is in the same file,
        :func:`gradwatch.logfile.read_log`). Without ``log=`` they stayed in the spawned
        processes, and this warns once and returns ``[]``.
        """
        if not self.watchers and self._spawned:
            return self._spawned_diagnoses()
        return sorted((d for w in self.watchers for d in w.diagnoses), key=lambda d: d.step)

    def _spawned_diagnoses(self) -> list[Diagnosis]:
        log = self.config.log
        if log is not None and os.path.isfile(log):
            from gradwatch.logfile import RunLogError, read_log

            try:
                return sorted(read_log(log).diagnoses, key=lambda d: d.step)
            except RunLogError as exc:
                warnings.warn(
                    f"GradWatch could not read the run log of the spawned processes: {exc}", GradWatchWarning, stacklevel=3
                )
                return []
        if not self._spawn_warned:
            self._spawn_warned = True
            warnings.warn(
                "GradWatch ran in the processes started by strategy='ddp_spawn'; its diagnoses and history stayed there "
                "(this copy in the main process saw no step). Pass GradWatch(log='run.jsonl'): rank zero writes them "
                "there, this property reads them back, and `gradwatch report run.jsonl` prints them",
                GradWatchWarning,
                stacklevel=3,
            )
        return []

    @property
    def state_key(self) -> str:
        return STATE_KEY

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse misuse before any training step (fit only; other stages compute no gradients)."""
        if stage != "fit":
            return
        if not any(p.requires_grad for p in pl_module.parameters()):
            raise GradWatchError(
                f"GradWatch: {type(pl_module).__name__} has no trainable parameters (none with requires_grad=True); "
                "there are no gradients to watch: unfreeze a layer or remove the GradWatch callback"
            )
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if self.config.clip is not None and clip_val:
            raise GradWatchError(
                f"GradWatch(clip={self.config.clip!r}) conflicts with Trainer(gradient_clip_val={clip_val}): "
                "both would clip the same gradients; remove one"
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Build one watcher per optimizer (the optimizers exist only now) and attach."""
        previous = [w.state_dict() for w in self.watchers] if self.watchers and trainer.global_step > 0 else None
        self._detach_all(report=False)
        self._reset()
        optimizers = [getattr(o, "_optimizer", o) for o in trainer.optimizers]
        for optimizer in optimizers:
            pending_scale(_scaler(trainer), optimizer)  # refuses, before training, what it cannot read
        self._progress_bar = getattr(trainer, "progress_bar_callback", None)
        self._build(pl_module, optimizers)
        state = self._pending
        self._pending = None
        if state is None and previous is not None:
            # Trainer.fit called again on a trainer that continues (global_step > 0):
            # continue the step count and history instead of starting over.
            state = {"version": 1, "watchers": previous}
        if state is not None:
            self._load(state)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """The step boundary: gradients are final, unscaled and not yet clipped."""
        if not self.watchers:
            return
        index = self._by_optimizer.get(id(getattr(optimizer, "_optimizer", optimizer)), 0 if len(self.watchers) == 1 else None)
        if index is None:
            return
        watcher, tap = self.watchers[index], self._taps[index]
        tap.wanted = self.log_metrics and trainer.is_global_zero and bool(trainer.loggers) and _logs_now(trainer)
        tap.total = tap.layers = None
        raw = getattr(optimizer, "_optimizer", optimizer)
        watcher.step(grad_scale=pending_scale(_scaler(trainer), raw))
        self._taken[index] += 1
        self._stepped = True
        self._flush(index)
        if tap.total is not None:
            tap.wanted = False
            try:
                metrics = self._metrics(index)
                pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, logger=True, rank_zero_only=True)
            except Exception as exc:
                # Logging is a report: a failure turns it off, training goes on.
                if self.config.strict:
                    raise
                self.log_metrics = False
                warnings.warn(
                    f"gradwatch stopped logging to the Trainer's loggers ({type(exc).__name__}: {exc}); "
                    "training goes on; pass strict=True to see the traceback",
                    GradWatchWarning,
                    stacklevel=2,
                )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Record the training loss of each optimizer step, on device (no sync): under
        gradient accumulation, the sum of the micro-batches' losses, which Lightning has
        already divided by ``accumulate_grad_batches`` (their mean)."""
        if not self.watchers:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.detach().reshape(())
            self._loss = loss if self._loss is None else self._loss + loss
        if self._stepped:
            self._stepped = False
            if self._loss is not None:
                self.watchers[0].observe_loss(self._loss)
            self._loss = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """With ``trial=True``: keep a reference to the batch (rank zero) for the trial."""
        if self._kept is not None and trainer.is_global_zero:
            self._kept.keep((batch, batch_idx))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """With ``trial=True``: the final report (every rank), then the trial on rank zero."""
        if self._kept is None or not self.watchers:
            return
        self._detach_all(report=True)
        if trainer.is_global_zero:
            self.trials = lightning_trial(trainer, pl_module, self.watchers[0], self._kept)
            if self.trials is not None and self.config.report:
                self.trials.print(self.watchers[0].console)
                self._flush(0, live=False)
        self._kept.clear()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Final report and hook removal; the watchers stay readable (``diagnoses``, ``state_dict``)."""
        if stage == "fit":
            self._detach_all(report=True)
            self._log_final(trainer)
            self._progress_bar = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Remove every hook; report what was seen before the failure (never masks it)."""
        try:
            self._detach_all(report=True)
            self._log_final(trainer)
        except Exception as exc:  # the user's exception is the one that matters
            warnings.warn(f"gradwatch could not give its final report ({exc!r})", GradWatchWarning, stacklevel=2)
        self._progress_bar = None

    def state_dict(self) -> dict[str, Any]:
        """Step count, history, diagnoses, actions and plugin state (clip history) of every
        watcher. Drains the statistics of the open interval first, so that the checkpoint
        holds everything seen up to now."""
        if not self.watchers:
            return dict(self._pending) if self._pending is not None else {}
        states = []
        for i, watcher in enumerate(self.watchers):
            if watcher.attached:
                watcher.report(new_only=True)  # drain the open interval; print only what is new
                self._flush(i)
            state = watcher.state_dict()
            # The open step (gradients read, update done) counts as taken: a resumed
            # run's next step is the next one.
            state["step"] = self._taken[i]
            states.append(state)
        return {"version": 1, "watchers": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint's state; applied when the watchers are built (``on_fit_start``)."""
        if not state_dict:
            return
        if state_dict.get("version") != 1:
            raise GradWatchError(f"unknown GradWatch checkpoint state version {state_dict.get('version')!r}; expected 1")
        if self.watchers and any(w.attached for w in self.watchers):
            self._load(state_dict)  # strategies that restore after setup
        else:
            self._pending = state_dict

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the Trainer with its callbacks: consoles, plugin managers,
        # hook handles and the progress bar stay behind; each process builds its own.
        # This object (the main process's) learns that its copies will do the training.
        self._spawned = True
        state = self.__dict__.copy()
        state.update(
            watchers=[],
            _taps=[],
            _buffers=[],
            _labels=[],
            _by_optimizer={},
            _taken=[],
            _progress_bar=None,
            _user_console=None,
            _loss=None,
            _spawned=False,
        )
        return state

    # ------------------------------------------------------------------ internals

    def _build(self, pl_module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
        shares: list[list[nn.Parameter] | None] = []
        if len(optimizers) <= 1:
            shares.append(None)
        else:
            for optimizer in optimizers:
                shares.append([p for g in optimizer.param_groups for p in g["params"] if id(p) in trainable])
        for i, params in enumerate(shares):
            tap = LogTap("lightning")
            buffer = io.StringIO()
            config = self.config.replace(plugins=(*self.config.plugins, tap))
            watcher = Watcher(
                pl_module,
                None,
                config=config,
                console=self._user_console if self._user_console is not None else capture_console(buffer),
                params=params,
            )
            watcher.attach()
            self.watchers.append(watcher)
            self._taps.append(tap)
            self._buffers.append(buffer)
            self._taken.append(0)
            self._labels.append(f"opt{i}" if len(shares) > 1 else "")
        self._by_optimizer = {id(o): i for i, o in enumerate(optimizers)} if len(optimizers) > 1 else {}

    def _reset(self) -> None:
        self.watchers, self._taps, self._buffers, self._labels, self._taken = [], [], [], [], []
        self._by_optimizer = {}
        self._stepped = False
        self._loss = None

    def _load(self, state: Mapping[str, Any]) -> None:
        states = state.get("watchers", [])
        if len(states) != len(self.watchers):
            warnings.warn(
                f"the checkpoint holds gradwatch state for {len(states)} optimizer(s) but this run has "
                f"{len(self.watchers)}; gradwatch starts over at step 0",
                GradWatchWarning,
                stacklevel=2,
            )
            return
        for i, (watcher, saved) in enumerate(zip(self.watchers, states)):
            watcher.load_state_dict(saved)
            self._taken[i] = watcher.step_count

    def _detach_all(self, *, report: bool) -> None:
        for i, watcher in enumerate(self.watchers):
            watcher.detach(report=report)
            # The Trainer has closed its progress bars by now (TQDM drops text then).
            self._flush(i, live=False)

    def _flush(self, index: int, *, live: bool = True) -> None:
        """Print what a watcher rendered since the last flush, through the progress bar
        while it is ``live``."""
        if index >= len(self._buffers):
            return
        text = take_text(self._buffers[index])
        if not text:
            return
        label = self._labels[index]
        if label:
            text = f"gradwatch · optimizer {label[3:]}\n{text}"
        bar = self._progress_bar
        # TQDM: tqdm.write clears the bars, prints above them and redraws them; rich's
        # global console prints above a live display (RichProgressBar).
        tqdm = live and bar is not None and getattr(bar, "is_enabled", False) and type(bar).__name__ != "RichProgressBar"
        print_text(text, bar.print if tqdm else None)

    def _log_final(self, trainer: Any) -> None:
        """Log the diagnosis and clip counts once the final report has diagnosed the last,
        partial interval: a fit shorter than a report interval past its last logging step
        would otherwise log no ``grad/diagnoses/*`` at all (issue 14). Written straight to
        the Trainer's loggers (``log_dict`` is not allowed at teardown), at the step
        Lightning's own logging uses, before Lightning finalizes them."""
        if not (self.log_metrics and self.watchers and getattr(trainer, "is_global_zero", True) and trainer.loggers):
            return
        metrics: dict[str, float] = {}
        for i, watcher in enumerate(self.watchers):
            metrics.update(count_metrics(watcher, prefix=f"grad/{self._labels[i]}/" if self._labels[i] else "grad/"))
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        step = getattr(loop, "_batches_that_stepped", None)
        step = trainer.global_step if step is None else step
        try:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        except Exception as exc:  # logging is a report: it never stops the user's run
            if self.config.strict:
                raise
            warnings.warn(
                f"gradwatch could not log its final counts ({type(exc).__name__}: {exc})", GradWatchWarning, stacklevel=2
            )

    def _metrics(self, index: int) -> dict[str, Any]:
        prefix = f"grad/{self._labels[index]}/" if self._labels[index] else "grad/"
        return log_metrics(self.watchers[index], self._taps[index], prefix=prefix, log_layers=self.log_layers)


GradWatchCallback.__doc__ = GradWatchCallback.__doc__.replace("{options}", WatchConfig.options_doc(indent=12))  # type: ignore[union-attr]


def _scaler(trainer: Any) -> Any:
    """The precision plugin's ``GradScaler`` (16-bit mixed precision), or ``None``."""
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


def _logs_now(trainer: Any) -> bool:
    """Whether the Trainer writes its loggers at the end of this batch (its own rule,
    ``_LoggerConnector.should_update_logs``, read before the step increments)."""
    if getattr(trainer, "fast_dev_run", False):
        return True
    every = getattr(trainer, "log_every_n_steps", 50)
    if not every:
        return False
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    done = getattr(loop, "_batches_that_stepped", None)
    if done is None:  # a Lightning without that counter: the optimizer step count is close
        done = trainer.global_step
    return (done + 1) % every == 0 or bool(getattr(trainer, "should_stop", False))


# ---------------------------------------------------------------------- the classes


_CLASSES: dict[str, type] = {}


def callback_class(package: str = "pytorch_lightning", name: str = "GradWatch") -> type:
    """The GradWatch callback class for one Lightning package, built once.

    Args:
        package: ``"pytorch_lightning"`` or ``"lightning.pytorch"``.
        name: The class name (the module attribute it is reachable as, for pickling).

    Raises:
        GradWatchError: For another package name.
        ImportError: When that package is not installed.
    """
    if package not in _PACKAGES:
        raise GradWatchError(f"package must be one of {', '.join(map(repr, _PACKAGES))}, got {package!r}")
    cls = _CLASSES.get(name)
    if cls is None:
        base = importlib.import_module(package).Callback
        cls = type(
            name,
            (GradWatchCallback, base),
            {"__module__": __name__, "__qualname__": name, "__doc__": GradWatchCallback.__doc__, "_lightning_package": package},
        )
        _CLASSES[name] = cls
    elif cls._lightning_package != package:  # type: ignore[attr-defined]
        raise GradWatchError(f"{name} is already built for {cls._lightning_package}")  # type: ignore[attr-defined]
    return cls


def _primary_package() -> str:
    import importlib.util

    try:
        found = importlib.util.find_spec("pytorch_lightning") is not None
    except ValueError:
        found = False
    return "pytorch_lightning" if found else "lightning.pytorch"


def __getattr__(name: str) -> Any:
    # Resolved lazily: importing gradwatch (or this module) imports no Lightning package.
    if name == "GradWatch":
        return callback_class(_primary_package(), "GradWatch")
    if name == "LightningGradWatch":
        return callback_class("lightning.pytorch", "LightningGradWatch")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    GradWatch = GradWatchCallback
    LightningGradWatch = GradWatchCallback
