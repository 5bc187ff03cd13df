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
                "rank_seen": gw.context().rank,
                "world_seen": gw.world_size,
                "names": gw.model_info.names,
                "grad_norm": gw.history.grad_norm,
                "update_ratio": gw.history.update_ratio.values,
                "printed": console.file.getvalue(),
                "params": [p.detach().clone() for p in model.parameters()],
                "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in ddp.modules()),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        # A rank that destroys its group while another still has gloo work in flight can
        # abort the other ("terminate called without an active exception"): wait first.
        dist.barrier()
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


def _fsdp_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        model = TinyModel(8, 16, 4)
        for layer in (model.linear1, model.linear2):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)
        expected, expected_ratio = [], []
        with gradwatch.watch(model, opt, stats_every=1, sample_every=1, report=False) as gw:
            for _ in range(4):
                model(torch.randn(8, 8, generator=g)).pow(2).mean().backward()
                # Reference: the full (unsharded) gradients, plain torch; collectives on every rank.
                with torch.no_grad():
                    full = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
                    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
                expected.append([
                    torch.sqrt(full[f"{layer}.weight"].pow(2).sum() + full[f"{layer}.bias"].pow(2).sum())
                    for layer in ("linear1", "linear2")
                ])  # fmt: skip
                opt.step()
                with torch.no_grad():
                    after = {n: p.full_tensor() for n, p in model.named_parameters()}
                expected_ratio.append([
                    torch.sqrt(sum((after[f"{layer}.{k}"] - before[f"{layer}.{k}"]).pow(2).sum() for k in ("weight", "bias")))
                    / torch.sqrt(sum(before[f"{layer}.{k}"].pow(2).sum() for k in ("weight", "bias")))
                    for layer in ("linear1", "linear2")
                ])  # fmt: skip
                opt.zero_grad()
        torch.save(
            {
                "grad_norm": gw.history.grad_norm,
                "expected": torch.tensor([[float(v) for v in row] for row in expected]),
                "update_ratio": gw.history.update_ratio.values,
                "expected_ratio": torch.tensor([[float(v) for v in row] for row in expected_ratio]),
            },
            os.path.join(out_dir, f"fsdp{rank}.pt"),
        )
        dist.barrier()  # see _worker
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_sharded_gradients_are_reduced_before_norms(tmp_path) -> None:
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"fsdp{r}.pt", weights_only=False) for r in (0, 1))
    for r in (r0, r1):
        torch.testing.assert_close(r["grad_norm"], r["expected"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r["update_ratio"], r["expected_ratio"], rtol=1e-4, atol=1e-8)
    assert torch.equal(r0["grad_norm"], r1["grad_norm"])


def _cadence_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        from gradwatch.cadence import Cadence

        if rank == 1:
            # Rank 1 measures a statistics pass 1000x dearer than it is (a slower device, say):
            # on its own it would read every 64th step; the ranks must agree on the largest period.
            observe = Cadence.observe
            Cadence.observe = lambda self, step, stats, own, sampled: observe(
                self, step, None if stats is None else 1000 * stats, own, sampled
            )
        torch.manual_seed(0)
        model = TinyModel()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)
        with gradwatch.watch(ddp, opt, report=False) as gw:
            for _ in range(80):
                ddp(torch.randn(8, 8, generator=g)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        torch.save(
            {"periods": (gw.cadence.stats_period, gw.cadence.sample_period), "steps": gw.history.steps.tolist()},
            os.path.join(out_dir, f"cadence{rank}.pt"),
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_auto_cadence_is_the_same_on_every_rank(tmp_path) -> None:
    mp.spawn(_cadence_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"cadence{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["periods"] == r1["periods"] and r0["periods"][0] == 64  # rank 1's (the largest) everywhere
    assert r0["steps"] == r1["steps"] == [*range(32), 64]
