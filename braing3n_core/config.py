"""Typed configuration from YAML: the shared loader and the one error type of every config file.

Every loader raises `ConfigError` whose message names the file and the offending field, so a hospital
IT team reading a failed start-up sees what to fix without reading code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from braing3n_core.errors import BadInput
from braing3n_core.presets import PRESETS


class ConfigError(BadInput, ValueError):
    """A configuration file is missing, unparsable or invalid; the message names the file."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


GZIP_MAGIC = b"\x1f\x8b"
# YAML 1.1 allows UTF-8 and UTF-16 with a byte-order mark; PyYAML detects the mark itself.
_UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML settings file; a `ConfigError` naming the file otherwise.

    Text must be UTF-8 (a UTF-8 or UTF-16 byte-order mark is honoured): a file saved in another encoding is
    refused with the line and byte at fault rather than read with guessed characters."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: file not found" if not path.exists() else f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
    try:
        raw = yaml.safe_load(data if data.startswith(_UTF16_MARKS) else _utf8_text(path, data))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(raw).__name__}")
    return raw


_read_yaml_mapping = read_yaml_mapping  # the name the config modules import


def _utf8_text(path: Path, data: bytes) -> str:
    if data.startswith(GZIP_MAGIC):
        raise ConfigError(f"{path}: a gzip-compressed file (a .nii.gz scan?), not a YAML text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        binary = b"\0" in data[:1024]
        what = "a binary file, not a YAML text file" if binary else "not UTF-8 text"
        raise ConfigError(f"{path}: {what} (byte 0x{data[error.start]:02x} at line {line}, column {column}); "
                          "save it as UTF-8") from None


def _validate(model: type[BaseModel], raw: dict[str, Any], path: Path) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        problems = [f"  {_where(item['loc'], raw)}: {_plain_message(item)}" for item in error.errors()]
        raise ConfigError(f"{path}: invalid {model.__name__}:\n" + "\n".join(problems)) from None


def _where(loc: tuple[Any, ...], raw: Any) -> str:
    """`stages.0.rounds` as the user knows it: list items that have a `name` are named (`stages[dit].rounds`),
    others numbered from 1 as a person counts (`sites[2]`); pydantic's union-branch tags are left out."""
    parts: list[str] = []
    node = raw
    for key in loc:
        if isinstance(key, int) and isinstance(node, list):
            item = node[key] if key < len(node) else None
            name = item.get("name") if isinstance(item, dict) else None
            label = f"[{name}]" if isinstance(name, str) else f"[{key + 1}]"
            parts[-1:] = [(parts[-1] if parts else "") + label]
            node = item
            continue
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, dict) and node.get("name") == key:
            continue  # the tag pydantic gives a union member (`strategy.fedprox.mu`): the file says `name: fedprox`
        else:
            node = None
        parts.append(str(key))
    return ".".join(parts) or "(top level)"


_SEQUENCE_ERRORS = {"tuple_type", "list_type", "set_type", "frozen_set_type"}


def _plain_message(item: Mapping[str, Any]) -> str:
    """pydantic's message in the words of a YAML file (a list, a mapping, a number), not Python's."""
    kind, value = item["type"], item.get("input")
    if kind == "extra_forbidden":
        return "unknown setting (check its spelling)"
    if kind in _SEQUENCE_ERRORS:
        example = f"[{value}]" if isinstance(value, str) else "[first, second]"
        return f"expected a list, e.g. {example}, got {_shown(value)}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping of settings (key: value lines), got {_shown(value)}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected a whole number, got {_shown(value)}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {_shown(value)}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {_shown(value)}"
    if kind in ("string_type",):
        return f"expected text, got {_shown(value)}"
    if kind == "missing":
        return "required setting is missing"
    return str(item["msg"]).removeprefix("Value error, ")


def _shown(value: Any) -> str:
    """A value as a YAML reader sees it: `the text 'T1w'`, `the number 3`, `a list`."""
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, str):
        return f"the text {value!r}"
    return f"the number {value!r}" if isinstance(value, (int, float)) else repr(value)


def check_preset_name(name: str) -> str:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return name
