"""Cost of the detector plugins (nonfinite, vanishing, exploding, activations), in one run.

Workloads (CPU, 2 threads; C on one thread): A = 8 × (Linear(1024) + ReLU), batch 256;
B = 200 × (Linear(64) + ReLU), batch 64; C = 25 × Linear(16), batch 4 (a small model); SGD.
Configurations, interleaved and timed per step (best of rounds, the steps after the dense start):

* ``bare``: the training loop alone;
* ``detect_anomaly``: ``torch.autograd.detect_anomaly(check_nan=True)`` around forward+backward;
* ``core``: gradwatch with every built-in plugin disabled (the default ``auto`` cadence);
* ``nonfinite``: core + the nonfinite plugin, default (the model's output every step, each
  module in the dense start and on sampled steps);
* ``nonfinite_every``: core + nonfinite with ``outputs="every_step"`` (each module every step);
* ``nonfinite_sampled``: core + nonfinite with ``outputs="sampled"``;
* ``detectors``: core + the detector plugins, default options.

``nonfinite − core`` is the cost of the non-finite check per step. For ``detectors`` it also
reports the median time of a sampled step (probes on) over that of an unsampled one, and the
host time of the ``gradwatch_diagnose`` calls per report interval. Run:
``python benchmarks/detectors.py [--steps 100] [--rounds 3] [--workload A|B|C]`` on a quiet
machine: other processes on the cores swamp these ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from torch import nn

import gradwatch
from gradwatch.manager import BUILTIN_PLUGINS

MINE = ("nonfinite", "vanishing", "exploding", "updates", "activations")
#: Steps before timing: past the dense start, so the table is the steady state.
SKIP = 40


def mlp(depth: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def run(model: nn.Module, x: torch.Tensor, steps: int, config: str) -> tuple[list[float], float, int, set[int]]:
    """Per-step wall times, host seconds spent in diagnose, the number of diagnose calls and
    the sampled steps."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    gw = None
    keep = {
        "core": (),
        "nonfinite": ("nonfinite",),
        "nonfinite_every": ("nonfinite",),
        "nonfinite_sampled": ("nonfinite",),
        "detectors": MINE,
    }.get(config)
    diag = [0.0, 0]
    if keep is not None:
        mode = {"nonfinite_sampled": "sampled", "nonfinite_every": "every_step"}.get(config)
        options = {"nonfinite": {"outputs": mode}} if mode else {}
        gw = gradwatch.watch(
            model,
            opt,
            report=False,
            autoload=False,
            options=options,
            disable=[n for n in BUILTIN_PLUGINS if n not in keep and n in MINE + ("nonfinite",)]
            + [n for n in BUILTIN_PLUGINS if n not in MINE and n != "nonfinite"],
        )
        started: list[float] = []

        def before(name, impls, kwargs):
            if name == "gradwatch_diagnose":
                started.append(time.perf_counter())

        def after(outcome, name, impls, kwargs):
            if name == "gradwatch_diagnose":
                diag[0] += time.perf_counter() - started.pop()
                diag[1] += 1

        gw.pm.add_hookcall_monitoring(before, after)
    anomaly = config == "detect_anomaly"
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autograd.detect_anomaly(check_nan=True) if anomaly else nullcontext():
            model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    sampled: set[int] = set()
    if gw is not None:
        gw.detach()
        sampled = {k for k in range(steps) if gw.cadence.sampled(k)}
    return times, diag[0], diag[1], sampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=168, help="steps per run, the first 40 not timed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workload", choices=("A", "B", "C", "all"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    warnings.simplefilter("ignore")
    configs = ("bare", "detect_anomaly", "core", "nonfinite", "nonfinite_every", "nonfinite_sampled", "detectors")
    workloads = (
        ("A 8xLinear(1024) b256", 8, 1024, 256),
        ("B 200xLinear(64) b64", 200, 64, 64),
        ("C 25xLinear(16) b4", 25, 16, 4),
    )
    for label, depth, width, batch in workloads:
        if args.workload != "all" and not label.startswith(args.workload):
            continue
        torch.set_num_threads(1 if label.startswith("C") else args.threads)
        model, x = mlp(depth, width), torch.randn(batch, width)
        if label.startswith("C"):
            torch.manual_seed(0)
            model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        best: dict[str, float] = {}
        sampled_ratio: list[float] = []
        diag_ms: list[float] = []
        run(model, x, 5, "bare")  # warm-up
        for _ in range(args.rounds):
            for config in configs:
                times, diag_s, calls, periods = run(model, x, args.steps, config)
                steady = times[SKIP:]  # after the dense start
                best[config] = min(best.get(config, float("inf")), statistics.mean(steady))
                if config == "detectors":
                    sampled = [t for k, t in enumerate(times) if k >= SKIP and k in periods]
                    other = [t for k, t in enumerate(times) if k >= SKIP and k not in periods]
                    sampled_ratio.append(statistics.median(sampled) / statistics.median(other))
                    diag_ms.append(1e3 * diag_s / max(calls, 1))
        bare = best["bare"]
        print(f"{label}: bare {bare * 1e3:.3f} ms/step")
        for config in configs[1:]:
            print(f"  {config:18s} {best[config] * 1e3:8.3f} ms/step  {best[config] / bare:6.3f}x bare")
        for config in ("nonfinite", "nonfinite_every", "nonfinite_sampled"):
            extra = best[config] - best["core"]
            print(f"  non-finite check ({config}): {extra * 1e3:+.3f} ms/step ({100 * extra / bare:+.1f}% of bare)")
        print(f"  sampled step / unsampled step (detectors, median): {min(sampled_ratio):.3f}x")
        print(f"  diagnose host time per report interval (four detectors): {min(diag_ms):.2f} ms")


if __name__ == "__main__":
    main()
