"""The one ``key=value`` dialect and typed loader of every configuration file of the project.

The experiment config (pipeline/config.py), the sweep file (tuning/spec.py) and the workflow file are trees
of dataclasses. Each is read the same way: a YAML mapping, then ``dotted.key=value`` items whose values are
YAML flow text (``1e-4``, ``true``, ``[a, b]``, ``{k: v}``, ``null``; a bare word or a path is a string),
then ``from_dict``, which checks every key against the dataclass (unknown keys name the nearest valid one)
and every value against its annotation. One value reads the same on the command line as in a file.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad key, type or value in the configuration; the message names the key."""


# ----------------------------------------------------------------------------------------------
# Values: YAML with YAML 1.2 floats and no implicit dates
# ----------------------------------------------------------------------------------------------


class YamlLoader(yaml.SafeLoader):
    """Safe YAML (plain data only) with YAML 1.2 floats: PyYAML follows YAML 1.1, where 1e-4 (no dot) is
    read as a string. Dates stay strings (a run named 2026-01-01 is a name, not a date)."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))


def load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)


NULL_WORDS = ("null", "Null", "NULL", "~")


def parse_value(raw: str) -> Any:
    """The value of a ``key=value`` item: YAML flow text read as a file's value would be (``1e-4`` is a
    number, ``[a, b]`` a list). Text YAML cannot read (``a: b: c``) and comments stay the literal string;
    a Python tuple ``(0.5, 0.9)`` is read as the list it means."""
    raw = raw.strip()
    if not raw:
        return ""
    try:
        value = load_yaml_text(raw)
    except yaml.YAMLError:
        return raw
    if value is None and raw not in NULL_WORDS:
        return raw   # '#...' is a comment to YAML, but a string here
    if isinstance(value, (dict, list)) and not raw.startswith(("{", "[")):
        return raw   # block YAML ('a: b', '- a') is never meant on a command line: '/data/x: y' is a path
    if isinstance(value, str) and raw.startswith("(") and raw.endswith(")"):
        try:
            literal = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            literal = None
        if isinstance(literal, tuple):
            return list(literal)
    if isinstance(value, str) and not raw.startswith(("'", '"')):
        return raw   # an unquoted string is the text as typed: 'my run #3' keeps its '#3'
    return value


def parse_override(item: str) -> tuple[str, Any]:
    """'optim.encoder.lr=3e-4' -> ('optim.encoder.lr', 3e-4); the value as ``parse_value`` reads it."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key (section.key=value)")
    return key, parse_value(raw)


# ----------------------------------------------------------------------------------------------
# Types: any dataclass tree
# ----------------------------------------------------------------------------------------------


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type annotation of every field of dataclass ``cls``."""
    return typing.get_type_hints(cls)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def unknown_key_error(path: str, key: str, cls: type) -> ConfigError:
    """The error for a key that ``cls`` does not have: names it, suggests the nearest, lists the valid ones."""
    valid = _field_names(cls)
    near = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{_join(path, key)}'.{hint} Valid keys{' in ' + path if path else ''}: "
                       f"{', '.join(valid)}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _section(tp: Any) -> type | None:
    """The dataclass of a section annotation (``Options`` or ``Options | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1 and dataclasses.is_dataclass(arms[0]):
            return arms[0]
    return None


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _number(value: Any, key: str) -> float:
    if isinstance(value, str):   # '1e-4' from YAML 1.1 (yaml.safe_load) or a quoted number
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"config key '{key}' must be a number; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config key '{key}' must be a number; got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number; got {value!r}")
    return float(value)


def _sequence(value: Any, tp: Any, key: str) -> tuple[Any, ...]:
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key '{key}' must be a list; got {value!r}")
    if typing.get_origin(tp) is list or (len(args) == 2 and args[1] is Ellipsis):
        item = args[0] if args else Any
        return tuple(coerce_value(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"config key '{key}' must have {len(args)} values; got {list(value)!r}")
    return tuple(coerce_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _union(value: Any, tp: Any, key: str) -> Any:
    arms = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None and _optional(tp):
        return None
    errors = []
    for arm in arms:
        try:
            return coerce_value(value, arm, key)
        except ConfigError as e:
            errors.append(e)
    if _optional(tp) and isinstance(value, str) and value.strip() in ("None", "none", *NULL_WORDS):
        return None
    if len(arms) == 1:
        raise errors[0]
    raise ConfigError(f"config key '{key}': {value!r} is none of {', '.join(map(_type_name, arms))}")


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the lossless cases (int or a number's text ->
    float, list -> tuple, mapping -> dataclass). Anything else raises a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}   # an empty section in YAML: every default
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}' must be {_type_name(tp)}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _union(value, tp, key)
    if origin in (tuple, list):
        out = _sequence(value, tp, key)
        return list(out) if origin is list else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping; got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {coerce_value(k, kt, f"{key} (a key)"): coerce_value(v, vt, _join(key, k)) for k, v in value.items()}
    if tp is float:
        return _number(value, key)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer; got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false; got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string; got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported annotation {tp}")


def from_dict(cls: type, d: Any, path: str = "") -> Any:
    """Plain dict -> dataclass ``cls`` (any dataclass tree), type-checked; unknown keys raise with the
    nearest valid one, missing keys keep their defaults, a missing key without a default is named."""
    if not isinstance(d, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping of keys to values, got {d!r}")
    hints = field_types(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in hints:
            raise unknown_key_error(path, key, cls)
        kwargs[key] = coerce_value(value, hints[key], _join(path, key))
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"config key{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(repr(_join(path, m)) for m in missing)} must be given (no default)")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path or 'config'}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Dotted keys
# ----------------------------------------------------------------------------------------------


def set_dotted(tree: dict[str, Any], key: str, value: Any, root: type) -> None:
    """Set ``tree['a']['b']['c'] = value`` for key 'a.b.c', checking that every part is a real path of the
    dataclass ``root``. Under a mapping field (``base``, ``set``, ``source_options``) the rest of the key
    is one key of that mapping ('base.train.steps' -> tree['base']['train.steps'])."""
    parts = key.split(".")
    cls: Any = root
    node = tree
    for i, part in enumerate(parts):
        hints = field_types(cls)
        if part not in hints:
            raise unknown_key_error(".".join(parts[:i]), part, cls)
        tp = hints[part]
        section = _section(tp)
        last = i == len(parts) - 1
        if last:
            if section is not None and not (value is None and _optional(tp)):
                raise ConfigError(f"config key '{key}' is a section, not a value; set one of its keys: "
                                  f"{', '.join(_field_names(section))}")
            node[part] = value
            return
        origin = typing.get_origin(tp)
        if origin is dict or tp is dict:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node[part][".".join(parts[i + 1:])] = value
            return
        if section is None:
            raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is a value, not a section")
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is a section; it holds {node[part]!r}")
        node = node[part]
        cls = section
