"""Host cost of the console report and the run log, per report interval.

Neither plugin implements a hot-path hook (collect, act, probes): their cost is paid once
per report interval, on rank zero, on host tensors. This measures that cost and the log's
size for MLPs of increasing depth (defaults: report_every=100, stats_every=4).

    python benchmarks/report_cost.py [--depths 20 100] [--intervals 4]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time

import torch
from rich.console import Console

import gradwatch
from gradwatch.manager import BUILTIN_PLUGINS
from gradwatch.testing import relu_mlp, train


def measure(depth: int, intervals: int, *, keep: tuple[str, ...]) -> tuple[float, int]:
    model = relu_mlp(depth=depth, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "run.jsonl")
        disable = [name for name in BUILTIN_PLUGINS if name not in keep]
        console = Console(file=io.StringIO(), width=120)
        gw = gradwatch.watch(model, opt, log=log, console=console, disable=disable, autoload=False,
                             options={"console": {"every_interval": True}})  # fmt: skip
        start: list[float] = []
        gw.pm.add_hookcall_monitoring(
            lambda name, impls, kw: start.append(time.perf_counter()) if name == "gradwatch_report" else None,
            lambda outcome, name, impls, kw: (
                times.append(time.perf_counter() - start.pop()) if name == "gradwatch_report" else None
            ),
        )
        with gw:
            train(model, 100 * intervals, optimizer=opt)
        size = os.path.getsize(log) if "runlog" in keep else 0
    # The first report loads rich's renderers and pygments once; the last is the final report.
    return statistics.median(times[1:-1] or times), size // intervals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--intervals", type=int, default=4)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; per report interval (100 steps, stats every 4)")
    print(f"{'layers':>7} {'console ms':>11} {'runlog ms':>10} {'log KiB/interval':>17}")
    for depth in args.depths:
        console_s, _ = measure(depth, args.intervals, keep=("console",))
        runlog_s, size = measure(depth, args.intervals, keep=("runlog",))
        print(f"{depth:>7} {console_s * 1e3:>11.1f} {runlog_s * 1e3:>10.1f} {size / 1024:>17.1f}")


if __name__ == "__main__":
    main()
