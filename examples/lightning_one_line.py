"""One line for a Lightning user: ``Trainer(callbacks=[gradwatch.GradWatch()])``.

A 20-layer sigmoid MLP (gradients vanish toward the input) trained for 40 steps on CPU:
gradwatch prints its report above the progress bar and logs ``grad/...`` to the
Trainer's logger (here ``CSVLogger``, next to Lightning's own metrics).

Run: ``python examples/lightning_one_line.py``.
"""

from __future__ import annotations

import tempfile

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch
from gradwatch.testing import sigmoid_mlp


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = sigmoid_mlp(depth=20)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(1024, 16, generator=g), torch.randn(1024, 1, generator=g))
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            callbacks=[gradwatch.GradWatch(report_every=20)],  # <- the one line
            max_steps=40,
            log_every_n_steps=10,
            logger=pl.loggers.CSVLogger(root),
            enable_checkpointing=False,
            default_root_dir=root,
            accelerator="cpu",
        )
        trainer.fit(Regressor(), DataLoader(data, batch_size=32, shuffle=True))


if __name__ == "__main__":
    main()
