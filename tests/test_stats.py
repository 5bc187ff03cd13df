"""Every statistic gradwatch records equals a plain-torch per-parameter computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.manager import BUILTIN_PLUGINS
from gradwatch.testing import TinyModel


class Branchy(nn.Module):
    """Forward order differs from registration order; one tied weight; one frozen layer;
    one layer used only on odd steps (grad None on the others)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 4)
        self.body = nn.Linear(16, 16)
        self.stem = nn.Linear(8, 16)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.sometimes = nn.Linear(16, 16)
        self.tied = nn.Linear(16, 16, bias=False)
        self.tied.weight = self.body.weight  # shared: counted once, for "body"
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = self.frozen(torch.tanh(self.body(h)))
        if self.calls % 2:
            h = h + self.sometimes(h)
        self.calls += 1
        return self.head(self.tied(h))


def _reference(model: nn.Module, layers: list[tuple[str, nn.Module, list[str]]]) -> dict[str, list[float]]:
    """Per-layer statistics computed the plain way, one parameter at a time, in float64."""
    out: dict[str, list[float]] = {
        "grad_norm": [],
        "grad_rms": [],
        "grad_max": [],
        "nonfinite": [],
        "present": [],
        "weight_norm": [],
    }
    for _, module, names in layers:
        params = [module.get_parameter(n) for n in names]
        grads = [p.grad for p in params if p.grad is not None]
        sq = sum(float(g.double().pow(2).sum()) for g in grads)
        numel = sum(p.numel() for p in params)
        out["grad_norm"].append(math.sqrt(sq))
        out["grad_rms"].append(math.sqrt(sq / numel))
        out["grad_max"].append(max((float(g.double().abs().max()) for g in grads), default=0.0))
        out["nonfinite"].append(float(sum(1 for g in grads if not torch.isfinite(g).all())))
        out["present"].append(float(len(grads)))
        out["weight_norm"].append(math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_equal_plain_torch(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = Branchy().to(dtype)
    opt = torch.optim.SGD([{"params": [model.stem.weight, model.stem.bias], "lr": 0.05},
                           {"params": [p for n, p in model.named_parameters() if not n.startswith("stem") and p.requires_grad], "lr": 0.1}],
                          momentum=0.9)  # fmt: skip
    expected: list[dict[str, list[float]]] = []
    totals: list[float] = []
    updates: list[list[float]] = []
    # Core statistics only: plugins (fx tracing in the advisor, say) must not run the
    # model's forward, which counts its calls here.
    with gradwatch.watch(model, opt, stats_every=1, sample_every=1, report_every=5, report=False, disable=BUILTIN_PLUGINS) as gw:
        for step in range(12):
            x = torch.randn(32, 8, dtype=dtype)
            model(x).float().pow(2).mean().backward()
            if step == 0:
                layer_order = [(layer.name, layer.module, list(layer.param_names)) for layer in gw._ensure_plan().model.layers]
            ref = _reference(model, layer_order)
            expected.append(ref)
            totals.append(math.sqrt(sum(n * n for n in ref["grad_norm"])))
            before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
            opt.step()
            delta = []
            for (name, module, names), w in zip(layer_order, ref["weight_norm"]):
                d = sum(float((module.get_parameter(n).detach().double() - before[f"{name}.{n}"]).pow(2).sum()) for n in names)
                delta.append(math.sqrt(d) / w)
            updates.append(delta)
            opt.zero_grad()

    h = gw.history
    # Forward order of the first step; "sometimes" did not run then, so it comes last;
    # frozen and tied ("tied" shares body.weight and owns nothing else) are not layers.
    assert h.layers == ("stem", "body", "head", "sometimes")
    assert h.steps.tolist() == list(range(12))
    tol = dict(rtol=1e-5, atol=1e-12) if dtype == torch.float32 else dict(rtol=2e-3, atol=1e-9)
    for key in ("grad_norm", "grad_rms", "grad_max", "nonfinite", "present"):
        torch.testing.assert_close(getattr(h, key), torch.tensor([e[key] for e in expected]), check_dtype=False, **tol)
    torch.testing.assert_close(h.total_norm, torch.tensor(totals), check_dtype=False, **tol)
    assert h.weight_norm.steps.tolist() == list(range(12))
    torch.testing.assert_close(h.weight_norm.values, torch.tensor([e["weight_norm"] for e in expected]), check_dtype=False, **tol)
    torch.testing.assert_close(h.update_ratio.values, torch.tensor(updates), check_dtype=False, rtol=1e-4, atol=1e-9)
    # "sometimes" ran on odd steps only: no gradient on even steps.
    assert [e["present"][3] for e in expected] == [0.0, 2.0] * 6


def test_nonfinite_and_overflow_are_counted_per_tensor() -> None:
    model = TinyModel()
    with gradwatch.watch(model, stats_every=1, report=False, autoload=False) as gw:
        model(torch.randn(4, 8)).sum().backward()
        model.linear1.weight.grad[0, 0] = float("nan")
        model.linear2.bias.grad[0] = float("inf")
        gw.step()
        model.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        gw.step()
    h = gw.history
    assert h.nonfinite.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert math.isnan(h.grad_max[0, 0]) and math.isinf(h.grad_max[0, 1])
    assert math.isnan(h.total_norm[0]) and math.isfinite(h.total_norm[1])


def test_statistics_cadence_and_one_drain_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradwatch.stats import StatsRing

    drains: list[int] = []
    original = StatsRing.drain

    def counting(self, **kw):
        drains.append(kw["last_step"])
        return original(self, **kw)

    monkeypatch.setattr(StatsRing, "drain", counting)
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, stats_every=4, sample_every=8, report_every=10, report=False, autoload=False) as gw:
        for _ in range(25):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
    assert gw.history.steps.tolist() == [0, 4, 8, 12, 16, 20, 24]
    assert gw.history.weight_norm.steps.tolist() == [0, 8, 16, 24]
    assert drains == [9, 19, 24]  # two full intervals, then the final one at detach
