"""The Lightning callback in real ``Trainer.fit`` runs on CPU (issue 5).

Every number the callback logs is compared with a plain-torch computation made by a
reference callback (``RefNorms``) from the same gradients at the same hook.
"""

from __future__ import annotations

import csv
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch
from gradwatch import Diagnosis, GradWatchError, Severity, hookimpl
from gradwatch.testing import Flag, TinyModel

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(does not have many workers|LeafSpec|litlogger|GPU available|Checkpoint directory|max_steps|tensorboardX).*"
)


# ---------------------------------------------------------------------- helpers


class Regressor(pl.LightningModule):
    """TinyModel (linear1 -> ReLU -> linear2) on a fixed regression set, plain SGD."""

    def __init__(self, lr: float = 0.1, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyModel(8, 16, 2)
        self.lr = lr
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("user error in training_step")
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(n: int = 64, batch: int = 8, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 8, generator=g), torch.randn(n, 2, generator=g))
    return DataLoader(data, batch_size=batch, shuffle=False)


class RefNorms(pl.Callback):
    """Plain torch: the global and per-layer gradient norms at on_before_optimizer_step,
    per optimizer."""

    def __init__(self, layers: dict[str, nn.Module] | None = None) -> None:
        self.layers = layers
        self.total: dict[int, list[float]] = {}
        self.per_layer: dict[int, list[dict[str, float]]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        k = [id(getattr(o, "_optimizer", o)) for o in trainer.optimizers].index(id(optimizer))
        params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        grads = [p.grad.detach().float() for p in pl_module.parameters() if id(p) in params and p.grad is not None]
        self.total.setdefault(k, []).append(torch.sqrt(sum((g * g).sum() for g in grads)).item())
        layers = self.layers or {n: m for n, m in pl_module.named_modules() if list(m.parameters(recurse=False))}
        row = {}
        for name, module in layers.items():
            own = [p.grad.detach().float() for p in module.parameters(recurse=False) if id(p) in params and p.grad is not None]
            if own:
                row[name] = torch.sqrt(sum((g * g).sum() for g in own)).item()
        self.per_layer.setdefault(k, []).append(row)


def trainer(tmp_path: Path, callbacks: list, **kwargs) -> pl.Trainer:
    defaults = dict(
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def read_csv(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


# ---------------------------------------------------------------------- import and classes


def test_gradwatch_lightning_imports_its_package_only_when_resolved() -> None:
    """Importing gradwatch.lightning imports no Lightning; resolving GradWatch imports pytorch_lightning only
    (tests/test_project.py checks that `import gradwatch` alone imports none)."""
    code = (
        "import sys, gradwatch, gradwatch.lightning\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', 'lightning_fabric')]\n"
        "assert not bad, bad\n"
        "cb = gradwatch.GradWatch\n"
        "assert 'pytorch_lightning' in sys.modules and 'lightning' not in sys.modules, sorted(sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_classes_are_callbacks_of_their_package_and_pickle() -> None:
    import lightning.pytorch as L

    from gradwatch.lightning import GradWatch, LightningGradWatch

    assert gradwatch.GradWatch is GradWatch
    assert issubclass(GradWatch, pl.Callback) and not issubclass(GradWatch, L.Callback)
    assert issubclass(LightningGradWatch, L.Callback) and not issubclass(LightningGradWatch, pl.Callback)
    cb = GradWatch(report_every=10, options={"console": {"compact": True}})
    clone = pickle.loads(pickle.dumps(cb))
    assert type(clone) is GradWatch and clone.config == cb.config
    assert type(pickle.loads(pickle.dumps(LightningGradWatch()))) is LightningGradWatch
    assert cb.state_key == LightningGradWatch().state_key == "GradWatch"


# ---------------------------------------------------------------------- misuse


def test_unknown_option_lists_known_names() -> None:
    with pytest.raises(GradWatchError, match=r"'report_evry' \(did you mean 'report_every'\?\).*its options are: .*stats_every"):
        gradwatch.GradWatch(report_evry=10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"report_every": 0}, "report_every must be a positive integer"),
        ({"log_layers": "some"}, "log_layers must be one of"),
        ({"disable": 3}, "disable takes plugin names"),
        ({"disable": ["nosuch"]}, "unknown plugin"),
        ({"options": {"nosuch": {}}}, "options given for unknown plugin"),
    ],
)
def test_bad_values_fail_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(GradWatchError, match=match):
        gradwatch.GradWatch(**kwargs)


def test_module_without_parameters_is_refused(tmp_path: Path) -> None:
    class Frozen(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.net.requires_grad_(False)
            self.extra = nn.Parameter(torch.zeros(1), requires_grad=False)

        def configure_optimizers(self):
            return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    with pytest.raises(GradWatchError, match="Frozen has no trainable parameters.*unfreeze a layer or remove"):
        trainer(tmp_path, [gradwatch.GradWatch()]).fit(Frozen(), loader())


def test_clip_conflicts_with_trainer_gradient_clip_val(tmp_path: Path) -> None:
    cb = gradwatch.GradWatch(clip=1.0)
    with pytest.raises(GradWatchError, match=r"conflicts with Trainer\(gradient_clip_val=0.5\).*remove one"):
        trainer(tmp_path, [cb], gradient_clip_val=0.5).fit(Regressor(), loader())
    assert not cb.watchers  # refused in setup, before any hook was registered


# ---------------------------------------------------------------------- automatic optimisation + loggers


def test_automatic_logs_match_plain_torch_in_csv(tmp_path: Path) -> None:
    ref = RefNorms()
    cb = gradwatch.GradWatch(report_every=4, report=False, stats_every=4)
    logger = CSVLogger(tmp_path, name="csv")
    t = trainer(tmp_path, [cb, ref], max_steps=6, logger=logger, log_every_n_steps=1)
    t.fit(Regressor(), loader())
    watcher = cb.watchers[0]
    assert watcher.step_count == t.global_step == 6
    assert not watcher.attached
    rows = read_csv(logger)
    total = column(rows, "grad/norm_total")
    # Logged at every step (log_every_n_steps=1) although statistics are read every 4th.
    assert sorted(total) == list(range(6))
    assert [total[s] for s in range(6)] == pytest.approx(ref.total[0], rel=1e-5)
    for layer in ("net.linear1", "net.linear2"):
        logged = column(rows, f"grad/norm/{layer}")
        assert [logged[s] for s in range(6)] == pytest.approx([r[layer] for r in ref.per_layer[0]], rel=1e-5)
    assert set(column(rows, "grad/clips").values()) == {0.0}
    # The history holds the statistics steps (0 and 4), with the same numbers.
    assert watcher.history.steps.tolist() == [0, 4]
    assert watcher.history.total_norm.tolist() == pytest.approx([ref.total[0][0], ref.total[0][4]], rel=1e-5)
    # The training loss of each step is recorded on device and drained with the rest.
    loss = watcher.history.extras["core.loss"]
    assert loss.steps.tolist() == list(range(6))
    assert loss.values.tolist() == pytest.approx([column(rows, "train_loss")[s] for s in range(6)], rel=1e-6)


def test_logging_follows_log_every_n_steps(tmp_path: Path) -> None:
    cb = gradwatch.GradWatch(report=False, log_layers="none")
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [cb], max_steps=8, logger=logger, log_every_n_steps=3).fit(Regressor(), loader())
    rows = read_csv(logger)
    ours = sorted(column(rows, "grad/norm_total"))
    lightning = sorted(column(rows, "train_loss"))  # what Lightning itself wrote
    assert ours == lightning == [2, 5]
    assert not any(k.startswith("grad/norm/") for k in rows[0])


def test_tensorboard_event_file_and_aggregates(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref = RefNorms()
    cb = gradwatch.GradWatch(report=False, log_layers="aggregate")
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, [cb, ref], max_steps=5, logger=logger, log_every_n_steps=1).fit(Regressor(), loader())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"grad/norm_total", "grad/norm_min", "grad/norm_max", "grad/norm_mean", "grad/clips"} <= tags
    assert not any(t.startswith("grad/norm/") for t in tags)
    total = events.Scalars("grad/norm_total")
    assert [e.step for e in total] == list(range(5))
    assert [e.value for e in total] == pytest.approx(ref.total[0], rel=1e-5)
    per_layer = [sorted(r.values()) for r in ref.per_layer[0]]
    assert [e.value for e in events.Scalars("grad/norm_min")] == pytest.approx([p[0] for p in per_layer], rel=1e-5)
    assert [e.value for e in events.Scalars("grad/norm_max")] == pytest.approx([p[-1] for p in per_layer], rel=1e-5)
    assert [e.value for e in events.Scalars("grad/norm_mean")] == pytest.approx([sum(p) / 2 for p in per_layer], rel=1e-5)


def test_diagnosis_counts_are_logged_by_kind(tmp_path: Path) -> None:
    cb = gradwatch.GradWatch(report=False, report_every=2, stats_every=1, sample_every=2, plugins=[Flag()], log_layers=1)
    ref = RefNorms()
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [cb, ref], max_steps=6, logger=logger, log_every_n_steps=1).fit(Regressor(), loader())
    rows = read_csv(logger)
    # Intervals are drained at steps 2 and 4 (when step 1 and 3 close): the count rises then.
    counts = column(rows, "grad/diagnoses/flagged")
    # ... and once more at the end of fit, after the final report diagnosed the last interval.
    assert counts == {2: 1.0, 3: 1.0, 4: 2.0, 5: 2.0, 6: 3.0}
    assert [d.kind for d in cb.diagnoses] == ["flagged"] * 3  # and the final interval
    # log_layers=1: the largest layer norm of each step, under its own name.
    for step, r in enumerate(ref.per_layer[0]):
        top = max(r, key=r.get)
        assert float(rows[[int(x["step"]) for x in rows].index(step)][f"grad/norm/{top}"]) == pytest.approx(r[top], rel=1e-5)


class Late:
    """Inline plugin: one diagnosis, in the final (partial) report interval only."""

    gradwatch_name = "late"

    @hookimpl
    def gradwatch_diagnose(self, window):
        if window.final and len(window):
            return [Diagnosis(kind="late", severity=Severity.WARNING, step=int(window.steps[0]), message="late", source="late")]
        return None


def test_short_fit_logs_the_diagnoses_of_its_last_partial_interval(tmp_path: Path) -> None:
    """report_every=100 and log_every_n_steps=50 (the defaults): a 120-step fit logs norms at
    steps 49 and 99; the diagnosis of steps 100-119 reaches the logger at the end of fit (issue
    14). Statistics every 4 steps, so that the last interval holds rows whatever the machine."""
    cb = gradwatch.GradWatch(report=False, plugins=[Late()], stats_every=4)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [cb], max_steps=120, logger=logger).fit(Regressor(), loader())
    rows = read_csv(logger)
    assert sorted(column(rows, "grad/norm_total")) == [49, 99]
    assert column(rows, "grad/diagnoses/late") == {120: 1.0}
    assert column(rows, "grad/clips") == {49: 0.0, 99: 0.0, 120: 0.0}
    assert [d.kind for d in cb.diagnoses] == ["late"] and cb.diagnoses[0].step == 100


# ---------------------------------------------------------------------- modes


def test_accumulate_grad_batches_is_one_statistics_step_per_optimizer_step(tmp_path: Path) -> None:
    ref = RefNorms()
    cb = gradwatch.GradWatch(report=False, stats_every=1, sample_every=1)
    t = trainer(tmp_path, [cb, ref], max_steps=2, accumulate_grad_batches=4)
    t.fit(Regressor(), loader())
    watcher = cb.watchers[0]
    assert t.global_step == 2 and watcher.step_count == 2
    assert watcher.history.steps.tolist() == [0, 1]
    assert watcher.history.total_norm.tolist() == pytest.approx(ref.total[0], rel=1e-5)
    # Plain torch: the accumulated gradient of four micro-batches, each loss divided by 4.
    model = Regressor()
    mean_loss = 0.0
    for x, y in list(loader())[:4]:
        loss = nn.functional.mse_loss(model(x), y) / 4
        loss.backward()
        mean_loss += loss.item()
    expected = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())).item()
    assert watcher.history.total_norm[0].item() == pytest.approx(expected, rel=1e-5)
    # One loss per optimizer step, the mean over its micro-batches.
    loss = watcher.history.extras["core.loss"]
    assert loss.steps.tolist() == [0, 1]
    assert loss.values[0].item() == pytest.approx(mean_loss, rel=1e-5)


class GAN(pl.LightningModule):
    """Manual optimisation with two optimizers; plain-torch norms taken before each step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.g_norms: list[float] = []
        self.d_norms: list[float] = []

    @staticmethod
    def _norm(module: nn.Module) -> float:
        return torch.sqrt(sum((p.grad**2).sum() for p in module.parameters())).item()

    def training_step(self, batch, batch_idx):
        real = batch[0]
        g_opt, d_opt = self.optimizers()
        z = torch.randn(real.shape[0], 4)
        fake = self.generator(z)
        g_loss = nn.functional.softplus(-self.discriminator(fake)).mean()
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        self.g_norms.append(self._norm(self.generator))
        g_opt.step()
        d_loss = (
            nn.functional.softplus(-self.discriminator(real)) + nn.functional.softplus(self.discriminator(fake.detach()))
        ).mean()
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        self.d_norms.append(self._norm(self.discriminator))
        d_opt.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.generator.parameters(), 1e-3), torch.optim.Adam(self.discriminator.parameters(), 1e-3)


def test_manual_optimisation_two_optimizers_reported_separately(tmp_path: Path, capsys) -> None:
    cb = gradwatch.GradWatch(stats_every=1, sample_every=1)
    logger = CSVLogger(tmp_path, name="csv")
    model = GAN()
    data = DataLoader(TensorDataset(torch.randn(32, 8, generator=torch.Generator().manual_seed(3))), batch_size=8)
    t = trainer(tmp_path, [cb], max_steps=6, logger=logger, log_every_n_steps=1)
    t.fit(model, data)
    g, d = cb.watchers
    assert g.model_info.names == ("generator.0", "generator.2")
    assert d.model_info.names == ("discriminator.0", "discriminator.2")
    assert g.step_count == d.step_count == 3  # Lightning counts both optimizers' steps: 6
    assert g.history.total_norm.tolist() == pytest.approx(model.g_norms, rel=1e-5)
    assert d.history.total_norm.tolist() == pytest.approx(model.d_norms, rel=1e-5)
    rows = read_csv(logger)
    for prefix, norms in (("grad/opt0", model.g_norms), ("grad/opt1", model.d_norms)):
        logged = [float(r[f"{prefix}/norm_total"]) for r in rows if r.get(f"{prefix}/norm_total")]
        assert logged == pytest.approx(norms, rel=1e-5)
    assert "grad/opt0/norm/generator.0" in rows[0] and "grad/opt1/norm/discriminator.2" in rows[0]
    assert "grad/norm_total" not in rows[0]
    out = capsys.readouterr().out
    assert "gradwatch · optimizer 0" in out and "gradwatch · optimizer 1" in out
    assert out.count("gradient flow") == 2


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_precision(tmp_path: Path, precision: str) -> None:
    ref = RefNorms()
    cb = gradwatch.GradWatch(report=False, stats_every=1)
    t = trainer(tmp_path, [cb, ref], precision=precision, max_steps=3)
    t.fit(Regressor(), loader())
    history = cb.watchers[0].history
    assert history.steps.tolist() == [0, 1, 2]
    assert history.total_norm.tolist() == pytest.approx(ref.total[0], rel=1e-5)
    assert history.total_norm.dtype == torch.float32


def test_16_mixed_on_cpu_falls_back_to_bf16(tmp_path: Path) -> None:
    cb = gradwatch.GradWatch(report=False, stats_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(tmp_path, [cb], precision="16-mixed", max_steps=2)
    if t.precision == "16-mixed":  # a Lightning that allows fp16 AMP on CPU
        t.fit(Regressor(), loader())
        assert cb.watchers[0].step_count == 2
        return
    # Lightning 2.x: "AMP with fp16 is not supported on CPU. Using bf16-mixed instead."
    assert t.precision == "bf16-mixed"
    assert any("not supported on CPU" in str(w.message) for w in caught)
    t.fit(Regressor(), loader())
    assert cb.watchers[0].step_count == 2 and torch.isfinite(cb.watchers[0].history.total_norm).all()


def test_fast_dev_run(tmp_path: Path) -> None:
    cb = gradwatch.GradWatch(report=False)
    trainer(tmp_path, [cb], fast_dev_run=True).fit(Regressor(), loader(), loader(16))
    assert cb.watchers[0].step_count == 1 and len(cb.watchers[0].history) == 1


def test_validate_test_predict_only_report_nothing(tmp_path: Path, capsys) -> None:
    cb = gradwatch.GradWatch()
    t = trainer(tmp_path, [cb])
    model = Regressor()
    t.validate(model, loader(16))
    t.test(model, loader(16))
    assert len(t.predict(model, loader(16))) == 2
    assert cb.watchers == [] and cb.diagnoses == []
    assert "gradwatch" not in capsys.readouterr().out
    assert cb.state_dict() == {}


def test_fit_twice(tmp_path: Path) -> None:
    cb = gradwatch.GradWatch(report=False, stats_every=1, sample_every=1)
    t = trainer(tmp_path, [cb], max_steps=3)
    model = Regressor()
    t.fit(model, loader())
    first = cb.watchers[0]
    # The same trainer goes on from global_step 3: gradwatch goes on from step 3 too.
    t.fit_loop.epoch_loop.max_steps = 5
    t.fit(model, loader())
    second = cb.watchers[0]
    assert second is not first and not first.attached and not second.attached
    assert t.global_step == second.step_count == 5
    assert second.history.steps.tolist() == [0, 1, 2, 3, 4]
    # A new trainer starts over.
    trainer(tmp_path, [cb], max_steps=2).fit(model, loader())
    assert cb.watchers[0].step_count == 2 and cb.watchers[0].history.steps.tolist() == [0, 1]


def test_exception_in_training_detaches_and_propagates(tmp_path: Path) -> None:
    cb = gradwatch.GradWatch(report=False, stats_every=1)
    model = Regressor(fail_at=2)
    with pytest.raises(RuntimeError, match="user error in training_step"):
        trainer(tmp_path, [cb], max_steps=5).fit(model, loader())
    watcher = cb.watchers[0]
    assert not watcher.attached
    assert watcher.history.steps.tolist() == [0, 1]
    assert model._forward_pre_hooks == {} and all(not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------- checkpoints


def test_checkpoint_resume_continues_where_it_stopped(tmp_path: Path) -> None:
    flag = Flag()
    cb = gradwatch.GradWatch(report=False, report_every=3, stats_every=1, sample_every=1, plugins=[flag], clip="autoclip")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    t = trainer(tmp_path, [cb, ckpt], max_steps=6, enable_checkpointing=True)
    t.fit(Regressor(), loader(32))  # 4 batches an epoch: the checkpoint at step 4 ends epoch 0
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"]["GradWatch"]
    # Saved mid-run after step 3: the open interval was drained into the checkpoint.
    assert saved["watchers"][0]["step"] == 4
    assert saved["watchers"][0]["history"]["steps"].tolist() == [0, 1, 2, 3]
    assert [d["kind"] for d in saved["watchers"][0]["diagnoses"]] == ["flagged", "flagged"]
    assert saved["watchers"][0]["plugins"]["flag"] == {"intervals": 2}
    assert saved["watchers"][0]["plugins"]["clipping"]["steps"] == 4  # AutoClip's norm history

    flag2 = Flag()
    resumed = gradwatch.GradWatch(report=False, report_every=3, stats_every=1, sample_every=1, plugins=[flag2], clip="autoclip")
    t2 = trainer(tmp_path, [resumed], max_steps=8)
    t2.fit(Regressor(), loader(32), ckpt_path=path)
    watcher = resumed.watchers[0]
    assert t2.global_step == watcher.step_count == 8
    assert watcher.history.steps.tolist() == list(range(8))
    # Same weights, data and clip state as the first run at steps 4 and 5: same numbers
    # (step 5 differs if AutoClip's history was not restored, as its threshold would).
    assert watcher.history.total_norm[:4].tolist() == pytest.approx(cb.watchers[0].history.total_norm[:4].tolist())
    assert watcher.history.total_norm[4:6].tolist() == pytest.approx(cb.watchers[0].history.total_norm[4:6].tolist(), rel=1e-5)
    # Restored: intervals 0-2 and 3 (drained at the save); then 4-5 (report_every=3) and 6-7.
    assert [d.step for d in watcher.diagnoses] == [0, 3, 4, 6]
    assert flag2.intervals == 4
    clipping = resumed.state_dict()["watchers"][0]["plugins"]["clipping"]
    assert clipping["steps"] == 8  # the clip history went on from the checkpoint's 4 steps


def test_state_dict_after_fit_round_trips(tmp_path: Path) -> None:
    cb = gradwatch.GradWatch(report=False, stats_every=1)
    t = trainer(tmp_path, [cb], max_steps=3)
    t.fit(Regressor(), loader())
    path = tmp_path / "end.ckpt"
    t.save_checkpoint(path)
    other = gradwatch.GradWatch(report=False, stats_every=1)
    trainer(tmp_path, [other], max_steps=5).fit(Regressor(), loader(), ckpt_path=path)
    assert other.watchers[0].history.steps.tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------- console under progress bars


def _report_lines(out: str) -> list[str]:
    # What a terminal shows: each "\r" returns to the start of the line.
    return [line.rsplit("\r", 1)[-1] for line in out.split("\n")]


def test_report_under_tqdm_is_not_garbled(tmp_path: Path, capsys) -> None:
    cb = gradwatch.GradWatch(report_every=2, stats_every=1, sample_every=2, options={"console": {"every_interval": True}})
    t = trainer(tmp_path, [cb, TQDMProgressBar(refresh_rate=1)], max_steps=6, enable_progress_bar=True)
    t.fit(Regressor(), loader())
    out = capsys.readouterr().out
    titles = [line for line in _report_lines(out) if "gradient flow" in line]
    assert len(titles) == 4, out  # steps 1, 3, 5 and the final report
    assert all(line.lstrip().startswith("gradwatch") for line in titles), titles
    for line in _report_lines(out):
        if "net.linear" in line:  # table rows are whole lines, no bar glued to them
            assert "it/s" not in line and "%|" not in line, line


def test_report_under_rich_progress_bar(tmp_path: Path, capsys) -> None:
    cb = gradwatch.GradWatch(report_every=3, stats_every=1, sample_every=3, options={"console": {"every_interval": True}})
    t = trainer(tmp_path, [cb, RichProgressBar()], max_steps=6, enable_progress_bar=True)
    t.fit(Regressor(), loader())
    out = capsys.readouterr().out
    titles = [line for line in _report_lines(out) if "gradient flow" in line]
    assert len(titles) == 3, out
    assert all(line.lstrip().startswith("gradwatch") for line in titles), titles
    for line in _report_lines(out):
        if "net.linear" in line:
            assert "Epoch" not in line and "it/s" not in line, line


def test_user_console_receives_the_report(tmp_path: Path, console) -> None:
    cb = gradwatch.GradWatch(console=console)
    trainer(tmp_path, [cb], max_steps=2).fit(Regressor(), loader())
    text = console.file.getvalue()
    assert "gradient flow" in text and "net.linear1" in text
    assert pickle.loads(pickle.dumps(cb))._user_console is None


# ---------------------------------------------------------------------- lightning.pytorch


def test_lightning_pytorch_package(tmp_path: Path) -> None:
    import lightning.pytorch as L

    from gradwatch.lightning import LightningGradWatch

    class LRegressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = TinyModel(8, 16, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = LightningGradWatch(report=False, stats_every=1)
    logger = L.loggers.CSVLogger(tmp_path, name="csv")
    L.Trainer(
        callbacks=[cb],
        max_steps=3,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
    ).fit(LRegressor(), loader())
    rows = read_csv(logger)
    assert list(column(rows, "grad/norm_total").values()) == pytest.approx(cb.watchers[0].history.total_norm.tolist(), rel=1e-6)


def test_clip_logs_pre_clip_norms_and_clip_counts(tmp_path: Path) -> None:
    before, after = RefNorms(), RefNorms()
    cb = gradwatch.GradWatch(report=False, clip=0.5, report_every=2, stats_every=1, sample_every=2)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [before, cb, after], max_steps=6, logger=logger, log_every_n_steps=1).fit(Regressor(), loader())
    rows = read_csv(logger)
    total = column(rows, "grad/norm_total")
    # Statistics and logs are of the gradients before clipping; the optimizer got clipped ones.
    assert [total[s] for s in range(6)] == pytest.approx(before.total[0], rel=1e-5)
    assert after.total[0] == pytest.approx([min(n, 0.5) for n in before.total[0]], rel=1e-4)
    clipped = [s for s, n in enumerate(before.total[0]) if n > 0.5]
    assert clipped, "the test needs steps above the threshold"
    actions = [a.step for a in cb.watchers[0].actions if a.kind == "clip"]
    assert actions == clipped
    # The running count changes when an interval is drained (steps 2 and 4).
    counts = column(rows, "grad/clips")
    assert counts[2] == len([s for s in clipped if s < 2]) and counts[5] == len([s for s in clipped if s < 4])


def test_a_logging_failure_never_stops_training(tmp_path: Path) -> None:
    class Clash(Regressor):
        def log_dict(self, dictionary, **kwargs):  # a user's override that cannot take our keys
            if any(k.startswith("grad/") for k in dictionary):
                raise RuntimeError("no grad/ keys here")
            super().log_dict(dictionary, **kwargs)

    cb = gradwatch.GradWatch(report=False)
    with pytest.warns(gradwatch.GradWatchWarning, match="stopped logging.*training goes on"):
        t = trainer(tmp_path, [cb], max_steps=4, logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=1)
        t.fit(Clash(), loader())
    assert t.global_step == 4 and cb.watchers[0].step_count == 4


def test_watcher_params_filter_used_per_optimizer() -> None:
    """The core's ``params=`` filter the callback builds its per-optimizer watchers on."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    config = gradwatch.WatchConfig(report=False, autoload=False)
    first = gradwatch.Watcher(model, config=config, params=model[0].parameters()).attach()
    second = gradwatch.Watcher(model, config=config, params=model[2].parameters()).attach()
    assert first.model_info.names == ("0",) and second.model_info.names == ("2",)
    with pytest.raises(GradWatchError, match="already attached.*explicit steps"):
        gradwatch.Watcher(model, config=config, params=[model[0].weight]).attach()
    with pytest.raises(GradWatchError, match="none of the 1 parameter"):
        gradwatch.Watcher(model, config=config, params=[nn.Parameter(torch.zeros(1))])
    model(torch.randn(2, 4)).sum().backward()
    first.step()
    second.step()
    first.detach()
    second.detach()
    assert first.history.total_norm.tolist() == pytest.approx(
        [torch.cat([p.grad.flatten() for p in model[0].parameters()]).norm().item()]
    )
    assert second.history.total_norm.tolist() == pytest.approx(
        [torch.cat([p.grad.flatten() for p in model[2].parameters()]).norm().item()]
    )
