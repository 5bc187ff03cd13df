"""Per-step overhead of gradwatch.watch() over bare training, against the peers (issue 2).

Workloads (CPU, 2 threads):
  (1) 8 x Linear(1024, 1024) + ReLU, batch 256, SGD
  (2) 200 x Linear(64, 64) + ReLU, batch 64, SGD

Variants, interleaved round by round in one run so that machine noise hits all alike:
  bare          the training step alone
  watch         gradwatch.watch(model, opt) with default options (all built-in plugins)
  watch/every   gradwatch.watch(model, opt, stats_every=1): every gradient read every step
  item-hooks    per-parameter tensor hooks calling .item() on each gradient norm every step
                (what hand-written hooks do)
  clip          torch.nn.utils.clip_grad_norm_(foreach=True) every step: one pass over all
                gradients, the floor for anything that reads them

Usage: python benchmarks/overhead.py [--rounds 7] [--steps 30] [--workload 1|2|both]
Prints a markdown table: median ms/step over rounds, and ratio to bare.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

import gradwatch


def mlp(depth: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


@contextlib.contextmanager
def bare(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    yield lambda: None


@contextlib.contextmanager
def watch_default(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    with gradwatch.watch(model, opt, report=False):
        yield lambda: None


@contextlib.contextmanager
def watch_every(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    with gradwatch.watch(model, opt, stats_every=1, sample_every=40, report=False):
        yield lambda: None


@contextlib.contextmanager
def item_hooks(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    norms: list[float] = []
    handles = [p.register_hook(lambda g: norms.append(g.norm().item())) for p in model.parameters()]
    try:
        yield norms.clear
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def clip(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    params = list(model.parameters())
    yield lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)


VARIANTS = {"bare": bare, "watch": watch_default, "watch/every": watch_every, "item-hooks": item_hooks, "clip": clip}


def run(workload: str, rounds: int, steps: int) -> dict[str, float]:
    depth, width, batch = {"1": (8, 1024, 256), "2": (200, 64, 64)}[workload]
    model = mlp(depth, width)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(batch, width)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}

    def step(after_backward: Callable[[], None]) -> None:
        model(x).pow(2).mean().backward()
        after_backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):  # warm-up
        step(lambda: None)
    for _ in range(rounds):
        for name, variant in VARIANTS.items():
            with variant(model, opt) as after_backward:
                for _ in range(3):
                    step(after_backward)
                start = time.perf_counter()
                for _ in range(steps):
                    step(after_backward)
                times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workload", choices=["1", "2", "both"], default="both")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} rounds x {args.steps} steps\n")
    print("| workload | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for workload in ("1", "2") if args.workload == "both" else (args.workload,):
        med = run(workload, args.rounds, args.steps)
        label = {"1": "8×Linear(1024) b256", "2": "200×Linear(64) b64"}[workload]
        cells = [f"{med[n] * 1e3:.2f} ms ({med[n] / med['bare']:.3f}×)" for n in VARIANTS]
        print(f"| {label} | " + " | ".join(cells) + " |")
        extra = (med["watch"] - med["bare"]) / max(med["clip"] - med["bare"], 1e-12)
        print(
            f"|  | watch overhead = {100 * (med['watch'] / med['bare'] - 1):+.1f}% of bare, "
            f"{extra:.2f}× the clip_grad_norm_ pass |" + " |" * (len(VARIANTS) - 1)
        )


if __name__ == "__main__":
    main()
