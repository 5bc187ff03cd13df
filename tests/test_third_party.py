"""A real out-of-tree plugin distribution, pip-installed into a temporary target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "gradwatch-layercount"
version = "0.1.0"

[project.entry-points.gradwatch]
layercount = "gradwatch_layercount"

[tool.setuptools]
py-modules = ["gradwatch_layercount"]
"""

PLUGIN = '''
"""Counts hook calls and adds a diagnosis kind of its own."""
import gradwatch
from gradwatch import hookimpl

KEY = gradwatch.StashKey[dict]()


@hookimpl
def gradwatch_configure(config, ctx):
    ctx.stash[KEY] = {"collect": 0, "layers": None}


@hookimpl
def gradwatch_attach(model, ctx):
    ctx.stash[KEY]["layers"] = list(model.names)


@hookimpl
def gradwatch_collect(grads, ctx):
    ctx.stash[KEY]["collect"] += 1
    return {"layercount.max_norm": grads.layer_norms().max()}


@hookimpl
def gradwatch_diagnose(window, ctx):
    state = ctx.stash[KEY]
    return [gradwatch.Diagnosis(kind="layercount", severity=gradwatch.Severity.INFO, step=window.first_step,
                                message=f"{len(window)} rows, {state['collect']} collects", source="layercount")]
'''

SCRIPT = """
import json, torch, gradwatch
from gradwatch.testing import TinyModel
model = TinyModel()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with gradwatch.watch(model, opt, stats_every=1, report_every=4, report=False) as gw:
    for _ in range(6):
        model(torch.randn(4, 8)).sum().backward()
        opt.step(); opt.zero_grad()
print(json.dumps({
    "plugins": [name for name, _ in gw.pm.list_name_plugin()],
    "messages": [d.message for d in gw.diagnoses if d.kind == "layercount"],
    "extra_steps": gw.history.extras["layercount.max_norm"].steps.tolist(),
    "extra_ok": bool(torch.allclose(gw.history.extras["layercount.max_norm"].values, gw.history.grad_norm.max(1).values)),
}))
"""


@pytest.mark.slow
def test_installed_distribution_is_autoloaded(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "gradwatch_layercount.py").write_text(textwrap.dedent(PLUGIN))
    target = tmp_path / "target"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(src)],
        check=True,
        capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if k != "GRADWATCH_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert "layercount" in result["plugins"]
    assert result["messages"] == ["4 rows, 4 collects", "2 rows, 6 collects"]
    assert result["extra_steps"] == list(range(6)) and result["extra_ok"]
    # With autoload off, the same installation is not loaded.
    env["GRADWATCH_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    listing = "import json, gradwatch; from gradwatch.manager import make_plugin_manager; print(json.dumps([n for n, _ in make_plugin_manager().list_name_plugin()]))"
    names = json.loads(
        subprocess.run([sys.executable, "-c", listing], env=env, capture_output=True, text=True, check=True).stdout
    )
    assert "console" in names and "layercount" not in names
