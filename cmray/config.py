"""Typed experiment configs: dataclasses loaded from YAML with dotted overrides, validated up front.

A config is a tree of dataclasses whose every field is declared with :func:`param`, which records
a help string and optional constraints (``ge``/``gt``/``le``/``lt``/``choices``). A run's
effective values are resolved with this precedence, highest first:

1. ``--set section.key=value`` on the command line (later ``--set`` beats earlier ones),
2. the YAML file given with ``--config``,
3. the dataclass defaults.

Everything is checked before any work starts: unknown keys, wrong types, out-of-range values
and missing required fields all raise :class:`ConfigError`, whose message is a single line
naming the full dotted key and what would have been accepted. Pipelines wrap their ``main`` in
:func:`exit_on_config_error` so such a mistake prints that line and exits with status 2, the
same status argparse uses for a bad command line, instead of a traceback minutes into a run.

Typical use in a pipeline::

    @exit_on_config_error
    def main(argv: list[str] | None = None) -> None:
        parser = argparse.ArgumentParser()
        add_config_args(parser, default_config="configs/cifar10_cd.yaml")
        cfg = config_from_args(ExperimentConfig, parser.parse_args(argv))
        ...
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import operator
import os
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar, get_args, get_origin

import yaml

__all__ = [
    "ConfigError",
    "add_config_args",
    "apply_overrides",
    "config_from_args",
    "config_help",
    "dump_yaml",
    "exit_on_config_error",
    "flatten",
    "from_dict",
    "load_config",
    "param",
    "save_config",
    "to_dict",
]

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")

_PREFIX = "config error: "
_NONE_TYPE = type(None)
_UNION_ORIGINS = (typing.Union, types.UnionType)
_FAIL = object()  # a coercer's "cannot convert"; None is a legitimate value
_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
_RANGE_CHECKS = (("ge", operator.ge), ("gt", operator.gt), ("le", operator.le), ("lt", operator.lt))


class ConfigError(ValueError):
    """A user mistake in a config file or override; ``str(err)`` is one line for the terminal.

    ``key`` is the dotted key at fault when there is one (``None`` for file-level problems).
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        # Collapse newlines (YAML parser messages have them) so a log grep finds the whole story.
        line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
        if not line.startswith(_PREFIX):
            line = _PREFIX + line
        super().__init__(line)
        self.key = key


class _TypeMismatchError(ConfigError):
    """Raised when a value cannot be converted; ``X | None`` re-words it to mention null."""


# --------------------------------------------------------------------------- declaring fields


def param(
    default: Any = MISSING,
    *,
    help: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[Any] | None = None,
    default_factory: Callable[[], Any] | Any = MISSING,
) -> Any:
    """Declare a config field: ``lr: float = param(1e-4, help="Adam learning rate", gt=0)``.

    Bounds and ``choices`` apply elementwise to tuple/list fields. A field with neither
    ``default`` nor ``default_factory`` is required. Returns a :func:`dataclasses.field`.
    """
    if not help or not help.strip():
        raise TypeError("param() needs a non-empty help text")
    if isinstance(choices, str):
        raise TypeError(
            f"param(choices=...) needs a sequence of values, not the string {choices!r}"
        )
    metadata = {"help": help.strip(), "ge": ge, "gt": gt, "le": le, "lt": lt}
    metadata["choices"] = tuple(choices) if choices is not None else None
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


@functools.cache
def _schema(cls: type) -> tuple[tuple[dataclasses.Field[Any], Any], ...]:
    """The (field, resolved type) pairs a config class accepts, checked once per class."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as exc:
        raise TypeError(
            f"cannot resolve the type hints of {cls.__qualname__} ({exc}); "
            "define config dataclasses at module level"
        ) from exc
    schema = tuple((f, hints[f.name]) for f in dataclasses.fields(cls) if f.init)
    for f, tp in schema:
        where = f"{cls.__qualname__}.{f.name}"
        if "help" not in f.metadata:
            raise TypeError(f"{where} must be declared with param(..., help=...)")
        _check_supported(tp, where)
    return schema


def _check_supported(tp: Any, where: str) -> None:
    # Fail at the first load, on the developer, rather than on some later user's odd value.
    origin, args = get_origin(tp), get_args(tp)
    if tp in _SCALAR_COERCERS or origin is Literal or _is_section(tp):
        return
    if origin in _UNION_ORIGINS:  # X | None, or alternatives tried in order (int | tuple)
        for arg in args:
            if arg is not _NONE_TYPE:
                _check_supported(arg, where)
        return
    if origin in (list, tuple) and args and args != ((),):
        for arg in args:
            if arg is not Ellipsis:
                _check_supported(arg, where)
        return
    raise TypeError(
        f"{where}: unsupported config field type {tp!r}; use int, float, bool, str, Literal, "
        "X | None, tuple/list of those, or a nested dataclass"
    )


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _join(prefix: str, name: object) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


# --------------------------------------------------------------------------- building


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a nested mapping, converting and validating every field.

    Absent keys take the dataclass defaults (which are validated too). ``prefix`` is the
    dotted path of ``data`` inside the whole config, used only in error messages.
    """
    if not _is_section(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        where = f"'{prefix}'" if prefix else "the config"
        raise ConfigError(f"{where} must be a mapping of keys, got {_show(data)}", key=prefix)
    schema = _schema(cls)
    _reject_unknown(data, [f.name for f, _ in schema], prefix)
    values = {f.name: _field_value(f, tp, data, _join(prefix, f.name)) for f, tp in schema}
    # The class's own __post_init__ runs here and may raise ConfigError for cross-field rules.
    return cls(**values)


def _reject_unknown(data: Mapping[str, Any], accepted: list[str], prefix: str) -> None:
    unknown = [_join(prefix, key) for key in data if key not in accepted]
    if not unknown:
        return
    where = f"in '{prefix}'" if prefix else "at top level"
    names = ", ".join(f"'{key}'" for key in unknown)
    noun = "key" if len(unknown) == 1 else "keys"
    raise ConfigError(
        f"unknown {noun} {names} (accepted keys {where}: {', '.join(sorted(accepted))})",
        key=unknown[0],
    )


def _field_value(f: dataclasses.Field[Any], tp: Any, data: Mapping[str, Any], key: str) -> Any:
    value = _coerce(_raw_value(f, tp, data, key), tp, key)
    _check_constraints(value, f.metadata, key)
    return value


def _raw_value(f: dataclasses.Field[Any], tp: Any, data: Mapping[str, Any], key: str) -> Any:
    default = _default_of(f)
    if f.name not in data:
        if default is not MISSING:
            return default
        if _is_section(tp):
            return {}  # so a missing inner field is reported by its full dotted key
        raise ConfigError(f"'{key}' is required", key=key)
    raw = data[f.name]
    if raw is None and _is_section(tp):
        raw = {}  # YAML reads an empty "train:" block as null
    if _is_instance(default) and isinstance(raw, Mapping):
        # A partial section overrides the default instance's values, not the class defaults.
        raw = _deep_merge(to_dict(default), raw)
    return raw


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------- type conversion


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in _UNION_ORIGINS:
        return _coerce_union(value, tp, key)
    if origin is Literal:
        return _coerce_literal(value, tp, key)
    if _is_section(tp):
        return _coerce_section(value, tp, key)
    if origin in (list, tuple):
        return _coerce_sequence(value, tp, key)
    result = _SCALAR_COERCERS[tp](value)
    if result is _FAIL:
        raise _mismatch(value, tp, key)
    return result


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    args = get_args(tp)
    if value is None and _NONE_TYPE in args:
        return None
    alternatives = [a for a in args if a is not _NONE_TYPE]
    for inner in alternatives:
        try:
            return _coerce(value, inner, key)
        except _TypeMismatchError as exc:
            # A nested element's problem: its own message is the precise one.
            if exc.key != key and len(alternatives) == 1:
                raise
    raise _mismatch(value, tp, key) from None


def _coerce_literal(value: Any, tp: Any, key: str) -> Any:
    for choice in get_args(tp):
        coercer = _SCALAR_COERCERS.get(type(choice))
        candidate = coercer(value) if coercer else value
        if type(candidate) is type(choice) and candidate == choice:
            return choice
    raise _not_a_choice(value, get_args(tp), key)


def _coerce_section(value: Any, tp: type, key: str) -> Any:
    if isinstance(value, tp):
        value = to_dict(value)  # re-validate instances handed in as defaults
    if not isinstance(value, Mapping):
        raise _mismatch(value, tp, key)
    return from_dict(tp, value, key)


def _coerce_sequence(value: Any, tp: Any, key: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise _mismatch(value, tp, key)
    item_types = _item_types(tp, len(value))
    if item_types is None:
        raise _mismatch(value, tp, key)
    items = [
        _coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types, strict=True))
    ]
    return tuple(items) if get_origin(tp) is tuple else items


def _item_types(tp: Any, length: int) -> list[Any] | None:
    """Per-position types for a sequence of ``length``, or None if that length cannot fit."""
    args = get_args(tp)
    if get_origin(tp) is list or (len(args) == 2 and args[1] is Ellipsis):
        return [args[0]] * length
    return list(args) if len(args) == length else None


def _parse_number(text: str) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def _as_int(value: Any) -> Any:
    if isinstance(value, str):
        value = _parse_number(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)  # "1e6" steps is a fine way to write a million
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return _FAIL


def _as_float(value: Any) -> Any:
    # PyYAML follows YAML 1.1, which reads 1e-4 (no dot) as a string; users expect a number.
    if isinstance(value, str):
        value = _parse_number(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return _FAIL


def _as_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return _BOOL_WORDS.get(value.strip().lower(), _FAIL)
    return _FAIL


def _as_str(value: Any) -> Any:
    # Numbers are refused rather than str()-ed: YAML has already changed "0123" to 83 and
    # "1.10" to 1.1, so the text the user meant is gone. Quoting the value is the fix.
    return value if isinstance(value, str) else _FAIL


def _as_scalar(value: Any) -> Any:
    # ``Any`` in a config means "whatever YAML scalar the user wrote": a search's choice values
    # are checked later, against the field they are for.
    return value if isinstance(value, (bool, int, float, str)) else _FAIL


_SCALAR_COERCERS: dict[Any, Callable[[Any], Any]] = {
    int: _as_int,
    float: _as_float,
    bool: _as_bool,
    str: _as_str,
    Any: _as_scalar,
}


# --------------------------------------------------------------------------- constraints


def _check_constraints(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_constraints(item, meta, f"{key}[{i}]")
        return
    if value is None or _is_instance(value):
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise _not_a_choice(value, choices, key)
    bounds = [(meta.get(name), check) for name, check in _RANGE_CHECKS]
    if not all(bound is None or check(value, bound) for bound, check in bounds):
        raise ConfigError(
            f"{key} = {_show(value)} is out of range; accepted: {_range_text(meta)}", key=key
        )


def _range_text(meta: Mapping[str, Any]) -> str:
    """``0 <= value < 1`` for a two-sided range, else the conditions joined with ``and``."""
    lower = [(meta[k], op) for k, op in (("ge", "<="), ("gt", "<")) if meta.get(k) is not None]
    upper = [(meta[k], op) for k, op in (("le", "<="), ("lt", "<")) if meta.get(k) is not None]
    if len(lower) == 1 and len(upper) == 1:
        (lo, lo_op), (hi, hi_op) = lower[0], upper[0]
        return f"{_show(lo)} {lo_op} value {hi_op} {_show(hi)}"
    flipped = {"<=": ">=", "<": ">"}
    parts = [f"value {flipped[op]} {_show(b)}" for b, op in lower]
    parts += [f"value {op} {_show(b)}" for b, op in upper]
    return " and ".join(parts)


# --------------------------------------------------------------------------- messages


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, cut short so the message stays one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in _UNION_ORIGINS:
        named = [_describe(a) for a in args if a is not _NONE_TYPE]
        return " or ".join(named + (["null"] if _NONE_TYPE in args else []))
    if origin is Literal:
        return "one of: " + ", ".join(_choice_text(a) for a in args)
    if _is_section(tp):
        return "a mapping (a config section)"
    if origin in (list, tuple):
        return _describe_sequence(tp)
    return {
        int: "an int",
        float: "a float",
        bool: "a bool (true/false)",
        str: "a string",
        Any: "a number, string or bool",
    }[tp]


def _describe_sequence(tp: Any) -> str:
    args = get_args(tp)
    plural = {int: "ints", float: "floats", bool: "bools", str: "strings", Any: "scalars"}
    if get_origin(tp) is list or (len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {plural.get(args[0], 'values')}"
    if len(set(args)) == 1:
        return f"a list of {len(args)} {plural.get(args[0], 'values')}"
    return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"


def _choice_text(choice: Any) -> str:
    return choice if isinstance(choice, str) else _show(choice)


def _mismatch(value: Any, tp: Any, key: str) -> _TypeMismatchError:
    message = f"{key} = {_show(value)} has the wrong type; expected {_describe(tp)}"
    return _TypeMismatchError(message, key=key)


def _not_a_choice(value: Any, choices: Sequence[Any], key: str) -> ConfigError:
    accepted = ", ".join(_choice_text(c) for c in choices)
    return ConfigError(
        f"{key} = {_show(value)} is not accepted; choose one of: {accepted}", key=key
    )


# --------------------------------------------------------------------------- overrides and files


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with each ``a.b.c=value`` override set, in order.

    Values are parsed as YAML (``[1, 2]``, ``true``, ``null``, numbers); anything else stays
    a string. Keys are not checked here: :func:`from_dict` reports unknown ones.
    """
    result = copy.deepcopy(dict(data))
    for item in overrides:
        keys, value = _parse_override(item)
        _set_path(result, keys, value, item)
    return result


def with_values(data: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``data`` with each dotted key of ``values`` set (e.g. a trial's params)."""
    result = copy.deepcopy(dict(data))
    for key, value in values.items():
        _set_path(result, key.split("."), value, f"{key}={value}")
    return result


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, text = item.partition("=")
    keys = [part.strip() for part in key.split(".")]
    if not sep or not all(keys):
        raise ConfigError(f"--set {item!r} needs the form key=value")
    try:
        return keys, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"--set {item!r}: the value is not valid YAML ({_yaml_problem(exc)})"
        ) from None


def _set_path(root: dict[str, Any], keys: list[str], value: Any, item: str) -> None:
    node = root
    for depth, key in enumerate(keys[:-1]):
        if node.get(key) is None:
            node[key] = {}  # create missing sections, and fill an empty YAML "train:" block
        if not isinstance(node[key], dict):
            section = ".".join(keys[: depth + 1])
            raise ConfigError(f"--set {item!r}: '{section}' is a value, not a section", key=section)
        node = node[key]
    node[keys[-1]] = value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(exc)


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return {}  # an empty file means "all defaults"
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"config file '{path}' must be a mapping of sections, got a {kind}")
    return data


def read_config_file(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """A config file's mapping (``{}`` for None or an empty file); ConfigError if unreadable."""
    return _read_yaml(path) if path is not None else {}


def load_config(
    cls: type[T], path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()
) -> T:
    """Resolve a config: dataclass defaults < YAML file at ``path`` (if any) < ``overrides``."""
    data = read_config_file(path)
    return from_dict(cls, apply_overrides(data, overrides))


# --------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config instance as plain nested dicts; tuples become lists so YAML stays clean."""
    if not _is_instance(cfg):
        raise TypeError(f"to_dict needs a dataclass instance, got {type(cfg).__name__}")
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


def _plain(value: Any) -> Any:
    if _is_instance(value):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _Dumper(yaml.SafeDumper):
    """Block-style sections, but lists of scalars inline (``[64, 128]``) as people write them."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.SequenceNode:
    inline = all(not isinstance(v, (list, dict)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=inline)


_Dumper.add_representer(list, _represent_list)


def dump_yaml(cfg: Any) -> str:
    """The config as YAML in field order; loading it back gives an equal config."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``dump_yaml(cfg)`` to ``path`` atomically: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(dump_yaml(cfg))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a saved config is meant to be shared
        os.replace(tmp, path)  # same directory, so this is a rename within one filesystem
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def flatten(cfg_or_dict: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to scalar values (``{"train.lr": 0.0001}``), e.g. for MLflow params.

    Lists become their JSON text (``"[64, 128]"``) so every value is a scalar.
    """
    data = to_dict(cfg_or_dict) if _is_instance(cfg_or_dict) else cfg_or_dict
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = _join(prefix, key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted))
        elif isinstance(value, (list, tuple)):
            flat[dotted] = json.dumps(_plain(value))
        else:
            flat[dotted] = value
    return flat


def config_help(cls: type, prefix: str = "") -> str:
    """One line per leaf field: dotted key, type, default and constraints, then its help."""
    return "\n".join(_help_lines(cls, prefix, {}))


def _help_lines(cls: type, prefix: str, defaults: Mapping[str, Any]) -> list[str]:
    # ``defaults`` carries a section's default instance, which may differ from class defaults.
    lines = []
    for f, tp in _schema(cls):
        key = _join(prefix, f.name)
        default = defaults.get(f.name, _default_of(f))
        if _is_section(tp):
            lines += _help_lines(tp, key, to_dict(default) if _is_instance(default) else {})
            continue
        shown = "required" if default is MISSING else f"default {_show(_plain(default))}"
        facts = [_describe(tp), shown]
        if any(f.metadata.get(k) is not None for k, _ in _RANGE_CHECKS):
            facts.append(f"accepted: {_range_text(f.metadata)}")
        if f.metadata.get("choices") is not None:
            facts.append("one of: " + ", ".join(map(_choice_text, f.metadata["choices"])))
        lines.append(f"{key} ({'; '.join(facts)}): {f.metadata['help']}")
    return lines


# --------------------------------------------------------------------------- command line


def add_config_args(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """Add ``--config PATH``, repeatable ``--set KEY=VALUE`` and ``--print-config``."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=default_config,
        help=f"YAML config file (default: {default_config or 'none, dataclass defaults only'})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=None,
        help="override one value, e.g. --set train.lr=1e-4; repeatable, beats the YAML file",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit",
    )


def config_from_args(
    cls: type[T], args: argparse.Namespace, values: Mapping[str, Any] | None = None
) -> T:
    """Load ``cls`` from parsed :func:`add_config_args` options, then any dotted-key ``values``
    (a pipeline's own flags); honours ``--print-config``."""
    data = apply_overrides(read_config_file(args.config), args.overrides or ())
    cfg = from_dict(cls, with_values(data, values or {}))
    if args.print_config:
        sys.stdout.write(dump_yaml(cfg))
        sys.stdout.flush()
        raise SystemExit(0)
    return cfg


def exit_on_config_error(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a pipeline entry point: a ConfigError prints one line to stderr and exits 2."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
