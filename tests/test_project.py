"""The project itself: README commands, CI, packaging, import cost."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


def test_readme_starts_with_demo_and_test_commands() -> None:
    demo, tests = readme_commands()[:2]
    for command in (demo, tests):
        assert "pip install -q torch==2.13.0" in command, "the CPU wheel must be installed before gradwatch"
        assert command.index("torch==2.13.0") < command.index('-e ".[dev]"')
    assert demo.endswith("examples/quickstart.py")
    assert tests.endswith("-m pytest -q")
    assert "ruff check . && .venv/bin/ruff format --check ." in tests, "the style holds by itself: the test command lints"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in [line.strip() for line in ci]


def test_torch_requirement_is_a_range() -> None:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.startswith("torch"))
    assert ">=" in torch_dep and "==" not in torch_dep


def test_import_gradwatch_imports_no_lightning() -> None:
    """Nor torch until a name is used (issue 14: the CLI's help starts without it); then
    gradwatch.watch is the function, even once the submodule gradwatch.watch is imported."""
    code = (
        "import sys, gradwatch; assert 'torch' not in sys.modules; "
        "from gradwatch import hookimpl, Diagnosis; import gradwatch.watch; "
        "assert callable(gradwatch.watch) and gradwatch.watch.__name__ == 'watch'; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'lightning_fabric', 'matplotlib')]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_import_gradwatch_imports_no_transformers() -> None:
    """Neither ``import gradwatch`` nor ``import gradwatch.hf`` imports transformers or
    accelerate; resolving ``gradwatch.hf.GradWatchCallback`` does."""
    code = (
        "import sys, gradwatch, gradwatch.hf\n"
        "hf = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'accelerate'})\n"
        "assert hf() == [], hf()\n"
        "cls = gradwatch.hf.GradWatchCallback\n"
        "assert 'transformers' in hf(), hf()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_import_time_added_to_torch_is_small() -> None:
    """`python -X importtime`: gradwatch's own cumulative import time once torch is loaded
    (``import gradwatch`` is lazy: ``gradwatch.watch`` imports the core)."""
    code = "import torch; import gradwatch; gradwatch.watch"
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True).stderr
    cumulative: dict[str, int] = {}
    for line in err.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cum, raw = line.removeprefix("import time:").split("|")
            name = raw.rstrip()
            if cum.strip().isdigit() and not name.startswith("  "):  # top level: what this code imported
                cumulative[name.strip()] = cumulative.get(name.strip(), 0) + int(cum)
    gradwatch_us = sum(us for name, us in cumulative.items() if name.split(".")[0] == "gradwatch")
    assert "gradwatch.watch" in cumulative  # the core was imported, by the name
    assert gradwatch_us < 0.25 * cumulative["torch"], (gradwatch_us, cumulative["torch"])


@pytest.mark.slow
def test_wheel_ships_plugins_only_under_gradwatch(tmp_path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("gradwatch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "gradwatch/plugins/__init__.py" in names and "gradwatch/plugins/console.py" in names
    assert "gradwatch/py.typed" in names
    tops = {name.split("/")[0] for name in names}
    assert tops <= {"gradwatch", *(n for n in tops if n.endswith(".dist-info"))}, tops


def test_bare_plugins_import_is_refused() -> None:
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import plugins"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "must be imported as 'gradwatch.plugins'" in proc.stderr
