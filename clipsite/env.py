"""Typed readers for environment variables.

Settings are the only module that reads the environment. A bad value never raises here: it is
recorded in ``CONFIG_ERRORS`` and reported by the system check ``embeddings.E001``, which stops
``manage.py`` commands and the server's start with a message naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

CONFIG_ERRORS: list[tuple[str, str]] = []

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip()


def _bad(name: str, message: str) -> None:
    CONFIG_ERRORS.append((name, message))


def env_str(name: str, default: str = "") -> str:
    value = _raw(name)
    return default if value is None or value == "" else value


def env_bool(name: str, default: bool) -> bool:
    value = _raw(name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    _bad(name, f"{name}={value!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")
    return default


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        number = int(value.replace("_", ""))
    except ValueError:
        _bad(name, f"{name}={value!r} is not an integer")
        return default
    if minimum is not None and number < minimum:
        _bad(name, f"{name}={number} is below its minimum of {minimum}")
        return default
    if maximum is not None and number > maximum:
        _bad(name, f"{name}={number} is above its maximum of {maximum}")
        return default
    return number


def env_choice(name: str, default: str, choices: Sequence[str]) -> str:
    value = _raw(name)
    if value is None or value == "":
        return default
    if value.lower() not in choices:
        _bad(name, f"{name}={value!r} is not one of: {', '.join(choices)}")
        return default
    return value.lower()


def env_list(name: str, default: Sequence[str], *, separator: str = ",") -> list[str]:
    value = _raw(name)
    if value is None or value == "":
        return list(default)
    return [item.strip() for item in value.split(separator) if item.strip()]
