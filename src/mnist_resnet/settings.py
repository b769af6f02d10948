"""A setting's help, bounds and choices, written once beside its config field, and what is made
from them: the check of a value and the command-line flag.

    lr: float = setting(0.2, "peak learning rate", above=0.0)

`check(cfg)` (a `Settings` config's `validate()`) refuses a value outside its bounds, not among
its choices or (a float) not finite, in one line that names the flag; `add_flags(parser, cls)`
gives every field that has help a flag whose spelling, type, default and help come from the
field. Checks that join two fields stay in the config's own `validate()`, after `check`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from mnist_resnet.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A configuration value a user chose is invalid; the message says which and why."""


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    flag: str = "",
    negative: str = "",
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    below: float | None = None,
    choices: Iterable[Any] = (),
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    shown: str | None = None,
    repeat: bool = False,
) -> Any:
    """A dataclass field with its rules; no `help`, no flag (the rules still hold).

    `low`/`high` are inclusive bounds, `above`/`below` exclusive ones. `flag` is the spelling when
    it is not `--field-name`; `negative` gives a True-by-default switch only its `--no-...` form.
    `parse` turns the flag's text into the value (default: the field's type); `shown` is the
    default as help states it (default: the value, "or the preset's" where presets apply);
    a tuple field takes its values after one flag, or with `repeat` one per flag.
    """
    rules = {
        "help": help,
        "flag": flag,
        "negative": negative,
        "low": low,
        "high": high,
        "above": above,
        "below": below,
        "choices": tuple(choices),
        "metavar": metavar,
        "parse": parse,
        "shown": shown,
        "repeat": repeat,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=rules)
    return dataclasses.field(default=default, metadata=rules)


class Settings:
    """A config made of `setting` fields: `validate()` checks them (`check`); a config with
    rules that join two fields adds them in its own `validate()`, after `super().validate()`."""

    def validate(self) -> None:
        check(self)


def flag_of(f: dataclasses.Field[Any]) -> str:
    """How messages name a field: its flag, or its own name where it has none."""
    rules = f.metadata
    if not rules.get("help"):
        return f.name
    return rules["negative"] or rules["flag"] or "--" + f.name.replace("_", "-")


def check(cfg: object) -> None:
    """Every field of `cfg` within its bounds and choices, and every float finite."""
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        if "help" in f.metadata:
            _check_value(f, getattr(cfg, f.name))


def _check_value(f: dataclasses.Field[Any], value: Any) -> None:
    rules, label = f.metadata, flag_of(f)
    if value is None:  # "decide for me" (amp) or "none" (an output file not asked for)
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{label} must be a finite number, got {value}")
    if rules["choices"] and value not in rules["choices"]:
        named = f" ({label})" if label != f.name else ""
        raise ConfigError(
            f"unknown {f.name.replace('_', ' ')} {value!r}{named}; choose one of "
            f"{', '.join(map(str, rules['choices']))}"
        )
    low, high, above, below = (rules[k] for k in ("low", "high", "above", "below"))
    if (
        (low is not None and not value >= low)
        or (high is not None and not value <= high)
        or (above is not None and not value > above)
        or (below is not None and not value < below)
    ):
        raise ConfigError(f"{label} must be {_rule(low, high, above, below)}, got {value}")


def _rule(low: float | None, high: float | None, above: float | None, below: float | None) -> str:
    """`between 0 and 8`, `in (0, 1]`, `>= 1` or `< 1`: the bounds as messages state them."""
    if low is not None and high is not None:
        return f"between {_num(low)} and {_num(high)}"
    if (low, above) != (None, None) and (high, below) != (None, None):
        start = f"[{_num(low)}" if low is not None else f"({_num(above)}"
        end = f"{_num(high)}]" if high is not None else f"{_num(below)})"
        return f"in {start}, {end}"
    sign, bound = next(
        (s, b) for s, b in ((">=", low), (">", above), ("<=", high), ("<", below)) if b is not None
    )
    return f"{sign} {_num(bound)}"


def _num(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type[Any],
    names: Iterable[str] | None = None,
    *,
    presets: bool = False,
) -> None:
    """A flag for each field of `cls` that has help (or each of `names`), in field order.

    With `presets` a flag left out stays None, so the preset's value holds, and help says
    "default: X, or the preset's"; without, its default is the field's. Either way its value
    lands under `Class.field`, where `given` finds it.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("help")}
    hints, defaults = typing.get_type_hints(cls), cls()
    for name in fields if names is None else names:
        f, dest = fields[name], f"{cls.__name__}.{name}"
        rules, default = f.metadata, getattr(defaults, name)
        if rules["negative"]:
            text = str(rules["help"]).replace("%", "%%")
            parser.add_argument(
                rules["negative"], dest=dest, action="store_const", const=False, help=text
            )
            continue
        kind = _kind(name, hints[name], rules, None if presets else default)
        text = _help(rules, default, presets)
        parser.add_argument(flag_of(f), dest=dest, help=text, **kind)


def _kind(name: str, hint: Any, rules: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """argparse's action or type, nargs, metavar and default for a field of type `hint`."""
    if typing.get_origin(hint) is not tuple:  # `X | None`: X
        hint = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction, "default": default}
    choices = rules["choices"]
    metavar = rules["metavar"] or ("{" + ",".join(choices) + "}" if choices else name.upper())
    kind = {"type": rules["parse"] or hint, "metavar": metavar, "default": default}
    if typing.get_origin(hint) is tuple:  # its values after one flag, or one per flag
        kind.update(type=rules["parse"] or typing.get_args(hint)[0])
        kind.update({"action": "append"} if rules["repeat"] else {"nargs": "+"})
        kind["default"] = None if default is None else list(default)
    return kind


def _help(rules: Mapping[str, Any], default: Any, presets: bool) -> str:
    text = str(rules["help"]).replace("%", "%%")
    if rules["shown"] is not None:
        return f"{text} (default: {rules['shown']})"
    if default is None or default == ():
        return text
    if presets:
        return f"{text} (default: {default!r}, or the preset's)"
    return f"{text} (default: %(default)s)"


def given(args: argparse.Namespace, cls: type[Any]) -> dict[str, Any]:
    """The values `add_flags(parser, cls)` parsed into `args`, by field name; None left out."""
    prefix = f"{cls.__name__}."
    return {
        key[len(prefix) :]: value
        for key, value in vars(args).items()
        if key.startswith(prefix) and value is not None
    }


def from_args(cls: type[T], args: argparse.Namespace, base: T | None = None, **extra: Any) -> T:
    """`base` (default: the class's defaults) with the values given in `args`, then `extra`."""
    # A tuple field's flag collects a list.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in given(args, cls).items()}
    values.update(extra)
    return dataclasses.replace(base if base is not None else cls(), **values)  # type: ignore[type-var]
