"""Bad input gets a clear error, before training starts, that says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.testing import TinyModel


def test_not_a_module() -> None:
    with pytest.raises(gradwatch.GradWatchError, match="needs an nn.Module, got Tensor"):
        gradwatch.watch(torch.zeros(3))


def test_no_trainable_parameters() -> None:
    frozen = TinyModel().requires_grad_(False)
    with pytest.raises(gradwatch.GradWatchError, match="no trainable parameters.*unfreeze"):
        gradwatch.watch(frozen)
    with pytest.raises(gradwatch.GradWatchError, match="no trainable parameters"):
        gradwatch.watch(nn.ReLU())


def test_optimizer_of_another_model() -> None:
    model, other = TinyModel(), TinyModel()
    with pytest.raises(gradwatch.GradWatchError, match="4 parameter.*not in the watched TinyModel"):
        gradwatch.watch(model, torch.optim.SGD(other.parameters(), lr=0.1))


def test_optimizer_wrong_type() -> None:
    with pytest.raises(gradwatch.GradWatchError, match="optimizer must be a torch.optim.Optimizer"):
        gradwatch.watch(TinyModel(), "sgd")


@pytest.mark.parametrize("option", ["report_every", "stats_every", "sample_every"])
@pytest.mark.parametrize("value", [0, -5, 1.5, True])
def test_bad_cadence(option, value) -> None:
    with pytest.raises(gradwatch.GradWatchError, match=f"{option} must be a positive integer"):
        gradwatch.watch(TinyModel(), **{option: value})


def test_sample_every_not_a_multiple() -> None:
    with pytest.raises(gradwatch.GradWatchError, match="sample_every=10 must be a multiple of stats_every=4.*use sample_every=8"):
        gradwatch.watch(TinyModel(), stats_every=4, sample_every=10)


def test_bad_scaler() -> None:
    with pytest.raises(gradwatch.GradWatchError, match="torch.amp.GradScaler"):
        gradwatch.watch(TinyModel(), scaler=object())


def test_errors_leave_no_hooks_behind() -> None:
    model = TinyModel()
    with pytest.raises(gradwatch.GradWatchError):
        gradwatch.watch(model, disable=["nope"])
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    gradwatch.watch(model, report=False).detach()  # and the model can be watched afterwards
