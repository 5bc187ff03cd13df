"""Cost of a remedy trial: 4 remedies x 20 steps, as a multiple of 20 plain training steps.

A trial trains 5 copies (the untouched one and one per remedy) for 20 steps each, and
makes each copy (deep copy, remedy, fresh optimizer) and measures it on every step, so a
ratio near 5 is the floor. Workloads are deep sigmoid MLPs trained with Adam (the advisor
suggests relu, reinit, normalization and residual for them); the diagnoses come from a
default ``watch()`` over 40 steps.

Time: median over interleaved rounds (plain 20 steps, trial, plain, trial ...), one process.
Peak memory, in a fresh subprocess per variant (resident set size): *training memory* is
the peak of 20 plain steps above the process's size before the model was built, once
every library is loaded (model, gradients, Adam state, activations, batches, the watch); *trial extra* is the peak during the trial
above the size after setup. The peak is reset with ``/proc/self/clear_refs`` (Linux only).

    python benchmarks/trial.py [--rounds 3] [--threads 2] [--workloads 1 2]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch.testing import regression_batches, sigmoid_mlp

WORKLOADS = {
    "(1) 20xLinear(256) sigmoid, batch 128": {"depth": 20, "width": 256, "batch": 128},
    "(2) 8xLinear(1024) sigmoid, batch 256": {"depth": 8, "width": 1024, "batch": 256},
}
STEPS = 20
KINDS = ("relu", "reinit", "normalization", "residual")


def setup(depth: int, width: int, batch: int, kinds: tuple[str, ...] = KINDS):
    model = sigmoid_mlp(depth=depth, width=width, d_in=width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = list(itertools.islice(regression_batches(d_in=width, batch=batch, seed=1), STEPS))
    with gradwatch.watch(model, opt, console=Console(file=io.StringIO())) as gw:
        for x, y in itertools.islice(itertools.cycle(batches), 40):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    found = {r.kind: r for d in gw.diagnoses for r in d.remedies}
    remedies = [found[k] for k in kinds if k in found]
    if len(remedies) != len(kinds):
        raise SystemExit(f"expected the remedies {kinds}, the advisor gave {sorted(found)}")
    return model, opt, batches, gw, remedies


def plain(model: nn.Module, opt: torch.optim.Optimizer, batches: list) -> None:
    for x, y in batches:
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def trial(gw: gradwatch.Watcher, batches: list, remedies: list) -> gradwatch.Trials:
    return gw.trial(nn.functional.mse_loss, batches, steps=STEPS, remedies=remedies)


def _status() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def memory_child(name: str, variant: str) -> None:
    """Run one variant in this (fresh) process; print its peaks in KiB as JSON."""
    # Load every library first (plugins, rich, the fx trace, the trial) on a tiny model, so
    # that "training memory" counts the workload and not the imports.
    setup(depth=6, width=8, batch=4, kinds=("relu",))[3].trial(
        nn.functional.mse_loss, regression_batches(d_in=8, batch=4), steps=2
    )
    empty = _status()["VmRSS"]
    model, opt, batches, gw, remedies = setup(**WORKLOADS[name])
    plain(model, opt, batches[:1])
    ready = _status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    if variant == "plain":
        plain(model, opt, batches)
    else:
        trial(gw, batches, remedies)
    peak = _status()["VmHWM"]
    print(json.dumps({"above_empty": peak - empty, "above_ready": peak - ready}))


def memory(name: str, variant: str, threads: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, variant, "--threads", str(threads)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {k: v / 1024 for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workloads", type=int, nargs="+", default=[1, 2], help="which workloads (1-based)")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {STEPS} steps, {len(KINDS)} remedies, {args.rounds} rounds\n"
    )
    print(
        "| workload | params | 20 plain steps | trial (4 remedies x 20 steps) | time x plain "
        "| training memory | trial extra peak | x training | x params |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for index, (name, shape) in enumerate(WORKLOADS.items(), 1):
        if index not in args.workloads:
            continue
        model, opt, batches, gw, remedies = setup(**shape)
        params_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        plain(model, opt, batches[:2])  # warm-up
        times: dict[str, list[float]] = {"plain": [], "trial": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            plain(model, opt, batches)
            times["plain"].append(time.perf_counter() - start)
            start = time.perf_counter()
            result = trial(gw, batches, remedies)
            times["trial"].append(time.perf_counter() - start)
        assert len(result) == 4
        t_plain, t_trial = statistics.median(times["plain"]), statistics.median(times["trial"])
        training = memory(name, "plain", args.threads)["above_empty"]
        extra = memory(name, "trial", args.threads)["above_ready"]
        print(
            f"| {name} | {params_mib:.1f} MiB | {t_plain * 1e3:.0f} ms | {t_trial * 1e3:.0f} ms | {t_trial / t_plain:.1f}x "
            f"| {training:.1f} MiB | {extra:.1f} MiB | {extra / training:.2f}x | {extra / params_mib:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
