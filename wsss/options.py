"""Typed stage options.

Each stage's options are one frozen dataclass whose fields are declared with :func:`option`
(default, help, whether the setting is *result-neutral*) and whose ``__post_init__`` checks every
value once, raising :class:`OptionError`. The stage's command line is generated from the dataclass
(:func:`add_options`, :func:`options_from_args`), ``wsss run`` builds the same dataclass from its
YAML section, and both report a bad value with the same text, named the way the user wrote it
(``--peak-quantile`` or ``cams.peak_quantile``). Result-neutral fields (workers, batch sizes,
devices, memory layout) change how fast a stage runs, never its files: they are left out of the
parameters a stage folder records and of ``wsss run``'s step hashes (:func:`result_params`).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from wsss.errors import ConfigError

IRN_SCALES = (1.0, 0.5, 1.5, 2.0)  # ``--scales irn``: IRN's make_cam.py views


class OptionError(ConfigError):
    """A bad value of option ``name`` (a dataclass field): ``problem`` says why, without the name,
    so that each front end can name the option as its user wrote it."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem


def option(default: Any, help: str, *, neutral: bool = False, key: str | None = None, choices: Iterable[str] | None = None,
           parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field of a stage's options. ``neutral``: the setting changes speed or memory,
    never results. ``key``: its name in YAML and on the command line when not the field's name.
    ``choices``: the allowed values (checked by :func:`check_choice` in ``__post_init__``, listed in
    ``--help``). ``parse``: how the command line's text becomes the value (default: from the type)."""
    metadata = {"help": help, "neutral": neutral, "key": key, "choices": tuple(choices) if choices else None, "parse": parse}
    return dataclasses.field(default=default, metadata=metadata)


def same_option(cls: type, name: str) -> Any:
    """A field declared like ``cls``'s field ``name`` (default, help, key): one declaration for an
    option that two configurations share."""
    source = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=source.default, metadata=source.metadata)


def option_key(f: dataclasses.Field) -> str:
    """The name of field ``f`` in YAML (its ``key`` or its own name)."""
    return f.metadata.get("key") or f.name


def flag_of(f: dataclasses.Field) -> str:
    return "--" + option_key(f).replace("_", "-")


# ----------------------------------------------------------------------------- checks


def check_range(name: str, value: float | None, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """OptionError unless ``value`` (when not None) is finite and within the bounds (closed unless
    ``low_open``/``high_open``); the message states the range."""
    if value is None:
        return
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or below or above:
        if low is not None and high is not None:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            span = f"{'>' if low_open else '>='} {low:g}"
        else:
            span = f"{'<' if high_open else '<='} {high:g}"
        raise OptionError(name, f"must be {span}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise OptionError(name, f"{value!r} unknown; choose from {', '.join(map(str, choices))}")


def check_positive_list(name: str, values: tuple[float, ...]) -> None:
    if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
        raise OptionError(name, f"must be a list of positive numbers, got {list(values)!r}")


def check_choices(instance: Any) -> None:
    """:func:`check_choice` for every field of ``instance`` declared with ``choices``."""
    for f in dataclasses.fields(instance):
        if f.metadata.get("choices"):
            check_choice(f.name, getattr(instance, f.name), f.metadata["choices"])


def suggest(name: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or ``""``."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_keys_error(where: str, unknown: Iterable[str], valid: Iterable[str]) -> ConfigError:
    """One error for misspelt keys: each with its closest valid key, then every valid key."""
    valid = sorted(valid)
    named = ", ".join(f"{key!r}{suggest(key, valid)}" for key in sorted(unknown))
    return ConfigError(f"unknown key(s) {named} in {where}; valid keys: {', '.join(valid)}")


# ----------------------------------------------------------------------------- values


def result_params(instance: Any) -> dict[str, Any]:
    """The fields of an options dataclass that change results, as plain data (tuples as lists):
    what a stage folder records and a step hash covers."""
    return {option_key(f): _plain(getattr(instance, f.name)) for f in dataclasses.fields(instance) if not f.metadata.get("neutral")}


def narrowed(instance: Any, cls: type, **changes: Any) -> Any:
    """``cls`` (a base of ``instance``'s class, such as a stage's options under a pipeline section)
    with ``instance``'s values of its fields, ``changes`` applied; checked again."""
    return cls(**{**{f.name: getattr(instance, f.name) for f in dataclasses.fields(cls)}, **changes})


def resource_values(instance: Any) -> dict[str, Any]:
    """The result-neutral fields of an options dataclass, as plain data: what a stage folder records
    for information only."""
    return {option_key(f): _plain(getattr(instance, f.name)) for f in dataclasses.fields(instance) if f.metadata.get("neutral")}


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------- files and typed values


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: ``{}``); ConfigError naming the file otherwise."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    return raw


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the type ``hint`` of a field (lists become tuples); ConfigError naming ``where``."""
    if isinstance(hint, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return coerce_value(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"'{where}' must be {' or '.join(_type_name(o) for o in typing.get_args(hint))}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
    elif typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, list):
            return tuple(coerce_value(v, item, f"{where}[{n}]") for n, v in enumerate(value))
        raise ConfigError(f"'{where}' must be a list, got {value!r}")
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"'{where}' must be {_type_name(hint)}, got {value!r}")


# ----------------------------------------------------------------------------- command lines


def _parser_for(hint: Any, f: dataclasses.Field) -> Callable[[str], Any]:
    if f.metadata.get("parse"):
        return f.metadata["parse"]
    options_ = [h for h in typing.get_args(hint) if h is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    if typing.get_origin(options_[0]) is tuple:
        item = typing.get_args(options_[0])[0]
        return names if item is str else numbers
    if options_ == [int, str]:
        return lambda text: int(text) if text.lstrip("-").isdigit() else text
    if options_[0] is int:
        return integer
    if options_[0] is float:
        return finite
    return str


def add_options(parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = ()) -> None:
    """One ``--flag`` per field of ``cls`` (but ``skip``), typed, with its help and default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = f.metadata.get("help", "")
        if hints[f.name] is bool:
            parser.add_argument(flag_of(f), dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=f"{text} (default: {'on' if default else 'off'})")
            continue
        choices = f.metadata.get("choices")
        parser.add_argument(flag_of(f), dest=f.name, type=_parser_for(hints[f.name], f), default=default, choices=choices,
                            help=f"{text} (default: {shown if shown not in ('', None) else 'none'})" + (" [speed only: never changes results]" if f.metadata.get("neutral") else ""))


CONFIG_HELP = ("YAML file of this command's options, keyed by the long flags without '--' (fusion: mean, "
               "data_root: ..., the keys of wsss run's section); flags on the command line win")


def parse_stage_args(parser: argparse.ArgumentParser, argv: list[str], *classes: type) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with ``--config FILE`` added: the file's values become the
    defaults (each checked against the field's type in ``classes``, or the flag's own type), so a
    flag given on the command line wins. Unknown keys are refused with suggestions."""
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_HELP)
    path = _config_argument(argv)
    if path is not None:
        by_key = {_long_flag(a).replace("-", "_"): a for a in parser._actions if _long_flag(a) and a.dest not in ("help", "config")}
        raw = read_yaml(Path(path), "options file")
        unknown = sorted(set(raw) - set(by_key))
        if unknown:
            raise ConfigError(f"{path}: {unknown_keys_error(f'the {parser.prog} options', unknown, by_key)}")
        hints = {name: hint for cls in classes for name, hint in typing.get_type_hints(cls).items()}
        for key, value in raw.items():
            action = by_key[key]
            parser.set_defaults(**{action.dest: _file_value(action, hints.get(action.dest), value, f"{path}: {key}")})
            action.required = False  # the file gave it
            for group in parser._mutually_exclusive_groups:  # e.g. --checkpoint | --model: one of them given
                if action in group._group_actions:
                    group.required = False
    return parser.parse_args(argv)


def _long_flag(action: argparse.Action) -> str | None:
    """``--fusion`` -> ``fusion`` (of ``--flip/--no-flip``: ``flip``)."""
    return next((s[2:] for s in action.option_strings if s.startswith("--")), None)


def _config_argument(argv: list[str]) -> str | None:
    for n, arg in enumerate(argv):
        if arg == "--config" and n + 1 < len(argv):
            return argv[n + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _file_value(action: argparse.Action, hint: Any, value: Any, where: str) -> Any:
    """An options file's ``value`` for ``action``: typed like the dataclass field, or like the flag."""
    if hint is not None and value is not None:
        return coerce_value(value, hint, where)
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
        if not isinstance(value, bool):
            raise ConfigError(f"'{where}' must be true or false, got {value!r}")
        return value
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"'{where}' {value!r} unknown; choose from {', '.join(map(str, action.choices))}")
    if value is None or action.type is None:
        return value
    try:
        return [action.type(str(v)) for v in value] if isinstance(value, list) else action.type(str(value))
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise ConfigError(f"'{where}' {exc}") from None


def options_from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """``cls`` built from the parsed ``args`` (fields ``values`` given instead); an OptionError
    names the ``--flag``."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    try:
        return cls(**{**given, **values})
    except OptionError as exc:
        field_ = next((f for f in dataclasses.fields(cls) if f.name == exc.name), None)
        raise ConfigError(f"{flag_of(field_) if field_ else exc.name} {exc.problem}") from None


def names(text: str) -> tuple[str, ...]:
    """``"stage3, stage5"`` -> ``("stage3", "stage5")``; ``""`` -> ``()``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def numbers(text: str) -> tuple[float, ...]:
    """Comma- or space-separated numbers (``0.75,1,1.25``); ``irn`` = IRN's scales."""
    if text.strip() == "irn":
        return IRN_SCALES
    try:
        return tuple(float(s) for s in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be numbers, e.g. '0.75,1.0,1.25', got {text!r}") from None


def scales(text: str) -> tuple[float, ...]:
    """Positive scale factors, comma- or space-separated (``0.75,1,1.25``), or ``irn``."""
    values = numbers(text)
    if not values or any(not math.isfinite(s) or s <= 0 for s in values):
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
    return values


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def finite(text: str) -> float:
    """A finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def default_workers() -> int:
    return os.cpu_count() or 1


def reference_rows(cls: type, skip: Iterable[str] = ()) -> list[str]:
    """Markdown table rows ``| --flag / key | default | what it does |`` of an options dataclass:
    the README's stage reference is generated from these (``scripts/stage_reference.py``)."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else ("none" if default is None else str(default))
        note = " (speed only)" if f.metadata.get("neutral") else ""
        text = f.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{flag_of(f)}` / `{option_key(f)}` | `{shown}` | {text}{note} |")
    return rows
