"""The hook specifications document themselves (datasette's docs-vs-spec test)."""

from __future__ import annotations

import inspect

import pluggy
import pytest

from gradwatch import hookspecs

SPECS = [
    (name, fn)
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if getattr(fn, "gradwatch_spec", None) is not None
]


def test_specs_found() -> None:
    names = {name for name, _ in SPECS}
    assert {"gradwatch_configure", "gradwatch_attach", "gradwatch_collect", "gradwatch_act",
            "gradwatch_diagnose", "gradwatch_advise", "gradwatch_report", "gradwatch_state_dict",
            "gradwatch_load_state_dict", "gradwatch_unconfigure", "gradwatch_read_actions"} <= names  # fmt: skip


@pytest.mark.parametrize("name,fn", SPECS, ids=[n for n, _ in SPECS])
def test_spec_is_documented(name, fn) -> None:
    assert name.startswith("gradwatch_")
    doc = inspect.getdoc(fn) or ""
    for arg in pluggy._hooks.varnames(fn)[0]:
        assert f":param {arg}:" in doc, f"{name} does not document {arg}"
    assert ":returns:" in doc, f"{name} does not say what it returns"
    assert "Runs on " in doc, f"{name} does not say where it runs"
    if fn.gradwatch_spec.get("firstresult"):
        assert "Stops at first non-None result." in doc
    assert all(p.annotation is not inspect.Parameter.empty for p in inspect.signature(fn).parameters.values())


def test_hot_path_hooks_say_so() -> None:
    for name in ("gradwatch_collect", "gradwatch_act"):
        assert "hot path" in inspect.getdoc(getattr(hookspecs, name))


def test_pending_check_passes_for_builtins(pm) -> None:
    pm.check_pending()


def test_old_actions_hook_name_still_works_with_a_deprecation_warning(tiny_model) -> None:
    import torch

    import gradwatch
    from gradwatch import Action
    from gradwatch.testing import regression_batches, train

    class Old:
        gradwatch_name = "old"

        @gradwatch.hookimpl
        def gradwatch_actions(self, window):
            return [Action(kind="mark", step=int(window.first_step), source="old")]

    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.01)
    with pytest.warns(DeprecationWarning, match="renamed gradwatch_read_actions"):
        gw = gradwatch.watch(tiny_model, opt, plugins=[Old()], report=False, report_every=3)
    with gw:
        train(tiny_model, 6, batches=regression_batches(d_in=8, d_out=2), optimizer=opt)
    assert [a.step for a in gw.actions if a.kind == "mark"] == [0, 3, 6]  # two intervals and the final report


def test_diagnose_and_advise_get_the_history(tiny_model) -> None:
    import torch

    import gradwatch
    from gradwatch.testing import regression_batches, train

    seen = []

    class Reader:
        gradwatch_name = "reader"

        @gradwatch.hookimpl
        def gradwatch_diagnose(self, window, history):
            seen.append((window.last_step, history.steps.tolist()))
            return [gradwatch.Diagnosis(kind="note", severity=gradwatch.Severity.INFO, step=0, message="n")]

        @gradwatch.hookimpl
        def gradwatch_advise(self, diagnosis, history):
            seen.append(("advise", len(history)))

    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.01)
    with gradwatch.watch(tiny_model, opt, plugins=[Reader()], report=False, report_every=4, stats_every=2) as gw:
        train(tiny_model, 8, batches=regression_batches(d_in=8, d_out=2), optimizer=opt)
    # The history a hook sees already holds its own interval, and every earlier one.
    assert seen[0] == (3, [0, 2]) and seen[1] == ("advise", 2)
    assert seen[2] == (7, [0, 2, 4, 6]) and seen[3] == ("advise", 4)
    assert len(gw.diagnoses) >= 2
