"""One rule for numbers in messages, checked on every built-in message template.

The rule (CONTRACTS.md, gradwatch.kit): a number in a diagnosis ``message``/``summary`` or
a remedy ``title``/``rationale`` has 3 significant figures (whole numbers 100–9999 may be
written whole), scientific notation from 1e4 on and below 1e-3, ``nan``/``inf`` spelled
out (what :func:`gradwatch.kit.num` writes); a ratio is capped (``≫ 1000×``, what
:func:`gradwatch.kit.times` writes); a percentage of a fraction may use ``:.0%``.

How every template is run: each built-in plugin module is parsed, and every f-string that
flows into a ``message=``/``summary=``/``title=``/``rationale=`` keyword (directly or through
local variables) is evaluated piece by piece with its free variables bound to extreme
evidence (1e-30, 1e+30, 0, inf, NaN, and three long numbers that must be rounded), all at
once and one at a time. Each number it writes is checked against the value it came from.
The advisor's titles, written from ``params`` by ``render``, and its rationales are also
run end to end with extreme evidence and history (tests/plugins/test_advice_numbers.py).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import re
from pathlib import Path

import pytest

from gradwatch.kit import TIMES_CAP, num, power, round_sig, times
from gradwatch.manager import BUILTIN_PLUGINS

TEXT_FIELDS = {"message", "summary", "title", "rationale"}
EXTREMES = (1e-30, 1e30, 0.0, math.inf, math.nan, 0.123456789, 6084819956.63, 0.000456789)
# Modules whose templates belong to other engineers' open issues (the test is their contract);
# a case listed here is expected to fail until that issue lands.
PENDING = {
    "recurrent": "issue 12 owns the recurrent templates ({gamma:.3g}, {b:.2g}, {keep:.1e})",
}
_NUMBER = re.compile(r"(?<![\w.'\"])[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?(?![\w.])", re.I)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


# ---------------------------------------------------------------------- the rule, on text


def sig_digits(token: str) -> int:
    """Significant digits of a decimal token (``"0.00123"`` → 3, ``"1.50e+03"`` → 3)."""
    mantissa = re.split(r"[eE]", token.lstrip("+-"))[0]
    digits = mantissa.replace(".", "").lstrip("0")
    return len(digits) if digits else 1


def number_problem(value: float, text: str) -> str | None:
    """Why ``text`` is not how the rule writes the float ``value``, or ``None``."""
    if math.isnan(value):
        return None if text == "nan" else f"NaN written {text!r}, not 'nan'"
    if math.isinf(value):
        return None if text == ("inf" if value > 0 else "-inf") else f"{value} written {text!r}"
    try:
        shown = float(text)
    except ValueError:
        return f"{value!r} written {text!r}, not a number"
    if value == 0:
        return None if shown == 0 else f"0 written {text!r}"
    if abs(shown - value) > 0.005 * abs(value):
        return f"{value!r} written {text!r}: not within 3 significant figures"
    whole = "e" not in text.lower() and 100 <= abs(value) < 1e4
    if not whole and sig_digits(text) > 3:
        return f"{value!r} written {text!r}: more than 3 significant figures"
    if (abs(value) >= 1e4 or abs(value) < 1e-3) and "e" not in text.lower():
        return f"{value!r} written {text!r}: not in scientific notation"
    return None


def text_problems(text: str) -> list[str]:
    """Numbers in finished text that break the rule: more than 3 significant figures in a
    decimal, or a ratio (a number beside ×) beyond the cap that is not written ≫/≪."""
    bare = _QUOTED.sub("''", text)
    problems = []
    for match in _NUMBER.finditer(bare):
        token = match.group(0)
        is_decimal = "." in token or "e" in token.lower()
        before, after = bare[max(0, match.start() - 3) : match.start()], bare[match.end() : match.end() + 1]
        if is_decimal and sig_digits(token) > 3:
            problems.append(f"{token!r}: more than 3 significant figures")
        ratio = before.endswith("×") or after == "×"
        capped = "≫" in before or "≪" in before
        if ratio and not capped and abs(float(token)) > TIMES_CAP:
            problems.append(f"ratio {token!r}×: past the ≫ {num(TIMES_CAP)}× cap")
    return problems


def test_the_rule_on_kit_and_on_known_bad_text():
    for value in (*EXTREMES, -3.14159, 12345.6, 0.000456789, 999.9, 100.0, 1.0, 2e-300, 7.5e305):
        assert number_problem(value, num(value)) is None, (value, num(value))
        assert text_problems(times(value)) == [], (value, times(value))
    assert text_problems(f"the update ratio is {times(3e36)} the healthy one") == []
    # What the issue found, each caught:
    assert text_problems("the loss grows ×6084819956.63 per step") != []
    assert text_problems("Lower the learning rate by ×1e+39") != []
    assert text_problems("3055437573401754806925876560641654784000× the ~0.001 of a healthy step") != []
    assert number_problem(1e-30, f"{1e-30:.2f}") is not None  # "0.00"
    assert number_problem(0.123456789, f"{0.123456789:.2g}") is not None  # two figures
    assert number_problem(1e30, f"{1e30:.0f}") is not None
    assert text_problems("layer 'blocks.11.fc2' at step 123456, 0.25^19 = 3.64e-12") == []
    assert power(0.25, 600) == "1e-361" and text_problems(power(0.25, 600)) == []
    for value in (0.123456789, 6084819956.63, 0.000456789, 999.95, -3.14159, 0.0, math.inf):
        assert num(round_sig(value)) == num(value) and (
            round_sig(value) == value or abs(round_sig(value) - value) <= 0.005 * abs(value)
        )


# ---------------------------------------------------------------------- finding the templates


def _scopes(tree: ast.AST) -> list[tuple[list[ast.stmt], ast.FunctionDef | ast.AsyncFunctionDef | None]]:
    scopes: list[tuple[list[ast.stmt], ast.FunctionDef | ast.AsyncFunctionDef | None]] = (
        [(tree.body, None)] if isinstance(tree, ast.Module) else []
    )
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scopes.append((node.body, node))
    return scopes


def _defaults(function: ast.FunctionDef | ast.AsyncFunctionDef | None) -> dict[str, object]:
    """Parameters with a constant default (``limit: int = 4``): options, not evidence."""
    if function is None:
        return {}
    args = function.args
    positional = [*args.posonlyargs, *args.args]
    pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
    pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    return {a.arg: d.value for a, d in pairs if isinstance(d, ast.Constant)}


def _walk_scope(body: list[ast.stmt]):
    """The nodes of one scope, not descending into nested function or class definitions."""
    nested = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    stack: list[ast.AST] = [node for node in body if not isinstance(node, nested)]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, nested):
                stack.append(child)


def text_templates(tree: ast.AST) -> list[tuple[ast.JoinedStr, dict[str, object]]]:
    """Every f-string of the module that flows into a text keyword: directly, through the
    local variables of its scope, or through the return value of a function of the module
    called there (a helper that writes part of a message)."""
    scopes = _scopes(tree)
    names = {f.name for _, f in scopes if f is not None}
    text_functions: set[str] = set()
    found: dict[int, tuple[ast.JoinedStr, dict[str, object]]] = {}
    grown = True
    while grown:
        grown = False
        for body, function in scopes:
            scope_name = function.name if function is not None else None
            assigned: dict[str, list[ast.expr]] = {}
            roots: list[ast.expr] = []
            for node in _walk_scope(body):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        for t in [target] if isinstance(target, ast.Name) else getattr(target, "elts", []):
                            if isinstance(t, ast.Name):
                                assigned.setdefault(t.id, []).append(node.value)
                elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and isinstance(node.target, ast.Name) and node.value:
                    assigned.setdefault(node.target.id, []).append(node.value)
                elif isinstance(node, ast.Call):
                    roots += [k.value for k in node.keywords if k.arg in TEXT_FIELDS]
                elif isinstance(node, ast.Return) and node.value is not None and scope_name in text_functions:
                    roots.append(node.value)
            seen: set[int] = set()
            while roots:
                expr = roots.pop()
                if id(expr) in seen:
                    continue
                seen.add(id(expr))
                for sub in ast.walk(expr):
                    if isinstance(sub, ast.JoinedStr):
                        found.setdefault(id(sub), (sub, _defaults(function)))
                    elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
                        roots += assigned.get(sub.id, [])
                        if sub.id in names and sub.id not in text_functions:
                            text_functions.add(sub.id)
                            grown = True
    # Nested f-strings (format specs, comprehension bodies) are run as parts of their parent.
    nested = {id(s) for t, _ in found.values() for s in ast.walk(t) if isinstance(s, ast.JoinedStr) and s is not t}
    return [t for k, t in found.items() if k not in nested]


# ---------------------------------------------------------------------- running them


class Evidence(float):
    """A stand-in for any evidence value: a float (so helpers that check ``isinstance(x,
    float)`` take it as one, and ``num(x)`` or ``f"{x:.2f}"`` see its value) that also
    answers attribute, item, call, length and iteration (a dict of numbers, a list of
    names) with itself. ``str()``/``repr()`` of it is a name, not a number."""

    def __getattr__(self, name: str) -> Evidence:
        if name.startswith("__"):
            raise AttributeError(name)
        return Evidence(self)

    def __getitem__(self, key: object) -> Evidence:
        return Evidence(self)

    def __call__(self, *args: object, **kwargs: object) -> Evidence:
        return Evidence(self)

    def __len__(self) -> int:
        return 3

    def __index__(self) -> int:
        return 3

    def __iter__(self):
        return iter([Evidence(self), Evidence(self)])

    def __str__(self) -> str:
        # Written as it is, a stand-in is a name (a layer, a kind) or a count: a number must
        # go through num()/times() or a format spec, which see its value.
        return "‹v›"

    __repr__ = __str__

    def __int__(self) -> int:
        return int(float(self)) if math.isfinite(self) and abs(self) < 1e15 else 7


_SKIP = (TypeError, ValueError, ZeroDivisionError, OverflowError, KeyError, AttributeError, IndexError, NameError)


def _free_names(expr: ast.expr, module_globals: dict) -> set[str]:
    bound = {
        n.id
        for comp in ast.walk(expr)
        if isinstance(comp, ast.comprehension)
        for n in ast.walk(comp.target)
        if isinstance(n, ast.Name)
    }
    builtins = set(dir(__builtins__)) if not isinstance(__builtins__, dict) else set(__builtins__)
    return {
        n.id
        for n in ast.walk(expr)
        if isinstance(n, ast.Name) and n.id not in bound and n.id not in module_globals and n.id not in builtins
    }


def _piece(node: ast.FormattedValue, env: dict) -> tuple[object, str]:
    value = eval(compile(ast.Expression(node.value), "<template>", "eval"), env)
    spec = ""
    if node.format_spec is not None:
        spec = "".join(
            str(v.value) if isinstance(v, ast.Constant) else _piece(v, env)[1]  # type: ignore[arg-type]
            for v in node.format_spec.values
        )
    shown = {115: str, 114: repr, 97: ascii}.get(node.conversion, None)
    text = format(shown(value) if shown else value, spec)
    return value, text


def run_template(template: ast.JoinedStr, module_globals: dict, fixed: dict | None = None) -> tuple[list[str], int]:
    """Evaluate ``template`` with extreme evidence (``fixed`` names keep their value);
    ``(problems, pieces evaluated)``."""
    fixed = fixed or {}
    free = set().union(*(_free_names(v.value, module_globals) for v in template.values if isinstance(v, ast.FormattedValue)))
    names = sorted(free - set(fixed))
    bindings = [dict.fromkeys(names, extreme) for extreme in EXTREMES]
    bindings += [{**dict.fromkeys(names, 1.0), name: extreme} for name in names for extreme in EXTREMES]
    problems: list[str] = []
    evaluated = 0
    for binding in bindings:
        env = {**module_globals, **fixed, **{k: Evidence(v) for k, v in binding.items()}}
        parts = []
        for part in template.values:
            if isinstance(part, ast.Constant):
                parts.append(str(part.value))
                continue
            assert isinstance(part, ast.FormattedValue)
            try:
                value, text = _piece(part, env)
            except _SKIP:
                parts.append("…")
                continue
            evaluated += 1
            parts.append(text)
            spec = ast.unparse(part.format_spec) if part.format_spec is not None else ""
            where = f"{{{ast.unparse(part.value)}{':' + spec[2:-1] if spec else ''}}} with {binding}"
            if isinstance(value, bool) or "%" in spec:
                continue  # a percentage of a fraction may use :.0%
            if isinstance(value, float) and (type(value) is float or part.format_spec is not None):
                problem = number_problem(float(value), text)
                if problem:
                    problems.append(f"{where}: {problem}")
            elif isinstance(value, str):
                problems += [f"{where} gives {text!r}: {p}" for p in text_problems(text)]
        problems += [f"{ast.unparse(template)[:80]}… with {binding}: {p}" for p in text_problems("".join(parts))]
    return sorted(set(problems)), evaluated


def _modules() -> list[str]:
    return [name for name in BUILTIN_PLUGINS if name not in ("console", "runlog", "clipping")]


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(strict=False, reason=PENDING[n])) if n in PENDING else n for n in _modules()],
)
def test_every_template_writes_numbers_by_the_rule(name):
    module = importlib.import_module(f"gradwatch.plugins.{name}")
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    templates = text_templates(tree)
    assert templates, f"no message template found in {name}"
    problems, evaluated = [], 0
    for template, fixed in templates:
        found, count = run_template(template, vars(module), fixed)
        evaluated += count
        problems += [f"line {template.lineno}: {p}" for p in found]
    assert evaluated, name
    assert not problems, f"{name}: {len(problems)} problem(s):\n" + "\n".join(problems[:40])


def test_the_template_finder_sees_inline_and_variable_templates():
    source = """
def diagnose(x, growth, name):
    what = {"a": f"grows ×{growth:.2f} per step", "b": "spikes"}["a"]
    message = f"{what} (last {x:.3g}) in {name!r}"
    lines = [f"clip_grad_norm_(max_norm={x:g})"]  # code: not a template
    return Diagnosis(message=message, summary=f"total {num(x)}", snippet="\\n".join(lines))
"""
    templates = text_templates(ast.parse(source))
    texts = sorted(ast.unparse(t) for t, _ in templates)
    assert len(texts) == 3 and not any("max_norm" in t for t in texts), texts
    problems = [p for t, _ in templates for p in run_template(t, {"num": num, "Diagnosis": dict})[0]]
    assert any("growth:.2f" in p for p in problems) and any("x:.3g" in p for p in problems)
    assert not any("num(x)" in p for p in problems)


# ---------------------------------------------------------------------- the advisor, end to end


def _advisor_cases(x: float):
    from gradwatch import Diagnosis, Severity

    def d(kind, layers=("0",), **evidence):
        return Diagnosis(
            kind=kind,
            severity=Severity.WARNING,
            step=3,
            layers=layers,
            message=kind,
            summary=f"{kind} {num(x)}",
            evidence=evidence,
        )

    def origin(**fields):
        base = {"module": "2", "module_type": "Linear", "input_min": -x, "input_max": x, "input_finite": True}
        return {
            **base,
            "input_has_zero": True,
            "input_has_negative": True,
            "input_dtype": "float32",
            "weights_finite": True,
            **fields,
        }

    return [
        d("vanishing", ratio=x, decay_per_layer=x, depth=20),
        d("exploding", onset=3, update_ratio=x, loss_diverging=True, total_norm=x),
        d("update_scale", update_ratio=x, per_layer={"0": x, "2": x}, steps_seen=4, skipped_zero_weight=["4"]),
        d("dead_units", layers=("1",), fraction={"1": x}),
        d("saturation", layers=("1",), fraction={"1": x}),
        d("init_scale", std={"0": x, "2": x}, depth_gain=x, contradicted=False),
        *[
            d("nonfinite", where="output", produced=True, first_step=3, origin=origin(output=out, input_dtype=dtype))
            for out in ("nan", "inf", "-inf")
            for dtype in ("float32", "float16")
        ],
        d("nonfinite", where="output", produced=True, first_step=3, origin=origin(module_type="SelfAttention")),
        d("nonfinite", where="output", produced=False, first_step=3, origin=origin(input_finite=False)),
        d("nonfinite", where="gradient", first_step=3),
        d("nonfinite", where="loss", first_step=3),
        d("nonfinite", where="weights", first_step=3),
    ]


def _recurrent_cases(x: float):
    from gradwatch import Diagnosis, Severity

    evidence = {"recurrent": True, "module_type": "RNN", "spectral_radius": {"weight_hh_l0": x}, "seq_len": 100, "gain": x}
    return [
        Diagnosis(
            kind="vanishing", severity=Severity.WARNING, step=0, layers=("rnn",), message="v", summary=num(x), evidence=evidence
        ),
        Diagnosis(
            kind="exploding", severity=Severity.WARNING, step=0, layers=("rnn",), message="e", summary=num(x), evidence=evidence
        ),
    ]


@pytest.mark.parametrize("x", EXTREMES, ids=[num(x) for x in EXTREMES])
def test_advisor_titles_and_rationales_with_extreme_evidence(x):
    import io

    import torch
    from rich.console import Console

    import gradwatch
    from gradwatch.testing import lstm_model, relu_mlp, sigmoid_mlp, vanilla_rnn

    def history(gw):
        layers = gw.model_info.names
        steps = list(range(8))
        totals = [1.0, 1.1, 0.9, x, x, 1e3 * x, math.nan, math.nan]
        zeros = torch.zeros(8, len(layers))
        series = gradwatch.Series(torch.tensor(steps), torch.full((8, len(layers)), x))
        loss = gradwatch.Series(torch.tensor(steps), torch.tensor([2.0, 1.9, x, x, 1e3 * x, math.inf, math.nan, math.nan]))
        gw.history.extend(
            gradwatch.StatsWindow(
                layers=layers, steps=torch.tensor(steps), grad_norm=zeros, grad_rms=zeros, grad_max=zeros, nonfinite=zeros,
                present=zeros + 1, total_norm=torch.tensor(totals), weight_norm=series, update_ratio=series,
                extras={"core.loss": loss}, first_step=0, last_step=7,
            )
        )  # fmt: skip

    cases = [
        (sigmoid_mlp(depth=8, width=8), _advisor_cases(x)),
        (relu_mlp(depth=8, width=8, init="lecun"), _advisor_cases(x)),
        (vanilla_rnn(hidden=8), _recurrent_cases(x)),
        (lstm_model(hidden=8), [gradwatch.Diagnosis(kind="forget_gate", severity=gradwatch.Severity.INFO, step=0, layers=("rnn",), message="f", evidence={"keep": x, "seq_len": 100})]),
    ]  # fmt: skip
    seen = set()
    for model, diagnoses in cases:
        gw = gradwatch.watch(model, autoload=False, report=False, strict=True, console=Console(file=io.StringIO()))
        history(gw)
        render = gw.pm.get_plugin("advisor").render
        for diagnosis in diagnoses:
            for remedy in gw.advise(diagnosis):
                seen.add(remedy.kind)
                for field in ("title", "rationale"):
                    text = getattr(remedy, field)
                    assert not text_problems(text), (diagnosis.kind, remedy.kind, field, text, text_problems(text))
                assert render(remedy.kind, remedy.params) == (remedy.title, remedy.snippet)
                compile(remedy.snippet, "<snippet>", "exec")
        gw.detach()
    assert {"relu", "normalization", "residual", "reinit", "lstm_gru", "clipping", "lower_lr", "leaky_relu"} <= seen, seen
    assert {"epsilon", "finite_mask", "input_data", "stable_loss"} <= seen, seen
    if 1 < x < math.inf:
        assert "precision" in seen  # float16 inputs that large overflow
