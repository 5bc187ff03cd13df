"""The clipping plugin against plain torch and against the papers' formulas, written here."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch import AGC, AutoClip, ClipNorm, GradWatchError, GradWatchWarning, ZClip
from gradwatch.testing import high_lr_mlp, nan_model, regression_batches, relu_mlp, residual_convnet, transformer_encoder

RECORD = "clipping.step"


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _watch(model, optimizer=None, **kwargs):
    kwargs.setdefault("report", False)
    return gradwatch.watch(model, optimizer, strict=True, autoload=False, **kwargs)


# ---------------------------------------------------------------------- configure


@pytest.mark.parametrize(
    ("clip", "on_nonfinite", "match"),
    [
        (-1, None, "positive finite"),
        (0.0, None, "positive finite"),
        (math.inf, None, "positive finite"),
        ("zclips", None, "unknown clip mode 'zclips'"),
        (True, None, "clip takes None"),
        ([1.0], None, "clip takes None"),
        (None, "ignore", "on_nonfinite must be"),
    ],
)
def test_hook_configure_bad_values_fail_at_construction(tiny_model, clip, on_nonfinite, match):
    with pytest.raises(GradWatchError, match=match):
        _watch(tiny_model, clip=clip, on_nonfinite=on_nonfinite)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: AutoClip(percentile=0), r"percentile must be in \(0, 100\]"),
        (lambda: AutoClip(percentile=100.5), r"percentile must be in \(0, 100\]"),
        (lambda: AutoClip(history=0), "history"),
        (lambda: ZClip(alpha=1.0), "alpha"),
        (lambda: ZClip(warmup=0), "warmup"),
        (lambda: AGC(clipping=-0.1), "clipping"),
        (lambda: AGC(exclude="head"), "tuple of layer names"),
    ],
)
def test_clip_configs_validate(make, match):
    with pytest.raises(GradWatchError, match=match):
        make()


def test_hook_configure_unknown_agc_layer_and_options(tiny_model):
    with pytest.raises(GradWatchError, match="unknown layer"):
        _watch(tiny_model, clip=AGC(exclude=("nope",)))
    with pytest.raises(GradWatchError, match="takes no options"):
        _watch(tiny_model, clip=1.0, options={"clipping": {"max_norm": 1}})


def test_hook_act_noop_without_clip():
    model = relu_mlp(depth=3, width=16)
    ref = copy.deepcopy(model)
    x, y = next(regression_batches())
    with _watch(model) as gw:
        nn.functional.mse_loss(model(x), y).backward()
        nn.functional.mse_loss(ref(x), y).backward()
        gw.step()
        assert all(torch.equal(a, b) for a, b in zip(_grads(model), _grads(ref)))
    assert RECORD not in gw.history.extras


# ---------------------------------------------------------------------- fixed norm


def _models():
    return {
        "mlp": (relu_mlp(depth=6, width=32), lambda g: next(regression_batches(seed=g))),
        "convnet": (residual_convnet(), lambda g: (torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(g)), None)),
        "transformer": (
            transformer_encoder(),
            lambda g: (torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(g)), None),
        ),
    }


def _loss(out, y):
    return nn.functional.mse_loss(out, y) if y is not None else out.square().mean()


@pytest.mark.parametrize("name", ["mlp", "convnet", "transformer"])
def test_fixed_equals_clip_grad_norm_float32_bitwise(name):
    model, data = _models()[name]
    ref = copy.deepcopy(model)
    probe = copy.deepcopy(model)
    _loss(probe(data(0)[0]), data(0)[1]).backward()
    max_norm = 0.8 * float(torch.nn.utils.get_total_norm([p.grad for p in probe.parameters()]))
    norms = []
    with _watch(model, clip=max_norm) as gw:
        for step in range(6):
            x, y = data(step)
            for m in (model, ref):
                m.zero_grad()
                _loss(m(x), y).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm))
            gw.step()
            assert all(torch.equal(a, b) for a, b in zip(_grads(model), _grads(ref))), f"step {step}"
            with torch.no_grad():  # same update on both, so the norms change over steps
                for m in (model, ref):
                    for p in m.parameters():
                        p.sub_(0.5 * p.grad)
    rows = gw.history.extras[RECORD].values
    torch.testing.assert_close(rows[:, 0], torch.stack(norms), rtol=0, atol=0)
    assert (rows[:, 2] < 1).any()  # the comparison covered clipped steps


def test_fixed_bfloat16_within_dtype_tolerance():
    model = relu_mlp(depth=6, width=32).to(torch.bfloat16)
    ref = copy.deepcopy(model)
    for step in range(4):
        x, y = next(regression_batches(seed=step))
        for m in (model, ref):
            m.zero_grad()
            nn.functional.mse_loss(m(x.bfloat16()).float(), y).backward()
        raw = _grads(model)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)  # bf16 norms, bf16 coefficient
        with _watch(model, clip=0.05) as gw:
            gw.step()
        ours = _grads(model)
        # Plain torch with float32 statistics (what gradwatch promises): identical.
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in raw]))
        coef = torch.clamp(0.05 / (total + 1e-6), max=1.0)
        assert coef < 1
        assert all(torch.equal(o, g * coef) for o, g in zip(ours, raw))
        # clip_grad_norm_ itself computes the norm in bf16: equal within 2 bf16 ulps (2 * 2**-7 relative).
        for o, r in zip(ours, _grads(ref)):
            torch.testing.assert_close(o.float(), r.float(), rtol=2 * 2**-7, atol=1e-6)


# ---------------------------------------------------------------------- AutoClip and ZClip vs the papers


def _spiky_norms(n: int = 60) -> list[float]:
    g = torch.Generator().manual_seed(3)
    norms = (1.0 + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)).abs().tolist()
    for step, factor in ((8, 40.0), (30, 12.0), (31, 25.0), (45, 80.0), (52, 3.0)):
        norms[step] *= factor
    return norms


def _replay(clip, norms: list[float]) -> tuple[list[float], list[float]]:
    """Give gradients of the recorded norms to a watched model; return norms after clipping and thresholds."""
    model = nn.Linear(4, 3)
    g = torch.Generator().manual_seed(0)
    dirs = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    total = math.sqrt(sum(float(d.square().sum()) for d in dirs))
    after = []
    with _watch(model, clip=clip) as gw:
        for n in norms:
            for p, d in zip(model.parameters(), dirs):
                p.grad = d * (n / total)
            gw.step()
            after.append(math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters())))
    rows = gw.history.extras[RECORD].values
    torch.testing.assert_close(rows[:, 0].double(), torch.tensor(norms, dtype=torch.float64), rtol=1e-6, atol=0)
    return after, rows[:, 1].tolist()


@pytest.mark.parametrize("history", [None, 8])
def test_autoclip_equals_paper_reference(history):
    norms = _spiky_norms()
    # Seetharaman et al. 2020, Algorithm 1: append the norm, clip to the p-th percentile of the history.
    seen, expected, thresholds = [], [], []
    for n in norms:
        seen.append(n)
        window = seen if history is None else seen[-history:]
        eta = float(np.percentile(window, 10))
        thresholds.append(eta)
        expected.append(n * min(eta / (n + 1e-6), 1.0))
    after, recorded = _replay(AutoClip(percentile=10, history=history), norms)
    np.testing.assert_allclose(recorded, thresholds, rtol=1e-5)
    np.testing.assert_allclose(after, expected, rtol=1e-5)
    assert sum(a < n * 0.999 for a, n in zip(after, norms)) > 10


def test_zclip_equals_paper_reference():
    norms = _spiky_norms()
    alpha, zt, warmup, eps = 0.97, 2.5, 25, 1e-6
    # Kumar et al. 2025 (and the authors' zclip package): warm-up mean/variance, then z-score
    # detection, reciprocal clipping mu + zt * sigma / (z / zt), EMA updated with the clipped norm.
    expected, clipped_steps = [], []
    buf: list[float] = []
    mu = var = 0.0
    for step, n in enumerate(norms):
        if step < warmup:
            buf.append(n)
            if len(buf) == warmup:
                mu = sum(buf) / warmup
                var = sum((b - mu) ** 2 for b in buf) / warmup
            expected.append(n)
            continue
        sigma = math.sqrt(var)
        z = (n - mu) / (sigma + eps)
        g = n
        if z > zt:
            g = mu + zt * sigma / (z / zt)
            clipped_steps.append(step)
        expected.append(n * (g / (n + 1e-6)) if g < n else n)
        mu = alpha * mu + (1 - alpha) * g
        var = alpha * var + (1 - alpha) * (g - mu) ** 2
    after, _ = _replay(ZClip(warmup_max_norm=None), norms)  # the paper's warm-up clips nothing
    np.testing.assert_allclose(after, expected, rtol=1e-5)
    # Step 8 is in warm-up; its spike widens the warm-up variance, so the x12 step 30 passes.
    assert 8 not in clipped_steps and 30 not in clipped_steps and {31, 45} <= set(clipped_steps)


def test_zclip_agrees_with_the_authors_package():
    zclip_pkg = pytest.importorskip("zclip")
    norms = _spiky_norms()
    model = nn.Linear(4, 3)
    g = torch.Generator().manual_seed(0)
    dirs = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    total = math.sqrt(sum(float(d.square().sum()) for d in dirs))
    theirs = zclip_pkg.ZClip(max_grad_norm=None)
    expected = []
    for n in norms:
        for p, d in zip(model.parameters(), dirs):
            p.grad = d * (n / total)
        theirs.step(model)
        expected.append(math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters())))
    after, _ = _replay(ZClip(warmup_max_norm=None), norms)
    np.testing.assert_allclose(after, expected, rtol=1e-5)


@pytest.mark.parametrize(("ours", "package_max"), [(ZClip(max_norm=1.0), 1.0), (ZClip(), "warm-up")])
def test_zclip_defaults_clip_warmup_like_the_authors_package(ours, package_max):
    """The package's default max_grad_norm=1.0 clips during warm-up (and after it); ZClip()
    clips warm-up at warmup_max_norm=1.0 the same way, then follows the paper."""
    zclip_pkg = pytest.importorskip("zclip")
    norms = _spiky_norms()
    model = nn.Linear(4, 3)
    g = torch.Generator().manual_seed(0)
    dirs = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    total = math.sqrt(sum(float(d.square().sum()) for d in dirs))
    theirs = zclip_pkg.ZClip(max_grad_norm=1.0) if package_max == 1.0 else None
    paper = zclip_pkg.ZClip(max_grad_norm=None)
    expected = []
    for step, n in enumerate(norms):
        for p, d in zip(model.parameters(), dirs):
            p.grad = d * (n / total)
        if theirs is not None:
            theirs.step(model)
        elif step < 25:  # warm-up: the package's fixed cap; its statistics see the norm before clipping
            paper.step(model)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            paper.step(model)
        expected.append(math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters())))
    after, thresholds = _replay(ours, norms)
    np.testing.assert_allclose(after, expected, rtol=1e-5)
    assert max(after[:25]) <= 1.0 + 1e-5 and thresholds[:25] == [1.0] * 25
    if package_max == "warm-up":
        assert max(after[25:]) > 1.0  # after warm-up, only the z-score clips (the paper's method)


def _spiky_batches(every: int = 20, scale: float = 100.0):
    # Corrupt batches (inputs and targets x100) after ZClip's 25-step warm-up: without
    # clipping, one such step is far too large for SGD and the run diverges.
    for i, (x, y) in enumerate(regression_batches()):
        yield (x * scale, y * scale) if i % every == every - 1 and i > 30 else (x, y)


@pytest.mark.parametrize("clip", [None, "zclip", "autoclip"])
def test_diverging_run_stays_finite_with_adaptive_clipping(clip):
    model = high_lr_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = _spiky_batches()
    losses = []
    with _watch(model, opt, clip=clip) as gw:
        for _ in range(100):
            x, y = next(batches)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
    losses = torch.stack(losses)
    finite = bool(torch.isfinite(losses).all() and all(torch.isfinite(p).all() for p in model.parameters()))
    if clip is None:
        assert not finite
        return
    assert finite
    clean = losses[torch.arange(100) % 20 != 19]
    assert clean[-10:].mean() < 0.2 * clean[:3].mean()
    clips = [a.step for a in gw.actions if a.kind == "clip"]
    assert {39, 59, 79, 99} <= set(clips)


# ---------------------------------------------------------------------- AGC


def _agc_reference(model: nn.Module, skip: set[str], lam: float = 0.01, eps: float = 1e-3) -> None:
    for name, module in model.named_modules():
        if name in skip:
            continue
        for p in module.parameters(recurse=False):
            if p.grad is None:
                continue
            dims = tuple(range(1, p.dim())) if p.dim() > 1 else None
            w = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True).clamp_min(eps)
            g = torch.linalg.vector_norm(p.grad, dim=dims, keepdim=True)
            max_norm = lam * w
            p.grad.copy_(torch.where(g > max_norm, p.grad * (max_norm / g.clamp_min(1e-6)), p.grad))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_agc_equals_unitwise_reference_and_skips_the_head(memory_format):
    model = residual_convnet().to(memory_format=memory_format)  # channels_last: non-contiguous rows
    ref = copy.deepcopy(model)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(memory_format=memory_format)
    with _watch(model, clip=AGC(exclude_max_norm=None)) as gw:  # the paper's AGC: the head unclipped
        for m in (model, ref):
            m(x).square().mean().backward()
        head = gw.model_info.layers[-1].name
        assert head == "9"  # the final Linear, last in forward order
        raw_head = model.get_submodule(head).weight.grad.clone()
        _agc_reference(ref, {head})
        gw.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8, msg=name)
    assert torch.equal(model.get_submodule(head).weight.grad, raw_head)
    clipped, units = gw.history.extras["clipping.agc"].values[0].tolist()
    assert 0 < clipped <= units
    assert [a.kind for a in gw.actions] == ["clip"]


@pytest.mark.parametrize("cap", [1.0, 0.01])
def test_agc_clips_the_excluded_head_by_its_own_norm(cap):
    model = residual_convnet()
    ref = copy.deepcopy(model)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with _watch(model, clip=AGC(exclude_max_norm=cap)) as gw:
        for m in (model, ref):
            (10 * m(x)).square().mean().backward()
        head = ref.get_submodule("9")
        # Reference: unit-wise AGC on every other layer; the head's weight and bias together by
        # clip_grad_norm_ at the cap.
        _agc_reference(ref, {"9"})
        torch.nn.utils.clip_grad_norm_(head.parameters(), cap)
        gw.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8, msg=name)
    head_norm = math.sqrt(sum(float(p.grad.square().sum()) for p in model.get_submodule("9").parameters()))
    assert head_norm <= cap * (1 + 1e-5)


def _tanh_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for d in (16, 32, 32, 32):
        layers += [nn.Linear(d, 32), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(32, 1))


@pytest.mark.parametrize("clip", [None, "zclip", "autoclip", "agc", 1.0])
def test_tanh_mlp_at_lr_10_stays_finite_under_every_adaptive_mode(clip):
    """Issue 12: SGD at lr 10 on a 4-layer tanh MLP reached NaN at step 7 under "zclip" (no
    clipping during its warm-up) and at step 15 under "agc" (the unclipped head)."""
    model = _tanh_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    g = torch.Generator().manual_seed(1)
    losses = []
    with _watch(model, opt, clip=clip):
        for _ in range(60):
            x, y = torch.randn(32, 16, generator=g), torch.randn(32, 1, generator=g)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
    finite = bool(torch.isfinite(torch.stack(losses)).all())
    assert finite == (clip is not None)


# ---------------------------------------------------------------------- AMP and accumulation


def _amp_run(dtype: torch.dtype, ours: bool, steps: int = 8):
    model = relu_mlp(depth=4, width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    batches = regression_batches()
    gw = _watch(model, opt, clip=0.5, scaler=scaler) if ours else None
    for step in range(steps):
        x, y = next(batches)
        if step == 2:
            x = x.clone()
            x[0, 0] = math.inf  # non-finite gradients: GradScaler skips this optimizer step
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if not ours:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    if gw is not None:
        gw.detach()
    return model, gw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_clips_after_unscale_like_the_torch_recipe(dtype):
    ours, gw = _amp_run(dtype, ours=True)
    ref, _ = _amp_run(dtype, ours=False)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    recorded = gw.history.extras[RECORD]
    skipped = set(gw.history.amp_skips)
    # The skipped step is counted as a step, and act never ran on it (the optimizer never stepped).
    assert 2 in skipped and not skipped & set(recorded.steps.tolist()) and recorded.steps.numel() == 8 - len(skipped)
    assert torch.isfinite(recorded.values[:, 0]).all() and (recorded.values[:, 2] < 1).any()


def test_accumulation_acts_once_per_optimizer_step():
    def run(ours: bool):
        model = relu_mlp(depth=4, width=32)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        batches = regression_batches(batch=16)
        gw = _watch(model, opt, clip=0.3, stats_every=1) if ours else None
        for _ in range(5):
            for _ in range(4):  # four micro-batches per optimizer step
                x, y = next(batches)
                (nn.functional.mse_loss(model(x), y) / 4).backward()
            if not ours:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
            opt.step()
            opt.zero_grad()
        if gw is not None:
            gw.detach()
        return model, gw

    ours, gw = run(True)
    ref, _ = run(False)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    assert gw.history.extras[RECORD].steps.tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------- non-finite policy


def _nan_run(policy: str, momentum: float = 0.0):
    model = nan_model(at=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum)
    batches = regression_batches()
    snapshots = []
    gw = _watch(model, opt, on_nonfinite=policy, report_every=10)
    try:
        for _ in range(6):
            snapshots.append([p.detach().clone() for p in model.parameters()])
            x, y = next(batches)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    finally:
        gw.detach()
    snapshots.append([p.detach().clone() for p in model.parameters()])
    return model, gw, snapshots


def test_on_nonfinite_skip_leaves_parameters_and_momentum_alone():
    model, gw, snaps = _nan_run("skip", momentum=0.9)
    assert all(torch.equal(a, b) for a, b in zip(snaps[3], snaps[4]))  # step 3 not applied
    assert not all(torch.equal(a, b) for a, b in zip(snaps[4], snaps[5]))  # training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [(a.kind, a.step) for a in gw.actions if a.source == "clipping"] == [("skip", 3)]


def test_on_nonfinite_zero_steps_with_zero_gradients():
    model, gw, snaps = _nan_run("zero", momentum=0.9)
    # Zero gradients, but the optimizer steps: momentum still moves the parameters.
    assert not all(torch.equal(a, b) for a, b in zip(snaps[3], snaps[4]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [(a.kind, a.step) for a in gw.actions if a.source == "clipping"] == [("zero", 3)]


def test_on_nonfinite_warn_warns_at_the_report_and_applies_the_update():
    with pytest.warns(GradWatchWarning, match=r"non-finite gradients at step\(s\) \[3, 4, 5\]"):
        model, _, _ = _nan_run("warn")
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_on_nonfinite_raise_stops_before_the_update():
    model = nan_model(at=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = regression_batches()
    with pytest.raises(GradWatchError, match=r"non-finite gradients at step 3 in .*'raise'"):
        with _watch(model, opt, on_nonfinite="raise"):
            for _ in range(6):
                x, y = next(batches)
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------- state, actions, report


@pytest.mark.parametrize("clip", [ZClip(warmup=5), AutoClip(percentile=25), AutoClip(history=6)])
def test_resumed_run_continues_with_the_same_thresholds(clip):
    data = [b for b, _ in zip(_spiky_batches(every=7, scale=20.0), range(40))]

    def run(start, end, state=None):
        model = high_lr_mlp(seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        gw = _watch(model, opt, clip=clip, report_every=10)
        if state is not None:
            gw.load_state_dict(state["gw"])
        for x, y in data[start:end]:
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        saved = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()), "gw": gw.state_dict()}
        gw.detach()
        return model, gw, saved

    whole, gw_whole, _ = run(0, 40)
    _, _, saved = run(0, 20)
    resumed, gw_resumed, _ = run(20, 40, saved)
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))
    tail = gw_whole.history.extras[RECORD].values[20:]
    assert torch.equal(gw_resumed.history.extras[RECORD].values[-20:], tail)
    assert (tail[:, 2] < 1).any()  # the resumed part did clip


def test_clip_actions_and_report_agree_with_plain_torch():
    model = relu_mlp(depth=4, width=32)
    ref = copy.deepcopy(model)
    console = Console(file=io.StringIO(), width=120, color_system=None)
    batches = regression_batches()
    norms = []
    with gradwatch.watch(model, clip=0.2, console=console, autoload=False, report_every=4) as gw:
        for _ in range(6):
            x, y = next(batches)
            for m in (model, ref):
                m.zero_grad()
                nn.functional.mse_loss(m(x), y).backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.2)))
            gw.step()
    clips = [a for a in gw.actions if a.kind == "clip"]
    assert [a.step for a in clips] == [s for s, n in enumerate(norms) if n > 0.2]
    for a in clips:
        assert a.evidence["norm"] == pytest.approx(norms[a.step], rel=1e-6)
        assert a.evidence["threshold"] == pytest.approx(0.2)
        assert a.evidence["coefficient"] == pytest.approx(0.2 / (norms[a.step] + 1e-6), rel=1e-6)
    biggest = max(range(6), key=lambda s: norms[s] if norms[s] > 0.2 else -1)
    out = console.file.getvalue()
    assert f"clipping (max_norm=0.2): {len(clips)} of 6 steps clipped" in out
    assert f"largest norm clipped {norms[biggest]:.4g} at step {biggest}" in out


def test_two_watchers_keep_their_own_state():
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    with _watch(a, clip=AutoClip(percentile=50)) as gwa, _watch(b, clip=AutoClip(percentile=50)) as gwb:
        for n in (1.0, 100.0, 1.0):
            for m, scale in ((a, n), (b, 1.0)):
                for p in m.parameters():
                    p.grad = torch.full_like(p, scale)
            gwa.step()
            gwb.step()
    assert (gwa.history.extras[RECORD].values[:, 2] < 1).any()
    assert (gwb.history.extras[RECORD].values[:, 2] > 0.9999).all()
    assert [a.step for a in gwa.actions] == [1] and not gwb.actions


def test_clip_config_objects_are_exported():
    assert ClipNorm(max_norm=1.0) == gradwatch.ClipNorm(max_norm=1.0)
    assert {"AGC", "AutoClip", "ClipNorm", "ZClip"} <= set(gradwatch.__all__)


@pytest.mark.parametrize("clip", [0.5, AutoClip(), AutoClip(history=4), ZClip(warmup=3), AGC(exclude=())])
def test_hook_act_reads_nothing_on_the_host(monkeypatch, clip):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with _watch(model, clip=clip, report_every=1000) as gw:
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        gw.step()  # the first step builds the plan and the caches

        def sync(*args, **kwargs):
            raise AssertionError("host read in the clipping hot path")

        with monkeypatch.context() as m:
            for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, name, sync)
            for n in (1.0, 2.0, 1.5, 50.0, 1.0, 80.0):
                for p in model.parameters():
                    p.grad = torch.full_like(p, n)
                gw.step()
    rows = gw.history.extras[RECORD].values
    assert rows.shape == (7, 4) and (rows[:, 2] < 1).any()


@pytest.mark.parametrize("clip", [AutoClip(percentile=50), ZClip(warmup=3)])
def test_a_nonfinite_step_does_not_poison_the_adaptive_state(clip):
    model = nn.Linear(3, 2)
    norms = [1.0, 1.1, 0.9, math.nan, 1.0, 1.2, 40.0, 1.0]
    with _watch(model, clip=clip) as gw:
        for n in norms:
            for p in model.parameters():
                p.grad = torch.full_like(p, n)
            gw.step()
    rows = gw.history.extras[RECORD].values
    after = rows[4:]  # the steps after the NaN one
    assert torch.isfinite(after[:, 1]).all() and torch.isfinite(after[:, 2]).all()
    assert after[2, 2] < 0.5  # the x40 spike after the NaN step is still clipped
    if isinstance(clip, AutoClip):  # the NaN step counts as +inf in the history
        hist = [1.0, 1.1, 0.9, math.inf, 1.0, 1.2, 40.0]
        scale = math.sqrt(8)  # 8 entries of value n in a Linear(3, 2)
        assert rows[6, 1].item() == pytest.approx(float(np.percentile(hist, 50)) * scale, rel=1e-6)
