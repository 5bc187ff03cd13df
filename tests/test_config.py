"""One source for the options: every door builds the same WatchConfig, checked the same way."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import gradwatch
from gradwatch import GradWatchError, WatchConfig
from gradwatch.testing import TinyModel, train


def lightning_door(**options):
    return gradwatch.GradWatch(**options).config


def watch_door(**options):
    options.setdefault("report", False)
    gw = gradwatch.watch(TinyModel(), **options)
    gw.detach(report=False)
    return gw.config


DOORS = pytest.mark.parametrize("door", [watch_door, lightning_door], ids=["watch", "GradWatch"])


@DOORS
def test_a_misspelled_option_names_the_closest_one(door) -> None:
    with pytest.raises(GradWatchError, match=r"'stats_evry' \(did you mean 'stats_every'\?\)"):
        door(stats_evry=2)


@DOORS
def test_options_for_a_misspelled_plugin_are_refused(door) -> None:
    with pytest.raises(GradWatchError, match=r"unknown plugin\(s\) 'vanishng' \(did you mean 'vanishing'\?\)"):
        door(options={"vanishng": {"ratio": 1e-4}})


@DOORS
def test_clip_without_the_clipping_plugin_is_refused(door) -> None:
    with pytest.raises(GradWatchError, match=r"clip=1.0 needs the 'clipping' plugin, which is disabled"):
        door(clip=1.0, disable=["clipping"])
    with pytest.raises(GradWatchError, match=r"on_nonfinite='skip' needs the 'clipping' plugin"):
        door(on_nonfinite="skip", disable="clipping")


@DOORS
def test_disable_given_as_a_string_is_one_name(door) -> None:
    config = door(disable="console")
    assert config.disable == ("console",)
    assert gradwatch.manager.plugin_manager(config).is_blocked("console")


@DOORS
def test_options_are_deep_copied(door) -> None:
    mine = {"vanishing": {"ratio": 1e-4}}
    config = door(options=mine)
    mine["vanishing"]["ratio"] = 0.5
    assert config.plugin_options("vanishing") == {"ratio": 1e-4}


def test_both_doors_build_equal_configs() -> None:
    options = {
        "report_every": 7,
        "stats_every": 2,
        "clip": "zclip",
        "options": {"exploding": {"spike": 5.0}},
        "disable": "runlog",
        "report": False,
    }
    assert watch_door(**options) == lightning_door(**options)


def test_every_option_is_documented_in_both_doors() -> None:
    from gradwatch.lightning import GradWatchCallback

    for name in WatchConfig.names():
        field = next(f for f in dataclasses.fields(WatchConfig) if f.name == name)
        assert field.metadata["doc"], name
        for doc in (gradwatch.watch.__doc__, GradWatchCallback.__doc__):
            assert f"{name}: " in doc, (name, doc)
    assert "{options}" not in gradwatch.watch.__doc__ and "{options}" not in GradWatchCallback.__doc__


def test_watch_takes_no_option_of_its_own_that_the_config_lacks() -> None:
    own = set(inspect.signature(gradwatch.watch).parameters) - {"model", "optimizer", "options"}
    assert own == {"console", "scaler"}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"report_every": 0}, "report_every must be a positive integer"),
        ({"stats_every": 2, "sample_every": 5}, "must be a multiple of stats_every=2"),
        ({"clip": "nonsense"}, "unknown clip mode 'nonsense'"),
        ({"clip": -1.0}, "positive finite number"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite must be None or one of"),
        ({"strict": "yes"}, "strict takes True or False"),
        ({"options": {"vanishing": 3}}, "dicts of that plugin's options"),
        ({"log": 3}, "log takes a file path"),
        ({"plugins": "myplugin"}, "plugins takes a list of plugin objects"),
    ],
)
def test_bad_values_say_what_to_pass(options, match) -> None:
    with pytest.raises(GradWatchError, match=match):
        WatchConfig.from_options(options, door="watch()")


def test_history_size_is_an_option_of_every_door() -> None:
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, report=False, history_size=3, stats_every=1) as gw:
        train(model, 10, batches=iter([(torch.randn(4, 8), torch.randn(4, 2))] * 10), optimizer=opt)
    assert len(gw.history) == 3
    assert lightning_door(history_size=3).history_size == 3
