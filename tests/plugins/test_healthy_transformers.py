"""Healthy transformers that learn are not exploding (issue 10, part 5).

A transformer's gradient norm grows as it starts to learn (a small BERT classifier's from
0.5 to 10-25 within 150 steps of AdamW while its loss falls): the z-score rule this replaced
called that "spiked 2 times (z up to 13.0)". Each model here is built in the test, seeded,
trained with AdamW on a task it can learn (the loss is checked to fall), and must get no
warning from any detector: with the default options, with statistics every step and every
fourth step, at three seeds, and without ``observe_loss`` (the detectors judge the run
against its own history) as well as with it.
"""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch

CADENCES = {"default": {}, "every_step": {"stats_every": 1, "sample_every": 1}, "every_4": {"stats_every": 4}}
SEEDS = (0, 1, 2)


class Encoder(nn.Module):
    """Token embedding + learned positions, two pre-LN encoder layers, mean pooling."""

    def __init__(self, vocab: int = 32, d_model: int = 32, length: int = 12, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(1, length, d_model))
        layer = nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(tokens) + self.pos)).mean(1))


class ViT(nn.Module):
    """Patch-embedding conv, a class token, learned positions, two pre-LN encoder layers."""

    def __init__(self, size: int = 16, patch: int = 4, d_model: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d_model, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (size // patch) ** 2 + 1, d_model))
        layer = nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch(images).flatten(2).transpose(1, 2)
        h = torch.cat((self.cls.expand(len(images), -1, -1), patches), 1) + self.pos
        return self.head(self.norm(self.encoder(h))[:, 0])


def token_batches(seed: int, vocab: int = 32, length: int = 12, batch: int = 32, classes: int = 4, marked: float = 0.3):
    """Class ``c`` draws a share ``marked`` of its tokens from the ``c``-th quarter of the vocabulary."""
    g = torch.Generator().manual_seed(1000 + seed)
    band = vocab // classes
    while True:
        y = torch.randint(0, classes, (batch,), generator=g)
        x = torch.randint(0, vocab, (batch, length), generator=g)
        chosen = torch.rand(batch, length, generator=g) < marked
        yield torch.where(chosen, y[:, None] * band + torch.randint(0, band, (batch, length), generator=g), x), y


def image_batches(seed: int, size: int = 16, batch: int = 32):
    """Noise images; classes 0-2 brighten one random quadrant of that channel, class 3 none."""
    g = torch.Generator().manual_seed(2000 + seed)
    h = size // 2
    while True:
        x = torch.randn(batch, 3, size, size, generator=g)
        y = torch.randint(0, 4, (batch,), generator=g)
        quadrant = torch.randint(0, 4, (batch,), generator=g)
        for i in range(batch):
            if y[i] < 3:
                r, c = divmod(int(quadrant[i]), 2)
                x[i, int(y[i]), r * h : (r + 1) * h, c * h : (c + 1) * h] += 1.0
        yield x, y


def bert(seed: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=4,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(config)


def _train(name: str, seed: int, steps: int, lr: float, observe: bool = False, **options):
    torch.manual_seed(seed)
    if name == "encoder":
        model, batches, forward = Encoder(), token_batches(seed), None
    elif name == "vit":
        model, batches, forward = ViT(), image_batches(seed), None
    else:
        model, batches = bert(seed), token_batches(seed, vocab=64, length=16, marked=0.5)
        forward = lambda x: model(input_ids=x).logits  # noqa: E731
    forward = forward or model
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    with gradwatch.watch(model, opt, console=Console(file=io.StringIO()), autoload=False, strict=True, **options) as gw:
        for _ in range(steps):
            x, y = next(batches)
            loss = nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            if observe:
                gw.observe_loss(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
    return gw, torch.stack(losses).tolist()


def _loud(gw) -> list[tuple[str, str]]:
    return [(d.kind, d.message) for d in gw.diagnoses if d.severity.value in ("warning", "error")]


def _falls(losses: list[float]) -> bool:
    return sum(losses[-10:]) < 0.9 * sum(losses[:10])


@pytest.mark.parametrize("cadence", list(CADENCES))
@pytest.mark.parametrize(("name", "lr"), [("encoder", 1e-3), ("vit", 1e-3), ("bert", 3e-4)])
def test_a_learning_transformer_is_silent_at_every_cadence_and_seed(name, lr, cadence):
    for seed in SEEDS:
        gw, losses = _train(name, seed, 80, lr, **CADENCES[cadence])
        assert _falls(losses), (name, seed, losses[:3], losses[-3:])
        assert _loud(gw) == [], (name, seed, _loud(gw))


@pytest.mark.parametrize("seed", SEEDS)
def test_bert_learning_for_150_steps_is_silent_with_and_without_the_loss(seed):
    """The reported false alarm: the norm grows ×10-25 over these steps while the loss falls."""
    for observe in (False, True):
        gw, losses = _train("bert", seed, 150, 3e-4, observe=observe, stats_every=1, sample_every=1)
        totals = gw.history.total_norm
        assert _falls(losses) and float(totals[-20:].median()) > 3 * float(totals[:20].median())
        assert _loud(gw) == [], (seed, observe, _loud(gw))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["encoder", "vit", "bert"])
def test_at_lr_1e_3_for_150_steps_every_step(name):
    """BERT's norm at lr 1e-3 reaches up to 11× the median of the 50 rows before it as it learns,
    but stays up: no spike comes back down."""
    for seed in SEEDS:
        gw, losses = _train(name, seed, 150, 1e-3, stats_every=1, sample_every=1)
        assert _falls(losses) and _loud(gw) == [], (seed, _loud(gw))
