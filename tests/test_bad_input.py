"""Misuse and odd models, as a user stumbles on them: one test per row of docs/bad-input.md.

Each row either works (and the test checks what it gives) or raises one GradWatchError whose
message is one line that says what to do; nothing here stops the training loop or prints a
traceback from inside gradwatch.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import GradWatchError, GradWatchWarning, hookimpl
from gradwatch.cli import main as cli
from gradwatch.testing import TinyModel

DOC = Path(__file__).parent.parent / "docs" / "bad-input.md"


def _one_line_error(call, match: str) -> str:
    with pytest.raises(GradWatchError, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def _train(model: nn.Module, steps: int = 4, *, forward=None, **options) -> tuple[gradwatch.Watcher, list[str]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    forward = forward or (lambda m: m(torch.randn(3, 8)).sum())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, opt, report=False, autoload=False, stats_every=1, sample_every=1, **options) as gw:
            for _ in range(steps):
                forward(model).backward()
                opt.step()
                opt.zero_grad()
    return gw, [str(w.message) for w in caught if issubclass(w.category, GradWatchWarning)]


def test_doc_table_has_a_test_per_row() -> None:
    rows = [line for line in DOC.read_text().splitlines() if re.match(r"\| \d+ \|", line)]
    tests = {name for name in globals() if name.startswith("test_row_")}
    assert len(rows) == len(tests) == 16, (len(rows), sorted(tests))
    for row in rows:
        number = int(row.split("|")[1])
        assert any(t.startswith(f"test_row_{number:02d}_") for t in tests), row


def test_row_01_a_model_without_parameters() -> None:
    _one_line_error(
        lambda: gradwatch.watch(nn.ReLU()), "ReLU has no trainable parameters.*unfreeze a layer or watch another model"
    )


def test_row_02_every_parameter_frozen() -> None:
    model = TinyModel().requires_grad_(False)
    _one_line_error(lambda: gradwatch.watch(model), "TinyModel has no trainable parameters")
    from gradwatch.watch import Watcher  # params= is the framework doors' per-optimizer share

    stray = [nn.Parameter(torch.zeros(1))]
    _one_line_error(lambda: Watcher(TinyModel(), config=gradwatch.WatchConfig(), params=stray), "none of the 1 parameter")


@pytest.mark.parametrize("optimizer", ["adam", torch.optim.SGD, nn.Linear(2, 2), [1, 2]])
def test_row_03_a_non_optimizer_passed_as_optimizer(optimizer) -> None:
    _one_line_error(
        lambda: gradwatch.watch(TinyModel(), optimizer), "optimizer must be a torch.optim.Optimizer, a list of them, or None"
    )
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    _one_line_error(lambda: gradwatch.watch(TinyModel(), other), "pass the optimizer that trains this model")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"clip": "nonsense"}, "unknown clip mode 'nonsense'; use a max norm"),
        ({"stats_every": 0}, "stats_every must be a positive integer"),
        ({"report_every": -5}, "report_every must be a positive integer"),
        ({"clip": -1.0}, "must be a positive finite number"),
        ({"options": {"vanishing": {"ratio": -1}}}, "vanishing option ratio must be a number > 0"),
        ({"options": {"activations": {"dead": 1.5}}}, "activations option dead must be a number > 0 and < 1"),
        ({"options": {"exploding": {"spike": -3}}}, "exploding option spike must be a number > 1"),
        ({"clip": gradwatch.ZClip(warmup=5), "options": {"clipping": {"z": 2}}}, "the clipping plugin takes no options"),
        ({"stats_evry": 2}, r"did you mean 'stats_every'"),  # item 6: tests/test_config.py covers both doors
        ({"clip": 1.0, "disable": ["clipping"]}, "needs the 'clipping' plugin, which is disabled"),
    ],
)
def test_row_04_bad_option_values(options, match) -> None:
    _one_line_error(lambda: gradwatch.watch(TinyModel(), autoload=False, **options), match)


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        return {"logits": self.b(h), "extra": (h, [h * 2, "text", 3]), "none": None}


def test_row_05_dict_and_tuple_outputs() -> None:
    gw, said = _train(
        DictModel(), forward=lambda m: (lambda out: out["logits"].sum() + out["extra"][1][0].sum())(m(torch.randn(3, 8)))
    )
    assert not said and gw.history.steps.tolist() == [0, 1, 2, 3] and gw.model_info.names == ("a", "b")


def test_row_06_sparse_embeddings() -> None:
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8, sparse=True)
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            return self.head(self.emb(x).mean(1))

    gw, said = _train(Bag(), forward=lambda m: m(torch.randint(0, 20, (4, 5))).sum())
    assert not said and gw.history.steps.tolist() == [0, 1, 2, 3]
    assert bool((gw.history.grad_norm[:, 0] > 0).all())  # measured, see tests/test_sparse.py


def test_row_07_tied_weights() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.emb(x))

    model = Tied()
    seen = []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt, report=False, autoload=False, stats_every=1) as gw:
        for _ in range(3):
            model(torch.randint(0, 10, (3, 5))).square().mean().backward()
            seen.append(float(model.emb.weight.grad.norm()))  # one tensor, both uses summed
            opt.step()
            opt.zero_grad()
    assert gw.model_info.names == ("emb",)  # counted once, for the first layer that uses it
    torch.testing.assert_close(gw.history.grad_norm[:, 0], torch.tensor(seen))


def test_row_08_a_model_called_twice_per_step() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    gw, said = _train(model, 6, forward=lambda m: m(torch.randn(3, 8)).sum() + m(torch.randn(3, 8)).sum())
    assert not said and gw.step_count == 6 and gw.history.steps.tolist() == list(range(6))


def test_row_09_two_watchers_on_one_model() -> None:
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, report=False, autoload=False):
        _one_line_error(lambda: gradwatch.watch(model, opt, report=False, autoload=False), "detach it first")
    # One watcher per optimizer (a GAN's generator and discriminator) is the supported way.
    gen, disc = torch.optim.SGD(model.linear1.parameters(), lr=0.1), torch.optim.SGD(model.linear2.parameters(), lr=0.1)
    with gradwatch.watch(model, gen, report=False, autoload=False), gradwatch.watch(model, disc, report=False, autoload=False):
        pass


def test_row_10_the_watcher_used_after_its_block() -> None:
    model = TinyModel()
    gw, _ = _train(model, 3)
    opt = gw.optimizers[0]
    model(torch.randn(2, 8)).sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gw.step()
        gw.step()
        gw.observe_loss(torch.tensor(1.0))
        opt.step()
    said = [str(w.message) for w in caught if issubclass(w.category, GradWatchWarning)]
    assert len(said) == 1 and "call gw.attach() to watch again" in said[0]
    assert gw.history.steps.tolist() == [0, 1, 2] and gw.state_dict()["step"] == 3  # still readable
    gw.attach()  # and it watches again (tests/test_reattach.py)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    gw.detach()
    assert gw.history.steps.tolist() == [0, 1, 2, 3]


def _log(tmp_path: Path, text: str | bytes, name: str = "run.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("", "the file is empty"),
        ('{"type":"header","sch', "the header line was cut mid-write"),
        ("hello world\n", "not JSON"),
        ('{"type":"interval"}\n', "the first record is 'interval', not a header"),
        ("[1, 2]\n", "not a gradwatch record"),
        (bytes(range(256)) * 40_000, "not JSON"),  # 10 MB of binary on one line
    ],
    ids=["empty", "truncated", "not-json", "no-header", "not-a-record", "huge-binary"],
)
def test_row_11_a_bad_run_log_given_to_the_cli(tmp_path, capsys, content, said) -> None:
    for command in (["report"], ["plot", "-o", str(tmp_path / "x.png")]):
        assert cli([command[0], _log(tmp_path, content), *command[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and err.startswith("gradwatch: error: ") and len(err.splitlines()) == 1, err
    assert cli(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli(["report", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_row_12_a_huge_run_log_reads_in_one_pass(tmp_path) -> None:
    path = tmp_path / "huge.jsonl"
    gradwatch.watch(TinyModel(), report=False, autoload=False, log=str(path)).detach()
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, report=False, autoload=False, log=str(path), stats_every=1, report_every=50):
        for _ in range(50):
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
    lines = path.read_text().splitlines()
    header, interval = lines[0], next(x for x in lines if '"type":"interval"' in x)
    record = json.loads(interval)
    body = []
    for k in range(4000):  # 200k steps of records, ~40 MB
        record.update(first_step=50 * k, last_step=50 * k + 49, steps=list(range(50 * k, 50 * k + 50)))
        body.append(json.dumps(record))
    path.write_text("\n".join([header, *body]) + "\n")
    from gradwatch.logfile import read_log

    log = read_log(path)
    assert len(log.intervals) == 4000 and log.last_step == 199_999
    assert cli(["report", str(path)]) == 0


def test_row_13_a_plugin_that_raises_in_every_hook() -> None:
    class Raiser:
        gradwatch_name = "raiser"

    names = [n for n in dir(gradwatch.hookspecs) if n.startswith("gradwatch_") and n != "gradwatch_actions"]
    for hook in names:

        def boom(self, hook=hook):
            raise RuntimeError(f"boom in {hook}\n" + "a dispatcher's list of backends\n" * 100)

        boom.__name__ = hook
        setattr(Raiser, hook, hookimpl(boom))
    model = nn.Sequential(nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1))
    gw, said = _train(model, 8, plugins=[Raiser()], report_every=4)
    assert len(said) == 1 and "plugin 'raiser' raised RuntimeError: boom in gradwatch_configure" in said[0]
    assert "\n" not in said[0] and "switched off" in said[0]
    assert gw.history.steps.tolist() == list(range(8))  # the built-ins went on


def test_row_14_a_plugin_that_returns_the_wrong_type() -> None:
    class Wrong:
        @hookimpl
        def gradwatch_diagnose(self):
            return "something is off"

    gw, said = _train(TinyModel(), 8, plugins=[Wrong()], report_every=4)
    assert len(said) == 1 and "plugin 'Wrong' returned str from gradwatch_diagnose" in said[0]
    assert gw.history.steps.tolist() == list(range(8))  # (tests/test_plugin_returns.py: every hook)


def test_row_15_a_plugin_registered_the_wrong_way() -> None:
    class Forgot:
        def gradwatch_diagnose(self, window):
            return None

    _one_line_error(lambda: gradwatch.watch(TinyModel(), plugins=[Forgot()]), "not marked with @gradwatch.hookimpl")
    _one_line_error(lambda: gradwatch.watch(TinyModel(), plugins=["not_a_module_xyz"]), "cannot import module")
    _one_line_error(lambda: gradwatch.watch(TinyModel(), plugins=[len]), "implements no gradwatch_\\* hook")


def test_row_16_an_internal_error_is_one_line_and_training_goes_on(monkeypatch) -> None:
    def broken(self, grad_scale=None):
        raise RuntimeError("Could not run 'aten::op' with arguments from the 'SparseCPU' backend.\n" + "CPU: registered\n" * 100)

    monkeypatch.setattr(gradwatch.stats.Plan, "batch", broken)
    gw, said = _train(TinyModel(), 4)
    assert len(said) == 1 and said[0].startswith(
        "gradwatch stopped watching after an internal error (RuntimeError: Could not run"
    )
    assert "\n" not in said[0] and "training goes on unwatched" in said[0]
