"""Per-step overhead of gradwatch.watch() over bare training, against the peers (issues 2, 10).

Workloads:
  (1) 8 x Linear(1024, 1024) + ReLU, batch 256, SGD, 2 threads
  (2) 200 x Linear(64, 64) + ReLU, batch 64, SGD, 2 threads
  (many) N x Linear(16, 16), batch 4, SGD, one thread, N = 25, 100, 400, 1600: many small
      tensors, where per-tensor and per-module costs dominate

Variants, interleaved round by round in one run so that machine noise hits all alike:
  bare          the training step alone
  watch         gradwatch.watch(model, opt) with default options (all built-in plugins; the
                "auto" cadence: dense for the first 32 steps, then what its budget allows)
  watch/every   gradwatch.watch(model, opt, stats_every=1): every gradient read every step
  item-hooks    per-parameter tensor hooks calling .item() on each gradient norm every step
                (what hand-written hooks do; workloads 1 and 2)
  clip          torch.nn.utils.clip_grad_norm_(foreach=True) every step: one pass over all
                gradients, the floor for anything that reads them

Each round makes a new watcher and runs --warmup steps (past the dense start) before the
timed steps, so the table is the steady state; the dense start's own cost (its first 32 steps)
is printed apart. Times are process CPU time (time.process_time), the median over rounds.

Usage: python benchmarks/overhead.py [--rounds 7] [--steps 40] [--workload 1|2|many|all]
Prints markdown tables: ms/step, ratio to bare, and the extra ms of watch() over the clip pass.
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
from gradwatch.cadence import DENSE_STEPS


def mlp(depth: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


@contextlib.contextmanager
def bare(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    yield lambda: None


#: The cadence the last default watcher chose, per workload (printed with the table).
CHOSEN: dict[str, str] = {}


@contextlib.contextmanager
def watch_default(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    with gradwatch.watch(model, opt, report=False) as gw:
        yield lambda: None
    CHOSEN["watch"] = gw.cadence.describe()


@contextlib.contextmanager
def watch_every(model: nn.Module, opt: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    with gradwatch.watch(model, opt, stats_every=1, report=False) as gw:
        yield lambda: None
    CHOSEN["watch/every"] = gw.cadence.describe()


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


def run(
    model: nn.Module, x: torch.Tensor, variants: dict[str, Callable], rounds: int, steps: int, warmup: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median CPU seconds per step of each variant in the steady state, and of the first
    ``DENSE_STEPS`` steps after the variant started (the dense start)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {name: [] for name in variants}
    dense: dict[str, list[float]] = {name: [] for name in variants}

    def step(after_backward: Callable[[], None]) -> None:
        model(x).pow(2).mean().backward()
        after_backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):  # warm-up
        step(lambda: None)
    for _ in range(rounds):
        for name, variant in variants.items():
            with variant(model, opt) as after_backward:
                start = time.process_time()
                for _ in range(DENSE_STEPS):
                    step(after_backward)
                dense[name].append((time.process_time() - start) / DENSE_STEPS)
                for _ in range(warmup - DENSE_STEPS):
                    step(after_backward)
                start = time.process_time()
                for _ in range(steps):
                    step(after_backward)
                times[name].append((time.process_time() - start) / steps)
    return {n: statistics.median(t) for n, t in times.items()}, {n: statistics.median(t) for n, t in dense.items()}


def table(rows: list[tuple[str, dict[str, float], dict[str, float]]], variants: dict[str, Callable]) -> None:
    print("| workload | " + " | ".join(variants) + " | watch − bare | clip − bare | watch extra / clip extra | dense start |")
    print("|---|" + "---|" * (len(variants) + 4))
    for label, med, dense in rows:
        cells = [f"{med[n] * 1e3:.3f} ms ({med[n] / med['bare']:.3f}×)" for n in variants]
        extra, clip_extra = med["watch"] - med["bare"], med["clip"] - med["bare"]
        ratio = extra / clip_extra if clip_extra > 0 else float("nan")
        start = f"+{100 * (dense['watch'] / dense['bare'] - 1):.0f}% over 32 steps"
        print(
            f"| {label} | " + " | ".join(cells) + f" | {extra * 1e3:+.3f} ms ({100 * extra / med['bare']:+.1f}%) | "
            f"{clip_extra * 1e3:+.3f} ms | {ratio:.2f}× | {start} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=48, help="steps of each round before timing (>= 32)")
    parser.add_argument("--workload", choices=["1", "2", "many", "all"], default="all")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
    warmup = max(args.warmup, DENSE_STEPS)
    print(f"torch {torch.__version__}, median of {args.rounds} rounds x {args.steps} steps, after {warmup} steps\n")
    if args.workload in ("1", "2", "all"):
        torch.set_num_threads(args.threads)
        print(f"{torch.get_num_threads()} threads\n")
        rows, chosen = [], []
        for workload in ("1", "2") if args.workload == "all" else (args.workload,):
            depth, width, batch = {"1": (8, 1024, 256), "2": (200, 64, 64)}[workload]
            med, dense = run(mlp(depth, width), torch.randn(batch, width), VARIANTS, args.rounds, args.steps, warmup)
            label = {"1": "8×Linear(1024) b256", "2": "200×Linear(64) b64"}[workload]
            rows.append((label, med, dense))
            chosen.append(f"{label}: {CHOSEN['watch']}")
        table(rows, VARIANTS)
        print("\ncadence chosen by watch():\n" + "\n".join(f"- {c}" for c in chosen) + "\n")
    if args.workload in ("many", "all"):
        torch.set_num_threads(1)
        variants = {k: v for k, v in VARIANTS.items() if k != "item-hooks"}
        rows, chosen = [], []
        for n in (25, 100, 400, 1600):
            torch.manual_seed(0)
            model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(n)])
            med, dense = run(model, torch.randn(4, 16), variants, args.rounds, args.steps, warmup)
            rows.append((f"{n}×Linear(16) b4", med, dense))
            chosen.append(f"{n}×Linear(16): {CHOSEN['watch']}")
        print("many small tensors, 1 thread\n")
        table(rows, variants)
        print("\ncadence chosen by watch():\n" + "\n".join(f"- {c}" for c in chosen))


if __name__ == "__main__":
    main()
