"""Cost of the recurrent, init and advisor plugins.

1. Host cost per report interval: the time of ``gradwatch_diagnose`` of ``recurrent``,
   ``init`` and ``advisor`` plus ``gradwatch_advise`` for the diagnoses they raise, per
   model (the first interval includes the one-off torch.fx trace).
2. The sampled forward probe of ``recurrent`` (sequence length from the input's shape):
   time of a training step with the probe installed against without, in one run, and
   the amortised overhead at the default ``sample_every`` (read from WatchConfig).

Run: ``.venv/bin/python benchmarks/bench_recurrent_init_advisor.py`` (CPU, 1 thread).
"""

from __future__ import annotations

import io
import statistics
import time

import torch
from rich.console import Console
from torch import nn

import gradwatch
import gradwatch.manager
from gradwatch.testing import relu_mlp, sequence_batches, sigmoid_mlp, vanilla_rnn

torch.set_num_threads(1)
PLUGINS = ("recurrent", "init", "advisor")
SAMPLE_EVERY = gradwatch.WatchConfig().sample_every


def host_cost(name, model, batches, steps=61, report_every=20):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    others = [n for n in gradwatch.manager.BUILTIN_PLUGINS if n not in PLUGINS]
    with gradwatch.watch(
        model, opt, autoload=False, report_every=report_every, disable=others, console=Console(file=io.StringIO())
    ) as gw:
        times: dict[str, list[float]] = {}
        timings: dict[str, float] = {}

        def before(hook, impls, kwargs):
            timings[hook] = time.perf_counter()

        def after(outcome, hook, impls, kwargs):
            if hook in ("gradwatch_diagnose", "gradwatch_advise"):
                times.setdefault(hook, []).append(time.perf_counter() - timings[hook])

        # Only these three plugins are registered, so the hook time is theirs.
        undo = gw.pm.add_hookcall_monitoring(before, after)
        for _ in range(steps):
            x, y = next(batches)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        undo()
    diag = times.get("gradwatch_diagnose", [])
    adv = times.get("gradwatch_advise", [])
    print(
        f"{name:28s} diagnose per interval: first {diag[0] * 1e3:7.1f} ms, later {statistics.median(diag[1:]) * 1e3:6.2f} ms; "
        f"advise {sum(adv) * 1e3:6.1f} ms for {len(adv)} diagnosis(es) ({', '.join(d.kind for d in gw.diagnoses)})"
    )


def probe_overhead(reps=150):
    model = vanilla_rnn(radius=0.5, hidden=64)
    batches = sequence_batches(seq_len=50, batch=32)
    x, y = next(batches)
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    # A watcher whose only sampled probe is recurrent's: compare sampled vs unsampled steps.
    with gradwatch.watch(
        model,
        opt,
        autoload=False,
        report=False,
        disable=[n for n in gradwatch.manager.BUILTIN_PLUGINS if n != "recurrent"],
        stats_every=1,
        sample_every=2,
        report_every=10_000,
    ) as gw:
        sampled, plain = [], []
        for _k in range(2 * reps):
            t = time.perf_counter()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            (sampled if gw.step_count % 2 == 0 else plain).append(time.perf_counter() - t)
        # The probe itself, called directly: shape metadata only.
        (hook,) = [fn for m, method, fn, kw in gw.probes._sampled if m is model.rnn]
        t = time.perf_counter()
        for _ in range(10_000):
            hook(model.rnn, (x,), None)
        per_call = (time.perf_counter() - t) / 10_000
    s, p = statistics.median(sampled[5:]), statistics.median(plain[5:])
    print(f"recurrent probe: {per_call * 1e6:.2f} µs per call (one call per RNN module per sampled forward)")
    print(
        f"recurrent probe: sampled step {s * 1e3:.2f} ms vs unsampled {p * 1e3:.2f} ms -> ×{s / p:.3f}; "
        f"amortised at sample_every={SAMPLE_EVERY}: ×{1 + (s / p - 1) / SAMPLE_EVERY:.4f}"
    )


if __name__ == "__main__":
    host_cost("vanilla_rnn(T=100, H=32)", vanilla_rnn(radius=0.5), sequence_batches(seq_len=100, batch=16))
    host_cost(
        "relu_mlp(depth=30, lecun)",
        relu_mlp(depth=30, init="lecun"),
        iter(lambda: (torch.randn(64, 16), torch.randn(64, 1)), None),
    )
    host_cost("sigmoid_mlp(depth=20)", sigmoid_mlp(depth=20), iter(lambda: (torch.randn(64, 16), torch.randn(64, 1)), None))
    probe_overhead()
