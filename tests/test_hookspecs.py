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
            "gradwatch_load_state_dict", "gradwatch_unconfigure", "gradwatch_actions"} <= names  # fmt: skip


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
