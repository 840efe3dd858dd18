"""Checking a filter's own options, so a mistake names its config key (``safety.filters.ip.names``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fluxframe.errors import ConfigError


def key(filter_name: str, *parts: str) -> str:
    return ".".join(("safety", "filters", filter_name, *parts))


def reject_unknown(filter_name: str, options: dict[str, Any], known: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown option (known: {', '.join(sorted(known))})", key=key(filter_name, unknown[0]))


def number(filter_name: str, name: str, value: Any, *, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"must be a number, got {type(value).__name__} {value!r}", key=key(filter_name, name))
    value = float(value)
    if value < low or value > high or (low_open and value == low):
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ConfigError(f"must be in {bound}, got {value:g}", key=key(filter_name, name))
    return value


def boolean(filter_name: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"must be true or false, got {value!r}", key=key(filter_name, name))
    return value


def string_list(filter_name: str, name: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"must be a list of strings, got {value!r}", key=key(filter_name, name))
    return list(value)


def path(filter_name: str, name: str, value: Any, base_dir: str | Path | None, *, kind: str = "file") -> Path:
    if not isinstance(value, str | Path):
        raise ConfigError(f"must be a path, got {value!r}", key=key(filter_name, name))
    p = Path(value).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    ok = p.is_dir() if kind == "dir" else p.is_file()
    if not ok:
        raise ConfigError(f"{kind} does not exist: {p}", key=key(filter_name, name))
    return p
