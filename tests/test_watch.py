"""The watcher: attaching to wrapped models, step boundaries, AMP skips, hooks that never leak."""

from __future__ import annotations

import copy
import gc
import io
import os
import pickle
import tempfile
import warnings
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradwatch
from gradwatch.testing import TinyModel, relu_mlp


def _fit(
    model: nn.Module, opt: torch.optim.Optimizer | None, steps: int, gw: gradwatch.Watcher | None = None, d_in: int = 8
) -> None:
    for _ in range(steps):
        model(torch.randn(4, d_in)).float().pow(2).mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        else:
            assert gw is not None
            gw.step()
            model.zero_grad()


def count_hooks(model: nn.Module, optimizers: tuple[torch.optim.Optimizer, ...] = ()) -> dict[str, int]:
    """Every kind of hook a module tree, its parameters and optimizers can hold."""
    from torch.nn.modules import module as module_mod

    counts = {"module": 0, "tensor": 0, "optimizer": 0, "global": 0}
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"):  # fmt: skip
            counts["module"] += len(getattr(m, attr, {}) or {})
    for p in model.parameters():
        counts["tensor"] += len(p._backward_hooks or {}) + len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    for o in optimizers:
        counts["optimizer"] += len(o._optimizer_step_pre_hooks) + len(o._optimizer_step_post_hooks)
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"):
        counts["global"] += len(getattr(module_mod, attr))
    return counts


def test_layer_names_and_forward_order() -> None:
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, stats_every=1, report=False) as gw:
        assert not gw.model_info.order_known
        _fit(model, opt, 3)
    assert gw.model_info.order_known
    assert gw.model_info.names == ("linear1", "linear2")
    assert [layer.numel for layer in gw.model_info.layers] == [8 * 16 + 16, 16 * 2 + 2]
    assert gw.history.steps.tolist() == [0, 1, 2]


def test_explicit_step_without_optimizer_measures_manual_updates() -> None:
    model = TinyModel()
    with gradwatch.watch(model, stats_every=1, sample_every=1, report=False) as gw:
        for _ in range(3):
            model(torch.randn(4, 8)).sum().backward()
            gw.step()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            model.zero_grad()
    assert gw.history.steps.tolist() == [0, 1, 2]
    assert (gw.history.update_ratio.values > 0).all()


def test_several_optimizers_count_one_step_per_iteration() -> None:
    model = TinyModel()
    opt1 = torch.optim.SGD(model.linear1.parameters(), lr=0.1)
    opt2 = torch.optim.Adam(model.linear2.parameters(), lr=0.01)
    with gradwatch.watch(model, [opt1, opt2], stats_every=1, sample_every=1, report=False) as gw:
        for _ in range(5):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt1.step()
            opt2.step()
            opt1.zero_grad()
            opt2.zero_grad()
    assert gw.history.steps.tolist() == [0, 1, 2, 3, 4]
    assert (gw.history.update_ratio.values > 0).all()  # both optimizers' updates measured


@pytest.mark.parametrize("wrap", ["dataparallel", "compile", "ddp"])
def test_wrapped_models_report_unprefixed_names(wrap: str) -> None:
    torch.manual_seed(0)
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store_dir = None
    if wrap == "dataparallel":
        wrapped: nn.Module = nn.DataParallel(model)
    elif wrap == "compile":
        wrapped = torch.compile(model, backend="eager")
    else:
        store_dir = tempfile.mkdtemp()
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(store_dir, "store"), 1), rank=0, world_size=1)
        wrapped = nn.parallel.DistributedDataParallel(model)
    try:
        before = count_hooks(model, (opt,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gradwatch.GradWatchWarning)  # compile: probes off
            with gradwatch.watch(wrapped, opt, stats_every=1, report=False) as gw:
                _fit(wrapped, opt, 4)
        assert gw.model_info.names == ("linear1", "linear2")
        assert gw.model_info.compiled == (wrap == "compile")
        assert gw.history.steps.tolist() == [0, 1, 2, 3]
        assert torch.isfinite(gw.history.grad_norm).all() and (gw.history.grad_norm > 0).all()
        assert count_hooks(model, (opt,)) == before
    finally:
        if store_dir is not None:
            dist.destroy_process_group()


def test_gradient_accumulation_is_one_step() -> None:
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, stats_every=1, report=False) as gw:
        for i in range(3):
            for _ in range(4):
                model(torch.randn(4, 8)).sum().backward()
                assert gw.step_count == i  # micro-batches do not advance the step
            expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
            opt.step()
            opt.zero_grad()
    assert gw.history.steps.tolist() == [0, 1, 2]
    torch.testing.assert_close(gw.history.total_norm[-1], expected)
    assert gw.history.amp_skips == []


def test_amp_skipped_steps_are_counted_apart_from_nonfinite() -> None:
    """GradScaler skips optimizer.step() when the scaled gradients overflow: the watcher
    still counts the step, as an AMP skip, with no statistics row and no non-finite error."""
    torch.manual_seed(0)
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # overflows for the first steps
    skipped = []
    with gradwatch.watch(model, opt, stats_every=1, report=False, scaler=scaler) as gw:
        for step in range(8):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(torch.randn(16, 8)).float().pow(2).mean() * 100
            scaler.scale(loss).backward()
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() < scale:
                skipped.append(step)
            opt.zero_grad()
    assert skipped, "the test needs at least one skipped step"
    assert gw.history.amp_skips == skipped
    assert gw.history.steps.tolist() == [s for s in range(8) if s not in skipped]
    assert gw.history.nonfinite.sum() == 0
    assert [a.step for a in gw.actions if a.kind == "amp_skip"] == skipped
    assert not [d for d in gw.diagnoses if d.kind == "nonfinite"]


def test_detach_removes_every_hook_and_model_is_unchanged() -> None:
    model = relu_mlp(depth=4, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = count_hooks(model, (opt,))
    reference = copy.deepcopy(model)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with gradwatch.watch(model, opt, stats_every=1, sample_every=1, report=False) as gw:
        assert count_hooks(model, (opt,)) != before
        x = torch.randn(4, 16)
        model(x).sum().backward()  # no optimizer step: the model stays as it was
        opt.zero_grad()
        # Mid-step (probes installed), the model still deep-copies and pickles.
        copy.deepcopy(model)
    assert count_hooks(model, (opt,)) == before
    assert model.state_dict().keys() == state_before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k])
    assert pickle.loads(pickle.dumps(model)).state_dict().keys() == reference.state_dict().keys()
    assert not any(k for k in vars(model) if "gradwatch" in k.lower())
    gw_ref = weakref.ref(gw)
    del gw
    gc.collect()
    assert gw_ref() is None, "the watcher must be collectable after detach"


def test_detach_on_exception_and_idempotent() -> None:
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = count_hooks(model, (opt,))
    with pytest.raises(RuntimeError, match="user error"):
        with gradwatch.watch(model, opt, report=False) as gw:
            _fit(model, opt, 2)
            raise RuntimeError("user error")
    assert count_hooks(model, (opt,)) == before
    assert not gw.attached
    gw.detach()  # idempotent
    assert gw.history.steps.tolist() == [0, 1]  # the dense start reads every step; drained at exit


def test_reattach_after_detach_and_refuse_double_attach() -> None:
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = gradwatch.watch(model, opt, report=False)
    with pytest.raises(gradwatch.GradWatchError, match="already attached"):
        gw.attach()
    with pytest.raises(gradwatch.GradWatchError, match="another gradwatch watcher is already attached"):
        gradwatch.watch(model, opt, report=False)
    # A different optimizer on the same model is fine (e.g. per-optimizer watchers).
    other = gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), report=False)
    other.detach()
    gw.detach()
    again = gradwatch.watch(model, opt, report=False)
    again.detach()


def test_two_watchers_do_not_share_state() -> None:
    """A GAN's generator and discriminator, each with its own watcher."""
    gen, disc = TinyModel(8, 16, 8), TinyModel(8, 16, 1)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.01)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.01)
    with (
        gradwatch.watch(gen, opt_g, stats_every=1, report=False) as gw_g,
        gradwatch.watch(disc, opt_d, stats_every=1, report=False) as gw_d,
    ):
        for _ in range(3):
            disc(gen(torch.randn(4, 8)).detach()).mean().backward()
            opt_d.step()
            opt_d.zero_grad()
            disc(gen(torch.randn(4, 8))).mean().neg().backward()
            opt_g.step()
            opt_g.zero_grad()
            opt_d.zero_grad()
    assert gw_g.pm is not gw_d.pm and gw_g.stash is not gw_d.stash
    assert gw_g.history.steps.tolist() == gw_d.history.steps.tolist() == [0, 1, 2]


def test_state_dict_round_trip_continues_at_saved_step() -> None:
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, stats_every=1, report=False) as gw:
        _fit(model, opt, 5)
        state = gw.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    with gradwatch.watch(model, opt, stats_every=1, report=False) as gw2:
        gw2.load_state_dict(restored)
        _fit(model, opt, 3)
    assert gw2.history.steps.tolist() == list(range(8))
    torch.testing.assert_close(gw2.history.grad_norm[:5], gw.history.grad_norm)


def test_final_report_prints_flow_table(console) -> None:
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, stats_every=1, console=console) as gw:
        _fit(model, opt, 3)
    out = console.file.getvalue()
    assert "gradient flow" in out and "linear1" in out and "linear2" in out
    norm = gw.history.grad_norm[:, 0].mean().item()
    assert f"{norm:.3g}" in out
