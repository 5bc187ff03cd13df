"""The Hugging Face door: ``Trainer(callbacks=[gradwatch.hf.GradWatchCallback()])``.

One implementation, :class:`HFGradWatch`, holds every hook; ``GradWatchCallback`` is built
from it on first use as a subclass of ``transformers.TrainerCallback`` and
``transformers.trainer_callback.ExportableState``, so that importing ``gradwatch`` or this
module imports neither transformers nor accelerate. Accelerate custom loops need no door:
``gradwatch.watch(model, optimizer)`` takes what ``accelerator.prepare`` returns.

Where a step is read. In ``Trainer._run_epoch`` an optimizer step is: the backward of each
micro-batch (DDP reduces the gradients in the last one's), then ``clip_grad_norm_`` when
``max_grad_norm > 0`` (the default is 1.0), then ``on_pre_optimizer_step``,
``optimizer.step()``, ``model.zero_grad()``, ``on_step_end`` and the log entry. A callback
that read the gradients in ``on_pre_optimizer_step`` would read clipped ones. So:

* when Trainer clips, the statistics are taken at the end of the backward pass of the
  step's last micro-batch (``accelerate``'s ``GradientState.sync_gradients``, which
  Trainer sets before each micro-batch): a tensor hook on the model's outputs queues an
  autograd-engine callback when the backward starts, and that callback queues a second
  one, which runs after every callback queued during the backward (DDP's gradient
  reduction finishes in one): the gradients are then final, all-reduced, accumulated and
  not yet clipped, and nothing is read on the host;
* when Trainer does not clip (``max_grad_norm=0``, required for ``clip=``), they are taken
  in ``on_pre_optimizer_step``, where they are final and unscaled, and gradwatch's own
  clipping acts there;
* under fp16 loss scaling the step is the wrapped optimizer's own ``step()``, as for
  :func:`gradwatch.watch`: ``GradScaler.step`` calls it after ``unscale_`` and skips it on
  overflow, and a skipped step is counted as an AMP skip, not read as non-finite
  gradients. With Trainer clipping the gradients are then read after the clip (they are
  unscaled only inside it; a warning says so). A fused optimizer (``adamw_torch_fused``,
  Trainer's default with torch >= 2.8) always runs its step and skips inside its kernel:
  there an overflow step shows as non-finite gradients;
* under DeepSpeed the gradients are not visible at all (huggingface/accelerate#2951) and
  gradwatch stays off with a warning.

Trainer hands a callback no reference to itself; the callback finds the
``CallbackHandler`` that calls it (in the calling frame, once, at ``on_train_begin``) and
moves itself just after ``DefaultFlowCallback``, before the ``report_to`` integrations and
the progress callback, so the ``grad/`` keys it adds to ``logs`` in ``on_log`` reach them.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradwatch._door import LogTap, capture_console, check_log_layers, count_metrics, log_metrics, print_text, take_text
from gradwatch.config import WatchConfig
from gradwatch.manager import plugin_manager
from gradwatch.types import Diagnosis, GradWatchError, GradWatchWarning
from gradwatch.watch import Watcher

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["GradWatchCallback", "HFGradWatch", "callback_class"]

#: Version of the state kept in ``trainer_state.json`` (``stateful_callbacks``).
STATE_VERSION = 1
_DOOR_NAMES = ("console", "log_metrics", "log_layers")
_CHECKPOINT = "_gradwatch_checkpoint"


class HFGradWatch:
    """Watch the gradients a ``transformers.Trainer`` trains with: statistics, diagnoses, remedies, logs.

    The Trainer face of :func:`gradwatch.watch`, with the same options, core and plugins;
    pass it as ``Trainer(callbacks=[GradWatchCallback()])``. It attaches in
    ``on_train_begin`` to the model Trainer trains (the module inside DDP), measures once
    per optimizer step, after gradient accumulation and DDP's all-reduce and before
    Trainer's ``max_grad_norm`` clipping (see the module docstring for exactly where),
    and detaches in ``on_train_end``. Gradwatch step ``k`` is the optimizer step after
    which Trainer's ``state.global_step`` is ``k + 1``. The training loss it records is
    the model's returned ``loss``, combined over the step's micro-batches as Trainer
    combines them (not filtered by ``logging_nan_inf_filter``).

    In ``on_log`` it adds to Trainer's ``logs`` (so they reach every ``report_to``
    integration and ``state.log_history``), on the main process only:
    ``grad/norm_total`` and the per-layer norms ``log_layers`` asks for, of the step the
    entry's ``grad_norm`` is of (kept on device on logging steps only, read when the entry
    is written: no other host read), and ``grad/diagnoses/<kind>`` and ``grad/clips``, the
    counts so far. The final report is given at the end of the last step, before Trainer
    writes its last log entries, so they carry the diagnoses of the last, partial report
    interval. Reports print on the main process above Trainer's progress bar. Its state (step, history, diagnoses, plugin state such as a clipping
    EMA) is saved in ``trainer_state.json`` at each checkpoint and restored by
    ``trainer.train(resume_from_checkpoint=...)``.

    Args:
        console: A rich console to print reports to, as is (default: reports are
            rendered off-screen and printed through ``tqdm.write``, above the bar).
        log_metrics: Add the ``grad/`` keys to Trainer's logs.
        log_layers: Per-layer norms to log: ``"all"``; an ``int`` k: the k largest
            layer norms of the step; ``"aggregate"``: ``norm_min``, ``norm_max``,
            ``norm_mean`` over layers; ``"none"``; ``"auto"`` (default): all up to 32
            layers, aggregates beyond.
        **options: The options every door takes (:class:`gradwatch.WatchConfig`);
            ``clip`` needs ``TrainingArguments(max_grad_norm=0)``:

            {options}

    Raises:
        GradWatchError: For an unknown option (with the closest known name) or a bad
            value, here; for ``clip=`` with ``max_grad_norm > 0`` when the Trainer is
            built; for a model without trainable parameters at ``on_train_begin``.

    Example::

        from gradwatch.hf import GradWatchCallback

        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[GradWatchCallback()])
        trainer.train()
    """

    def __init__(
        self,
        *,
        console: Console | None = None,
        log_metrics: bool = True,
        log_layers: str | int = "auto",
        **options: Any,
    ) -> None:
        check_log_layers(log_layers)
        self.config = WatchConfig.from_options(options, door="GradWatchCallback()", door_names=_DOOR_NAMES)
        plugin_manager(self.config)  # the plugin set resolved now: bad names fail here, not in train()
        self.log_metrics = log_metrics
        self.log_layers = log_layers
        self._options = dict(options)
        self._user_console = console
        self.watcher: Watcher | None = None
        self._tap: LogTap | None = None
        self._tap_step = -1
        self._tap_pending = -1
        self._buffer = io.StringIO()
        self._args: Any = None
        self._state: Any = None
        self._gradient_state: Any = None
        self._mode = "pre_optimizer"
        self._measured = False
        self._queued = False
        self._loss: torch.Tensor | None = None
        self._loss_count = 0
        self._loss_summed = False
        self._steps_per_epoch: int | None = None
        self._engine: Any = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ results

    @property
    def diagnoses(self) -> list[Diagnosis]:
        """Every diagnosis of the last (or current) training run, oldest first."""
        return list(self.watcher.diagnoses) if self.watcher is not None else []

    def detach(self) -> None:
        """Give the final report and remove every hook now. Trainer calls no callback when
        ``train()`` raises: call this after such an exception if the model lives on (the
        next ``train()`` with this callback does it too)."""
        if self.watcher is not None and self.watcher.attached:
            self.watcher.detach(report=True)
        self._print()

    # ------------------------------------------------------------------ Trainer events

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Refuse ``clip=`` with Trainer's own clipping as soon as the Trainer exists."""
        self._check_args(args)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        """Build the watcher on the model Trainer trains, attach, and restore a checkpoint's state."""
        if self.watcher is not None and self.watcher.attached:
            self.watcher.detach(report=False)  # a train() that raised left it attached
        self.watcher, self._tap = None, None
        self._check_args(args)
        optimizer = kwargs.get("optimizer")
        accelerator_state = getattr(optimizer, "accelerator_state", None)
        if getattr(args, "deepspeed", None) or getattr(accelerator_state, "distributed_type", None) == "DEEPSPEED":
            self._warn_once(
                "deepspeed",
                "GradWatchCallback cannot see the gradients under DeepSpeed (they live in DeepSpeed's own partitions, "
                "huggingface/accelerate#2951): gradwatch is off for this run",
            )
            return
        if not isinstance(model, nn.Module):
            return
        if not any(p.requires_grad for p in model.parameters()):
            raise GradWatchError(
                f"GradWatchCallback: {type(model).__name__} has no trainable parameters (none with requires_grad=True); "
                "there are no gradients to watch: unfreeze a layer or remove the GradWatchCallback"
            )
        self._place()
        self._args, self._state = args, state
        self._gradient_state = getattr(optimizer, "gradient_state", None)
        self._steps_per_epoch = _steps_per_epoch(kwargs.get("train_dataloader"), args.gradient_accumulation_steps)
        self._measured = self._queued = False
        self._loss, self._loss_count = None, 0
        self._tap_step = -1
        scaler = getattr(optimizer, "scaler", None)
        scaled = scaler is not None and getattr(scaler, "is_enabled", lambda: True)()
        trainer_clips = bool(args.max_grad_norm and args.max_grad_norm > 0)
        # Under loss scaling the step boundary is the wrapped optimizer's own step, which
        # GradScaler.step calls after unscale_ and skips on overflow: a skipped step is then
        # counted as an AMP skip by the core, not read as non-finite gradients.
        self._mode = "optimizer" if scaled else "backward" if trainer_clips else "pre_optimizer"
        # The autograd engine's end-of-backward callbacks, which DDP and FSDP use themselves.
        self._engine = getattr(torch.autograd.Variable, "_execution_engine", None)
        if self._mode == "backward" and not hasattr(self._engine, "queue_callback"):
            self._mode = "pre_optimizer"
            self._warn_once(
                "engine",
                "this torch has no autograd end-of-backward callbacks: gradwatch reads gradients after Trainer's clipping",
            )
        if trainer_clips and scaled:
            self._warn_once(
                "fp16",
                f"under fp16 loss scaling Trainer unscales the gradients only inside its clip call "
                f"(max_grad_norm={args.max_grad_norm}): gradwatch reads them after clipping; for pre-clip statistics "
                "set max_grad_norm=0 and GradWatchCallback(clip=...)",
            )
        self._tap = LogTap("hf")
        config = self.config.replace(plugins=(*self.config.plugins, self._tap))
        console = self._user_console if self._user_console is not None else capture_console(self._buffer)
        if self._mode == "optimizer":
            # watch() semantics: the AcceleratedOptimizer's wrapped optimizer marks the step.
            self.watcher = Watcher(model, optimizer, config=config, console=console, scaler=scaler)
        else:
            self.watcher = Watcher(model, None, config=config, console=console)
        self.watcher.attach()
        # Through the watcher, so that detach removes it and a deep copy of the model gets an inert hook.
        self.watcher.probes.forward_hook(model, self._on_forward, sampled=False, with_kwargs=True)
        self._restore(state)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._queued = False  # a backward that raised never ran its end-of-backward callback

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Take the step's statistics here when Trainer does not clip (or when the end of
        the backward pass was not seen); under loss scaling, arm the log tap for the step
        ``optimizer.step()`` is about to mark."""
        if self.watcher is None or self._measured or not self.watcher.attached:
            return
        if self._mode == "optimizer":
            self._tap_pending = self._arm_tap()
            return
        if self._mode == "backward":
            self._warn_once(
                "no-backward",
                "gradwatch did not see the end of this step's backward pass (no model output took part in it): "
                "it reads the gradients after Trainer's clipping for such steps",
            )
        self._measure()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Under loss scaling: keep the log tap's norms if the step was not skipped."""
        if self._mode == "optimizer" and self.watcher is not None and self.watcher.attached:
            self._measured = not getattr(kwargs.get("optimizer"), "step_was_skipped", False)
            self._read_tap(self._tap_pending)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Record the step's loss (on device); at the last step, give the final report now."""
        if self.watcher is None:
            return
        # A step the scaler skipped is closed as an AMP skip at the next forward: its loss
        # belongs to it too.
        if (self._measured or self._mode == "optimizer") and self._loss is not None:
            loss = self._loss if self._loss_summed else self._loss / self._loss_count
            self.watcher.observe_loss(loss)
        self._loss, self._loss_count = None, 0
        self._measured = False
        if control.should_training_stop or state.global_step >= state.max_steps:
            # Trainer writes its last log entries before on_train_end and runs no training
            # step after this one: the final report (the last, partial interval) is given
            # now, so that those entries carry its diagnoses.
            self.watcher.detach(report=True)
        self._print()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Add the ``grad/`` keys to a training log entry (and to its ``state.log_history`` row)."""
        watcher, tap = self.watcher, self._tap
        if watcher is None or tap is None or not self.log_metrics or logs is None or not state.is_world_process_zero:
            return
        training = "loss" in logs or "grad_norm" in logs
        if not (training or "train_runtime" in logs):
            return  # evaluation metrics
        try:
            if training and tap.total is not None and self._tap_step == state.global_step:
                metrics = log_metrics(watcher, tap, prefix="grad/", log_layers=self.log_layers)
            else:
                metrics = count_metrics(watcher, prefix="grad/")
            tensors = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
            if tensors:
                # The one host read of a logging step (integrations log Python numbers only).
                metrics.update(zip(tensors, torch.stack([metrics[k].float().reshape(()) for k in tensors]).tolist()))
            history = state.log_history
            row = (
                history[-1]
                if history and history[-1].get("step") == state.global_step and set(logs) <= set(history[-1])
                else None
            )
            logs.update(metrics)
            if row is not None:
                row.update(metrics)
        except Exception as exc:
            # Logging is a report: a failure turns it off, training goes on.
            if self.config.strict:
                raise
            self.log_metrics = False
            warnings.warn(
                f"gradwatch stopped adding to Trainer's logs ({type(exc).__name__}: {exc}); "
                "training goes on; pass strict=True to see the traceback",
                GradWatchWarning,
                stacklevel=2,
            )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Hook removal (the final report was given at the last step); ``watcher`` and
        ``diagnoses`` stay readable."""
        self.detach()

    # ------------------------------------------------------------------ checkpoints (ExportableState)

    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` keeps: the constructor's JSON-able arguments (Trainer
        rebuilds the callback from them with ``restore_callback_states_from_checkpoint=True``)
        and the watcher's state (step, history, diagnoses, actions, plugin state), drained
        first, so the checkpoint holds everything seen up to now."""
        args, unsaved = self._json_args()
        attributes: dict[str, Any] = {}
        if self.watcher is not None:
            saved = self.watcher.state_dict()
            self._print()
            step = int(self._state.global_step) if self._state is not None else int(saved["step"])
            attributes[_CHECKPOINT] = {
                "version": STATE_VERSION,
                "global_step": step,
                "step": int(saved["step"]),
                "unsaved": unsaved,
                "data": _encode(saved),
            }
        return {"args": args, "attributes": attributes}

    def __getstate__(self) -> dict[str, Any]:
        # A pickled or deep-copied callback (hyperparameter search pickles the Trainer) is
        # the configured callback before training: watcher, hooks and consoles stay behind.
        state = self.__dict__.copy()
        state.update(
            watcher=None,
            _tap=None,
            _tap_step=-1,
            _tap_pending=-1,
            _buffer=io.StringIO(),
            _args=None,
            _state=None,
            _gradient_state=None,
            _engine=None,
            _user_console=None,
            _loss=None,
            _loss_count=0,
            _measured=False,
            _queued=False,
        )
        return state

    # ------------------------------------------------------------------ internals

    def _check_args(self, args: Any) -> None:
        clip_norm = getattr(args, "max_grad_norm", None)
        if self.config.clip is not None and clip_norm and clip_norm > 0:
            raise GradWatchError(
                f"GradWatchCallback(clip={self.config.clip!r}) conflicts with TrainingArguments(max_grad_norm={clip_norm}) "
                "(1.0 unless set): both would clip the same gradients; set max_grad_norm=0 or drop clip="
            )

    def _place(self) -> None:
        """Move this callback just after ``DefaultFlowCallback``, before the ``report_to``
        integrations and the progress callback, so the keys added in ``on_log`` reach them."""
        handler = _calling_handler(self)
        if handler is None:
            self._warn_once(
                "handler",
                "gradwatch could not find the Trainer's callback list: its grad/ keys reach state.log_history and "
                "the callbacks after it, not the report_to integrations placed before it",
            )
            return
        callbacks = handler.callbacks
        here = next(k for k, cb in enumerate(callbacks) if cb is self)
        flow = [k for k, cb in enumerate(callbacks) if type(cb).__name__ == "DefaultFlowCallback"]
        there = flow[-1] + 1 if flow else 0
        # The handler is iterating over this list (it is calling us): moving an entry from
        # here to an earlier index neither skips nor repeats the callbacks after us.
        if there < here:
            callbacks.insert(there, callbacks.pop(here))

    def _on_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        """Per training forward (grad enabled): keep the model's loss on device and, on the
        step's last micro-batch when Trainer clips, hook the outputs to see the backward end."""
        if not torch.is_grad_enabled() or not module.training:
            return
        tensors = _output_tensors(output)
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.detach().float().reshape(())
            self._loss = loss if self._loss is None else self._loss + loss
            self._loss_count += 1
            # With num_items_in_batch the model divides by the whole step's token count
            # and Trainer sums the micro-batch losses; else it averages them.
            self._loss_summed = kwargs.get("num_items_in_batch") is not None
        if self._mode == "backward" and self._syncing():
            for tensor in tensors:
                tensor.register_hook(self._on_output_grad)

    def _on_output_grad(self, grad: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            self._engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        # Queued when the backward reached the model's output, before DDP queued the end of
        # its reduction: queue again, behind every callback queued during the backward.
        self._engine.queue_callback(self._at_backward_end)

    def _at_backward_end(self) -> None:
        self._queued = False
        if self._syncing():
            try:
                self._measure()
            except GradWatchError:
                raise  # deliberate (on_nonfinite="raise")
            except Exception as exc:  # never fail the user's backward pass
                if self.config.strict:
                    raise
                self._mode = "pre_optimizer"
                warnings.warn(
                    f"gradwatch cannot read gradients at the end of the backward pass ({type(exc).__name__}: {exc}); "
                    "it reads them in on_pre_optimizer_step, after Trainer's clipping",
                    GradWatchWarning,
                    stacklevel=2,
                )

    def _syncing(self) -> bool:
        state = self._gradient_state
        return True if state is None else bool(getattr(state, "sync_gradients", True))

    def _measure(self) -> None:
        """The step boundary: statistics (and the log tap on logging steps) on device."""
        watcher, tap = self.watcher, self._tap
        if watcher is None or tap is None or self._measured or not watcher.attached:
            return
        self._measured = True
        step = self._arm_tap()
        watcher.step()
        self._read_tap(step)

    def _arm_tap(self) -> int:
        """Ask the log tap for this step's norms if Trainer logs it; returns the step's
        ``global_step`` (that of its log entry)."""
        tap, state = self._tap, self._state
        assert tap is not None
        step = state.global_step + 1
        tap.wanted = self.log_metrics and state.is_world_process_zero and self._logs_at(step)
        if tap.wanted:
            tap.total = tap.layers = None
        return step

    def _read_tap(self, step: int) -> None:
        tap = self._tap
        if tap is not None and tap.wanted and tap.total is not None:
            self._tap_step = step
        if tap is not None:
            tap.wanted = False

    def _logs_at(self, step: int) -> bool:
        """Whether Trainer writes a log entry at ``global_step == step`` (the rule of its
        ``DefaultFlowCallback``, read before the step ends)."""
        args, state = self._args, self._state
        if step == 1 and args.logging_first_step:
            return True
        strategy = getattr(args.logging_strategy, "value", args.logging_strategy)
        if strategy == "steps":
            return bool(state.logging_steps) and step % state.logging_steps == 0
        if strategy == "epoch":
            return step >= state.max_steps or bool(self._steps_per_epoch and step % self._steps_per_epoch == 0)
        return False

    def _restore(self, state: Any) -> None:
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        payload = saved.get("attributes", {}).get(_CHECKPOINT) if isinstance(saved, Mapping) else None
        # A fresh run also lists this callback's own (earlier) state: only a checkpoint of
        # the step training resumes at is restored.
        if not payload or state.global_step == 0 or payload.get("global_step") != state.global_step:
            return
        if payload.get("version") != STATE_VERSION:
            raise GradWatchError(
                f"unknown GradWatchCallback checkpoint state version {payload.get('version')!r}; expected {STATE_VERSION}"
            )
        missing = [
            name
            for name in payload.get("unsaved", ())
            if name not in self._options and not (name == "console" and self._user_console)
        ]
        if missing:
            self._warn_once(
                "rebuilt",
                f"this GradWatchCallback lacks {', '.join(missing)}, which the checkpoint's run had and trainer_state.json "
                "cannot hold (Trainer rebuilds callbacks from it with restore_callback_states_from_checkpoint=True); "
                "keep that flag False and pass the same callback: gradwatch restores its own state",
            )
        assert self.watcher is not None
        self.watcher.load_state_dict(_decode(payload["data"]))

    def _json_args(self) -> tuple[dict[str, Any], list[str]]:
        args: dict[str, Any] = {"log_metrics": self.log_metrics, "log_layers": self.log_layers}
        unsaved = ["console"] if self._user_console is not None else []
        for name, value in self._options.items():
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                unsaved.append(name)
            else:
                args[name] = value
        return args, unsaved

    def _print(self) -> None:
        """Print what the watcher rendered since the last call, above Trainer's tqdm bar."""
        text = take_text(self._buffer)
        if text:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # transformers requires tqdm; a bare print is the fallback
                print_text(text)
            else:
                print_text(text, tqdm.write)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, GradWatchWarning, stacklevel=3)


HFGradWatch.__doc__ = HFGradWatch.__doc__.replace("{options}", WatchConfig.options_doc(indent=12))  # type: ignore[union-attr]


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """The model output's top-level tensors that take part in a backward pass."""
    if isinstance(output, torch.Tensor):
        values: Any = (output,)
    elif isinstance(output, Mapping):
        values = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    else:
        return []
    return [v for v in values if isinstance(v, torch.Tensor) and v.requires_grad]


def _steps_per_epoch(loader: Any, accumulation: int) -> int | None:
    """Optimizer steps per epoch, as Trainer counts them (``None`` for an unsized loader)."""
    try:
        batches = len(loader)
    except TypeError:
        return None
    return max(batches // accumulation + int(batches % accumulation > 0), 1)


def _calling_handler(callback: object) -> Any:
    """The ``CallbackHandler`` whose ``call_event`` is calling ``callback`` (a few frames up)."""
    frame = sys._getframe(1)
    for _ in range(12):
        frame = frame.f_back
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "CallbackHandler" and any(cb is callback for cb in getattr(owner, "callbacks", ())):
            return owner
    return None


def _encode(state: Mapping[str, Any]) -> str:
    """A watcher state as text for ``trainer_state.json``: ``torch.save`` bytes, base64."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode(text: str) -> dict[str, Any]:
    # weights_only: tensors and plain containers only, never arbitrary pickled objects.
    return torch.load(io.BytesIO(base64.b64decode(text)), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------- the class


_CLASS: type | None = None


def callback_class() -> type:
    """``GradWatchCallback``: :class:`HFGradWatch` as a ``transformers.TrainerCallback`` and
    ``ExportableState``, built once (this imports transformers).

    Raises:
        ImportError: When transformers is not installed (``pip install gradwatch[hf]``).
    """
    global _CLASS
    if _CLASS is None:
        from transformers import TrainerCallback
        from transformers.trainer_callback import ExportableState

        _CLASS = type(
            "GradWatchCallback",
            (HFGradWatch, TrainerCallback, ExportableState),
            {"__module__": __name__, "__qualname__": "GradWatchCallback", "__doc__": HFGradWatch.__doc__},
        )
    return _CLASS


def __getattr__(name: str) -> Any:
    # Resolved lazily: importing gradwatch (or this module) imports no transformers.
    if name == "GradWatchCallback":
        return callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    GradWatchCallback = HFGradWatch
