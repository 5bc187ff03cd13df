"""What ``gradwatch.watch(model, optimizer)`` with nothing else catches (issue 10).

Every model here is built and seeded in this file; the runs use the default options and do
not record the loss (no ``observe_loss``), as a new user's loop would not. Each finding is
checked against a plain-torch computation of the same run.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch.cadence import BUDGET, DENSE_STEPS, FLOOR_SECONDS, Cadence


def _watch(model, opt, **kw):
    kw.setdefault("console", Console(file=io.StringIO(), width=100))
    kw.setdefault("strict", True)
    return gradwatch.watch(model, opt, **kw)


def _kinds(gw, kind):
    return [d for d in gw.diagnoses if d.kind == kind]


# ---------------------------------------------------------------------- the cadence


def test_auto_cadence_is_dense_at_the_start_then_fixed_once():
    c = Cadence()
    assert [s for s in range(40) if c.sampled(s)] == [0, 1, 2, 4, 8, 16, 32]
    assert all(c.stats(s) for s in range(DENSE_STEPS))
    for step in range(1, DENSE_STEPS):
        c.observe(step, 300e-6, 9.7e-3, 6e-3 if c.sampled(step) else None)
    assert c.decide() and not c.decide()  # chosen once
    # 300 µs of a 9.7 ms step is 3.1%: every 4 steps keeps it within 1%.
    assert c.stats_period == 4 and c.measured["stats_seconds"] == pytest.approx(300e-6)
    # Sampled work costs 6 ms: 6 ms / P <= 1% of 9.7 ms needs P = 64 (a power of two from 32).
    assert c.sample_period == 64
    assert [s for s in range(32, 140) if c.stats(s)][:4] == [32, 36, 40, 44] and not c.sampled(96) and c.sampled(128)
    text = c.describe()
    assert "every 4 steps" in text and "300 µs = 3.1% of a 9.7 ms step" in text and "every 64" in text


@pytest.mark.parametrize(
    ("pass_seconds", "step_seconds", "period"),
    [(30e-6, 200e-6, 1), (49e-6, 100e-6, 1), (120e-6, 1e-3, 4), (11.9e-3, 176e-3, 8), (1.0, 1.0, 64)],
)
def test_auto_statistics_period_is_the_smallest_power_of_two_within_the_budget(pass_seconds, step_seconds, period):
    c = Cadence()
    for step in range(1, DENSE_STEPS):
        c.observe(step, pass_seconds, step_seconds, None)
    c.decide()
    assert c.stats_period == period
    allowed = max(BUDGET * step_seconds, FLOOR_SECONDS)
    assert pass_seconds / period <= allowed or period == 64
    assert period == 1 or pass_seconds / (period // 2) > allowed


def test_explicit_integers_keep_their_meaning():
    c = Cadence(stats_every=4, sample_every=40)
    assert [s for s in range(50) if c.stats(s)] == list(range(0, 50, 4))
    assert [s for s in range(90) if c.sampled(s)] == [0, 40, 80]
    # An explicit stats_every with automatic sampling samples among its statistics steps.
    c = Cadence(stats_every=3)
    assert [s for s in range(DENSE_STEPS) if c.sampled(s)] == [0]
    c = Cadence(stats_every=2)
    assert [s for s in range(DENSE_STEPS) if c.sampled(s)] == [0, 2, 4, 8, 16]
    assert all(c.stats(s) for s in range(0, 40) if c.sampled(s))


def test_the_report_and_the_run_log_say_which_cadence_was_chosen(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = io.StringIO()
    log = tmp_path / "run.jsonl"
    with _watch(model, opt, console=Console(file=out, width=200), log=str(log)) as gw:
        for _ in range(40):
            x = torch.randn(16, 8)
            nn.functional.mse_loss(model(x), x[:, :1]).backward()
            opt.step()
            opt.zero_grad()
    cadence = gw.cadence
    assert cadence.decided and cadence.stats_period in (1, 2, 4, 8, 16, 32, 64) and cadence.sample_period >= 32
    steps = gw.history.steps.tolist()
    assert steps[:DENSE_STEPS] == list(range(DENSE_STEPS))
    assert steps[DENSE_STEPS:] == [s for s in range(DENSE_STEPS, 40) if cadence.stats(s)]
    assert f"cadence: {cadence.describe()}" in " ".join(out.getvalue().split())
    records = [json.loads(line) for line in log.read_text().splitlines()]
    (end,) = [r for r in records if r["type"] == "end"]
    assert end["cadence"]["stats_period"] == cadence.stats_period and end["cadence"]["description"] == cadence.describe()
    assert end["cadence"]["measured"]["step_seconds"] > 0


def test_clipping_reads_every_step_and_its_norm_feeds_the_history():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    norms = []
    with _watch(model, opt, clip=1e9, stats_every=8, report=False) as gw:
        for _ in range(20):
            x = torch.randn(16, 8)
            nn.functional.mse_loss(model(x), x[:, :1]).backward()
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
            opt.step()
            opt.zero_grad()
    assert gw.history.steps.tolist() == [0, 8, 16]
    step_norm = gw.history.step_norm
    assert step_norm.steps.tolist() == list(range(20))
    assert step_norm.values.tolist() == pytest.approx(norms, rel=1e-5)


# ---------------------------------------------------------------------- a run that diverges in a few steps


def _diverging_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


def _regression(seed: int = 0, scale: float = 8.0):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(64, 8, generator=g) * scale
        yield x, x[:, :1]


def _plain_events(model: nn.Module, steps: int, lr: float) -> dict[str, object]:
    """Plain torch: the norms, and the first step of non-finite gradients and weights."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batches = _regression()
    events: dict[str, object] = {"norms": []}
    for step in range(steps):
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            events.setdefault("weights", step)
        x, y = next(batches)
        nn.functional.mse_loss(model(x), y).backward()
        with torch.no_grad():
            events["norms"].append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
            if not all(torch.isfinite(p.grad).all() for p in model.parameters()):
                events.setdefault("gradients", step)
        opt.step()
        opt.zero_grad()
    return events


def test_fast_divergence_gives_the_step_of_the_non_finite_gradients_and_no_false_origin():
    plain = _plain_events(_diverging_mlp(), 12, lr=0.05)
    norms = plain["norms"]
    # The scenario: the norm grows from step 1 (x7.7, x30, ...) and the gradients are non-finite at step 6.
    assert norms[1] > 5 * norms[0] and norms[2] > 20 * norms[1] and plain["gradients"] == 6 and plain["weights"] == 7
    model = _diverging_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = _regression()
    with _watch(model, opt) as gw:
        for _ in range(12):
            x, y = next(batches)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    (d,) = _kinds(gw, "nonfinite")
    ev = d.evidence
    assert d.step == ev["gradient_step"] == plain["gradients"] and ev["where"] == "gradient"
    # No module produced it: fc '0' is non-finite at step 7 because its weights are.
    assert ev["produced"] is False and "origin" not in ev
    assert ev["weights_step"] == plain["weights"] and ev["weights_after_update"] == plain["gradients"]
    assert "the weights of '0' were non-finite after the update of step 6 (gradients non-finite at step 6)" in d.message
    assert d.layers and d.layers[0] == "4"  # first in backward order
    # And the growth before it, from its first step (the norm grows from step 1 on).
    (grew,) = _kinds(gw, "exploding")
    assert grew.evidence["pattern"] == "growth" and abs(grew.step - 1) <= 1, grew.message


# ---------------------------------------------------------------------- a deep conv net without normalisation


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.relu(self.conv1(x))))


class _PlainResNet(nn.Module):
    """16 residual blocks with no normalisation at all."""

    def __init__(self, channels: int = 16, blocks: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[_Block(channels) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(torch.relu(self.stem(x)))).flatten(1))


def _plain_origin(model: nn.Module, steps: int) -> tuple[int, str] | None:
    """Plain torch: the first module whose output is non-finite while its inputs and its own
    weights are finite, and its step."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    names = {m: n for n, m in model.named_modules()}
    found: list[tuple[int, str]] = []
    step = [0]

    def hook(module, args, out):
        inputs = all(torch.isfinite(t).all() for t in args if isinstance(t, torch.Tensor))
        weights = all(torch.isfinite(p).all() for p in module.parameters(recurse=False))
        if not found and not torch.isfinite(out).all() and inputs and weights:
            found.append((step[0], names[module]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    for step[0] in range(steps):
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    for h in handles:
        h.remove()
    return found[0] if found else None


def test_deep_conv_net_without_normalisation_names_the_producing_module_with_defaults():
    torch.manual_seed(0)
    plain = _plain_origin(_PlainResNet(), 10)
    assert plain is not None and plain[0] < 8  # it blows up within a few steps
    torch.manual_seed(0)
    model = _PlainResNet()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    with _watch(model, opt) as gw:
        for _ in range(10):
            x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    (d,) = _kinds(gw, "nonfinite")
    assert (d.step, d.layers) == (plain[0], (plain[1],))
    origin = d.evidence["origin"]
    assert d.evidence["produced"] is True and origin["module_type"] == "Conv2d" and origin["input_dtype"] == "float32"
    assert origin["input_max"] > 1e3 and origin["output"] in ("inf", "-inf", "nan")
    assert "Conv2d" in d.message and "from finite inputs in [" in d.message


# ---------------------------------------------------------------------- a value made inside an op


class _Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)  # ReLU outputs hold exact zeros: -inf


def test_log_of_an_exact_zero_is_named_with_what_its_input_held():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), _Log(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 8)
    with torch.no_grad():
        relu = torch.relu(model[0](x))  # plain torch: what _Log is given
    with _watch(model, opt) as gw:
        nn.functional.mse_loss(model(x), x[:, :1]).backward()
        opt.step()
        opt.zero_grad()
    (d,) = _kinds(gw, "nonfinite")
    origin = d.evidence["origin"]
    assert (d.step, d.layers, d.evidence["produced"]) == (0, ("2",), True)
    assert origin["input_min"] == relu.min().item() == 0.0 and origin["input_max"] == pytest.approx(relu.max().item())
    assert origin["input_has_zero"] is True and origin["output"] == "-inf"


def test_a_checkpoint_keeps_the_cadence_and_an_older_one_measures_afresh():
    def run(gw, model, opt, steps):
        for _ in range(steps):
            x = torch.randn(16, 8)
            nn.functional.mse_loss(model(x), x[:, :1]).backward()
            opt.step()
            opt.zero_grad()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with _watch(model, opt, report=False) as gw:
        run(gw, model, opt, 40)
        state = gw.state_dict()
    chosen = (gw.cadence.stats_period, gw.cadence.sample_period)
    assert state["cadence"]["stats_period"] == chosen[0]
    with _watch(model, opt, report=False) as resumed:
        resumed.load_state_dict(state)
        assert (resumed.cadence.stats_period, resumed.cadence.sample_period) == chosen and resumed.cadence.decided
    older = {k: v for k, v in state.items() if k != "cadence"}
    with _watch(model, opt, report=False) as fresh:
        fresh.load_state_dict(older)
        assert not fresh.cadence.decided and fresh.cadence.origin == 40
        run(fresh, model, opt, DENSE_STEPS + 2)
        assert fresh.cadence.decided  # measured on steps 41-71, decided at step 72
    assert set(range(40, 40 + DENSE_STEPS)) <= set(fresh.history.steps.tolist())  # a dense start again
