"""fp16 mixed precision with a fused optimizer: the gradients at the step still carry the loss scale (issue 12.7).

Lightning's ``MixedPrecision.optimizer_step`` calls ``scaler.unscale_(optimizer)`` before
``on_before_optimizer_step`` only when the optimizer does not unscale inside its own step
(``_step_supports_amp_scaling``, set by ``fused=True``); a fused optimizer is handed the
scale by ``GradScaler.step`` (Lightning-AI/pytorch-lightning#21720). On CPU, Lightning
turns ``precision="16-mixed"`` into bf16, so these tests pass the fp16 precision plugin
with a CPU ``GradScaler`` themselves: the code path is the one a GPU run takes.
"""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch
from gradwatch import GradWatchError
from gradwatch._door import pending_scale

pytestmark = pytest.mark.filterwarnings("ignore:.*(does not have many workers|LeafSpec|litlogger|GPU available|max_steps).*")


class Net(pl.LightningModule):
    def __init__(self, fused: bool, sgd: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        self.fused = fused
        self.sgd = sgd

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self):
        if self.sgd:  # SGD's update is proportional to the gradient: a wrong clip shows in the weights
            return torch.optim.SGD(self.parameters(), lr=0.5, fused=self.fused)
        return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused)


class Unscaled(pl.Callback):
    """Plain torch at the same hook: per-layer norms of the gradients divided by what the scaler says they carry."""

    def __init__(self) -> None:
        self.norms: list[list[float]] = []
        self.stages: list[str] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        scaler = trainer.precision_plugin.scaler
        stage = scaler._per_optimizer_states[id(optimizer)]["stage"].name
        self.stages.append(stage)
        scale = 1.0 if stage == "UNSCALED" else float(scaler._scale)
        self.norms.append(
            [
                float(torch.cat([p.grad.flatten() for p in m.parameters()]).norm()) / scale
                for m in (pl_module.net[0], pl_module.net[2])
            ]
        )


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(48, 8, generator=g), torch.randn(48, 2, generator=g)), batch_size=8)


def _fit(module, *callbacks, **trainer_kw) -> None:
    trainer = pl.Trainer(
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
        callbacks=list(callbacks),
        **trainer_kw,
    )
    trainer.fit(module, _data())


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_statistics_are_unscaled_with_and_without_a_fused_optimizer(fused) -> None:
    ref, gw = Unscaled(), gradwatch.GradWatch(stats_every=1, report=False)
    _fit(Net(fused), ref, gw)
    # The claim of #21720, in the installed Lightning: fused -> still scaled at the hook.
    assert set(ref.stages) == ({"READY"} if fused else {"UNSCALED"})
    torch.testing.assert_close(gw.watchers[0].history.grad_norm, torch.tensor(ref.norms), rtol=1e-5, atol=1e-8)


def test_gradwatch_clip_under_a_fused_fp16_optimizer_clips_the_unscaled_norm() -> None:
    # Lightning refuses Trainer(gradient_clip_val=...) with a fused optimizer under fp16; the
    # reference is the same run with the unfused optimizer and Lightning's own clipping.
    ours, theirs = Net(fused=True, sgd=True), Net(fused=False, sgd=True)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    watch = gradwatch.GradWatch(clip=0.05, report=False, stats_every=1)
    _fit(ours, watch)
    _fit(theirs, gradient_clip_val=0.05)
    moved = sum(float((a - b).abs().sum()) for a, b in zip(ours.parameters(), Net(fused=True).parameters()))
    assert moved > 0.1  # the clipped updates changed the weights, so the comparison below means something
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    clips = [a for a in watch.watchers[0].actions if a.kind == "clip"]
    assert clips and all(a.evidence["norm"] < 100 for a in clips)  # unscaled norms, not ×65536


def test_plain_watch_reads_a_fused_optimizer_under_gradscaler() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    seen: list[list[float]] = []

    def reference(optimizer, args, kwargs):  # registered first: runs before gradwatch's hook
        scale = float(optimizer.grad_scale)
        seen.append([float(torch.cat([p.grad.flatten() for p in m.parameters()]).norm()) / scale for m in (model[0], model[2])])

    opt.register_step_pre_hook(reference)
    g = torch.Generator().manual_seed(1)
    with gradwatch.watch(model, opt, scaler=scaler, report=False, stats_every=1, autoload=False) as gw:
        for _ in range(5):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(torch.randn(8, 8, generator=g)).float(), torch.randn(8, 2, generator=g))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert len(seen) == 5
    torch.testing.assert_close(gw.history.grad_norm, torch.tensor(seen), rtol=1e-5, atol=1e-8)


def test_a_scaler_that_hides_its_state_is_refused_for_a_fused_optimizer() -> None:
    class OpaqueScaler:
        def is_enabled(self) -> bool:
            return True

    fused = torch.optim.AdamW(nn.Linear(2, 2).parameters(), fused=True)
    with pytest.raises(GradWatchError, match=r"unscales its gradients inside step\(\) \(fused=True\)"):
        pending_scale(OpaqueScaler(), fused)
    assert pending_scale(OpaqueScaler(), torch.optim.SGD(nn.Linear(2, 2).parameters())) is None
    assert pending_scale(None, fused) is None
