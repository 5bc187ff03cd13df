"""The Hugging Face door in real ``transformers.Trainer`` runs, and Accelerate loops under ``watch()`` (issue 13).

Every number is compared with plain torch: ``RefTrainer`` records the gradients Trainer is
about to clip (its ``_clip_grad_norm``, called once per optimizer step after the last
micro-batch's backward) and ``PostClip`` the ones the optimizer receives. The model is a
two-layer GPT-2 built from ``GPT2Config`` on synthetic tokens.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import gradwatch
from gradwatch import GradWatchError, GradWatchWarning, Severity
from gradwatch.hf import GradWatchCallback
from gradwatch.testing import Flag

transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.filterwarnings("ignore:.*(save_steps|not supported on CPU|pin_memory).*")

VOCAB = 64


# ---------------------------------------------------------------------- helpers


def gpt2(init: float = 0.02, seed: int = 0) -> GPT2LMHeadModel:
    """Two blocks, width 32, no dropout (runs are deterministic, so a resumed run repeats)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=init,
    )
    return GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    """Fixed random token sequences; the labels are the inputs (causal LM)."""

    def __init__(self, n: int = 256, length: int = 16, seed: int = 1) -> None:
        self.ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(tmp_path: Path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def layer_norms(model: nn.Module) -> dict[str, float]:
    """Plain torch: the gradient norm of each module that owns parameters (a tied
    parameter counted once, for the first module in ``named_modules()`` order)."""
    seen: set[int] = set()
    out = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen and p.grad is not None]
        seen.update(id(p) for p in own)
        if own:
            out[name] = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in own)).item()
    return out


def total_norm(model: nn.Module) -> float:
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()


class RefTrainer(Trainer):
    """Records, in plain torch, the gradients Trainer is about to clip (pre-clip)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pre_total: list[float] = []
        self.pre_layers: list[dict[str, float]] = []

    def _clip_grad_norm(self, model):
        self.pre_total.append(total_norm(self.model))
        self.pre_layers.append(layer_norms(self.model))
        return super()._clip_grad_norm(model)


class PostClip(TrainerCallback):
    """Plain torch: the global gradient norm the optimizer receives."""

    def __init__(self) -> None:
        self.total: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.total.append(total_norm(model))


def grad_rows(trainer: Trainer) -> dict[int, dict]:
    """Trainer's training log entries that carry gradwatch's norms, by global_step."""
    return {e["step"]: e for e in trainer.state.log_history if "grad/norm_total" in e}


# ---------------------------------------------------------------------- construction


def test_class_is_a_trainer_callback_with_exportable_state() -> None:
    from transformers.trainer_callback import ExportableState

    assert gradwatch.hf.GradWatchCallback is GradWatchCallback
    assert issubclass(GradWatchCallback, TrainerCallback) and issubclass(GradWatchCallback, ExportableState)
    assert GradWatchCallback.__module__ == "gradwatch.hf" and "report_every:" in GradWatchCallback.__doc__


def test_unknown_option_and_bad_values_fail_at_construction() -> None:
    with pytest.raises(
        GradWatchError, match=r"GradWatchCallback\(\) got unknown option.*'report_evry' \(did you mean 'report_every'\?\)"
    ):
        GradWatchCallback(report_evry=10)
    with pytest.raises(GradWatchError, match="log_layers must be one of"):
        GradWatchCallback(log_layers="some")
    with pytest.raises(GradWatchError, match="options given for unknown plugin"):
        GradWatchCallback(options={"nosuch": {}})


def test_clip_conflicts_with_trainer_clipping(tmp_path: Path) -> None:
    with pytest.raises(GradWatchError, match=r"conflicts with TrainingArguments\(max_grad_norm=1.0\).*set max_grad_norm=0"):
        Trainer(model=gpt2(), args=arguments(tmp_path), train_dataset=Tokens(), callbacks=[GradWatchCallback(clip=1.0)])


def test_model_without_trainable_parameters_is_refused(tmp_path: Path) -> None:
    model = gpt2()
    model.requires_grad_(False)
    model.lm_head.bias = None
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=Tokens(), callbacks=[GradWatchCallback()])
    with pytest.raises(GradWatchError, match="GPT2LMHeadModel has no trainable parameters.*remove the GradWatchCallback"):
        trainer.train()


# ---------------------------------------------------------------------- statistics and logs


def test_pre_clip_statistics_and_logs_match_plain_torch_and_trainer(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = GradWatchCallback(report=False, stats_every=1, report_every=4)
    post = PostClip()
    args = arguments(tmp_path, max_steps=6, logging_steps=2, report_to=["tensorboard"], max_grad_norm=1.0)
    trainer = RefTrainer(model=gpt2(init=0.2), args=args, train_dataset=Tokens(), callbacks=[cb, post])
    trainer.train()
    watcher = cb.watcher
    assert watcher.step_count == trainer.state.global_step == 6 and not watcher.attached
    # Trainer really clipped: the optimizer got norm 1.0, the gradients were larger.
    assert min(trainer.pre_total) > 1.5 and post.total == pytest.approx([1.0] * 6, rel=1e-5)
    # gradwatch read the gradients before Trainer's clipping, on every step.
    assert watcher.history.steps.tolist() == list(range(6))
    assert watcher.history.total_norm.tolist() == pytest.approx(trainer.pre_total, rel=1e-5)
    names = watcher.model_info.names
    assert set(names) == set(trainer.pre_layers[0]) and "lm_head" not in names  # tied to transformer.wte
    for step, ref in enumerate(trainer.pre_layers):
        assert watcher.history.grad_norm[step].tolist() == pytest.approx([ref[n] for n in names], rel=1e-5)

    # Each log entry carries the norms of its own step: Trainer's pre-clip grad_norm.
    rows = grad_rows(trainer)
    assert sorted(rows) == [2, 4, 6]
    for step, row in rows.items():
        assert row["grad/norm_total"] == pytest.approx(row["grad_norm"], rel=1e-6)
        assert row["grad/norm_total"] == pytest.approx(trainer.pre_total[step - 1], rel=1e-5)
        assert row["grad/norm/transformer.h.0.mlp.c_fc"] == pytest.approx(
            trainer.pre_layers[step - 1]["transformer.h.0.mlp.c_fc"], rel=1e-5
        )
        assert row["grad/clips"] == 0.0
    assert all(isinstance(v, float) for row in rows.values() for k, v in row.items() if k.startswith("grad/"))
    # The loss recorded on device is the one Trainer logs (mean of the entry's two steps).
    loss = watcher.history.extras["core.loss"]
    assert loss.steps.tolist() == list(range(6))
    for step, row in rows.items():
        assert row["loss"] == pytest.approx(loss.values[step - 2 : step].mean().item(), rel=1e-5)

    # The keys reached the report_to integration: gradwatch placed itself before it.
    order = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert order.index("GradWatchCallback") < order.index("TensorBoardCallback")
    events = EventAccumulator(str(next((tmp_path / "out" / "runs").iterdir())))
    events.Reload()
    assert "train/grad/norm/transformer.wte" in events.Tags()["scalars"]
    logged = {e.step: e.value for e in events.Scalars("train/grad/norm_total")}
    assert logged == pytest.approx({s: r["grad_norm"] for s, r in rows.items()}, rel=1e-6)


def test_gradient_accumulation_is_one_row_per_optimizer_step(tmp_path: Path) -> None:
    cb = GradWatchCallback(report=False, stats_every=1, log_layers=3)
    args = arguments(tmp_path, max_steps=3, gradient_accumulation_steps=4, per_device_train_batch_size=4)
    trainer = RefTrainer(model=gpt2(init=0.2), args=args, train_dataset=Tokens(), callbacks=[cb])
    trainer.train()
    history = cb.watcher.history
    assert cb.watcher.step_count == 3 and history.steps.tolist() == [0, 1, 2]
    # The accumulated gradient of the four micro-batches, as Trainer is about to clip it.
    assert history.total_norm.tolist() == pytest.approx(trainer.pre_total, rel=1e-5)
    rows = grad_rows(trainer)
    assert sorted(rows) == [1, 2, 3]
    for step, row in rows.items():
        assert row["grad/norm_total"] == pytest.approx(row["grad_norm"], rel=1e-6)
        per_layer = {k: v for k, v in row.items() if k.startswith("grad/norm/")}
        ref = trainer.pre_layers[step - 1]
        top3 = sorted(ref, key=ref.get, reverse=True)[:3]
        assert sorted(per_layer) == sorted(f"grad/norm/{n}" for n in top3)
        # One loss per optimizer step: what Trainer logs for it.
        assert row["loss"] == pytest.approx(history.extras["core.loss"].values[step - 1].item(), rel=1e-5)


def test_logs_follow_trainer_logging_strategy(tmp_path: Path) -> None:
    """Epoch logging and logging_first_step, with stats_every=4: the norms of a logged step
    are taken for its entry even when it is not a statistics step."""
    cb = GradWatchCallback(report=False, stats_every=4)
    args = arguments(tmp_path, max_steps=-1, num_train_epochs=2, logging_strategy="epoch", logging_first_step=True)
    trainer = Trainer(model=gpt2(), args=args, train_dataset=Tokens(32), callbacks=[cb])
    trainer.train()
    rows = grad_rows(trainer)
    assert sorted(rows) == [1, 4, 8]  # 4 steps an epoch
    assert all(r["grad/norm_total"] == pytest.approx(r["grad_norm"], rel=1e-6) for r in rows.values())
    assert cb.watcher.history.steps.tolist() == [0, 4]


def test_gradwatch_clips_when_trainer_does_not(tmp_path: Path) -> None:
    cb = GradWatchCallback(report=False, stats_every=1, report_every=3, clip=0.5)
    post = PostClip()
    trainer = Trainer(
        model=gpt2(init=0.2),
        args=arguments(tmp_path, max_steps=6, max_grad_norm=0.0),
        train_dataset=Tokens(),
        callbacks=[cb, post],
    )
    trainer.train()
    rows = grad_rows(trainer)
    history = cb.watcher.history.total_norm.tolist()
    # Statistics and logs are of the gradients before gradwatch clipped them (Trainer's
    # own grad_norm, taken before on_pre_optimizer_step); the optimizer got clipped ones.
    assert [rows[s]["grad/norm_total"] for s in range(1, 7)] == pytest.approx(
        [rows[s]["grad_norm"] for s in range(1, 7)], rel=1e-6
    )
    assert history == pytest.approx([rows[s]["grad_norm"] for s in range(1, 7)], rel=1e-6)
    # PostClip runs after gradwatch, which placed itself first: it sees what the optimizer gets.
    assert post.total == pytest.approx([0.5] * 6, rel=1e-4)
    assert (
        [a.step for a in cb.watcher.actions if a.kind == "clip"]
        == [s for s, n in enumerate(history) if n > 0.5]
        == list(range(6))
    )
    # The running count changes when an interval is drained (steps 0-2 at the start of step 3).
    assert [rows[s]["grad/clips"] for s in range(1, 7)] == [0.0, 0.0, 0.0, 3.0, 3.0, 6.0]


class StepOutcome(TrainerCallback):
    """Plain torch, after optimizer.step(): whether the scaler skipped it, and the global
    norm of the (unscaled, still present) gradients."""

    def __init__(self) -> None:
        self.skipped: list[bool] = []
        self.total: list[float] = []

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.skipped.append(optimizer.step_was_skipped)
        self.total.append(total_norm(model))


def test_steps_skipped_by_the_loss_scaler_are_amp_skips(tmp_path: Path) -> None:
    cb = GradWatchCallback(report=False, stats_every=1)
    outcome = StepOutcome()
    # Not the fused AdamW (Trainer's default), whose step always runs and skips inside its kernel.
    args = arguments(tmp_path, max_steps=8, max_grad_norm=0.0, logging_steps=1, optim="adamw_torch")
    trainer = Trainer(model=gpt2(init=0.2), args=args, train_dataset=Tokens(), callbacks=[cb, outcome])
    # accelerate makes a GradScaler only for fp16 on an accelerator: hand it a real one on CPU,
    # with a loss scale so large that the first steps overflow and are skipped (each skip divides it by 2**40).
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-40, growth_interval=1000)
    trainer.train()
    watcher = cb.watcher
    skipped = [s for s, skip in enumerate(outcome.skipped) if skip]
    stepped = [s for s, skip in enumerate(outcome.skipped) if not skip]
    assert skipped and stepped, outcome.skipped
    assert watcher.step_count == 8
    # Overflow steps are AMP skips, not non-finite gradients; the others are read after
    # the scaler unscaled them, before the optimizer stepped.
    assert [a.step for a in watcher.actions if a.kind == "amp_skip"] == skipped
    assert not [d for d in cb.diagnoses if d.kind == "nonfinite"], cb.diagnoses
    assert watcher.history.steps.tolist() == stepped
    assert watcher.history.total_norm.tolist() == pytest.approx([outcome.total[s] for s in stepped], rel=1e-5)
    rows = grad_rows(trainer)
    assert sorted(rows) == [s + 1 for s in stepped]
    assert [rows[s + 1]["grad/norm_total"] for s in stepped] == pytest.approx([outcome.total[s] for s in stepped], rel=1e-5)


# ---------------------------------------------------------------------- checkpoints


def test_resume_from_checkpoint_restores_step_history_and_plugin_state(tmp_path: Path) -> None:
    def callback(flag: Flag) -> GradWatchCallback:
        return GradWatchCallback(
            report=False, report_every=3, stats_every=1, sample_every=1, plugins=[flag], clip=gradwatch.ZClip(warmup=2, z=0.5)
        )

    flag = Flag()
    full = callback(flag)
    args = dict(max_steps=8, max_grad_norm=0.0, logging_steps=4)
    Trainer(
        model=gpt2(init=0.2),
        args=arguments(tmp_path, save_strategy="steps", save_steps=4, **args),
        train_dataset=Tokens(),
        callbacks=[full],
    ).train()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["GradWatchCallback"]
    assert saved["args"]["report_every"] == 3 and "plugins" not in saved["args"]
    payload = saved["attributes"]["_gradwatch_checkpoint"]
    assert payload["global_step"] == payload["step"] == 4 and payload["unsaved"] == ["plugins", "clip"]

    flag2 = Flag()
    resumed = callback(flag2)
    trainer = Trainer(model=gpt2(init=0.2), args=arguments(tmp_path, **args), train_dataset=Tokens(), callbacks=[resumed])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    a, b = full.watcher, resumed.watcher
    assert b.step_count == trainer.state.global_step == 8
    assert b.history.steps.tolist() == list(range(8))
    # Same weights, data order and clipping state at step 4 as the uninterrupted run: the
    # same gradients after it (ZClip clips steps 4-7 from its EMA; restarting its warm-up
    # would not clip them).
    clipped = [x.step for x in a.actions if x.kind == "clip"]
    assert any(s >= 4 for s in clipped) and [x.step for x in b.actions if x.kind == "clip"] == clipped
    assert b.history.total_norm.tolist() == pytest.approx(a.history.total_norm.tolist(), rel=1e-5)
    ema_a, ema_b = (w.state_dict()["plugins"]["clipping"] for w in (a, b))
    assert ema_b["steps"] == ema_a["steps"] == 8
    for key, value in ema_a["tensors"].items():
        assert torch.allclose(ema_b["tensors"][key], value, rtol=1e-5, equal_nan=True), key
    # Diagnoses and the plugin's own state came back too: intervals 0-2 and 3 (drained at
    # the save), then 4-5 (report_every=3) and 6-7.
    assert [d.step for d in b.diagnoses if d.kind == "flagged"] == [0, 3, 4, 6]
    assert flag2.intervals == 4

    # A fresh train() on the same trainer starts over, as Trainer does.
    trainer.train()
    assert resumed.watcher.history.steps.tolist() == list(range(8)) and resumed.watcher is not b

    # restore_callback_states_from_checkpoint=True: Trainer replaces the callback with one
    # rebuilt from the JSON-able arguments; it restores the state and says what it lacks.
    mine = callback(Flag())
    trainer = Trainer(
        model=gpt2(init=0.2),
        args=arguments(tmp_path, restore_callback_states_from_checkpoint=True, **args),
        train_dataset=Tokens(),
        callbacks=[mine],
    )
    with pytest.warns(GradWatchWarning, match="lacks plugins, clip.*restore_callback_states_from_checkpoint"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    rebuilt = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GradWatchCallback))
    assert rebuilt is not mine and mine.watcher is None
    assert rebuilt.config.report_every == 3 and rebuilt.config.clip is None
    assert rebuilt.watcher.history.steps.tolist() == list(range(8))
    assert rebuilt.watcher.history.total_norm[:4].tolist() == pytest.approx(a.history.total_norm[:4].tolist(), rel=1e-6)


def test_pickled_callback_is_the_configured_callback(tmp_path: Path) -> None:
    cb = GradWatchCallback(report=False, report_every=7, stats_every=1)
    Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=2), train_dataset=Tokens(), callbacks=[cb]).train()
    clone = pickle.loads(pickle.dumps(cb))
    assert type(clone) is GradWatchCallback and clone.config == cb.config and clone.watcher is None
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=2), train_dataset=Tokens(), callbacks=[clone])
    trainer.train()
    assert clone.watcher.history.total_norm.tolist() == pytest.approx(cb.watcher.history.total_norm.tolist(), rel=1e-6)


# ---------------------------------------------------------------------- diagnoses, defaults


def test_diverging_run_is_diagnosed_with_remedies_and_logged(tmp_path: Path, capsys) -> None:
    """Defaults (report_every=100): a 40-step run has only its last, partial interval, and
    its diagnoses reach Trainer's last log entries."""
    cb = GradWatchCallback()
    args = arguments(tmp_path, max_steps=40, logging_steps=10, optim="sgd", learning_rate=1000.0, lr_scheduler_type="constant")
    trainer = Trainer(model=gpt2(), args=args, train_dataset=Tokens(512), callbacks=[cb])
    trainer.train()
    kinds = {d.kind for d in cb.diagnoses}
    assert kinds & {"exploding", "nonfinite"}, cb.diagnoses
    for d in cb.diagnoses:
        # Updates that dwarf the weights get a lower rate; the norms' growth and NaN get clipping too.
        expected = {"lower_lr"} if d.kind == "update_scale" else {"clipping", "lower_lr"}
        assert d.severity is Severity.ERROR and expected <= {r.kind for r in d.remedies}
    last_train, summary = trainer.state.log_history[-2:]
    assert last_train["step"] == 40 and "train_runtime" in summary
    for kind in kinds:
        assert last_train[f"grad/diagnoses/{kind}"] == summary[f"grad/diagnoses/{kind}"] >= 1.0
    out = capsys.readouterr().out
    assert out.count("gradient flow") == 1 and "(final)" in out and "exploding" in out


def test_healthy_run_raises_no_warning_and_reports_above_the_bar(tmp_path: Path, capsys) -> None:
    cb = GradWatchCallback()
    args = arguments(tmp_path, max_steps=40, logging_steps=10, disable_tqdm=False)
    model = gpt2()
    before = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(512), callbacks=[cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    # No hook is left behind on the model.
    assert {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()} == before
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    assert not [w for w in caught if issubclass(w.category, GradWatchWarning)], [str(w.message) for w in caught]
    assert not [d for d in cb.diagnoses if d.severity >= Severity.WARNING], cb.diagnoses
    assert sorted(grad_rows(trainer)) == [10, 20, 30, 40]
    captured = capsys.readouterr()
    # tqdm draws its bar on stderr; the report went through tqdm.write, in whole lines.
    assert "40/40" in captured.err and "40/40" not in captured.out
    lines = captured.out.splitlines()
    assert sum("gradient flow" in line for line in lines) == 1
    assert "no gradient problems found" in captured.out
    assert all(line.startswith("gradwatch") for line in lines if "gradient flow" in line)


# ---------------------------------------------------------------------- two processes


DDP_SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import torch
    import transformers
    from transformers import TrainingArguments

    sys.path.insert(0, sys.argv[2])
    from test_hf import RefTrainer, Tokens, gpt2, grad_rows  # the test module's own helpers

    from gradwatch.hf import GradWatchCallback

    transformers.logging.set_verbosity_error()
    out = Path(sys.argv[1])
    cb = GradWatchCallback(report_every=2, stats_every=1, log=str(out / "run.jsonl"), options={"console": {"every_interval": True}})
    args = TrainingArguments(
        output_dir=str(out / "out"), max_steps=4, per_device_train_batch_size=4, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, ddp_backend="gloo", dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = RefTrainer(model=gpt2(init=0.2), args=args, train_dataset=Tokens(64), callbacks=[cb])
    trainer.train()
    rank = trainer.args.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "ref": trainer.pre_total,
        "history": cb.watcher.history.total_norm.tolist(),
        "layers": cb.watcher.history.grad_norm.tolist(),
        "steps": cb.watcher.history.steps.tolist(),
        "rank_seen": cb.watcher.rank,
        "logged": {str(s): r["grad/norm_total"] for s, r in grad_rows(trainer).items()},
        "grad_norm": {str(e["step"]): e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e},
    }))
    """
)


@pytest.mark.slow
def test_two_processes_launched_with_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path),
            str(Path(__file__).parent),
        ],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, seen in enumerate(ranks):
        assert seen["world_size"] == 2 and seen["rank_seen"] == r and seen["wrapped"] == "DistributedDataParallel"
        assert seen["steps"] == [0, 1, 2, 3]
        # Pre-clip and after DDP's all-reduce: what Trainer itself is about to clip.
        assert seen["history"] == pytest.approx(seen["ref"], rel=1e-5)
    # The same statistics on both ranks (all-reduced gradients), per layer too.
    assert ranks[0]["history"] == pytest.approx(ranks[1]["history"], rel=1e-6)
    assert torch.allclose(torch.tensor(ranks[0]["layers"]), torch.tensor(ranks[1]["layers"]), rtol=1e-6)
    # One report: intervals 0-1 and 2-3 and the final summary, printed by rank zero only.
    assert run.stdout.count("gradient flow") == 3, run.stdout
    assert run.stdout.count("(final)") == 1
    # One log: the main process adds the keys to Trainer's logs and writes the run log.
    assert ranks[1]["logged"] == {}
    assert ranks[0]["logged"] == pytest.approx(ranks[0]["grad_norm"], rel=1e-6)
    lines = (tmp_path / "run.jsonl").read_text().splitlines()
    assert sum(json.loads(line).get("type") == "header" for line in lines) == 1


# ---------------------------------------------------------------------- Accelerate custom loops under watch()


def _accelerate_run(*, accelerate_clip: bool, **options):
    """Two micro-batches per optimizer step, four steps, under ``gradwatch.watch()``."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 8, generator=g), 5 * torch.randn(16, 1, generator=g)) for _ in range(8)]
    model, optimizer = accelerator.prepare(model, optimizer)
    seen = []
    with gradwatch.watch(model, optimizer, report=False, stats_every=1, **options) as gw:
        for x, y in data:
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients and accelerate_clip:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                if accelerator.sync_gradients:
                    seen.append(total_norm(model))
                optimizer.step()
                optimizer.zero_grad()
    return gw, seen, model, data


def test_accelerate_loop_with_accumulate_and_clip_grad_norm() -> None:
    gw, seen, model, data = _accelerate_run(accelerate_clip=True)
    # accelerator.accumulate: one optimizer step per two micro-batches.
    assert gw.step_count == 4 and gw.history.steps.tolist() == [0, 1, 2, 3]
    # watch() reads the gradients the optimizer steps with: after accelerator.clip_grad_norm_.
    assert gw.history.total_norm.tolist() == pytest.approx(seen, rel=1e-5)
    # Plain torch, first step: the two micro-batches' losses, each divided by 2, clipped at 1.
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    for x, y in data[:2]:
        (nn.functional.mse_loss(ref(x), y) / 2).backward()
    pre = total_norm(ref)
    assert pre > 1.0 and gw.history.total_norm[0].item() == pytest.approx(1.0, rel=1e-5)

    # clip= instead of accelerator.clip_grad_norm_: the statistics are pre-clip, and the
    # training is the same to the bit (both are torch's clip_grad_norm_).
    gw2, _, model2, _ = _accelerate_run(accelerate_clip=False, clip=1.0)
    assert gw2.history.total_norm[0].item() == pytest.approx(pre, rel=1e-5)
    assert [a.step for a in gw2.actions if a.kind == "clip"] == [0, 1, 2, 3]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
