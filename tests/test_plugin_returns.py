"""A plugin's wrong return value switches off that plugin only; every registration form works or says what to pass (issue 12.9)."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

import gradwatch
from gradwatch import Action, Diagnosis, GradWatchError, GradWatchWarning, Remedy, Severity, hookimpl
from gradwatch.testing import TinyModel, regression_batches, sigmoid_mlp


def _train(model, steps: int = 8, **options) -> tuple[gradwatch.Watcher, list[str]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = regression_batches(
        d_in=model[0].in_features if isinstance(model, torch.nn.Sequential) else 8,
        d_out=1 if isinstance(model, torch.nn.Sequential) else 2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(
            model, opt, report=False, autoload=False, stats_every=1, sample_every=1, report_every=4, **options
        ) as gw:
            for _ in range(steps):
                x, y = next(batches)
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                opt.zero_grad()
    return gw, [str(w.message) for w in caught if issubclass(w.category, GradWatchWarning)]


def _plugin(hook: str, value):
    @hookimpl(specname=hook)
    def impl():
        return value

    return types.SimpleNamespace(gradwatch_name="bad", impl=impl)


DIAG = Diagnosis(kind="mine", severity=Severity.INFO, step=0, message="m")


@pytest.mark.parametrize(
    ("hook", "value", "said"),
    [
        ("gradwatch_diagnose", "oops", "returned str from gradwatch_diagnose; it must return a list of gradwatch.Diagnosis"),
        ("gradwatch_diagnose", DIAG, "returned one Diagnosis from gradwatch_diagnose; return a list of them"),
        ("gradwatch_diagnose", [DIAG, 3], "returned a list holding int"),
        (
            "gradwatch_diagnose",
            [Diagnosis(kind="mine", severity="warning", step=0, message="m")],
            "bad severity (a gradwatch.Severity)",
        ),
        ("gradwatch_advise", ["clip it"], "returned a list holding str from gradwatch_advise"),
        ("gradwatch_read_actions", {"kind": "clip"}, "returned dict from gradwatch_read_actions"),
        ("gradwatch_collect", [torch.zeros(2)], "returned list from gradwatch_collect"),
        ("gradwatch_collect", {"bad.x": 1.0}, "keys are str, values tensors"),
        ("gradwatch_state_dict", 7, "returned int from gradwatch_state_dict"),
    ],
)
def test_hook_bad_return_switches_off_that_plugin_only(hook, value, said) -> None:
    gw, said_warnings = _train(sigmoid_mlp(depth=8), plugins=[_plugin(hook, value)])
    # (gradwatch_state_dict is asked at detach, for a later attach.)
    mine = [w for w in said_warnings if "plugin 'bad'" in w]
    assert mine and said in mine[0] and "switched off" in mine[0], said_warnings
    assert not any("internal error" in w for w in said_warnings)
    # The built-ins go on: the sigmoid stack's vanishing gradients are still diagnosed.
    assert "vanishing" in {d.kind for d in gw.diagnoses}
    assert gw.history.steps.tolist() == list(range(8))


def test_hook_collect_shape_change_is_the_plugins_fault() -> None:
    class Growing:
        gradwatch_name = "growing"
        n = 1

        @hookimpl
        def gradwatch_collect(self):
            self.n += 1
            return {"growing.v": torch.zeros(self.n)}

    gw, said = _train(TinyModel(), plugins=[Growing()])
    assert any("plugin 'growing'" in w and "a key keeps one shape" in w for w in said), said
    assert gw.history.steps.tolist() == list(range(8)) and not any("internal error" in w for w in said)


def test_hook_collect_key_of_another_plugin_is_refused() -> None:
    class A:
        gradwatch_name = "a"

        @hookimpl
        def gradwatch_collect(self):
            return {"shared.v": torch.zeros(())}

    class B(A):
        gradwatch_name = "b"

    _, said = _train(TinyModel(), plugins=[A(), B()])
    # The second plugin asked is switched off (pluggy calls the later registered first).
    assert len(said) == 1 and "returned the statistic 'shared.v', which plugin " in said[0], said


def test_strict_reraises_a_bad_return() -> None:
    with pytest.raises(TypeError, match="returned str from gradwatch_diagnose"):
        _train(TinyModel(), plugins=[_plugin("gradwatch_diagnose", "oops")], strict=True)


def test_good_returns_pass_unchanged() -> None:
    class Good:
        gradwatch_name = "good"

        @hookimpl
        def gradwatch_diagnose(self, window):
            return (Diagnosis(kind="mine", severity=Severity.INFO, step=window.first_step, message="ok", layers=["linear1"]),)

        @hookimpl
        def gradwatch_advise(self, diagnosis):
            return [Remedy(kind="mine", title="t", rationale="r")] if diagnosis.kind == "mine" else None

        @hookimpl
        def gradwatch_read_actions(self, window):
            return [Action(kind="mine", step=window.first_step)]

    gw, said = _train(TinyModel(), plugins=[Good()])
    assert not said
    mine = [d for d in gw.diagnoses if d.kind == "mine"]
    assert len(mine) == 3 and mine[0].remedies[0].title == "t"
    assert [a.step for a in gw.actions if a.kind == "mine"] == [0, 4, 8]


# ---------------------------------------------------------------------- registration forms


seen: list[int] = []


@hookimpl
def gradwatch_diagnose(window):
    seen.append(window.first_step)


def gradwatch_report(report):  # no @hookimpl: given bare, it is a hook all the same
    seen.append(-report.step - 1)


@hookimpl(specname="gradwatch_diagnose")
def spot(window):
    seen.append(100 + window.first_step)


def test_a_bare_hook_function_is_a_plugin() -> None:
    seen.clear()
    _train(TinyModel(), plugins=[gradwatch_diagnose, spot, gradwatch_report])
    assert [s for s in seen if 0 <= s < 100] == [0, 4, 8]
    assert [s for s in seen if s >= 100] == [100, 104, 108]
    assert [s for s in seen if s < 0]  # the bare report hook ran too (report=False only mutes the console)


def test_two_bare_functions_of_one_hook_get_their_own_names() -> None:
    def make():
        @hookimpl
        def gradwatch_diagnose(window):
            return None

        return gradwatch_diagnose

    pm = gradwatch.manager.make_plugin_manager(plugins=[gradwatch_diagnose, make()], autoload=False)
    names = [n for n, _ in pm.list_name_plugin() if "gradwatch_diagnose" in n]
    assert len(names) == 2 and len(set(names)) == 2


def test_a_module_name_is_imported_and_registered(monkeypatch) -> None:
    module = types.ModuleType("gw_tmp_plugin")
    calls = []
    module.gradwatch_diagnose = hookimpl(lambda window: calls.append(window.first_step))
    module.gradwatch_diagnose.__name__ = "gradwatch_diagnose"
    monkeypatch.setitem(sys.modules, "gw_tmp_plugin", module)
    _train(TinyModel(), plugins=["gw_tmp_plugin"])
    assert calls == [0, 4, 8]


class Counter:
    def __init__(self) -> None:
        self.n = 0

    @hookimpl
    def gradwatch_diagnose(self, window, ctx):
        self.n += 1
        ctx.stash.setdefault(_COUNT, []).append(self.n)


_COUNT = gradwatch.StashKey[list]()


def test_a_class_is_built_once_per_watch() -> None:
    a, _ = _train(TinyModel(), plugins=[Counter])
    b, _ = _train(TinyModel(), plugins=[Counter])
    assert a.stash[_COUNT] == b.stash[_COUNT] == [1, 2, 3]  # each watch its own instance


@pytest.mark.parametrize(
    ("plugin", "said"),
    [
        ("no_such_module_xyz", "cannot import module 'no_such_module_xyz'"),
        (lambda window: None, "must be named after the hook it implements"),
        (3, "is not a plugin"),
        (None, "is not a plugin"),
        (torch.nn.Linear(2, 2), "implements no gradwatch_* hook"),
    ],
)
def test_registration_mistakes_say_what_to_pass(plugin, said) -> None:
    with pytest.raises(GradWatchError, match=said.replace("*", r"\*").replace("(", r"\(")):
        gradwatch.watch(TinyModel(), plugins=[plugin], autoload=False)


def test_a_method_without_hookimpl_is_refused() -> None:
    class Forgot:
        def gradwatch_diagnose(self, window):
            return None

    with pytest.raises(GradWatchError, match=r"'Forgot': gradwatch_diagnose is not marked with @gradwatch.hookimpl"):
        gradwatch.watch(TinyModel(), plugins=[Forgot()], autoload=False)


def test_a_class_that_needs_arguments_says_pass_an_instance() -> None:
    class Needs:
        def __init__(self, threshold):
            self.threshold = threshold

        @hookimpl
        def gradwatch_diagnose(self, window):
            return None

    with pytest.raises(GradWatchError, match=r"pass an instance, plugins=\[Needs\(...\)\]"):
        gradwatch.watch(TinyModel(), plugins=[Needs], autoload=False)
