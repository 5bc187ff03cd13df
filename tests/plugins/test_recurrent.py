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
