"""Real architectures under ``watch()`` with its defaults (issue 12): Hugging Face GPT-2, BERT
(sequence classification), T5, ViT and ResNet, built from their config objects (no download),
~20 AdamW steps on synthetic data each.

For each: no exception and no GradWatchWarning; no warning- or error-severity diagnosis on
these healthy runs; on every statistics step (whichever the cadence picked: read from
``gw.history.steps``) the per-layer gradient norms equal plain torch's norms of the same
parameters' gradients taken right before ``optimizer.step()``; no hook left after detach; the
run log reads back through ``gradwatch report``. One case runs under ``torch.compile`` (slow:
compiling takes tens of seconds on CPU) and one with every ReLU made ``nn.ReLU(inplace=True)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import GradWatchWarning, Severity
from gradwatch.cli import main as cli

transformers = pytest.importorskip("transformers")

STEPS = 20
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning:transformers.*")


def _tokens(vocab: int, shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=g)


def gpt2() -> tuple[nn.Module, Callable[[torch.Generator], dict[str, Any]]]:
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)

    def batch(g):
        ids = _tokens(128, (4, 16), g)
        return {"input_ids": ids, "labels": ids}

    return model, batch


def bert() -> tuple[nn.Module, Callable[[torch.Generator], dict[str, Any]]]:
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config)

    def batch(g):
        return {"input_ids": _tokens(128, (8, 16), g), "labels": torch.randint(0, 3, (8,), generator=g)}

    return model, batch


def t5() -> tuple[nn.Module, Callable[[torch.Generator], dict[str, Any]]]:
    config = transformers.T5Config(
        d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16, vocab_size=128,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config)

    def batch(g):
        return {"input_ids": _tokens(128, (4, 12), g), "labels": _tokens(128, (4, 8), g)}

    return model, batch


def vit() -> tuple[nn.Module, Callable[[torch.Generator], dict[str, Any]]]:
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=4,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config)

    def batch(g):
        return {"pixel_values": torch.randn(8, 3, 16, 16, generator=g), "labels": torch.randint(0, 4, (8,), generator=g)}

    return model, batch


def resnet(inplace: bool = False) -> tuple[nn.Module, Callable[[torch.Generator], dict[str, Any]]]:
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=4)
    model = transformers.ResNetForImageClassification(config)
    if inplace:
        relus = [name for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
        assert relus
        for name in relus:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, nn.ReLU(inplace=True))

    def batch(g):
        return {"pixel_values": torch.randn(8, 3, 32, 32, generator=g), "labels": torch.randint(0, 4, (8,), generator=g)}

    return model, batch


MODELS: dict[str, Callable[[], tuple[nn.Module, Callable[[torch.Generator], dict[str, Any]]]]] = {
    "gpt2": gpt2,
    "bert": bert,
    "t5": t5,
    "vit": vit,
    "resnet": resnet,
    "resnet-relu-inplace": lambda: resnet(inplace=True),
}


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def _train(name: str, tmp_path, *, compile: bool = False):
    torch.manual_seed(0)
    model, batch_of = MODELS[name]()
    model.train()
    before = _hooks(model)
    runner: nn.Module = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    log = tmp_path / f"{name}.jsonl"
    reference: list[dict[int, float]] = []  # per step: squared grad norm of each parameter, plain torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(runner, opt, log=str(log), report=False) as gw:
            for _ in range(STEPS):
                loss = runner(**batch_of(g)).loss
                loss.backward()
                gw.observe_loss(loss)
                with torch.no_grad():
                    reference.append(
                        {id(p): float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None}
                    )
                opt.step()
                opt.zero_grad()
    said = [str(w.message) for w in caught if issubclass(w.category, GradWatchWarning)]
    return gw, model, reference, said, before, log


def _check(name: str, tmp_path, *, compile: bool = False) -> None:
    gw, model, reference, said, hooks_before, log = _train(name, tmp_path, compile=compile)
    if compile:  # the one warning compile gives: sampled forward probes are off
        said = [s for s in said if "torch.compile" not in s]
    assert not said, said
    loud = [d for d in gw.diagnoses if d.severity in (Severity.WARNING, Severity.ERROR)]
    known = FALSE_ALARMS.get(name)
    assert not [d for d in loud if known is None or d.kind != known[0]], [(d.kind, d.message) for d in loud]
    assert gw.step_count == STEPS
    steps = gw.history.steps.tolist()
    assert steps and steps[0] == 0 and all(0 <= s < STEPS for s in steps)
    # Per-layer norms on the statistics steps: the layer's own (watched) parameters, plain torch.
    layers = gw.model_info.layers
    expected = torch.tensor(
        [
            [sum(reference[s].get(id(layer.module.get_parameter(p)), 0.0) for p in layer.param_names) ** 0.5 for layer in layers]
            for s in steps
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(gw.history.grad_norm.double(), expected, rtol=2e-5, atol=1e-8)
    assert _hooks(model) == hooks_before
    assert cli(["report", str(log)]) == 0
    if known is not None and loud:
        pytest.xfail(known[1])  # everything else above held; the detector is another issue's (reported)


#: Known false alarms of a detector on these healthy runs, by model: ``(kind, why)``; reported to
#: the detector's owner, not loosened here, and the case's other checks still run first. None
#: now: a healthy BERT's query/key weights (gradient RMS ~3e-7 at init in every block) once read
#: as vanishing; a layer of the deeper half as starved as the first quarter is a layer-type
#: effect (plugins/vanishing.py, issue 10).
FALSE_ALARMS: dict[str, tuple[str, str]] = {}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_model_with_defaults(name: str, tmp_path) -> None:
    _check(name, tmp_path)


@pytest.mark.slow
def test_real_model_under_torch_compile(tmp_path) -> None:
    _check("gpt2", tmp_path, compile=True)
