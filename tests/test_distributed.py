"""Two real processes (gloo, CPU) training a DistributedDataParallel model under watch()."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch.testing import TinyModel


def _worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TinyModel()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        console = Console(file=io.StringIO(), width=120, color_system=None)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        with gradwatch.watch(ddp, opt, stats_every=1, sample_every=1, report_every=3, console=console) as gw:
            for _ in range(5):
                ddp(torch.randn(8, 8, generator=g)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        torch.save(
            {
                "rank_seen": gw._ctx().rank,
                "world_seen": gw._ctx().world_size,
                "names": gw.model_info.names,
                "grad_norm": gw.history.grad_norm,
                "update_ratio": gw.history.update_ratio.values,
                "printed": console.file.getvalue(),
                "params": [p.detach().clone() for p in model.parameters()],
                "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in ddp.modules()),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_same_statistics_rank_zero_prints(tmp_path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (r0["rank_seen"], r1["rank_seen"]) == (0, 1) and r0["world_seen"] == r1["world_seen"] == 2
    assert r0["names"] == r1["names"] == ("linear1", "linear2")
    # After DDP's all-reduce the gradients are identical on both ranks, so are the statistics.
    assert torch.equal(r0["grad_norm"], r1["grad_norm"]) and r0["grad_norm"].shape == (5, 2)
    torch.testing.assert_close(r0["update_ratio"], r1["update_ratio"])
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    assert "gradient flow" in r0["printed"] and r1["printed"] == ""
    assert r0["hooks"] == r1["hooks"] == 0
