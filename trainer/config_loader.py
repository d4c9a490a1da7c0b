"""Typed config trees from TOML: strict loading, `--section.key=value` overrides and TOML output.

wren's configs are nested dataclasses. This module turns a TOML table into such a tree, rejecting
unknown keys and values of the wrong type with a `ConfigError` that names the dotted key, and writes
a tree back out as TOML so that every run saves the config it resolved.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning a missing file or a syntax error into a `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file '{path}' is not valid TOML: {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `--section.key=value` into (["section", "key"], value); the value is read as TOML.

    A value that is not a TOML literal (for example `--data.source=text`) is taken as a string.
    """
    body = text[2:] if text.startswith("--") else text
    key, sep, raw = body.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' must look like --section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `table` with each `--a.b=value` override written into it."""
    result = {k: dict(v) if isinstance(v, dict) else v for k, v in table.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return result


def build_dataclass(cls: type, table: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a TOML table, checking every key and type.

    A dataclass with a field named `extra` of type dict collects keys it does not declare
    (the model section uses this for per-model fields validated later by the model itself).
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    collects_extra = "extra" in fields
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{where}.{key}" if where else key
        if key not in fields or (collects_extra and key == "extra"):
            if collects_extra:
                extra[key] = value
                continue
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{dotted}: unknown key (known keys: {known})")
        kwargs[key] = _coerce(hints[key], value, dotted)
    if collects_extra:
        kwargs["extra"] = extra
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, dotted: str) -> Any:
    """Check `value` against the type `hint`, converting where TOML is looser (int for float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        for option in options:
            try:
                return _coerce(option, value, dotted)
            except ConfigError:
                continue
        names = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{dotted}: expected {names}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, dotted)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{dotted}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(item, v, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}: expected a table, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{dotted}: expected nothing, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{dotted}: expected true or false, got {value!r}")
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{dotted}: expected {_type_name(hint)}, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{dotted}: expected {_type_name(hint)}, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{dotted}: expected a finite number, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def to_toml(tree: Any) -> str:
    """Write a dataclass tree of scalars, lists and sub-tables as TOML text."""
    lines: list[str] = []
    _write_table(dataclasses.asdict(tree), [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _write_table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    table = {**{k: v for k, v in table.items() if k != "extra"}, **table.get("extra", {})}
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if path and (scalars or not tables):
        lines.append(f"\n[{'.'.join(path)}]")
    for key, value in scalars.items():
        if value is not None:
            lines.append(f"{key} = {toml_value(value)}")
    for key, value in tables.items():
        _write_table(value, path + [key], lines)


def override_args(values: dict[str, Any]) -> list[str]:
    """`{"section.key": value}` as command-line overrides `--section.key=<TOML literal>`."""
    return [f"--{key}={toml_value(value)}" for key, value in values.items()]


def toml_value(value: Any) -> str:
    """A scalar or list as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
