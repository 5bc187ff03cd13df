"""Remedies that fit the fault and the model.

* A NaN produced inside a forward op gets advice for that op (from the ``origin`` the
  nonfinite detector records, CONTRACTS.md), never clipping or a lower learning rate.
* A deep stack without normalisation gets ``normalization``, saying where.
* Init-scale predictions follow the signal path: a residual block is judged per branch and
  its identity path keeps the gain near 1; a prediction the gradients contradict is "not
  the cause".
* Re-initialisation never moves weights the way that worsens the fault; activation
  rationales quote the bound of the activation present.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch import Diagnosis, Severity, anatomy
from gradwatch.kit import num
from gradwatch.testing import relu_mlp, residual_convnet, sigmoid_mlp, train


def watcher(model, optimizer=None, **kw):
    options = {"autoload": False, "report": False, "console": Console(file=io.StringIO()), "strict": True, **kw}
    return gradwatch.watch(model, optimizer, **options)


def diagnosis(kind, layers=("0",), step=3, summary="", **evidence):
    return Diagnosis(
        kind=kind, severity=Severity.WARNING, step=step, layers=layers, message=kind, summary=summary or kind, evidence=evidence
    )


def kinds(remedies):
    return [r.kind for r in remedies]


def run_snippet(model, snippet, x):
    clone = copy.deepcopy(model)
    ns = {"model": clone, "torch": torch, "nn": nn, "optimizer": torch.optim.SGD(clone.parameters(), lr=0.1)}
    exec(snippet, ns)
    ns["model"](x).float().pow(2).mean().backward()
    return ns["model"]


# ---------------------------------------------------------------------- faults produced in an op


def origin(**fields):
    base = {
        "module": "attn",
        "module_type": "SelfAttention",
        "input_min": -2.5,
        "input_max": 3.1,
        "input_finite": True,
        "input_has_zero": False,
        "input_has_negative": True,
        "input_dtype": "float32",
        "weights_finite": True,
        "output": "nan",
    }
    return {**base, **fields}


def produced(where="output", first_step=5, made=True, **fields):
    return diagnosis(
        "nonfinite",
        layers=(fields.get("module", "attn"),),
        step=first_step,
        summary=f"first non-finite value at step {first_step}",
        where=where,
        produced=made,
        origin=origin(**fields),
        first_step=first_step,
        chain={
            "loss": first_step,
            "gradients": first_step,
            "gradient_layers": [],
            "weights": None,
            "weight_layers": [],
            "output": 5,
        },
        module_type=fields.get("module_type", "SelfAttention"),
    )


@pytest.mark.parametrize(
    ("fields", "kind", "says"),
    [
        ({}, "finite_mask", "torch.finfo(scores.dtype).min"),
        ({"module_type": "MultiheadAttention"}, "finite_mask", "key_padding_mask.all(dim=-1)"),
        (
            {
                "module": "feat",
                "module_type": "LogFeatures",
                "input_min": 0.0,
                "input_has_zero": True,
                "input_has_negative": False,
                "output": "-inf",
            },
            "epsilon",
            "torch.log(x.clamp_min(1e-08))",
        ),
        (
            {"module": "feat", "module_type": "Norm", "input_min": -0.3, "output": "nan"},
            "epsilon",
            "torch.sqrt(x.clamp_min(0) + 1e-08)",
        ),
        (
            {
                "module": "feat",
                "module_type": "Ratio",
                "input_min": 0.0,
                "input_has_zero": True,
                "input_has_negative": False,
                "output": "inf",
            },
            "epsilon",
            "b.clamp_min(1e-08)",
        ),
        (
            {"module": "fc", "module_type": "Linear", "input_dtype": "float16", "input_max": 3.1e4, "output": "inf"},
            "precision",
            "run 'fc' in float32",
        ),
        (
            {
                "module": "feat",
                "module_type": "Energy",
                "input_min": 1.0,
                "input_max": 120.0,
                "input_has_negative": False,
                "output": "inf",
            },
            "log_space",
            "torch.logsumexp",
        ),
        (
            {"module": "feat", "module_type": "Mystery", "input_has_negative": False, "output": "nan"},
            "op_guard",
            "[-2.5, 3.1] (float32)",
        ),
    ],
)
def test_a_value_produced_in_a_forward_op_gets_advice_for_that_op(fields, kind, says):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    gw = watcher(model)
    remedies = gw.advise(produced(**fields))
    gw.detach()
    assert kinds(remedies) == [kind]  # no clipping, no lower_lr: the norms did not grow into it
    (remedy,) = remedies
    assert says in remedy.snippet
    module = fields.get("module", "attn")
    assert repr(module) in remedy.title and remedy.params["module"] == module
    assert "the norms did not grow into it" in remedy.rationale
    compile(remedy.snippet, "<snippet>", "exec")  # a pattern for forward(): valid Python


def test_op_advice_quotes_what_the_op_saw():
    gw = watcher(nn.Linear(2, 2))
    fields = {"module": "feat", "module_type": "LogFeatures", "input_min": 0.0, "input_max": 4.2, "input_has_zero": True}
    (remedy,) = gw.advise(produced(input_has_negative=False, output="-inf", **fields))
    gw.detach()
    assert remedy.params["op"] == "log" and remedy.params["eps"] == 1e-8
    assert "'feat' (LogFeatures) turned finite inputs (in [0, 4.2], float32)" in remedy.rationale
    assert "log(0) = -inf" in remedy.rationale


def test_a_fault_the_norms_grew_into_gets_clipping_too():
    gw = watcher(relu_mlp(depth=4, width=16))
    layers = gw.model_info.names
    zeros = torch.zeros(6, len(layers))
    empty = gradwatch.Series(torch.zeros(0, dtype=torch.int64), torch.zeros(0, len(layers)))
    gw.history.extend(
        gradwatch.StatsWindow(
            layers=layers, steps=torch.arange(6), grad_norm=zeros, grad_rms=zeros, grad_max=zeros, nonfinite=zeros,
            present=zeros + 1, total_norm=torch.tensor([1.0, 1.2, 0.9, 1.1, 40.0, 3e3]), weight_norm=empty,
            update_ratio=empty, first_step=0, last_step=5,
        )
    )  # fmt: skip
    remedies = gw.advise(produced(first_step=6, module="0", module_type="Linear", input_has_negative=True, output="inf"))
    gw.detach()
    assert kinds(remedies)[0] == "op_guard" and {"clipping", "lower_lr"} <= set(kinds(remedies))
    assert "the norms grew before it" in remedies[0].rationale and "did not grow" not in remedies[0].rationale


@pytest.mark.parametrize(
    ("where", "kind", "says"),
    [("gradient", "epsilon", "torch.sqrt(x + 1e-08)"), ("loss", "stable_loss", "nn.functional.cross_entropy")],
)
def test_a_gradient_or_loss_fault_without_growth_gets_no_clipping(where, kind, says):
    gw = watcher(relu_mlp(depth=3, width=8))
    d = diagnosis("nonfinite", layers=("2",), step=4, where=where, first_step=4, produced=False, origin=None)
    remedies = gw.advise(d)
    gw.detach()
    assert kinds(remedies) == [kind] and says in remedies[0].snippet


def test_a_batch_that_held_nan_is_named():
    gw = watcher(relu_mlp(depth=3, width=8))
    d = produced(made=False, module="0", module_type="Linear", input_finite=False, input_min=math.nan, input_max=math.nan)
    remedies = gw.advise(d)
    gw.detach()
    assert kinds(remedies) == ["input_data"] and "torch.isfinite(x).all()" in remedies[0].snippet


class SelfAttention(nn.Module):
    """Scaled dot-product attention that masks padding with -inf, as BERT's eager attention
    does with a boolean mask: a sequence that is all padding gets softmax over nothing."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.d = d

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(self.d)
        scores = scores.masked_fill(mask[:, None, :], float("-inf"))
        return torch.softmax(scores, -1) @ self.v(x)


class TinyBert(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.attn = SelfAttention(d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(self.norm(h + self.attn(h, tokens == 0)).mean(1))


class LogFeatures(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)  # ReLU outputs hold exact zeros: -inf


def _nonfinite_run(model, batches, steps, optimizer):
    with watcher(model, optimizer, report_every=5) as gw:
        train(model, steps, batches=batches, optimizer=optimizer, watcher=gw, loss_fn=nn.functional.mse_loss)
    return [d for d in gw.diagnoses if d.kind == "nonfinite"]


def test_bert_like_attention_with_a_fully_masked_row_gets_a_finite_mask():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def batches():
        for k in range(100):
            tokens = torch.randint(1, 50, (4, 6), generator=g)
            if k == 5:
                tokens[1] = 0  # one sequence all padding
            yield tokens, nn.functional.one_hot(tokens[:, 1] % 2, 2).float()

    model = TinyBert()
    (d,) = _nonfinite_run(model, batches(), 10, torch.optim.SGD(model.parameters(), lr=0.01))[:1]
    assert d.step == 5 and d.evidence.get("produced") is True
    found = kinds(d.remedies)
    assert found[0] == "finite_mask" and d.remedies[0].params["module"] == "attn", found
    assert not {"clipping", "lower_lr"} & set(found)


def test_log_of_an_exact_zero_gets_an_epsilon():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), LogFeatures(), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(0)
    batches = iter(lambda: (lambda x: (x, x[:, :1]))(torch.randn(16, 8, generator=g)), None)
    (d,) = _nonfinite_run(model, batches, 5, torch.optim.SGD(model.parameters(), lr=0.01))[:1]
    assert d.layers == ("2",) and d.evidence.get("produced") is True
    found = kinds(d.remedies)
    assert found == ["epsilon"] and d.remedies[0].params["op"] == "log", found


def test_a_produced_nan_gets_no_clipping():
    # The norms never rose before it: an op remedy, and no clipping or lower learning rate.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), LogFeatures(), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(0)
    batches = iter(lambda: (lambda x: (x, x[:, :1]))(torch.randn(16, 8, generator=g)), None)
    found = _nonfinite_run(model, batches, 5, torch.optim.SGD(model.parameters(), lr=0.01))
    assert found and all(not {"clipping", "lower_lr"} & set(kinds(d.remedies)) for d in found)
    assert kinds(found[0].remedies)[0] in ("epsilon", "op_guard")


# ---------------------------------------------------------------------- normalisation where it is missing


class Bottleneck(nn.Module):
    """ResNet-50's block (1x1, 3x3, 1x1 and a projection shortcut when the shape changes), without BatchNorm."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.relu = nn.ReLU()
        self.downsample = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.relu(self.conv3(out) + identity)


def resnet_without_norm(blocks=(2, 2, 2), width=8, classes=4, seed=0) -> nn.Sequential:
    """A small ResNet-50-like net (stem, three stages of bottlenecks) with every BatchNorm
    removed and Kaiming init, input ``[N, 3, 16, 16]``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.ReLU()]
    cin = width
    for stage, n in enumerate(blocks):
        cout = width * 4 * 2**stage
        for b in range(n):
            layers.append(Bottleneck(cin, cout // 4, cout, stride=2 if b == 0 and stage > 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


def test_deep_conv_net_without_norm_layers_gets_normalization_where_it_is_missing():
    model = resnet_without_norm()
    gw = watcher(model)
    remedies = {r.kind: r for r in gw.advise(diagnosis("exploding", onset=3, loss_diverging=True))}
    gw.detach()
    norm = remedies["normalization"]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert list(norm.params["layers"]) == [n for n in anatomy.anatomy(model).weight_layers if n in convs]
    assert all(spec["norm"] == "BatchNorm2d" for spec in norm.params["layers"].values())
    assert norm.params["zero_init"] == [n for n in convs if n.endswith("conv3")]  # each branch starts as the identity
    first = ", ".join(repr(n) for n in list(norm.params["layers"])[:4])
    assert norm.title.startswith(f"Insert BatchNorm2d after the {len(convs)} layer(s) {first} and {len(convs) - 4} more")
    x = torch.randn(2, 3, 16, 16)
    fixed = run_snippet(model, norm.snippet, x)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fixed.modules()) == len(convs)
    applied = norm.apply(copy.deepcopy(model))
    assert {n for n, m in applied.named_modules() if isinstance(m, nn.BatchNorm2d)} == {f"{n}.1" for n in norm.params["layers"]}
    assert all(applied.get_submodule(f"{n}.1").weight.abs().sum() == 0 for n in norm.params["zero_init"])
    # A healthy residual net with BatchNorm gets none.
    gw = watcher(residual_convnet())
    assert "normalization" not in kinds(gw.advise(diagnosis("exploding", onset=3)))
    gw.detach()


def test_deep_conv_net_without_norm_that_blows_up_in_training_gets_normalization():
    model = resnet_without_norm()
    g = torch.Generator().manual_seed(0)
    batches = iter(lambda: (torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 4, generator=g)), None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watcher(model, opt, stats_every=1, sample_every=1, report_every=5) as gw:
        train(model, 10, batches=batches, optimizer=opt, watcher=gw)
    faults = [d for d in gw.diagnoses if d.kind in ("exploding", "nonfinite")]
    assert faults, [(d.kind, d.message) for d in gw.diagnoses]
    assert any("normalization" in kinds(d.remedies) for d in faults), [(d.kind, kinds(d.remedies)) for d in faults]


# ---------------------------------------------------------------------- init chains along the signal path


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(width, width), nn.Linear(width, width), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.fc2(self.act(self.fc1(x))))


class ResMLP(nn.Module):
    """A stem, ``n`` residual blocks x + fc2(relu(fc1(x))) without normalisation, a head;
    weights drawn with std ``gain·sqrt(1/fan_in)`` (1: LeCun, ×0.71 of Kaiming per layer)."""

    def __init__(self, width: int = 64, n: int = 12, gain: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem, self.act = nn.Linear(16, width), nn.ReLU()
        self.blocks = nn.Sequential(*[Block(width) for _ in range(n)])
        self.head = nn.Linear(width, 1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=gain * math.sqrt(1 / m.in_features))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.act(self.stem(x))))


def _kaiming_gain(linear: nn.Linear) -> float:
    return float(linear.weight.detach().std()) / math.sqrt(2 / linear.in_features)


def _rms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


def test_residual_blocks_are_judged_per_branch_not_multiplied_through():
    model = ResMLP(gain=1.0)
    anat = anatomy.anatomy(model)
    scales = anatomy.init_scales(model, anat)
    # What a chain multiplied through all 25 judged layers says: the signal shrinks ×1.6e-4.
    through = math.prod(s.gain for s in scales)
    assert through < 1e-3
    prediction = anatomy.predict_signal(model, anat, scales)
    assert len(prediction.branches) == 12 and all(b.skip == () and b.skip_gain == 1.0 for b in prediction.branches)
    for k, (block, branch) in enumerate(zip(model.blocks, prediction.branches)):
        assert branch.layers == (f"blocks.{k}.fc1", f"blocks.{k}.fc2")
        assert branch.gain == pytest.approx(_kaiming_gain(block.fc1) * _kaiming_gain(block.fc2), rel=1e-5)
    # Plain torch: the blocks make the signal grow, as x + f(x) adds the branch's variance.
    x = torch.randn(4096, 16)
    with torch.no_grad():
        h = model.act(model.stem(x))
        measured = _rms(model.blocks(h)) / _rms(h)
    predicted = math.prod(math.sqrt(1 + b.gain**2) for b in prediction.branches)
    assert measured > 2 and predicted > 2  # the multiplied chain predicted the opposite
    assert 0.5 < predicted / measured < 2, (predicted, measured)
    # And the init plugin says nothing: the prediction is ×2.7, under its ×10 bar.
    with watcher(model, torch.optim.SGD(model.parameters(), lr=1e-3), report_every=4) as gw:
        train(model, 4, watcher=gw, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3))
    assert [d for d in gw.diagnoses if d.kind == "init_scale"] == []


def test_residual_branches_too_large_are_an_init_scale_warning_naming_them():
    model = ResMLP(gain=3.0)
    initial = {n: _kaiming_gain(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with watcher(model, torch.optim.SGD(model.parameters(), lr=1e-6), report_every=4) as gw:
        train(model, 4, watcher=gw, optimizer=torch.optim.SGD(model.parameters(), lr=1e-6))
    (d,) = [d for d in gw.diagnoses if d.kind == "init_scale"]
    assert d.severity == Severity.WARNING and not d.evidence["contradicted"]
    assert "12 residual additions, each branch summed with its skip path" in d.message
    branches = d.evidence["branches"]
    assert len(branches) == 12
    for k, branch in enumerate(branches.values()):
        assert branch["layers"] == [f"blocks.{k}.fc1", f"blocks.{k}.fc2"] and branch["skip"] == []
        assert branch["gain"] == pytest.approx(initial[f"blocks.{k}.fc1"] * initial[f"blocks.{k}.fc2"], rel=1e-4)
    assert d.evidence["depth_gain"] > 1e6
    (reinit,) = [r for r in d.remedies if r.kind == "reinit"]
    assert all(spec["std"] < spec["measured_std"] for spec in reinit.params["layers"].values())


def test_a_prediction_the_gradients_contradict_is_not_the_cause():
    # SqueezeNet-like: sigmoid convs drawn at 3x Xavier. The init predicts growth; the
    # gradients shrink toward the input (σ′ ≤ ¼); re-init would halve the weights.
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1), nn.Sigmoid()]
    for _ in range(9):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight, gain=3.0)
    g = torch.Generator().manual_seed(0)
    batches = iter(lambda: (torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 4, generator=g)), None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watcher(model, opt, report_every=8) as gw:
        train(model, 40, batches=batches, optimizer=opt, watcher=gw)
    (init,) = [d for d in gw.diagnoses if d.kind == "init_scale"]
    assert init.severity == Severity.INFO and init.evidence["contradicted"] is True
    assert init.evidence["depth_gain"] > 100 and init.evidence["measured_early_late"] < 0.1
    assert "init looks large" in init.message and "but the gradients shrink toward the input" in init.message
    assert init.message.endswith("not the cause") and init.remedies == ()
    # The vanishing it sits beside gets no re-initialisation (it would shrink the weights).
    vanishing = [d for d in gw.diagnoses if d.kind == "vanishing"]
    assert vanishing and all("reinit" not in kinds(d.remedies) for d in vanishing)
    gw2 = watcher(model)
    assert "reinit" not in kinds(gw2.advise(diagnosis("vanishing", decay_per_layer=0.4)))
    gw2.detach()


# ---------------------------------------------------------------------- re-initialisation's direction


def test_reinit_for_vanishing_only_raises_weights_and_states_the_sigmoid_bound():
    model = sigmoid_mlp(depth=20)
    gw = watcher(model)
    (reinit,) = [r for r in gw.advise(diagnosis("vanishing", decay_per_layer=0.35)) if r.kind == "reinit"]
    gw.detach()
    specs = reinit.params["layers"]
    assert specs and all(spec["std"] > spec["measured_std"] for spec in specs.values())
    for name, spec in specs.items():
        assert spec["measured_std"] == pytest.approx(float(model.get_submodule(name).weight.detach().std()), rel=1e-6)
    assert "re-initialisation alone does not fix the σ′ ≤ ¼ bound" in reinit.rationale


def test_reinit_for_exploding_only_shrinks_weights():
    big = relu_mlp(depth=10, width=32, seed=0)
    with torch.no_grad():
        for m in big.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(3.0)
    gw = watcher(big)
    (reinit,) = [r for r in gw.advise(diagnosis("exploding", onset=2)) if r.kind == "reinit"]
    assert all(spec["std"] < spec["measured_std"] for spec in reinit.params["layers"].values())
    assert reinit.params["predicted_gain"] > 10
    assert "reinit" not in kinds(gw.advise(diagnosis("vanishing", decay_per_layer=0.4)))  # it would worsen that
    gw.detach()
    small = relu_mlp(depth=10, width=32, init="lecun")
    gw = watcher(small)
    assert "reinit" not in kinds(gw.advise(diagnosis("exploding", onset=2)))
    gw.detach()


# ---------------------------------------------------------------------- the bound of the activation present


def tanh_mlp(depth: int = 16, width: int = 32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(16, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def test_tanh_rationale_quotes_tanh_bound_and_the_measured_decay():
    gw = watcher(tanh_mlp())
    (relu,) = [r for r in gw.advise(diagnosis("vanishing", decay_per_layer=0.626)) if r.kind == "relu"]
    gw.detach()
    assert "tanh′ ≤ 1 (1 only at 0) for the 15 Tanh" in relu.rationale
    assert f"tanh′(±1) = {num(1 - math.tanh(1) ** 2)}" in relu.rationale
    assert "the measured decay is ×0.626 per layer toward the input" in relu.rationale
    assert "0.25" not in relu.rationale and "¼" not in relu.rationale and "sigmoid" not in relu.rationale.lower()


def test_sigmoid_rationale_quotes_the_quarter_bound():
    gw = watcher(sigmoid_mlp(depth=20))
    (relu,) = [r for r in gw.advise(diagnosis("vanishing", decay_per_layer=0.35)) if r.kind == "relu"]
    gw.detach()
    assert f"σ′ ≤ ¼ for the 19 Sigmoid, so through 19 of them a gradient shrinks by up to 0.25^19 = {num(0.25**19)}" in (
        relu.rationale
    )
    assert "tanh" not in relu.rationale
