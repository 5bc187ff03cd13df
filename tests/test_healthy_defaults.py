"""Healthy models stay silent over a few hundred steps, with the defaults and with statistics
every step (issue 10): a denser cadence must not mean more false alarms.

The four healthy scenarios: a deep Kaiming ReLU net, a ResNet with BatchNorm, a transformer
encoder with LayerNorm and an LSTM with a large forget-gate bias, each on a task it learns
(the loss is checked to fall, so "healthy" is measured, not assumed). No loss is recorded.
"""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch.testing import lstm_model, regression_batches, relu_mlp, residual_convnet, sequence_batches, transformer_encoder

STEPS = 300


def _relu():
    return relu_mlp(depth=12, width=64), regression_batches(), nn.functional.mse_loss, torch.optim.SGD, {"lr": 0.01}


def _resnet():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 8 * 8, 4, generator=g) / 14

    def batches():
        while True:
            x = torch.randn(16, 3, 8, 8, generator=g)
            yield x, (x.flatten(1) @ w).argmax(1)

    return residual_convnet(), batches(), nn.functional.cross_entropy, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}


def _transformer():
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            tokens = torch.randint(0, 50, (16, 8), generator=g)
            yield tokens, tokens[:, 0] % 4

    return transformer_encoder(), batches(), nn.functional.cross_entropy, torch.optim.AdamW, {"lr": 1e-3}


def _lstm():
    model = lstm_model(hidden=32)
    rnn = model.rnn
    hidden = rnn.hidden_size
    with torch.no_grad():  # the forget gate's bias at 1 + 1 (Jozefowicz et al. 2015)
        rnn.bias_ih_l0[hidden : 2 * hidden].fill_(1.0)
        rnn.bias_hh_l0[hidden : 2 * hidden].fill_(1.0)
    return model, sequence_batches(seq_len=30, batch=16), nn.functional.mse_loss, torch.optim.Adam, {"lr": 3e-3}


MODELS = {"relu": _relu, "resnet": _resnet, "transformer": _transformer, "lstm": _lstm}


# The defaults, and the periods an auto cadence may choose after its dense start (it decides
# from the machine's timings, so a test of the defaults alone would not cover them all).
CADENCES = {
    "defaults": {},
    "every_step": {"stats_every": 1, "sample_every": 1},
    "every_8": {"stats_every": 8, "sample_every": 32},
    "every_64": {"stats_every": 64, "sample_every": 128},
}


@pytest.mark.parametrize("cadence", list(CADENCES.values()), ids=list(CADENCES))
@pytest.mark.parametrize("name", list(MODELS))
def test_healthy_models_are_silent(name, cadence):
    model, batches, loss_fn, optimizer, hyper = MODELS[name]()
    opt = optimizer(model.parameters(), **hyper)
    losses = []
    with gradwatch.watch(model, opt, console=Console(file=io.StringIO()), strict=True, **cadence) as gw:
        for _ in range(STEPS):
            x, y = next(batches)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < first, (name, first, last)  # it learns
    loud = [(d.kind, d.message) for d in gw.diagnoses if d.severity in (gradwatch.Severity.WARNING, gradwatch.Severity.ERROR)]
    assert loud == [], loud
    assert gw.step_count == STEPS
