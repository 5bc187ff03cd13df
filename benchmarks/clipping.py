"""Per-step cost of gradwatch's clipping against ``clip_grad_norm_`` alone (the floor) and
against the ``zclip`` package (issue 4).

Workloads (2 threads by default):
  (1) 8 x Linear(1024, 1024) + ReLU, batch 256, SGD
  (2) 200 x Linear(64, 64) + ReLU, batch 64, SGD

Variants, each with its own model and optimizer (same initialisation), interleaved round
by round in one process so that machine noise hits all alike:
  bare              the training step alone
  clip_grad_norm_   torch.nn.utils.clip_grad_norm_(params, 1.0) every step (the floor)
  watch             gradwatch.watch(model, opt) with defaults, no clipping
  watch clip=1.0    fixed-norm clipping (every step) on top of the default watch
  watch autoclip    AutoClip, full history (the paper's default)
  watch zclip       ZClip, paper defaults
  watch agc         AGC, paper defaults
  zclip package     zclip.ZClip(max_grad_norm=None).step(model) (if installed; it reads
                    the norm on the host with .item() every step)

Each variant first runs ``--warmup`` steps (past ZClip's 25-step warm-up); the order of
the variants is shuffled every round. Reported: the median and the best ms/step over
rounds (on a shared machine other load only adds time), with ratios to bare and to
``clip_grad_norm_``.

``--act`` times the clipping work alone on fixed gradients (no forward, backward or
update): ``clip_grad_norm_`` against the watcher's step boundary with each mode, and
the boundary without clipping (their difference is clipping's own cost).

Usage: python benchmarks/clipping.py [--rounds 7] [--steps 20] [--workload 1|2|both]
       [--threads 2] [--device cpu|cuda] [--act]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import gradwatch

try:
    import zclip as zclip_pkg
except ImportError:  # optional comparison
    zclip_pkg = None


def mlp(depth: int, width: int, device: str) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers).to(device)


class Variant:
    """One configuration: its own model, optimizer, watcher and per-step extra work."""

    def __init__(
        self,
        name: str,
        depth: int,
        width: int,
        device: str,
        clip: object = None,
        watch: bool = False,
        extra: Callable[[nn.Module], Callable[[], None]] | None = None,
    ) -> None:
        self.name = name
        self.model = mlp(depth, width, device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.stack = contextlib.ExitStack()
        if watch:
            self.stack.enter_context(gradwatch.watch(self.model, self.opt, clip=clip, report=False, autoload=False))
        self.extra = extra(self.model) if extra is not None else (lambda: None)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        nn.functional.mse_loss(self.model(x), y).backward()
        self.extra()
        self.opt.step()
        self.opt.zero_grad()


def variants(depth: int, width: int, device: str) -> list[Variant]:
    out = [
        Variant("bare", depth, width, device),
        Variant(
            "clip_grad_norm_", depth, width, device, extra=lambda m: lambda: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        ),
        Variant("watch", depth, width, device, watch=True),
        Variant("watch clip=1.0", depth, width, device, watch=True, clip=1.0),
        Variant("watch autoclip", depth, width, device, watch=True, clip="autoclip"),
        Variant("watch zclip", depth, width, device, watch=True, clip="zclip"),
        Variant("watch agc", depth, width, device, watch=True, clip="agc"),
    ]
    if zclip_pkg is not None:

        def package(m: nn.Module) -> Callable[[], None]:
            z = zclip_pkg.ZClip(max_grad_norm=None)
            return lambda: z.step(m)

        out.append(Variant("zclip package", depth, width, device, extra=package))
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(depth: int, width: int, batch: int, args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, generator=g).to(args.device)
    y = torch.randn(batch, width, generator=g).to(args.device)
    vs = variants(depth, width, args.device)
    for v in vs:
        for _ in range(args.warmup):
            v.step(x, y)
    times: dict[str, list[float]] = {v.name: [] for v in vs}
    order = random.Random(0)
    for _ in range(args.rounds):
        for v in order.sample(vs, len(vs)):  # a fresh order each round: no variant always runs after another
            sync(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                v.step(x, y)
            sync(args.device)
            times[v.name].append((time.perf_counter() - start) / args.steps * 1e3)
    for v in vs:
        v.stack.close()
    med = {k: statistics.median(t) for k, t in times.items()}
    best = {k: min(t) for k, t in times.items()}
    print(
        f"\n{depth} x Linear({width}) + ReLU, batch {batch}, SGD, {args.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{args.rounds} rounds x {args.steps} steps, median and best round (other load only adds time)"
    )
    print("| variant | ms/step median | × bare | × clip_grad_norm_ | ms/step best | × bare | × clip_grad_norm_ |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in med:
        m, b = med[name], best[name]
        print(
            f"| {name} | {m:.2f} | {m / med['bare']:.3f} | {m / med['clip_grad_norm_']:.3f} "
            f"| {b:.2f} | {b / best['bare']:.3f} | {b / best['clip_grad_norm_']:.3f} |"
        )


def run_act(depth: int, width: int, batch: int, args: argparse.Namespace) -> None:
    """The clipping work alone, on fixed gradients: no forward, backward or update.

    ``gw.step()`` is the watcher's step boundary with clipping (statistics switched off
    with a cadence longer than the run), ``gw.step() no clip`` the same boundary without;
    their difference is what clipping itself costs.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, generator=g).to(args.device)
    y = torch.randn(batch, width, generator=g).to(args.device)
    calls: dict[str, Callable[[], object]] = {}
    stack = contextlib.ExitStack()

    def model_with_grads() -> nn.Module:
        model = mlp(depth, width, args.device)
        nn.functional.mse_loss(model(x), y).backward()
        return model

    m = model_with_grads()
    calls["clip_grad_norm_"] = lambda m=m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    cadence = dict(stats_every=10_000, sample_every=10_000, report_every=10_000, report=False, autoload=False)
    for name, clip in (
        ("gw.step() no clip", None),
        ("gw.step() clip=1.0", 1.0),
        ("gw.step() autoclip", "autoclip"),
        ("gw.step() zclip", "zclip"),
        ("gw.step() agc", "agc"),
    ):
        m = model_with_grads()
        calls[name] = stack.enter_context(gradwatch.watch(m, clip=clip, **cadence)).step
    if zclip_pkg is not None:
        m = model_with_grads()
        z = zclip_pkg.ZClip(max_grad_norm=None)
        calls["zclip package"] = lambda m=m, z=z: z.step(m)
    for call in calls.values():
        for _ in range(args.warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            sync(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                call()
            sync(args.device)
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    stack.close()
    med = {k: statistics.median(t) for k, t in times.items()}
    print(
        f"\nclipping work alone: {depth} x Linear({width}) gradients, {args.device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; median of {args.rounds} rounds x {args.steps} calls"
    )
    print("| call | ms/call | × clip_grad_norm_ |")
    print("|---|---:|---:|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.3f} | {ms / med['clip_grad_norm_']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--workload", choices=("1", "2", "both"), default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--act", action="store_true", help="time the clipping work alone, on fixed gradients")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fn = run_act if args.act else run
    if args.workload in ("1", "both"):
        fn(8, 1024, 256, args)
    if args.workload in ("2", "both"):
        fn(200, 64, 64, args)


if __name__ == "__main__":
    main()
