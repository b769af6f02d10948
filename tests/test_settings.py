"""settings.py: a field's help, bounds and choices make its flag and its check."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import pytest

from mnist_resnet.cli import build_parser
from mnist_resnet.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from mnist_resnet.settings import Settings, add_flags, from_args, setting


@dataclass(frozen=True)
class Demo(Settings):
    count: int = setting(1, "how many", low=1)
    share: float = setting(0.5, "a share", above=0.0, below=1.0)
    size: int = setting(4, "a size", low=0, high=8)
    mode: str = setting("a", "a mode", choices=("a", "b"))
    hidden: int = setting(2, low=2)  # no help: no flag, the bound still holds
    timeout_s: float = setting(1.0, "seconds", flag="--timeout", above=0.0)
    on: bool = setting(True, "turn it off", negative="--no-on")
    names: tuple[str, ...] = setting((), "a name (repeatable)", flag="--name", repeat=True)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"count": 0}, "--count must be >= 1, got 0"),
        ({"share": 1.0}, "--share must be in (0, 1), got 1.0"),
        ({"size": 9}, "--size must be between 0 and 8, got 9"),
        ({"mode": "c"}, "unknown mode 'c' (--mode); choose one of a, b"),
        ({"hidden": 1}, "hidden must be >= 2, got 1"),
        ({"timeout_s": math.nan}, "--timeout must be a finite number, got nan"),
        ({"share": math.inf}, "--share must be a finite number, got inf"),
    ],
)
def test_a_value_out_of_its_rules_is_one_line_naming_the_flag(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        dataclasses.replace(Demo(), **values).validate()
    assert str(caught.value) == message


def test_flags_parse_into_the_config_with_their_defaults_in_the_help() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, Demo)
    argv = [
        "--count",
        "3",
        "--mode",
        "b",
        "--timeout",
        "2",
        "--no-on",
        "--name",
        "x",
        "--name",
        "y",
    ]
    cfg = from_args(Demo, parser.parse_args(argv))
    assert cfg == Demo(count=3, mode="b", timeout_s=2.0, on=False, names=("x", "y"))
    assert from_args(Demo, parser.parse_args([])) == Demo()
    text = parser.format_help()
    assert "how many (default: 1)" in text and "{a,b}" in text and "--hidden" not in text
    # With presets a flag left out keeps the base's value, and help says so.
    parser = argparse.ArgumentParser()
    add_flags(parser, Demo, presets=True)
    assert from_args(Demo, parser.parse_args(["--size", "5"]), Demo(count=7)) == Demo(
        count=7, size=5
    )
    assert "(default: 1, or the preset's)" in parser.format_help()


def test_every_setting_with_help_is_a_train_flag() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = {a.dest: a for a in sub.choices["train"]._actions}
    for cls in (DataConfig, TrainConfig, ModelConfig):
        for f in dataclasses.fields(cls):
            if f.metadata.get("help"):
                assert train[f"{cls.__name__}.{f.name}"].help, f.name
