"""Text for people and files: reprs that cannot fail, JSON that stays JSON, CSV cells.

A report or an export must be written whatever the jobs returned: a payload whose ``repr()``
raises, one nested thousands deep, a float that is not a number, a lone surrogate in an error
message. Everything here degrades to a readable placeholder instead of raising.
"""

from __future__ import annotations

import json
import math
import reprlib
from typing import Any

REPR_LIMIT = 1000  # characters of a payload's repr in a report: enough to recognise it


class _Repr(reprlib.Repr):
    """reprlib's limits on size and depth, and a placeholder that names what went wrong."""

    def repr_instance(self, obj: Any, level: int) -> str:
        try:
            text = repr(obj)
        except Exception as exc:
            return _placeholder(obj, exc)
        return text if len(text) <= self.maxother else text[: self.maxother - 3] + "..."


def _placeholder(obj: Any, exc: BaseException) -> str:
    return f"<{type(obj).__qualname__} object: repr() raised {type(exc).__name__}>"


_REPR = _Repr()
_REPR.maxlevel = 8  # deeper nesting shows as "[...]" instead of recursing
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = 100
_REPR.maxdeque = _REPR.maxarray = 100
_REPR.maxdict = 50
_REPR.maxstring = _REPR.maxlong = _REPR.maxother = REPR_LIMIT

# Non-finite floats as JSON strings: bare NaN/Infinity are not JSON, and null would lose them.
NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def safe_repr(obj: Any, limit: int = REPR_LIMIT) -> str:
    """``repr(obj)``, cut to ``limit`` characters; never raises (a placeholder instead)."""
    try:
        text = _REPR.repr(obj)
    except Exception as exc:  # RecursionError, or a __repr__ of a container subclass
        text = _placeholder(obj, exc)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by their NON_FINITE strings, at any depth."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return NON_FINITE[repr(obj)]
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(obj: Any, **options: Any) -> str:
    """Strict JSON text: values JSON cannot hold become their repr (see ``safe_repr``) and
    non-finite floats the strings "NaN", "Infinity", "-Infinity"."""
    try:
        return json.dumps(obj, allow_nan=False, default=safe_repr, **options)
    except ValueError:  # a non-finite float somewhere: the rare, slower path
        pass
    except RecursionError:
        return json.dumps(safe_repr(obj), **options)
    try:
        return json.dumps(_finite(obj), allow_nan=False, default=safe_repr, **options)
    except (ValueError, RecursionError):  # a float subclass, or nesting too deep to walk
        return json.dumps(safe_repr(obj), **options)


def csv_cell(value: Any) -> str:
    """One CSV cell: booleans as true/false, None as an empty cell, strings as they are,
    anything else as JSON (so numbers, lists and dicts read back with a JSON parser)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return to_json(value)
