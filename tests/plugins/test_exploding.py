"""The exploding detector, and the healthy models on which no detector may cry wolf.

Scenarios (real training, seeded models built here, no ``observe_loss``): a fast divergence
(SGD far past its stable rate) and a single-step spike (one recurrent neuron crossing a
bifurcation). Rules: synthetic rows fed to a watch through :func:`gradwatch.testing.diagnose`.
"""

from __future__ import annotations

import importlib.util
import io
import math
import statistics
import warnings
from itertools import count
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch import Series, StatsWindow
from gradwatch.stats import LOSS_KEY, STEP_NORM_KEY
from gradwatch.testing import (
    diagnose,
    high_lr_mlp,
    lstm_model,
    relu_mlp,
    residual_convnet,
    sequence_batches,
    train,
    transformer_encoder,
)

CONTRACT = {"total_norm", "onset", "growth_per_step", "norm_quantiles", "update_ratio", "loss_diverging", "pattern"}
SPIKE_CONTRACT = CONTRACT | {"median_before", "spike_ratio"}
MINE = ("vanishing", "exploding", "nonfinite", "activations")
EVERY_STEP = {"stats_every": 1, "sample_every": 1}
CADENCES = [pytest.param({}, id="default"), pytest.param(EVERY_STEP, id="every_step")]


def _watch(model, opt, **kw):
    return gradwatch.watch(model, opt, console=Console(file=io.StringIO()), strict=True, **kw)


def _mine(gw, kind="exploding"):
    return [d for d in gw.diagnoses if d.kind == kind and d.source == kind]


# ---------------------------------------------------------------------- scenarios


def test_hook_gradwatch_diagnose_high_lr_explodes_then_nonfinite():
    model = high_lr_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)  # stable below ~0.1
    with _watch(model, opt, report_every=10) as gw:
        losses = train(model, 20, optimizer=opt, watcher=gw)
    kinds = {d.kind: d for d in gw.diagnoses if d.source in MINE}
    exploding, nonfinite = kinds["exploding"], kinds["nonfinite"]
    assert CONTRACT <= set(exploding.evidence)
    assert exploding.step < nonfinite.step and exploding.severity is gradwatch.Severity.ERROR
    assert exploding.evidence["loss_diverging"] is True and exploding.evidence["onset"] == exploding.step
    # The fitted growth agrees with the recorded losses (plain float math on train()'s output).
    finite = [x for x in losses if math.isfinite(x)]
    assert exploding.evidence["growth_per_step"] > 10 and finite[-1] > 100 * finite[0]
    assert len(_mine(gw)) == 1


def _regression(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 1, generator=g) / 4
    while True:
        x = torch.randn(64, 16, generator=g)
        yield x, x @ w


@pytest.mark.parametrize("cadence", CADENCES)
def test_fast_divergence_is_growth_from_its_first_step(cadence):
    """A tanh MLP under SGD at lr 1.0 (stable near 0.1): the norm grows ×9-1200 a step from
    step 1 (3.7, 32, 1.4e3, 6.2e5, …, 6.7e16 at step 8) and is inf at step 9."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    batches, norms = _regression(1), []
    with _watch(model, opt, **cadence) as gw:
        for _ in range(12):
            x, y = next(batches)
            nn.functional.mse_loss(model(x), y).backward()
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
            opt.step()
            opt.zero_grad()
    first_growth = next(k for k in range(1, len(norms)) if norms[k] > 2 * norms[k - 1])
    assert first_growth == 1 and not math.isfinite(norms[9]), norms
    (d,) = _mine(gw)
    assert CONTRACT <= set(d.evidence) and d.evidence["pattern"] == "growth"
    assert abs(d.step - first_growth) <= 1 and d.evidence["onset"] == d.step
    assert d.evidence["growth_per_step"] > 20
    last = max(k for k, n in enumerate(norms) if math.isfinite(n))
    assert d.evidence["total_norm"] == pytest.approx(norms[last], rel=1e-4)  # the last finite row


class Neuron(nn.Module):
    """One recurrent tanh unit, ``h = tanh(w·h + u·x)`` unrolled ``T`` steps from ``h0``;
    only the scalar ``w`` is trained. With ``u·x = -0.3`` the map has a second, positive
    fixed point only above ``w ≈ 1.62``: below it the state falls to the negative branch,
    above it the state stays positive, and the final state jumps between them (a cliff,
    Pascanu et al. 2013)."""

    def __init__(self, w: float = 1.36, u: float = -0.3, h0: float = 0.9, T: int = 50) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.u, self.h0, self.T = u, h0, T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.full_like(x[:, 0], self.h0)
        for t in range(self.T):
            h = torch.tanh(self.w * h + self.u * x[:, t])
        return h


@pytest.mark.parametrize("cadence", CADENCES)
def test_single_step_spike_is_reported_at_its_step(cadence):
    """Pulled toward -1, ``w`` drifts up with |grad| 0.035 → 0.010 for 16 steps, lands past the
    cliff at step 16 (|grad| 18.4, ~1200× the median) and is thrown to w ≈ -17, where every
    gradient after is 0."""
    model = Neuron()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    norms = []
    with _watch(model, opt, **cadence) as gw:
        for _ in range(40):
            ((model(torch.ones(1, model.T)) + 1.0) ** 2).mean().backward()
            norms.append(model.w.grad.abs().item())
            opt.step()
            opt.zero_grad()
    at = max(range(len(norms)), key=norms.__getitem__)
    median = statistics.median_low(norms[:at])
    assert at == 16 and max(norms[:at]) < 0.05 and norms[at] > 500 * median and max(norms[at + 1 :]) < 1e-3, norms
    (d,) = _mine(gw)
    assert SPIKE_CONTRACT <= set(d.evidence) and d.evidence["pattern"] == "spike"
    assert d.step == d.evidence["onset"] == at
    assert d.evidence["spike_ratio"] == pytest.approx(norms[at] / median, rel=1e-4)
    assert d.evidence["median_before"] == pytest.approx(median, rel=1e-4)


# ---------------------------------------------------------------------- rules, on synthetic rows


def _window(steps, totals, layers, *, scale=None, last_step=None, extras=None, final=False):
    n, L = len(steps), len(layers)
    scale = torch.ones(L) if scale is None else torch.tensor(scale, dtype=torch.float32)
    norms = torch.tensor(totals, dtype=torch.float32)[:, None] * scale / scale.norm()
    empty = Series(torch.zeros(0, dtype=torch.int64), torch.zeros(0, L))
    return StatsWindow(
        layers=layers, steps=torch.tensor(steps), grad_norm=norms.clone(), grad_rms=norms.clone(), grad_max=norms.clone(),
        nonfinite=torch.zeros(n, L), present=torch.ones(n, L), total_norm=torch.tensor(totals, dtype=torch.float32),
        weight_norm=empty, update_ratio=empty, extras=extras or {}, first_step=steps[0],
        last_step=steps[-1] if last_step is None else last_step, final=final,
    )  # fmt: skip


def _feed(totals, *, every=1, per=100, losses=None, options=None, extras=None, scale=None):
    """``totals`` as statistics rows every ``every`` steps, fed to a watch in report intervals
    of ``per`` steps (the last one final); the exploding diagnoses of each interval."""
    gw = gradwatch.watch(relu_mlp(depth=4, width=8), report=False, autoload=False, options={"exploding": options or {}})
    layers = gw.model_info.names
    steps = [every * k for k in range(len(totals))]
    end = steps[-1] + 1
    out = []
    for lo in range(0, end, per):
        keep = [i for i, s in enumerate(steps) if lo <= s < lo + per]
        more = dict(extras(lo, lo + per) if extras else {})
        if losses is not None:
            span = range(lo, min(lo + per, len(losses)))
            more[LOSS_KEY] = Series(torch.tensor(list(span)), torch.tensor([losses[s] for s in span])[:, None])
        w = _window(
            [steps[i] for i in keep],
            [totals[i] for i in keep],
            layers,
            scale=scale,
            last_step=min(lo + per, end) - 1,
            extras=more,
            final=lo + per >= end,
        )
        out.append([d for d in diagnose(gw, w) if d.source == "exploding"])
    gw.detach(report=False)
    return out


def _noise(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (1.0 + 0.1 * torch.randn(n, generator=g)).tolist()


def _flat(out):
    return [d for part in out for d in part]


@pytest.mark.parametrize(("height", "reported"), [(50.0, False), (150.0, True)])
def test_a_lone_spike_is_a_warning_at_100x_the_median(height, reported):
    totals = _noise(60)
    totals[30] = height
    found = _flat(_feed(totals))
    if not reported:
        assert found == []
        return
    (d,) = found
    assert d.evidence["pattern"] == "spike" and d.step == d.evidence["onset"] == 30
    assert d.severity is gradwatch.Severity.WARNING and d.evidence["loss_diverging"] is None
    median = statistics.median_low(torch.tensor(totals[:30], dtype=torch.float32).tolist())
    assert d.evidence["median_before"] == pytest.approx(median) and d.evidence["spike_ratio"] == pytest.approx(height / median)


def test_a_lone_spike_needs_min_rows_before_it():
    totals = _noise(40)
    totals[6] = 1000.0  # six rows before it
    assert _flat(_feed(totals)) == []
    totals[6], totals[8] = 1.0, 1000.0
    assert [d.step for d in _flat(_feed(totals))] == [8]


def test_smaller_spikes_need_two_that_come_back_down():
    """Two ×20 spikes, each followed by ordinary rows: a warning dated at the first, reported
    once across intervals (steps 4k, intervals of 100 steps)."""
    totals = _noise(75)
    totals[30], totals[35] = 20.0, 25.0
    out = _feed(totals, every=4)
    assert out[0] == [] and out[2] == []
    (d,) = out[1]
    assert d.evidence["pattern"] == "spike" and d.step == 120 and d.evidence["spike_steps"] == [120, 140]
    assert "spiked 2 times" in d.message and d.evidence["spike_ratio"] == pytest.approx(25.0 / d.evidence["median_before"])
    seen = torch.tensor(totals[:50], dtype=torch.float32).double()
    assert math.isclose(d.evidence["norm_quantiles"]["p99"], float(seen.quantile(0.99)), rel_tol=1e-5)
    assert d.evidence["total_norm"] == pytest.approx(totals[49], rel=1e-6)
    alone = _noise(75)
    alone[35] = 25.0
    assert _flat(_feed(alone, every=4)) == []  # one is not a verdict (min_spikes=2)


def test_a_norm_that_rises_and_stays_up_is_not_a_spike():
    """A learning transformer's norm: ×20 over 20 steps, then level; without the loss."""
    totals = _noise(40) + [1.0 * 1.17**k for k in range(20)] + [20.0 * x for x in _noise(60, seed=1)]
    assert max(totals[40:]) / statistics.median(totals[:40]) > 20
    assert _flat(_feed(totals)) == []


def test_a_spike_waits_for_the_rows_after_it():
    """A ×20 spike in the last row of an interval is judged at the next report, at its step."""
    totals = _noise(150)
    totals[60], totals[99] = 20.0, 30.0
    out = _feed(totals)
    assert out[0] == []
    (d,) = out[1]
    assert d.step == 60 and d.evidence["spike_steps"] == [60, 99]


def test_sustained_growth_from_the_run_s_own_history():
    totals = _noise(20) + [3.0**k for k in range(1, 7)] + [700.0] * 10
    (d,) = _flat(_feed(totals))
    assert d.evidence["pattern"] == "growth" and d.step == d.evidence["onset"] == 20
    assert d.evidence["growth_per_step"] == pytest.approx(3.0, rel=1e-3)
    start = 20
    while totals[start - 1] < totals[start]:
        start -= 1  # the run is every row that grows, noise included; its reference the rows before
    rows = torch.tensor(totals[:start], dtype=torch.float32).tolist()
    assert d.evidence["growth_reference"] == pytest.approx(statistics.median_low(rows), rel=1e-6)
    assert d.evidence["growth_reference_rows"] == start
    assert d.evidence["growth_end"] == pytest.approx(729.0) and d.evidence["growth_end_step"] == 25


def test_growth_that_stops_below_growth_total_is_not_reported():
    totals = _noise(20) + [3.0**k for k in range(1, 4)] + [30.0] * 10  # ends 27× its reference
    assert _flat(_feed(totals)) == []


def test_a_falling_loss_is_learning():
    """With the loss recorded and falling, ×20 spikes and growth to 729× are learning; a ×150
    spike is still a warning; the same rows without the loss are reported."""
    spikes = _noise(60)
    spikes[30], spikes[35] = 20.0, 25.0
    growth = _noise(20) + [3.0**k for k in range(1, 7)] + [700.0] * 34
    falling = [2.0 - 0.02 * k for k in range(60)]
    assert _flat(_feed(spikes, losses=falling)) == [] and _flat(_feed(growth, losses=falling)) == []
    assert [d.evidence["pattern"] for d in _flat(_feed(spikes))] == ["spike"]
    assert [d.evidence["pattern"] for d in _flat(_feed(growth))] == ["growth"]
    spikes[45] = 150.0
    (d,) = _flat(_feed(spikes, losses=falling))
    assert d.step == 45 and d.evidence["learning"] is True and d.severity is gradwatch.Severity.WARNING


def test_a_diverging_loss_makes_it_an_error():
    totals = _noise(20) + [3.0**k for k in range(1, 7)] + [700.0] * 10
    rising = [1.0 + 0.5 * k for k in range(36)]
    (d,) = _flat(_feed(totals, losses=rising))
    assert d.severity is gradwatch.Severity.ERROR and d.evidence["loss_diverging"] is True
    assert "the loss diverges" in d.message


def test_the_per_step_clipping_norm_is_read_when_it_has_more_rows():
    """Statistics every 4 steps miss a ×200 spike at step 50; the norms clipping reads on the
    steps between them (``history.step_norm``) have it."""
    steps = _noise(100, seed=3)
    steps[50] = 200.0

    def clip(lo, hi):
        span = [s for s in range(lo, min(hi, len(steps))) if s % 4]  # the steps without statistics
        return {STEP_NORM_KEY: Series(torch.tensor(span), torch.tensor([steps[s] for s in span])[:, None])}

    rows = [steps[s] for s in range(0, 100, 4)]
    assert _flat(_feed(rows, every=4)) == []
    (d,) = _flat(_feed(rows, every=4, extras=clip))
    assert d.step == 50 and d.evidence["pattern"] == "spike" and d.evidence["spike_norm"] == pytest.approx(200.0)


def test_spiking_layers_are_named():
    totals = _noise(40)
    totals[20] = 500.0
    gw = gradwatch.watch(relu_mlp(depth=4, width=8), report=False, autoload=False)
    layers = gw.model_info.names
    steps = list(range(40))
    w = _window(steps, totals, layers)
    grad = w.grad_norm.clone()
    grad[20] = grad[19]  # every layer ordinary at step 20 …
    grad[20, 2] = 500.0  # … but one
    w = StatsWindow(**{**{f: getattr(w, f) for f in w.__dataclass_fields__}, "grad_norm": grad})
    (d,) = [d for d in diagnose(gw, w) if d.source == "exploding"]
    gw.detach(report=False)
    assert d.layers == (layers[2],)


def test_gradient_norms_growing_toward_the_input():
    totals = _noise(40)
    (d,) = _flat(_feed(totals, scale=[1e3, 1e3, 30.0, 3.0, 1.0]))
    assert d.evidence["pattern"] == "toward_input" and d.evidence["toward_input_ratio"] > 70


def test_the_last_total_norm_is_the_last_finite_row():
    totals = _noise(20) + [3.0**k for k in range(1, 7)] + [math.nan, math.nan]
    (d,) = _flat(_feed(totals))
    assert d.evidence["total_norm"] == pytest.approx(729.0) and "last total norm 729" in d.message


def _number_checker():
    path = Path(__file__).resolve().parents[1] / "test_message_numbers.py"
    spec = importlib.util.spec_from_file_location("message_numbers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_number_a_message_quotes_is_in_its_evidence():
    check = _number_checker()
    spikes = _noise(60)
    spikes[30], spikes[35] = 20.0, 25.0
    lone = _noise(60)
    lone[40] = 1234.5678
    growth = _noise(20) + [3.7**k for k in range(1, 7)] + [3000.0] * 10
    found = [
        *_flat(_feed(spikes)),
        *_flat(_feed(lone)),
        *_flat(_feed(growth)),
        *_flat(_feed(growth[:20] + [1.0 + 5 ** (k + 1) for k in range(6)], losses=[1.0 * 2.0**k for k in range(26)])),
        *_flat(_feed(_noise(40), scale=[1e3, 1e3, 30.0, 3.0, 1.0])),
    ]
    assert {d.evidence["pattern"] for d in found} == {"spike", "growth", "toward_input"} and len(found) == 5
    for d in found:
        candidates = check._candidates(d)
        for text in (d.message, d.summary):
            wrong = [t for t in check._numbers(text, d) if not check._matches(t, candidates)]
            assert not wrong, (text, wrong, d.evidence)


def test_reported_once_per_pattern_and_severity():
    totals = _noise(300)
    for k in (30, 130, 230):
        totals[k] = 500.0
    out = _feed(totals)
    assert [len(x) for x in out] == [1, 0, 0]


# ---------------------------------------------------------------------- healthy models


def _healthy(name):
    torch.manual_seed(0)
    if name == "residual_convnet":
        model = residual_convnet()
        return model, ((torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in count()), nn.functional.cross_entropy
    if name == "transformer_encoder":
        model = transformer_encoder()
        return model, ((torch.randint(0, 50, (8, 12)), torch.randint(0, 4, (8,))) for _ in count()), nn.functional.cross_entropy
    if name == "lstm":
        return lstm_model(), sequence_batches(seq_len=50, batch=16), None
    return relu_mlp(depth=8, width=32), None, None


@pytest.mark.parametrize("cadence", [{}, EVERY_STEP], ids=["default", "every_step"])
@pytest.mark.parametrize("name", ["residual_convnet", "transformer_encoder", "kaiming_mlp", "lstm"])
def test_healthy_models_get_no_warning(name, cadence):
    model, batches, loss_fn = _healthy(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    options = {"report_every": 50, **(cadence or {"sample_every": 20})}
    with _watch(model, opt, **options) as gw:
        losses = train(model, 200, batches=batches, optimizer=opt, loss_fn=loss_fn, watcher=gw)
    assert all(math.isfinite(x) for x in losses)
    bad = [d for d in gw.diagnoses if d.source in MINE and d.severity.value in ("warning", "error")]
    assert bad == [], [(d.kind, d.message) for d in bad]
    assert "vanishing.backprop_rms" in gw.history.extras  # the probes did run


# ---------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options",
    [{"spike": 0.5}, {"lone_spike": 5.0}, {"growth_rows": 1}, {"min_rows": 2.5}, {"growth": 1.0}, {"ema": 1.5}, {"zz": 1}],
)
def test_hook_gradwatch_configure_rejects_bad_options(options):
    with pytest.raises(gradwatch.GradWatchError, match="exploding"):
        gradwatch.watch(high_lr_mlp(), options={"exploding": options}, report=False)


def test_retired_z_score_options_are_accepted_with_a_warning():
    with pytest.warns(gradwatch.GradWatchWarning, match="ema, z have no effect"):
        gw = gradwatch.watch(high_lr_mlp(), options={"exploding": {"z": 5.0, "ema": 0.1}}, report=False)
    gw.detach(report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradwatch.watch(high_lr_mlp(), options={"exploding": {"spike": 20.0}}, report=False).detach(report=False)
