"""The plugin host: built-ins through entry points, third parties, disable, failures."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import tomllib
import torch

import gradwatch
from gradwatch import hookimpl
from gradwatch.manager import BUILTIN_PLUGINS, make_plugin_manager
from gradwatch.testing import ReportCatcher, TinyModel


def _train(model, opt, steps=3):
    for _ in range(steps):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()


def test_builtins_registered_in_order(pm) -> None:
    names = [name for name, _ in pm.list_name_plugin()]
    assert names[: len(BUILTIN_PLUGINS)] == list(BUILTIN_PLUGINS)
    for name in BUILTIN_PLUGINS:
        assert pm.get_plugin(name).__name__ == f"gradwatch.plugins.{name}"


def test_builtins_are_our_entry_points() -> None:
    """pyproject.toml declares exactly the built-ins, each as gradwatch.plugins.<name>; the
    installed metadata (stale until the next `pip install -e .`) holds no other names."""
    with open(Path(__file__).parents[1] / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["entry-points"]["gradwatch"]
    assert declared == {name: f"gradwatch.plugins.{name}" for name in BUILTIN_PLUGINS}
    installed = importlib.metadata.distribution("gradwatch").entry_points.select(group="gradwatch")
    assert {ep.name for ep in installed} <= set(BUILTIN_PLUGINS)


def test_hook_report_called_with_user_plugin() -> None:
    catcher = ReportCatcher()
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, plugins=[catcher], report_every=2, report=False):
        _train(model, opt, 5)
    assert [r.step for r in catcher.reports] == [1, 3, 4]
    assert [r.final for r in catcher.reports] == [False, False, True]


def test_disable_builtin_and_unknown_name() -> None:
    model = TinyModel()
    gw = gradwatch.watch(model, disable=["console"], report=False)
    assert gw.pm.get_plugin("console") is None and gw.pm.is_blocked("console")
    gw.detach()
    with pytest.raises(gradwatch.GradWatchError, match="unknown plugin.*'consol'.*known plugins are"):
        gradwatch.watch(model, disable=["consol"])
    with pytest.raises(gradwatch.GradWatchError, match="disable takes plugin names"):
        gradwatch.watch(model, disable=[3])


def test_disable_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("GRADWATCH_DISABLE_PLUGINS", "console")
    assert make_plugin_manager(autoload=False).get_plugin("console") is None


def _fake_distribution(monkeypatch, tmp_path, name: str, source: str, ep_name: str):
    """A third-party distribution on disk, found through importlib.metadata (as pytest's
    test_config fakes setuptools plugins)."""
    pkg = tmp_path / "site"
    pkg.mkdir(exist_ok=True)
    (pkg / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(pkg))

    class Dist(importlib.metadata.Distribution):
        def read_text(self, filename):
            if filename == "METADATA":
                return f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
            if filename == "entry_points.txt":
                return f"[gradwatch]\n{ep_name} = {name}\n"
            return None

        def locate_file(self, path):
            return pkg / path

    real = importlib.metadata.distributions

    def distributions(**kwargs):
        yield from real(**kwargs)
        yield Dist()

    monkeypatch.setattr(importlib.metadata, "distributions", distributions)
    return Dist()


def test_third_party_entry_point_autoload_and_env_off(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("GRADWATCH_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    _fake_distribution(
        monkeypatch,
        tmp_path,
        "gw_thirdparty",
        """
        from gradwatch import hookimpl
        CALLS = []

        @hookimpl
        def gradwatch_attach(model):
            CALLS.append(model.names)
        """,
        "thirdparty",
    )
    pm = make_plugin_manager()
    assert pm.get_plugin("thirdparty") is not None
    model = TinyModel()
    gradwatch.watch(model, report=False).detach()
    assert sys.modules["gw_thirdparty"].CALLS == [("linear1", "linear2")]
    assert make_plugin_manager(autoload=False).get_plugin("thirdparty") is None
    monkeypatch.setenv("GRADWATCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert make_plugin_manager().get_plugin("thirdparty") is None
    # A third party can be disabled by its entry-point name.
    monkeypatch.delenv("GRADWATCH_DISABLE_PLUGIN_AUTOLOAD")
    assert make_plugin_manager(disable=["thirdparty"]).get_plugin("thirdparty") is None


def test_third_party_cannot_shadow_a_builtin(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("GRADWATCH_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    _fake_distribution(monkeypatch, tmp_path, "gw_shadow", "from gradwatch import hookimpl\n", "console")
    pm = make_plugin_manager()
    assert pm.get_plugin("console").__name__ == "gradwatch.plugins.console"
    assert "gw_shadow" not in sys.modules


def test_misspelled_hook_fails_loudly() -> None:
    class Typo:
        @hookimpl
        def gradwatch_diagnos(self, window):
            return []

    with pytest.raises(gradwatch.GradWatchError, match="gradwatch_diagnos"):
        make_plugin_manager(plugins=[Typo()], autoload=False)


def test_hook_diagnose_plugin_that_raises_is_switched_off_once() -> None:
    calls = {"bad": 0, "good": 0}

    class Bad:
        gradwatch_name = "bad"

        @hookimpl
        def gradwatch_diagnose(self, window):
            calls["bad"] += 1
            raise ZeroDivisionError("oops")

    class Good:
        gradwatch_name = "good"

        @hookimpl
        def gradwatch_diagnose(self, window):
            calls["good"] += 1

    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, opt, plugins=[Bad(), Good()], report_every=2, report=False) as gw:
            _train(model, opt, 6)
    switched = [w for w in caught if issubclass(w.category, gradwatch.GradWatchWarning)]
    assert len(switched) == 1 and "'bad'" in str(switched[0].message) and "ZeroDivisionError" in str(switched[0].message)
    assert calls == {"bad": 1, "good": 4}  # good ran in the failing call too, and at every interval
    assert gw.pm.get_plugin("bad") is None
    assert gw.history.steps.tolist() == [0, 1, 2, 3, 4, 5]  # training and statistics went on


def test_hook_collect_plugin_that_raises_in_hot_path_does_not_stop_training() -> None:
    class Bad:
        @hookimpl
        def gradwatch_collect(self, grads):
            raise RuntimeError("boom")

    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(gradwatch.GradWatchWarning, match="Bad.*boom"):
        with gradwatch.watch(model, opt, plugins=[Bad()], stats_every=1, report=False) as gw:
            _train(model, opt, 3)
    assert gw.history.steps.tolist() == [0, 1, 2]


def test_strict_reraises() -> None:
    class Bad:
        @hookimpl
        def gradwatch_collect(self, grads):
            raise RuntimeError("boom")

    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        with gradwatch.watch(model, opt, plugins=[Bad()], stats_every=1, strict=True, report=False):
            _train(model, opt, 1)


def test_hook_collect_extras_reach_the_window() -> None:
    class Extra:
        @hookimpl
        def gradwatch_collect(self, grads, ctx):
            return {"extra.total": grads.total_norm(), "extra.per_layer": grads.layer_norms()}

        @hookimpl
        def gradwatch_act(self, grads, ctx):
            ctx.record("extra.step_seen", torch.tensor(float(ctx.step)))

    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, plugins=[Extra()], stats_every=2, report=False) as gw:
        _train(model, opt, 5)
    extras = gw.history.extras
    assert extras["extra.total"].steps.tolist() == [0, 2, 4]
    torch.testing.assert_close(extras["extra.total"].values, gw.history.total_norm)
    torch.testing.assert_close(extras["extra.per_layer"].values, gw.history.grad_norm)
    assert extras["extra.step_seen"].values.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_trace_env_writes_hook_calls(monkeypatch, capsys) -> None:
    monkeypatch.setenv("GRADWATCH_TRACE_PLUGINS", "1")
    model = TinyModel()
    gradwatch.watch(model, report=False).detach()
    err = capsys.readouterr().err
    assert "gradwatch: gradwatch_attach ->" in err and "console" in err


def test_module_plugin_object_registered_by_name() -> None:
    module = types.ModuleType("my_gw_plugin")
    seen = []

    @hookimpl
    def gradwatch_attach(model):
        seen.append(True)

    module.gradwatch_attach = gradwatch_attach
    gw = gradwatch.watch(TinyModel(), plugins=[module], report=False)
    assert gw.pm.get_plugin("my_gw_plugin") is module and seen == [True]
    gw.detach()
