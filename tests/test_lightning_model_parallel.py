"""Lightning ``ModelParallelStrategy`` (FSDP2) on CPU with two processes (gloo), issue 12.

The test runs this file as a script; Lightning's launcher starts the second rank by running
it again. Each rank writes what it saw to a file the test reads:

* ``GradWatch()``'s per-layer statistics equal the norms of the full gradients
  (``full_tensor()``) at the same hook, on both ranks;
* ``GradWatch(clip=0.05)`` trains to the same weights as ``Trainer(gradient_clip_val=0.05)``
  (Lightning's ``clip_gradients``: ``clip_grad_norm_`` on the DTensor parameters).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 6


def _main(out: Path, mode: str) -> None:
    import warnings

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.strategies import ModelParallelStrategy
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import gradwatch

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    class FullNorms(pl.Callback):
        """Plain torch at the same hook: norms of the full (gathered) gradients, per layer."""

        def __init__(self) -> None:
            self.rows: list[list[float]] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            with torch.no_grad():
                row = []
                for k in (0, 2, 4):
                    grads = [p.grad.full_tensor() for p in pl_module.net[k].parameters()]  # a collective, every rank
                    row.append(float(torch.sqrt(sum(g.square().sum() for g in grads))))
            self.rows.append(row)

    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(96, 8, generator=g), 3 * torch.randn(96, 1, generator=g)), batch_size=8)
    full = FullNorms()
    callbacks: list[pl.Callback] = [full]
    watch = None
    if mode in ("stats", "clip"):
        watch = gradwatch.GradWatch(stats_every=1, report=False, autoload=False, **({"clip": 0.05} if mode == "clip" else {}))
        callbacks.append(watch)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.05 if mode == "lightning_clip" else None,
        callbacks=callbacks,
        use_distributed_sampler=True,
    )
    module = Net()
    trainer.fit(module, data)
    with torch.no_grad():
        weights = [p.full_tensor().reshape(-1).tolist() for p in module.parameters()]
    rank = trainer.global_rank
    result = {"full": full.rows, "weights": weights}
    if watch is not None:
        w = watch.watchers[0]
        result.update(
            names=list(w.model_info.names),
            grad_norm=w.history.grad_norm.tolist(),
            clips=[a.step for a in w.actions if a.kind == "clip"],
        )
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, mode: str) -> None:
    env = {**os.environ, "GRADWATCH_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, __file__, str(tmp_path), mode], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
def test_model_parallel_strategy_statistics_equal_full_tensor_norms(tmp_path) -> None:
    _launch(tmp_path, "stats")
    r0, r1 = (json.loads((tmp_path / f"stats-rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["names"] == ["net.0", "net.2", "net.4"]
        assert len(r["grad_norm"]) == len(r["full"]) == STEPS
        for ours, full in zip(r["grad_norm"], r["full"]):
            assert ours == pytest.approx(full, rel=1e-5)
    assert r0["grad_norm"] == r1["grad_norm"]


@pytest.mark.slow
def test_model_parallel_strategy_gradwatch_clip_equals_lightning_clip_gradients(tmp_path) -> None:
    _launch(tmp_path, "clip")
    _launch(tmp_path, "lightning_clip")
    ours = json.loads((tmp_path / "clip-rank0.json").read_text())
    theirs = json.loads((tmp_path / "lightning_clip-rank0.json").read_text())
    assert ours["clips"], "the threshold must bite for the comparison to mean something"
    for a, b in zip(ours["weights"], theirs["weights"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    assert ours["weights"] == json.loads((tmp_path / "clip-rank1.json").read_text())["weights"]


if __name__ == "__main__":
    _main(Path(sys.argv[1]), sys.argv[2])
