"""Sparse gradients (nn.Embedding(sparse=True)) are measured, clipped and never end the watch (issue 12.8)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import AGC, GradWatchWarning


class Bag(nn.Module):
    """Sparse embedding -> mean over the sequence -> linear head."""

    def __init__(self, sparse: bool = True, declared: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 8, sparse=sparse)
        self.declared = declared
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.declared:
            vectors = self.emb(x)
        else:  # sparse gradients from a functional call: the module says sparse=False
            vectors = nn.functional.embedding(x, self.emb.weight, sparse=True)
        return self.head(vectors.mean(1))


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    # Repeated indices in a batch: the raw sparse gradient holds duplicates that must be summed.
    return [(torch.randint(0, 10, (4, 6), generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]


def _dense_norms(model: Bag) -> list[float]:
    return [
        float(model.emb.weight.grad.to_dense().norm()),
        float(torch.cat([p.grad.flatten() for p in model.head.parameters()]).norm()),
    ]


@pytest.mark.parametrize("declared", [True, False], ids=["sparse=True", "functional"])
@pytest.mark.parametrize("optimizer", ["sgd", "sparse_adam"])
def test_sparse_embedding_is_measured_like_its_dense_gradient(declared: bool, optimizer: str) -> None:
    model = Bag(declared=declared)
    if optimizer == "sgd":
        opts = [torch.optim.SGD(model.parameters(), lr=0.1)]
    else:  # SparseAdam takes sparse gradients only: the head gets its own optimizer
        opts = [torch.optim.SparseAdam([model.emb.weight], lr=0.01), torch.optim.Adam(model.head.parameters(), lr=0.01)]
    expected, maxima = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)
        with gradwatch.watch(model, opts, report=False, stats_every=1, autoload=False) as gw:
            for x, y in _batches(6):
                nn.functional.mse_loss(model(x), y).backward()
                expected.append(_dense_norms(model))
                maxima.append(float(model.emb.weight.grad.to_dense().abs().max()))
                for o in opts:
                    o.step()
                for o in opts:
                    o.zero_grad()
    # A functional embedding does not run its module, so "emb" comes after the layers that ran.
    names = ("emb", "head") if declared else ("head", "emb")
    assert gw.model_info.names == names
    order = [0, 1] if declared else [1, 0]
    assert gw.history.steps.tolist() == list(range(6))  # every layer, every step
    torch.testing.assert_close(gw.history.grad_norm, torch.tensor(expected)[:, order], rtol=1e-5, atol=1e-7)
    # max |g| of the summed duplicates, as the dense gradient has it
    emb = names.index("emb")
    torch.testing.assert_close(gw.history.grad_max[:, emb], torch.tensor(maxima), rtol=1e-6, atol=0)


def test_sparse_gradients_are_clipped_with_the_rest() -> None:
    model = Bag()
    ref = copy.deepcopy(model)
    x, y = _batches(1)[0]
    with gradwatch.watch(model, clip=0.01, report=False, autoload=False, strict=True) as gw:
        for m in (model, ref):
            nn.functional.mse_loss(m(x), y).backward()
        dense = [ref.emb.weight.grad.to_dense(), *(p.grad for p in ref.head.parameters())]
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in dense]))
        coef = torch.clamp(0.01 / (total + 1e-6), max=1.0)
        gw.step()
    assert coef < 1
    torch.testing.assert_close(model.emb.weight.grad.to_dense(), dense[0] * coef)
    for p, g in zip(model.head.parameters(), dense[1:]):
        torch.testing.assert_close(p.grad, g * coef)
    assert gw.actions and gw.actions[0].kind == "clip"


def test_agc_clips_sparse_gradients_by_their_joint_norm() -> None:
    model = Bag()
    x, y = _batches(1)[0]
    with gradwatch.watch(model, clip=AGC(exclude=(), exclude_max_norm=1e-3), report=False, autoload=False, strict=True) as gw:
        nn.functional.mse_loss(model(x), y).backward()
        raw = model.emb.weight.grad.to_dense().clone()
        gw.step()
    clipped = model.emb.weight.grad.to_dense()
    torch.testing.assert_close(clipped, raw * min(1.0, 1e-3 / (float(raw.norm()) + 1e-6)))
