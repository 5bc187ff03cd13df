"""Hook specifications: the contract between the gradwatch host and its plugins.

Every detector, remedy, clipper and reporter, the built-in ones included, is a
plugin implementing some of these hooks. The hooks fall in two halves:

* the **device hot path** (``gradwatch_collect``, ``gradwatch_act``): called on every
  rank with live gradients; tensor work only, on the gradients' device. No
  ``.item()``, ``.tolist()``, ``.cpu()`` and no Python branch on a tensor value.
* the **host side** (everything else): called once per report interval, or once per
  watch, on host tensors drained from the device in a single read.

Plugin state lives in ``ctx.stash`` (one per watcher), never in module globals.
Implementations take any subset of a spec's arguments, by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from rich.console import Console

    from gradwatch.config import WatchConfig
    from gradwatch.stats import GradBatch, History
    from gradwatch.trial import Trials
    from gradwatch.types import Action, Diagnosis, ModelInfo, Remedy, Report, StatsWindow, StepContext

__all__ = ["hookspec", "hookimpl", "PROJECT_NAME"]

PROJECT_NAME = "gradwatch"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -------------------------------------------------------------------------
# Configuration and attachment (host, once per watch)
# -------------------------------------------------------------------------


@hookspec(historic=True)
def gradwatch_configure(config: WatchConfig, ctx: StepContext) -> None:
    """Validate this plugin's options and set up its per-watch state in ``ctx.stash``.

    :param config: The watch's configuration; ``config.plugin_options(name)`` holds the
        options given for a plugin.
    :param ctx: The step (0 at the first attach), rank, the configuration and the watch's
        ``stash``; at the first configure the model's layers are in ``named_modules()``
        order (forward order is not known yet).
    :returns: Nothing. Raise :class:`gradwatch.GradWatchError` for a bad option: it
        reaches the user before training starts, whatever ``strict`` says.

    Historic: a plugin registered after the watch was configured is called on
    registration. Runs on every rank, on the host, when the watch is made and again
    before each later attach (a watcher attached again after ``detach()``), with a
    fresh ``stash``: set up all per-attach state here; what must survive the detach is
    given back through ``gradwatch_load_state_dict`` right after ``gradwatch_attach``.
    """


@hookspec
def gradwatch_attach(model: ModelInfo, ctx: StepContext) -> None:
    """Add module hooks to the model, through ``ctx.probes`` so they are removed on detach.

    :param model: The unwrapped model and its layers (``named_modules()`` order).
    :param ctx: As for configure, with ``ctx.probes`` set: ``ctx.probes.forward_hook(module,
        fn, sampled=True)`` registers a forward hook that is installed only for sampled
        steps (the default) or for every forward (``sampled=False``).
    :returns: Nothing.

    Runs on every rank, on the host, each time the watcher attaches (after a
    ``gradwatch_configure`` with a fresh ``stash`` when it attaches again).
    """


# -------------------------------------------------------------------------
# Device hot path (every rank, tensors only, no host sync)
# -------------------------------------------------------------------------


@hookspec
def gradwatch_collect(grads: GradBatch, ctx: StepContext) -> Mapping[str, torch.Tensor] | None:
    """Compute extra statistics of this step's final gradients, on device.

    :param grads: The step's gradients (after DDP's all-reduce, accumulation and AMP
        unscaling, before clipping), with cached per-tensor norms and per-layer sums.
    :param ctx: The step, whether it is ``sampled``, and the watch's ``stash``.
    :returns: Tensors on the gradients' device keyed ``"<plugin>.<name>"``; each key
        must have the same shape on every call. They appear in the next
        :class:`StatsWindow` as ``window.extras[key]``. Never read on the host here.

    Runs on every rank, on statistics steps (every ``config.stats_every`` steps), on the
    device hot path: no ``.item()``, ``.tolist()``, ``.cpu()`` or Python branching on
    tensor values.
    """


@hookspec
def gradwatch_act(grads: GradBatch, ctx: StepContext) -> None:
    """Change the gradients in place before the optimizer step (clipping and the like).

    :param grads: The step's gradients, as for collect; ``grads.mul_(coefficient)``
        scales them all by an on-device scalar.
    :param ctx: The step and the watch's ``stash``; ``ctx.record(key, tensor)`` stores an
        on-device value for this step (e.g. the clip coefficient) that appears in the
        next window's ``extras``.
    :returns: Nothing. The decision must be the same on every rank: take it from the
        (already all-reduced) gradients and from state that is identical across ranks.

    Runs on every rank, once per optimizer step, after collect, on the device hot path.
    """


# -------------------------------------------------------------------------
# Host side, once per report interval
# -------------------------------------------------------------------------


@hookspec
def gradwatch_read_actions(window: StatsWindow, ctx: StepContext) -> list[Action] | None:
    """Read back what this plugin did on device during the interval, as actions.

    :param window: The interval's statistics, with the plugin's recorded ``extras``
        (what it stored with ``ctx.record`` in ``gradwatch_act``).
    :param ctx: The last step of the interval and the watch's ``stash``.
    :returns: The :class:`Action` records (clips, skips) of the interval, or ``None``.

    Runs on every rank, once per report interval, on the host.
    """


@hookspec(warn_on_impl=DeprecationWarning("gradwatch_actions is renamed gradwatch_read_actions; rename the implementation"))
def gradwatch_actions(window: StatsWindow, ctx: StepContext) -> list[Action] | None:
    """Deprecated name of :func:`gradwatch_read_actions`, still called for old plugins.

    :param window: As for :func:`gradwatch_read_actions`.
    :param ctx: As for :func:`gradwatch_read_actions`.
    :returns: As for :func:`gradwatch_read_actions`.

    Runs on every rank, once per report interval, on the host, right after
    :func:`gradwatch_read_actions`.
    """


@hookspec
def gradwatch_diagnose(window: StatsWindow, model: ModelInfo, history: History, ctx: StepContext) -> list[Diagnosis] | None:
    """Inspect the last report interval's statistics and report what looks wrong.

    :param window: The interval's per-layer statistics, drained from the device once for
        the whole interval; host tensors, never live ones.
    :param model: The model and its layers in forward order.
    :param history: The run's statistics so far (the last ``history_size`` rows), this
        interval included: judge across intervals from it (``history.since(step)``), and
        keep no copy of your own. Read-only.
    :param ctx: The last step of the interval, rank, the configuration and the ``stash``.
    :returns: Diagnoses for this interval (``step`` = first step at which the condition
        was seen), or ``None`` when there is nothing to say. A plugin reports a
        condition once and again only when it changes; the host does not deduplicate.

    Runs on every rank (cheap), once per report interval and at the end, on the host.
    """


@hookspec
def gradwatch_advise(diagnosis: Diagnosis, model: ModelInfo, history: History, ctx: StepContext) -> list[Remedy] | None:
    """Suggest remedies for one diagnosis, naming the user's own modules.

    :param diagnosis: A diagnosis of this interval; its ``summary`` holds the headline
        numbers to quote.
    :param model: The model (look at its modules, activations, normalisation layers).
    :param history: The run's statistics so far, as for diagnose: numbers in a remedy
        (a clipping threshold, a learning-rate factor) come from here. Read-only.
    :param ctx: The last step of the interval and the ``stash``.
    :returns: Remedies, best first, or ``None``. Results of all plugins are concatenated
        (built-in advice is ``trylast``, so a third party's remedies come first) and
        remedies of the same ``kind`` after the first are dropped.

    Runs on rank zero only, once per new diagnosis, on the host.
    """


@hookspec
def gradwatch_report(report: Report, console: Console, ctx: StepContext) -> None:
    """Show or store a report: console tables, run logs, loggers.

    :param report: The interval's window, its diagnoses with remedies and its actions.
    :param console: The rich console to print to (``rich.get_console()`` by default, so
        output lands above a live progress display).
    :param ctx: The last step of the interval and the ``stash``.
    :returns: Nothing.

    Runs on rank zero only, once per report interval and at the end, on the host.
    """


@hookspec
def gradwatch_trial(trials: Trials, ctx: StepContext) -> None:
    """Show or store the result of a remedy trial (``gw.trial()``, ``GradWatch(trial=True)``).

    :param trials: The trials, best first (:class:`gradwatch.trial.Trials`; the untouched
        copy's numbers in ``trials.baseline``), or none, with ``trials.note`` saying why
        nothing was tried. Host values only; the copies of the model are already freed.
    :param ctx: The watcher's current step and the ``stash``. The watcher may be detached
        already (a trial after the ``with`` block): what unconfigure closed (a file) must
        be reopened to append.
    :returns: Nothing.

    Runs on rank zero only, on the host, once per trial, when the user calls it (never on
    the per-step path).
    """


# -------------------------------------------------------------------------
# Checkpoints and shutdown
# -------------------------------------------------------------------------


@hookspec
def gradwatch_state_dict(ctx: StepContext) -> Mapping[str, Any] | None:
    """Return this plugin's state for a checkpoint.

    :param ctx: The current step and the ``stash``.
    :returns: ``{plugin_name: state}`` with picklable (preferably tensor or plain) values,
        or ``None`` when the plugin keeps no state.

    Runs on every rank, on the host, when ``state_dict()`` is called.
    """


@hookspec
def gradwatch_load_state_dict(state: Mapping[str, Any], ctx: StepContext) -> None:
    """Restore this plugin's state from a checkpoint.

    :param state: The merged mapping of every plugin's state; take your own key and
        ignore a missing one (a checkpoint written before the plugin was installed).
    :param ctx: The restored step and the ``stash``.
    :returns: Nothing.

    Runs on every rank, on the host, when ``load_state_dict()`` is called, and when a
    watcher attaches again after ``detach()``: then ``state`` is what the plugins returned
    from ``gradwatch_state_dict`` at the detach.
    """


@hookspec
def gradwatch_unconfigure(config: WatchConfig, ctx: StepContext) -> None:
    """Release what configure and attach set up (files, buffers).

    :param config: The watch's configuration.
    :param ctx: The last step and the ``stash``.
    :returns: Nothing. Module hooks registered through ``ctx.probes`` are removed by the
        host; a plugin removes nothing of those itself.

    Runs on every rank, on the host, at every detach (also after an exception), after
    ``gradwatch_state_dict`` was asked for the state a later attach gives back.
    """
