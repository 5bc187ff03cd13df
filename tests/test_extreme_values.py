"""Every built-in plugin survives extreme models: weights ×1e3 over 130 layers, zero weights,
learning rates of 1e6–1e8, diverged gate biases (issue 12.3: products over depth or time in log
space). "Survives" means no plugin is switched off and no internal error: the warning text of
gradwatch would name it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import GradWatchWarning
from gradwatch.testing import regression_batches, relu_mlp, sigmoid_mlp


class _LSTMHead(nn.Module):
    def __init__(self, bias: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(16, 8, batch_first=True)
        self.fc = nn.Linear(8, 1)
        with torch.no_grad():
            self.rnn.bias_ih_l0[8:16] = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x.unsqueeze(1).repeat(1, 40, 1))[0][:, -1])


def _scaled(model: nn.Module, scale: float) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


CASES = {
    "130 relu layers x1e3": (lambda: _scaled(relu_mlp(depth=130, width=16), 1e3), 0.01),
    "60 relu layers x1e-3": (lambda: _scaled(relu_mlp(depth=60, width=16), 1e-3), 0.01),
    "zero weights": (lambda: _scaled(relu_mlp(depth=20, width=16), 0.0), 0.01),
    "sigmoid x1e6": (lambda: _scaled(sigmoid_mlp(depth=30), 1e6), 0.01),
    "relu at lr 1e6": (lambda: relu_mlp(depth=6), 1e6),
    "sigmoid at lr 1e8": (lambda: sigmoid_mlp(depth=10), 1e8),
    "lstm forget bias -1000": (lambda: _LSTMHead(-1000.0), 0.01),
    "lstm forget bias +1e30": (lambda: _LSTMHead(1e30), 0.01),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_plugin_is_switched_off_by_extreme_values(name: str) -> None:
    make, lr = CASES[name]
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batches = regression_batches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, opt, report=False, stats_every=1, sample_every=1, report_every=4, autoload=False) as gw:
            for _ in range(8):
                x, y = next(batches)
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                gw.observe_loss(loss)
                opt.step()
                opt.zero_grad()
    said = [str(w.message) for w in caught if issubclass(w.category, GradWatchWarning)]
    assert not said, said
    assert gw.step_count == 8 and len(gw.history) == 8
    for d in gw.diagnoses:  # every message and remedy was written (numbers through kit.num)
        assert d.message and all(r.title for r in d.remedies)
