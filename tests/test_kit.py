"""gradwatch.kit: what plugins share."""

from __future__ import annotations

import math

import pytest
import torch

from gradwatch import GradWatchError, WatchConfig
from gradwatch.kit import fit_decay, float_tensors, num, plugin_options, profile, times

DEFAULTS = {"ratio": 1e-3, "rows": 3, "on": True, "mode": "auto"}


def opts(**given):
    return plugin_options(
        WatchConfig(options={"p": given}), "p", DEFAULTS, bounds={"ratio": (0.0, 1.0)}, choices={"mode": ("auto", "off")}
    )


def test_plugin_options_merge_and_validate() -> None:
    assert opts() == DEFAULTS
    assert opts(ratio=1e-4, rows=5, on=False, mode="off") == {"ratio": 1e-4, "rows": 5, "on": False, "mode": "off"}
    assert opts(ratio=0.5)["ratio"] == 0.5


@pytest.mark.parametrize(
    ("given", "match"),
    [
        ({"rato": 1e-4}, r"unknown p option\(s\) 'rato' \(did you mean 'ratio'\?\)"),
        ({"ratio": 1.5}, r"p option ratio must be a number > 0 and < 1 \(default 0.001\), got 1.5"),
        ({"ratio": float("nan")}, "must be a number"),
        ({"ratio": True}, "must be a number"),
        ({"rows": 0}, r"p option rows must be a whole number >= 1, got 0"),
        ({"rows": 2.0}, "whole number"),
        ({"on": 1}, "must be True or False"),
        ({"mode": "fast"}, r"must be one of 'auto', 'off', got 'fast'"),
    ],
)
def test_plugin_options_say_what_to_pass(given, match) -> None:
    with pytest.raises(GradWatchError, match=match):
        opts(**given)


def test_profile_and_fit_decay_agree_with_plain_math() -> None:
    rows = torch.tensor([[1.0, 0.5, 0.0], [4.0, 0.5, float("nan")]])
    v = profile(rows)
    assert v[0].item() == pytest.approx(2.0) and v[1].item() == pytest.approx(0.5) and math.isnan(v[2].item())
    assert fit_decay(torch.tensor([8.0, 4.0, 2.0, 1.0]).flip(0)) == pytest.approx(0.5)
    assert math.isnan(fit_decay(torch.tensor([1.0])))


def test_float_tensors_walks_nested_outputs() -> None:
    a, b, c = torch.ones(1), torch.zeros(2), torch.ones(3, dtype=torch.int64)
    assert [t.shape for t in float_tensors({"x": (a, [c, b]), "y": None})] == [a.shape, b.shape]


@pytest.mark.parametrize(
    ("value", "text"),
    [(1e-30, "1.00e-30"), (1e30, "1.00e+30"), (0, "0"), (float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf"),
     (12345.6, "1.23e+04"), (1000, "1000"), (0.0123456, "0.0123"), (None, "n/a")],
)  # fmt: skip
def test_num(value, text) -> None:
    assert num(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(3.14, "×3.14"), (1e39, "≫ 1000×"), (float("inf"), "≫ 1000×"), (1e-9, "≪ 1/1000×"), (float("nan"), "n/a")],
)
def test_times_caps_absurd_ratios(value, text) -> None:
    assert times(value) == text
