"""Clipping under DDP: two real gloo processes take the same decisions and stay identical.

The test launches this file twice as a script (ranks 0 and 1); each rank trains a
DDP-wrapped MLP on its own data with occasional spike batches, for every clipping
mode, then all-gathers its parameters and recorded clipping rows and writes what it
found to a JSON file that the test reads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

MODES = ("fixed", "autoclip", "zclip", "agc")


def _worker(rank: int, world: int, port: int, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    import gradwatch
    from gradwatch.testing import regression_batches, relu_mlp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    clips = {"fixed": 0.3, "autoclip": gradwatch.AutoClip(percentile=10), "zclip": gradwatch.ZClip(warmup=5), "agc": "agc"}
    result = {}
    for mode in MODES:
        model = nn.parallel.DistributedDataParallel(relu_mlp(depth=4, width=32, seed=0))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        batches = regression_batches(seed=10 + rank)  # different data on each rank
        with gradwatch.watch(model, opt, clip=clips[mode], report=False, autoload=False, strict=True) as gw:
            for step in range(16):
                x, y = next(batches)
                if step in (9, 13):
                    x, y = x * (20.0 + 10 * rank), y * 20.0  # spikes of different size per rank
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                opt.zero_grad()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        rows = gw.history.extras["clipping.step"].values.reshape(-1)
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        rows_gathered = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(rows_gathered, rows)
        result[mode] = {
            "params_equal": all(torch.equal(gathered[0], g) for g in gathered),
            "rows_equal": all(torch.equal(rows_gathered[0], r) for r in rows_gathered),
            "clipped_steps": [a.step for a in gw.actions if a.kind == "clip"],
            "finite": bool(torch.isfinite(flat).all()),
        }
    dist.barrier()  # no rank tears the group down while another still has gloo work in flight
    dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_rank_takes_the_same_clipping_decision(tmp_path):
    port = _free_port()
    env = {**os.environ, "GRADWATCH_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), "2", str(port), str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True
        )
        for rank in range(2)
    ]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for mode in MODES:
        r0, r1 = results[0][mode], results[1][mode]
        assert r0["params_equal"] and r1["params_equal"], mode
        assert r0["rows_equal"], mode  # same norms, thresholds and coefficients on both ranks
        assert r0["finite"], mode
        assert r0["clipped_steps"] and r0["clipped_steps"] == r1["clipped_steps"], mode


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
