"""Durations: as people write them on a command line (``90`` seconds, ``1.5s``, ``500ms``,
``30m``, ``2h``, ``1d``), and as settings in seconds. Pure: ValueError with a one-line reason."""

from __future__ import annotations

import math
import re
from typing import Any

UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds in ``text``, a number > 0 with an optional unit (ms, s, m, h, d)."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (try 90, 1.5s, 500ms, 30m or 2h)")
    seconds = float(match.group(1)) * UNITS[(match.group(2) or "").lower()]
    if not 0 < seconds < math.inf:
        raise ValueError(f"a duration must be more than 0, got {text!r}")
    return seconds


def seconds_setting(name: str, value: Any) -> float:
    """A setting in seconds (a deadline, a timeout): a number > 0, not a bool, finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)
