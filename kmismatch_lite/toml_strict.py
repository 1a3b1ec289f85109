"""Strict TOML reading: every key is checked against the fields the code knows."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from kmismatch_lite.errors import KmmError


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise KmmError(f"file not found: {path}") from None
    except UnicodeDecodeError:
        raise KmmError(f"{path}: not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as exc:
        raise KmmError(f"{path}: invalid TOML: {exc}") from None


def check_keys(table: dict, allowed: dict[str, Any], path: Path, where: str = "") -> None:
    """Fail on the first unknown key or wrongly typed value, naming the key and the file."""
    for key, value in table.items():
        name = f"{where}.{key}" if where else key
        if key not in allowed:
            raise KmmError(f"{path}: unknown key '{name}' (known: {', '.join(sorted(allowed))})")
        kind = allowed[key]
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise KmmError(f"{path}: '{name}' must be a table")
            check_keys(value, kind, path, name)
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise KmmError(f"{path}: '{name}' must be {want}, got {value!r}")
