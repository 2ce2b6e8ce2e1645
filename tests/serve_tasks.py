"""Targets that tests/test_serve.py serves by file path (``serve_tasks.py:NAME``).

A payload is an int (squared at once) or a dict: ``n`` (the value returned), ``sleep``
(seconds), ``runs`` (a file that gets one line per attempt: ``n``), ``fail`` (fail for good),
``flag`` (Flaky: the first attempt creates the file and fails, later ones succeed), ``nice``
(return the worker's nice value instead).
"""

from __future__ import annotations

import os
import time
from typing import Any

from faults import append_line

from batchpool import PermanentError, Pipeline, Task


class Work(Task):
    retries = 0

    def run(self, payload: Any) -> Any:
        if isinstance(payload, int):
            return payload * payload
        if payload.get("nice"):
            return os.nice(0)
        if payload.get("runs"):
            append_line(payload["runs"], str(payload.get("n")))
        time.sleep(payload.get("sleep", 0))
        if payload.get("fail"):
            raise PermanentError(f"payload {payload.get('n')} refused")
        return payload.get("n")


class Flaky(Task):
    """Fails its first attempt; the retry, a second later, succeeds."""

    retries = 1
    backoff = 1.0
    jitter = 0.0

    def run(self, payload: Any) -> Any:
        if payload.get("runs"):
            append_line(payload["runs"], payload["flag"])
        if not os.path.exists(payload["flag"]):
            open(payload["flag"], "w").close()
            raise ValueError("the first attempt fails")
        return "second attempt"


class Double(Task):
    def run(self, payload: Any) -> Any:
        return payload * 2


class NeedsArgument(Task):
    def __init__(self, size: int) -> None:
        self.size = size

    def run(self, payload: Any) -> Any:
        return payload


NOT_A_TASK = 42

pipeline = Pipeline([], Work(), Double(), name="served")
