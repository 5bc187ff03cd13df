"""Models and fixtures for testing gradwatch and gradwatch plugins.

Opt-in: ``pytest_plugins = ["gradwatch.testing"]`` in a ``conftest.py`` gives the
fixtures below; the model builders are plain functions usable anywhere. Every model
is seeded, small, and trains on CPU in seconds. Each is a known case for a detector:
a healthy model must produce no warning, a broken one its diagnosis.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from gradwatch.hookspecs import hookimpl

__all__ = [
    "CADENCES",
    "EVERY_STEP",
    "Flag",
    "SPARSE",
    "NaNAt",
    "ReportCatcher",
    "advise",
    "diagnose",
    "TinyModel",
    "console",
    "exploding_rnn",
    "high_lr_mlp",
    "lstm_model",
    "nan_model",
    "pm",
    "recorder",
    "relu_mlp",
    "residual_convnet",
    "sigmoid_mlp",
    "tiny_model",
    "train",
    "transformer_encoder",
    "vanilla_rnn",
    "vanishing_model",
    "exploding_model",
    "regression_batches",
    "sequence_batches",
]


#: Statistics and sampled work on every step.
EVERY_STEP = {"stats_every": 1, "sample_every": 1}
#: Explicit integers keep their meaning: statistics every step, one sampled step in 8.
SPARSE = {"stats_every": 1, "sample_every": 8}
#: The cadences a detector is tested at (issue 10: judged with the defaults, and every rule
#: with statistics on every step too), as ``pytest.mark.parametrize("cadence", CADENCES)`` params.
CADENCES = [pytest.param({}, id="defaults"), pytest.param(EVERY_STEP, id="every_step"), pytest.param(SPARSE, id="every_8")]


class TinyModel(nn.Module):
    """Two linear layers around a ReLU (accelerate's ``ModelForTest``)."""

    def __init__(self, d_in: int = 8, d_hidden: int = 16, d_out: int = 2) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_hidden)
        self.act = nn.ReLU()
        self.linear2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.act(self.linear1(x)))


def sigmoid_mlp(depth: int = 20, width: int = 32, d_in: int = 16, d_out: int = 1, seed: int = 0) -> nn.Sequential:
    """A deep stack of Linear + Sigmoid with PyTorch's default init: gradients vanish
    toward the input (each sigmoid derivative is at most 0.25)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.Sigmoid()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


def relu_mlp(
    depth: int = 30, width: int = 64, d_in: int = 16, d_out: int = 1, init: str = "kaiming", seed: int = 0
) -> nn.Sequential:
    """A deep Linear + ReLU stack. ``init="lecun"`` draws weights with std
    ``sqrt(1/fan_in)`` (half the variance ReLU needs: the signal halves per layer,
    He et al. 2015), ``"kaiming"`` with ``sqrt(2/fan_in)``; biases are zero."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    dims = [d_in] + [width] * (depth - 1)
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(width, d_out))
    gain = {"kaiming": 2.0, "lecun": 1.0}[init]
    for module in layers:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=math.sqrt(gain / module.in_features))
            nn.init.zeros_(module.bias)
    return nn.Sequential(*layers)


class _RNNModel(nn.Module):
    def __init__(self, rnn: nn.Module, hidden: int, d_out: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])  # loss on the last step only


def vanilla_rnn(radius: float = 0.5, hidden: int = 32, d_in: int = 4, d_out: int = 1, seed: int = 0) -> nn.Module:
    """A one-layer tanh ``nn.RNN`` whose recurrent weight is rescaled to spectral radius
    ``radius``, with a linear head on the last step."""
    torch.manual_seed(seed)
    rnn = nn.RNN(d_in, hidden, batch_first=True, nonlinearity="tanh")
    with torch.no_grad():
        w = rnn.weight_hh_l0
        w.mul_(radius / torch.linalg.eigvals(w).abs().max().item())
    return _RNNModel(rnn, hidden, d_out)


def exploding_rnn(radius: float = 3.0, **kwargs: Any) -> nn.Module:
    """A vanilla RNN with recurrent spectral radius well above 1."""
    return vanilla_rnn(radius=radius, **kwargs)


def lstm_model(hidden: int = 32, d_in: int = 4, d_out: int = 1, seed: int = 0) -> nn.Module:
    """The same task as :func:`vanilla_rnn` with an ``nn.LSTM``."""
    torch.manual_seed(seed)
    return _RNNModel(nn.LSTM(d_in, hidden, batch_first=True), hidden, d_out)


def high_lr_mlp(width: int = 64, depth: int = 4, seed: int = 0) -> nn.Sequential:
    """A small ReLU MLP meant to be trained with SGD at a far too high learning rate
    (``lr=5.0`` with :func:`train` diverges within tens of steps)."""
    return relu_mlp(depth=depth, width=width, init="kaiming", seed=seed)


class NaNAt(nn.Module):
    """Passes its input through, except at forward call ``at`` (0-based) where it
    multiplies it by NaN: a module that produces NaN at a known step."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = self.calls == self.at and torch.is_grad_enabled()
        self.calls += 1
        return x * float("nan") if bad else x


def nan_model(at: int = 7, width: int = 32, seed: int = 0) -> nn.Sequential:
    """Linear/ReLU layers with a :class:`NaNAt` module in the middle, named ``"4"``
    (after ``"3"``, a Linear); it poisons the forward pass of training step ``at``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, width), nn.ReLU(),
        nn.Linear(width, width), nn.Linear(width, width), NaNAt(at), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 1),
    )  # fmt: skip


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


def residual_convnet(channels: int = 8, blocks: int = 4, classes: int = 4, seed: int = 0) -> nn.Module:
    """A healthy residual conv net with BatchNorm (input ``[N, 3, 8, 8]``)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        *[_ResBlock(channels) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, classes),
    )


class _Encoder(nn.Module):
    def __init__(self, d_model: int, layers: int, vocab: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def transformer_encoder(d_model: int = 32, layers: int = 2, vocab: int = 50, classes: int = 4, seed: int = 0) -> nn.Module:
    """A healthy transformer encoder with LayerNorm (input: int64 tokens ``[N, T]``)."""
    torch.manual_seed(seed)
    return _Encoder(d_model, layers, vocab, classes)


def regression_batches(
    d_in: int = 16, d_out: int = 1, batch: int = 64, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless stream of batches of a fixed random linear regression task."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, d_out, generator=g) / math.sqrt(d_in)
    while True:
        x = torch.randn(batch, d_in, generator=g)
        yield x, x @ w


def sequence_batches(
    seq_len: int = 100, d_in: int = 4, batch: int = 32, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequences whose target is a function of the *first* step: only a gradient that
    survives ``seq_len`` steps can learn it."""
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(batch, seq_len, d_in, generator=g)
        yield x, x[:, :1, :1].reshape(batch, 1)


def train(
    model: nn.Module,
    steps: int,
    *,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 0.01,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    watcher: Any = None,
    observe: bool = True,
    callback: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``model`` for ``steps`` SGD steps; returns the losses (read once, at the end).

    ``watcher`` (a :class:`gradwatch.Watcher`) is given each loss via ``observe_loss``
    unless ``observe=False`` (a loop that records nothing but the gradients).
    ``callback(step)`` runs after each backward, before the update.
    """
    batches = batches if batches is not None else regression_batches()
    optimizer = optimizer if optimizer is not None else torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = loss_fn or nn.functional.mse_loss
    losses = []
    for _ in range(steps):
        x, y = next(batches)
        loss = loss_fn(model(x), y)
        loss.backward()
        if watcher is not None and observe:
            watcher.observe_loss(loss)
        if callback is not None:
            callback(len(losses))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses).tolist()


class Flag:
    """A plugin that makes one ``flagged`` diagnosis per interval with rows and keeps its
    count of intervals in checkpoints (``gradwatch_state_dict``): ``plugins=[Flag()]``."""

    gradwatch_name = "flag"

    def __init__(self) -> None:
        self.intervals = 0

    @hookimpl
    def gradwatch_diagnose(self, window: Any, ctx: Any) -> Any:
        from gradwatch.types import Diagnosis, Severity

        if not len(window):
            return None
        self.intervals += 1
        return [Diagnosis(kind="flagged", severity=Severity.WARNING, step=int(window.steps[0]), message="seen", source="flag")]

    @hookimpl
    def gradwatch_state_dict(self) -> dict[str, Any]:
        return {"flag": {"intervals": self.intervals}}

    @hookimpl
    def gradwatch_load_state_dict(self, state: dict[str, Any]) -> None:
        self.intervals = state.get("flag", {}).get("intervals", 0)


class ReportCatcher:
    """A plugin that keeps every :class:`gradwatch.Report` it is given: ``plugins=[catcher]``."""

    gradwatch_name = "catch"

    def __init__(self) -> None:
        self.reports: list[Any] = []

    @hookimpl
    def gradwatch_report(self, report: Any) -> None:
        self.reports.append(report)


def diagnose(watcher: Any, window: Any) -> list[Any]:
    """Run ``watcher``'s host side on a hand-made :class:`gradwatch.StatsWindow`, as at a
    report interval: the window joins the history, every plugin diagnoses it, and on rank
    zero each diagnosis gets its remedies. Returns the new diagnoses, worst first (they are
    also in ``watcher.diagnoses``). For testing a detector on a known series of numbers."""
    ctx = watcher.context(step=max(window.last_step, 0))
    return watcher.pipeline.diagnose(window, watcher.model_info, ctx)[1]


def advise(watcher: Any, diagnosis: Any) -> list[Any]:
    """The remedies ``watcher``'s plugins give ``diagnosis`` (:meth:`gradwatch.Watcher.advise`)."""
    return watcher.advise(diagnosis)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def pm():
    """A fresh plugin manager with the built-ins and no third-party autoload."""
    from gradwatch.manager import make_plugin_manager

    return make_plugin_manager(autoload=False)


@pytest.fixture
def recorder(pm):
    """The hook calls made on ``pm``, as ``(hook_name, kwargs)`` (pytest's HookRecorder)."""
    calls: list[tuple[str, dict[str, Any]]] = []
    undo = pm.add_hookcall_monitoring(lambda name, impls, kwargs: calls.append((name, kwargs)), lambda *a: None)
    yield calls
    undo()


@pytest.fixture
def tiny_model() -> TinyModel:
    torch.manual_seed(0)
    return TinyModel()


@pytest.fixture
def vanishing_model() -> nn.Sequential:
    return sigmoid_mlp()


@pytest.fixture
def exploding_model() -> nn.Module:
    return exploding_rnn()


@pytest.fixture
def console():
    """A rich console writing plain text to ``console.file`` (a StringIO), 100 columns."""
    from rich.console import Console

    return Console(file=io.StringIO(), width=100, color_system=None, force_terminal=False)
