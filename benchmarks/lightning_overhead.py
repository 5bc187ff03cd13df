"""Per-step overhead of ``gradwatch.GradWatch`` over a bare ``Trainer.fit``, against
Lightning's own ``grad_norm`` utility logged every step (what users write today).

Same model, data and Trainer in every configuration, run in interleaved rounds in one
process (so machine load hits all alike); the time per step is measured from the end
of the warm-up to the end of training (one synchronisation at each end on a GPU) and the
median over rounds is reported, with its ratio to the bare run.

Configurations:

* ``bare``: no callback.
* ``gradwatch``: ``GradWatch()`` with its defaults (statistics every 4th step, logs at
  the Trainer's ``log_every_n_steps``).
* ``gradwatch stats_every=1``: statistics of every gradient on every step.
* ``gradwatch no plugins``: defaults with every built-in plugin disabled: the core's
  statistics and the callback's own glue (step boundary, loss, logging) only.
* ``grad_norm every step``: ``self.log_dict(grad_norm(self, norm_type=2))`` in
  ``on_before_optimizer_step`` (Lightning's documented recipe).

Run: ``.venv/bin/python benchmarks/lightning_overhead.py`` (``--help`` for the sizes).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import grad_norm
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

import gradwatch
from gradwatch.manager import BUILTIN_PLUGINS


class MLP(pl.LightningModule):
    def __init__(self, width: int, depth: int, log_grad_norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.log_grad_norm = log_grad_norm

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.log_grad_norm:
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Clock(pl.Callback):
    """Time from the start of batch ``warmup`` to the end of training: wall time, and
    this process's CPU time (``time.process_time``), which other processes on a shared
    machine disturb far less."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = self.cpu_start = self.cpu_end = 0.0
        self.steps = 0

    def _sync(self, module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._sync(pl_module)
            self.start = time.perf_counter()
            self.cpu_start = time.process_time()

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.end = time.perf_counter()
        self.cpu_end = time.process_time()
        self.steps = trainer.global_step - self.warmup

    def per_step(self, clock: str) -> float:
        if clock == "cpu":
            return (self.cpu_end - self.cpu_start) / self.steps
        return (self.end - self.start) / self.steps


def run(config: str, args: argparse.Namespace, batches: list, root: str) -> float:
    callbacks: list[pl.Callback] = [clock := Clock(args.warmup)]
    if config.startswith("gradwatch"):
        stats_every = 1 if "stats_every=1" in config else 4
        disable = BUILTIN_PLUGINS if "no plugins" in config else ()
        callbacks.append(
            gradwatch.GradWatch(stats_every=stats_every, console=Console(file=io.StringIO()), autoload=False, disable=disable)
        )
    model = MLP(args.width, args.depth, log_grad_norm=config == "grad_norm every step")
    trainer = pl.Trainer(
        max_steps=args.warmup + args.steps,
        callbacks=callbacks,
        logger=CSVLogger(root, name=config.replace(" ", "_")),
        log_every_n_steps=args.log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        accelerator=args.accelerator,
        devices=1,
    )
    # Ready-made batches, no collation: the step itself is what is timed.
    trainer.fit(model, DataLoader(batches, batch_size=None))
    return clock.per_step(args.clock)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=50, help="Trainer(log_every_n_steps=...)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared CPU machine; CPU runs only)",
    )
    args = parser.parse_args()
    if args.clock == "cpu" and args.accelerator != "cpu":
        parser.error("--clock cpu measures CPU work only; use --clock wall on a GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = "cuda" if args.accelerator in ("gpu", "cuda") else "cpu"
    g = torch.Generator().manual_seed(0)
    total = args.warmup + args.steps
    batches = [
        (torch.randn(args.batch, args.width, generator=g).to(device), torch.randn(args.batch, args.width, generator=g).to(device))
        for _ in range(total)
    ]
    configs = ["bare", "gradwatch", "gradwatch stats_every=1", "gradwatch no plugins", "grad_norm every step"]
    times: dict[str, list[float]] = {c: [] for c in configs}
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        for config in configs:  # a discarded round: imports, allocator and caches warm up
            run(config, args, batches, root)
        for r in range(args.rounds):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]  # rotate: no config always first
            for config in order:
                times[config].append(run(config, args, batches, root))
                print(f"round {r}: {config}: {times[config][-1] * 1e3:.2f} ms/step", file=sys.stderr, flush=True)
    bare = statistics.median(times["bare"])
    print(
        f"{args.depth} x Linear({args.width}) MLP, batch {args.batch}, {args.accelerator}, torch {torch.__version__}, "
        f"pytorch_lightning {pl.__version__}, {torch.get_num_threads()} threads; "
        f"{args.steps} timed steps x {args.rounds} rounds, log_every_n_steps={args.log_every}, {args.clock} time"
    )
    print(f"{'configuration':<26} {'ms/step (median)':>17} {'vs bare':>8}   all rounds (ms)")
    for config in configs:
        med = statistics.median(times[config])
        rounds = " ".join(f"{t * 1e3:.1f}" for t in times[config])
        print(f"{config:<26} {med * 1e3:>17.2f} {med / bare:>7.3f}x   {rounds}")


if __name__ == "__main__":
    main()
