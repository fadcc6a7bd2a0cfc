"""Typed run configs: dataclasses whose fields carry a one-line help, built from dicts that may
come from YAML files and ``--set key=value`` overrides. Unknown keys and wrongly typed values
are errors that name the key, the bad value and what was expected."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false (any case). YAML 1.1 also
    reads on/off/yes/no/y/n as booleans, which turns ``--set w_mode=off``-style string values
    into False."""


_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _yaml(text: str):
    """A YAML document as Python values, with YAML 1.2 booleans (:class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)


def field(default, help: str, **kw):
    """A dataclass field with its one-line help (shown by ``--help`` and saved with the run)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: typing.cast(typing.Any, default).copy(), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key + ".")
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: got {value!r}, expected one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}, expected a list")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: got {value!r}, expected a number")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float range
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{key}: got {value!r}, expected a finite number")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}, expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}, expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r}, expected a string")
        return value
    return value


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + u for u in unknown]}; valid keys: {sorted(prefix + n for n in names)}")
    for f in dataclasses.fields(cls):  # a partly given nested section keeps this class's defaults
        if f.name in data and dataclasses.is_dataclass(hints[f.name]):
            if not isinstance(data[f.name], dict):
                raise ConfigError(f"{prefix}{f.name}: got {data[f.name]!r}, expected a mapping of its keys")
            data[f.name] = merge(to_dict(_default_of(f)), data[f.name])
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def set_dotted(layer: dict, key: str, value) -> dict:
    """Set ``a.b.c`` in the nested dict ``layer`` (in place; returns it)."""
    node = layer
    *parents, leaf = key.strip().split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key.strip()}: {p!r} was already set to a value, not a section")
    node[leaf] = value
    return layer


def parse_overrides(pairs: list[str]) -> dict:
    """``["a.b=1", "c=[1,2]"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = _yaml(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key.strip()}: {raw!r} is not a YAML value ({_yaml_problem(e)})") from None
        set_dotted(out, key, value)
    return out


def _yaml_problem(e: Exception) -> str:
    """A YAML error on one line: the problem, and the line and column where PyYAML records them."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for k, v in override.items():
        merged[k] = merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(cls, path: str | None = None, overrides: list[str] | None = None):
    """``cls`` from an optional YAML/JSON file plus ``--set`` overrides."""
    return from_dict(cls, merge(read_config_file(path), parse_overrides(overrides or [])))


def read_config_file(path: str | None) -> dict:
    """The mapping in a YAML/JSON file ({} for no path)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        data = _yaml(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping, got {type(data).__name__}")
    return data


def describe(cls, prefix: str = "", defaults=None) -> list[str]:
    """``key (default): help`` lines, for --help and the README; nested sections show the
    defaults their parent gives them."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        default = getattr(defaults, f.name) if defaults is not None else _default_of(f)
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, prefix + f.name + ".", default)
            continue
        lines.append(f"{prefix}{f.name} ({json.dumps(default)}): {f.metadata.get('help', '')}")
    return lines
