"""Quickstart: watch a 20-layer sigmoid MLP whose gradients vanish toward the input.

Run it, then look at the run log it wrote::

    python examples/quickstart.py             # prints the report, writes run.jsonl
    gradwatch report run.jsonl                # the same report, from the log
    gradwatch plot run.jsonl -o flow.png      # per-layer gradient norms over steps
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import gradwatch


def main(log: str = "run.jsonl", steps: int = 100) -> gradwatch.Watcher:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(16, 32), nn.Sigmoid()]
    for _ in range(18):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))  # 20 Linear layers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    target = torch.randn(16, 1)

    with gradwatch.watch(model, optimizer, log=log, report_every=50) as gw:
        for _ in range(steps):
            x = torch.randn(64, 16)
            loss = nn.functional.mse_loss(model(x), x @ target)
            loss.backward()
            gw.observe_loss(loss)  # optional: lets detectors tell divergence from convergence
            optimizer.step()
            optimizer.zero_grad()
    return gw


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "run.jsonl"
    main(path)
    print(f"run log: {path}; now try `gradwatch report {path}` and `gradwatch plot {path} -o flow.png`")
