"""The Lightning callback under ``strategy="ddp"`` and ``"ddp_spawn"``: two CPU processes, gloo.

Each run is a script in a subprocess: ``ddp`` relaunches ``sys.argv`` for rank 1, and
``ddp_spawn`` pickles the Trainer with its callbacks into spawned processes, so neither
can run inside pytest's own process. Every rank dumps what its watcher saw, next to a
plain-torch reference taken at the same hook.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from gradwatch.testing import TinyModel

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    '''
    import json
    import sys
    from pathlib import Path

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import CSVLogger
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import gradwatch
    from gradwatch.testing import TinyModel


    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = TinyModel(8, 16, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)


    class Dump(pl.Callback):
        """Plain-torch norms at the same hook; at teardown (after GradWatch's), what the watcher saw."""

        def __init__(self, out):
            self.out = out
            self.total = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.first = [t.tolist() for t in batch]

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.total.append(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in pl_module.parameters())).item())

        def teardown(self, trainer, pl_module, stage):
            gw = next(c for c in trainer.callbacks if isinstance(c, gradwatch.GradWatch))
            w = gw.watchers[0]
            (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
                "ref": self.total,
                "history": w.history.total_norm.tolist(),
                "steps": w.history.steps.tolist(),
                "step_count": w.step_count,
                "world_size": trainer.world_size,
                "attached": w.attached,
                "rank_seen": w.rank,
                "first_batch": self.first,
            }))


    def main():
        out, strategy = Path(sys.argv[1]), sys.argv[2]
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 2, generator=g))
        cb = gradwatch.GradWatch(report_every=2, stats_every=1, sample_every=2, options={"console": {"every_interval": True}})
        trainer = pl.Trainer(
            strategy=strategy, accelerator="cpu", devices=2, max_steps=4, callbacks=[cb, Dump(out)],
            logger=CSVLogger(out, name="csv"), log_every_n_steps=1, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        )
        trainer.fit(Net(), DataLoader(data, batch_size=8, shuffle=False))


    if __name__ == "__main__":
        main()
    '''
)


def expected_first_norm(batches: list[list[list[list[float]]]]) -> float:
    """Plain torch, one process: DDP averages the ranks' gradients of their first batches
    (equal sizes), which is the gradient of the mean loss over both batches together."""
    x = torch.cat([torch.tensor(b[0]) for b in batches])
    y = torch.cat([torch.tensor(b[1]) for b in batches])
    torch.manual_seed(0)
    model = TinyModel(8, 16, 2)
    nn.functional.mse_loss(model(x), y).backward()
    return torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())).item()


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_processes_on_cpu(tmp_path: Path, strategy: str) -> None:
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path), strategy], capture_output=True, text=True, timeout=420, cwd=tmp_path
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, seen in enumerate(ranks):
        assert seen["world_size"] == 2 and seen["rank_seen"] == r
        assert seen["step_count"] == 4 and seen["steps"] == [0, 1, 2, 3] and not seen["attached"]
        assert seen["history"] == pytest.approx(seen["ref"], rel=1e-5)
    # Gradients are all-reduced before on_before_optimizer_step: both ranks see the same.
    assert ranks[0]["history"] == pytest.approx(ranks[1]["history"], rel=1e-6)
    assert ranks[0]["history"][0] == pytest.approx(expected_first_norm([r["first_batch"] for r in ranks]), rel=1e-5)
    # Reports on rank zero only: intervals 0-1 and 2-3 (closed at the end), and the final
    # summary, once each (six with both ranks printing).
    assert run.stdout.count("gradient flow") == 3, run.stdout
    assert run.stdout.count("(final)") == 1
    # Rank zero logged; the logged values are the watcher's.
    metrics = next(tmp_path.glob("csv/*/metrics.csv"))
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("grad/norm_total")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert [float(r["grad/norm_total"]) for r in rows] == pytest.approx(ranks[0]["ref"], rel=1e-5)
