"""The recurrent plugin: spectral radius, sequence length and the Pascanu bound."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from rich.console import Console
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import gradwatch
from gradwatch.testing import exploding_rnn, lstm_model, sequence_batches, train, vanilla_rnn


def _run(model, steps=8, seq_len=100, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(
        model, opt, strict=True, autoload=False, report_every=4, console=Console(file=io.StringIO()), **kw
    ) as gw:
        train(model, steps, batches=sequence_batches(seq_len=seq_len, batch=8), optimizer=opt, watcher=gw)
    return gw


def _from(gw, source="recurrent"):
    return [d for d in gw.diagnoses if d.source == source]


def test_hook_diagnose_vanishing_rnn_matches_plain_torch():
    model = vanilla_rnn(radius=0.5)
    gw = _run(model)
    (d,) = _from(gw)
    assert (d.kind, d.severity.value, d.layers, d.step) == ("vanishing", "warning", ("rnn",), 0)
    gamma = torch.linalg.eigvals(model.rnn.weight_hh_l0.detach().double()).abs().max().item()
    ev = d.evidence
    assert ev["recurrent"] is True and ev["module_type"] == "RNN" and ev["seq_len"] == 100
    assert ev["max_derivative"] == 1.0
    # γ after the last interval's weights (read at the report, weights barely move at lr 0.01).
    assert ev["spectral_radius"]["weight_hh_l0"] == pytest.approx(gamma, rel=0.05)
    assert ev["gain"] == pytest.approx(ev["spectral_radius"]["weight_hh_l0"])
    assert ev["bound"] == pytest.approx(ev["gain"] ** 100, rel=1e-9)
    assert ev["bound"] < 1e-20
    assert ev["initial_gain"] == pytest.approx(0.5, rel=1e-4)
    assert "'rnn'" in d.message and "100 steps" in d.message
    # The advisor answered with lstm_gru first.
    assert d.remedies[0].kind == "lstm_gru"


def test_hook_diagnose_lstm_forget_gate_note_only():
    model = lstm_model()
    gw = _run(model)
    (d,) = _from(gw)  # no vanishing or exploding verdict for a gated cell: an info note
    assert (d.kind, d.severity.value, d.layers) == ("forget_gate", "info", ("rnn",))
    b = (model.rnn.bias_ih_l0[32:64] + model.rnn.bias_hh_l0[32:64]).double().mean().item()
    assert d.evidence["gate_bias"]["l0"] == pytest.approx(b, abs=1e-3)  # after 8 small steps
    assert d.evidence["keep"] == pytest.approx(
        torch.sigmoid(torch.tensor(d.evidence["gate_bias"]["l0"], dtype=torch.float64)).item() ** 100
    )
    (remedy,) = d.remedies
    assert remedy.kind == "lstm_gru" and "forget-gate bias of 'rnn' to 4.6" in remedy.title
    fixed = remedy.apply(copy.deepcopy(model))
    assert torch.all(fixed.rnn.bias_ih_l0[32:64] == 4.6) and torch.all(fixed.rnn.bias_hh_l0[32:64] == 0)
    ns = {"model": copy.deepcopy(model), "torch": torch, "nn": nn}
    exec(remedy.snippet, ns)
    assert torch.all(ns["model"].rnn.bias_ih_l0[32:64] == 4.6)
    # With that bias the note is gone: the remedy fixes what was measured.
    assert _from(_run(fixed)) == []


def test_hook_diagnose_gru_update_gate():
    torch.manual_seed(0)
    model = lstm_model()
    model.rnn = nn.GRU(4, 32, batch_first=True)
    (d,) = _from(_run(model, steps=4))
    assert d.kind == "forget_gate" and "update (z) gate" in d.message


def test_hook_diagnose_short_sequences_do_not_vanish():
    # 0.5^5 = 0.03 is far above the 1e-6 bound: a short-memory task is fine.
    gw = _run(vanilla_rnn(radius=0.5), seq_len=5)
    assert _from(gw) == []


def test_hook_diagnose_exploding_rnn():
    model = exploding_rnn(radius=3.0)
    gw = _run(model, steps=4, seq_len=20)
    (d,) = _from(gw)
    assert (d.kind, d.step, d.layers) == ("exploding", 0, ("rnn",))
    assert d.evidence["gain"] > 1.2 and d.evidence["initial_gain"] == pytest.approx(3.0, rel=1e-4)
    assert "clipping" in [r.kind for r in d.remedies]


def test_hook_diagnose_reported_once():
    gw = _run(vanilla_rnn(radius=0.5), steps=12)
    assert len(_from(gw)) == 1


def test_spectral_radii_layers_directions_and_gates():
    from gradwatch.plugins.recurrent import spectral_radii

    torch.manual_seed(0)
    rnn = nn.RNN(3, 6, num_layers=2, bidirectional=True)
    radii = spectral_radii(rnn)
    assert set(radii) == {"weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse"}
    for key, value in radii.items():
        expected = torch.linalg.eigvals(getattr(rnn, key).detach().double()).abs().max().item()
        assert value == pytest.approx(expected)
    lstm = spectral_radii(nn.LSTM(3, 6))
    assert set(lstm) == {f"weight_hh_l0[{g}]" for g in "ifgo"}
    assert set(spectral_radii(nn.GRU(3, 6))) == {f"weight_hh_l0[{g}]" for g in "rzn"}


def test_sequence_length_shapes():
    from gradwatch.plugins.recurrent import sequence_length

    rnn = nn.RNN(3, 4, batch_first=True)
    assert sequence_length(rnn, torch.zeros(2, 7, 3)) == 7
    assert sequence_length(nn.RNN(3, 4), torch.zeros(7, 2, 3)) == 7
    assert sequence_length(rnn, torch.zeros(7, 3)) == 7  # unbatched
    packed = pack_padded_sequence(torch.zeros(2, 9, 3), [9, 4], batch_first=True)
    assert sequence_length(rnn, packed) == 9


class _Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(4, 16, batch_first=True, num_layers=2, bidirectional=True)
        with torch.no_grad():
            for name, p in self.rnn.named_parameters():
                if name.startswith("weight_hh"):
                    p.mul_(0.3 / torch.linalg.eigvals(p).abs().max())
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        lengths = [x.shape[1]] + [x.shape[1] // 2] * (x.shape[0] - 1)
        _, h = self.rnn(pack_padded_sequence(x, lengths, batch_first=True))
        return self.head(torch.cat([h[-2], h[-1]], dim=1))


def test_hook_diagnose_packed_bidirectional():
    gw = _run(_Packed(), steps=4, seq_len=60)
    (d,) = _from(gw)
    assert d.kind == "vanishing" and d.evidence["seq_len"] == 60
    assert len(d.evidence["spectral_radius"]) == 4
    assert d.evidence["bound"] == pytest.approx(d.evidence["gain"] ** 60, rel=1e-9)


def test_probe_installed_only_on_sampled_steps():
    model = vanilla_rnn(radius=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = sequence_batches(seq_len=10, batch=4)
    counts = []
    # Counted during each forward (the step closes, and probes are scheduled, as the forward starts).
    model.head.register_forward_pre_hook(lambda m, a: counts.append(len(model.rnn._forward_hooks)))
    with gradwatch.watch(model, opt, autoload=False, report=False, stats_every=2, sample_every=4) as gw:
        for _step in range(8):
            x, y = next(batches)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        assert gw.step_count == 7  # the last step closes at detach
    # Hooks of other plugins may sit on the RNN too; ours comes and goes with the schedule.
    assert counts[0] > counts[1] and counts[4] > counts[5] and counts[1] == counts[2] == counts[3]
    assert len(model.rnn._forward_hooks) == 0


@pytest.mark.parametrize(
    ("options", "match"),
    [({"vanish_bound": 2}, "vanish_bound"), ({"explode_gain": 0.5}, "explode_gain"), ({"bogus": 1}, "unknown recurrent option")],
)
def test_hook_configure_rejects_bad_options(options, match):
    with pytest.raises(gradwatch.GradWatchError, match=match):
        gradwatch.watch(vanilla_rnn(), options={"recurrent": options}, autoload=False)


def test_options_change_the_verdict():
    gw = _run(vanilla_rnn(radius=0.5), seq_len=5, options={"recurrent": {"vanish_bound": 0.1}})
    (d,) = _from(gw)
    assert d.evidence["threshold"] == 0.1 and d.evidence["bound"] < 0.1


def test_state_dict_round_trip():
    gw = _run(vanilla_rnn(radius=0.5), steps=4)
    state = gw.state_dict()["plugins"]["recurrent"]
    assert state["seq_len"] == {"rnn": 100} and ["rnn", "vanishing"] in state["reported"]
    model = vanilla_rnn(radius=0.5)
    other = gradwatch.watch(model, autoload=False, report=False)
    other.load_state_dict(gw.state_dict())
    from gradwatch.plugins.recurrent import KEY

    assert other.stash[KEY].seq_len == {"rnn": 100}
    other.detach()
    assert math.isfinite(gw.diagnoses[0].evidence["gain"])


def test_two_watchers_keep_their_own_state():
    rnn, lstm = vanilla_rnn(radius=0.5), lstm_model()
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (rnn, lstm)]
    batches = sequence_batches(seq_len=30, batch=8)
    quiet = dict(autoload=False, report=False, strict=True, report_every=4)
    with (
        gradwatch.watch(rnn, opts[0], **quiet) as a,
        gradwatch.watch(lstm, opts[1], options={"recurrent": {"vanish_bound": 1e-3}}, **quiet) as b,
    ):
        for _ in range(4):
            x, y = next(batches)
            for model, opt in zip((rnn, lstm), opts):
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                opt.zero_grad()
    assert [(d.kind, d.evidence["seq_len"]) for d in _from(a)] == [("vanishing", 30)]  # 0.5^30 = 9e-10 < 1e-6
    assert [(d.kind, d.evidence["threshold"]) for d in _from(b)] == [("forget_gate", 1e-3)]


# ---------------------------------------------------------------------- extreme values (issue 12.3)

from gradwatch.plugins.recurrent import from_log, log_power, log_sigmoid  # noqa: E402


@pytest.mark.parametrize("x", [-1e30, -800.0, -30.0, -1e-30, 0.0, 1e-30, 30.0, 800.0, 1e30, math.inf, -math.inf])
def test_log_sigmoid_is_finite_where_sigmoid_is_and_never_raises(x):
    expected = torch.nn.functional.logsigmoid(torch.tensor(x, dtype=torch.float64)).item()
    assert log_sigmoid(x) == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert math.isnan(log_sigmoid(math.nan))


@pytest.mark.parametrize(
    ("base", "exponent", "expected"),
    [
        (3.0, 1000, 1000 * math.log(3.0)),
        (0.0, 5, -math.inf),
        (1e-30, 10**6, 10**6 * math.log(1e-30)),
        (1e30, 50, 50 * math.log(1e30)),
    ],
)
def test_log_power_never_overflows(base, exponent, expected):
    assert log_power(base, exponent) == pytest.approx(expected)
    assert math.isnan(log_power(math.nan, 3)) and math.isnan(log_power(-1.0, 3))
    assert from_log(1e6) == math.inf and from_log(-1e6) == 0.0 and math.isnan(from_log(math.nan))


def _lm(ntoken: int = 100, d: int = 16) -> nn.Module:
    class LM(nn.Module):  # pytorch/examples word_language_model: embedding -> 2-layer LSTM -> decoder
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.encoder = nn.Embedding(ntoken, d)
            self.rnn = nn.LSTM(d, d, 2)
            self.decoder = nn.Linear(d, ntoken)

        def forward(self, x):
            return self.decoder(self.rnn(self.encoder(x))[0])

    return LM()


@pytest.mark.parametrize("bias", [-1e30, -800.0, 800.0, math.inf, -math.inf, math.nan])
def test_word_language_model_at_lr_20_with_diverged_gate_biases(bias):
    """The LSTM language model at SGD lr 20 without clipping once raised "OverflowError: math
    range error" in gradwatch_diagnose (a forget bias far below -709 made exp(-b) overflow)."""
    model = _lm()
    opt = torch.optim.SGD(model.parameters(), lr=20.0)
    g = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, opt, strict=True, autoload=False, report_every=4, console=Console(file=io.StringIO())) as gw:
        for step in range(12):
            if step == 6:  # as a diverged run leaves them
                with torch.no_grad():
                    for name, p in model.rnn.named_parameters():
                        if name.startswith("bias"):
                            p[16:32] = bias
            x = torch.randint(0, 100, (35, 4), generator=g)
            out = model(x)
            nn.functional.cross_entropy(out.reshape(-1, 100), torch.roll(x, -1, 0).reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
    notes = [d for d in _from(gw) if d.kind == "forget_gate"]
    assert len(notes) <= 1
    for d in notes:
        assert "nan" not in d.message.lower() or math.isnan(bias)
        assert 0.0 <= d.evidence["keep"] <= 1.0


@pytest.mark.parametrize(("radius", "seq_len"), [(1e-30, 100), (0.9, 100_000), (3.0, 2000), (1e30, 100)])
def test_vanilla_rnn_bounds_far_beyond_the_float_range(radius, seq_len):
    model = vanilla_rnn(radius=0.5, d_in=2, hidden=4)
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(torch.eye(4) * radius)
    with gradwatch.watch(model, strict=True, autoload=False, console=Console(file=io.StringIO())) as gw:
        model(torch.randn(1, min(seq_len, 50), 2)).sum().backward()
        gw.step()
        gw.stash[gradwatch.plugins.recurrent.KEY].seq_len["rnn"] = seq_len  # as if such sequences ran
    (d,) = _from(gw)
    log10 = seq_len * math.log10(float(torch.tensor(radius, dtype=torch.float32)))  # γ of the float32 weight
    assert d.evidence["log10_bound"] == pytest.approx(log10, rel=1e-9)
    if abs(log10) > 308:  # past the float range: the message writes the power of ten
        assert f"1e{log10:+.0f}" in d.message
