"""A served job's final outcome, as the journal keeps it and the HTTP answer carries it."""

from __future__ import annotations

import json
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from ..cancelling import CANCELLED
from ..journal.encoding import json_text
from ..journal.file import Outcome
from ..results import KIND_CANCELLED, JobError, JobResult


@dataclass(frozen=True, slots=True)
class Final:
    """``value`` is JSON text already: made once, in the journal and in every answer alike
    (what JSON cannot hold is kept as its repr(), as in a run's journal)."""

    id: int
    ok: bool
    value: str
    error: dict[str, Any] | None
    attempts: int
    elapsed: float
    worker: int | None = None

    @classmethod
    def of(cls, id: int, future: Future[JobResult], attempts: int = 0) -> Final:
        """A resolved future's outcome; a cancelled one (a DELETE) made ``attempts`` before
        (a job waiting for its retry can be cancelled too)."""
        if future.cancelled():
            why = "while waiting for a retry" if attempts else "before it started"
            cancelled = JobError(KIND_CANCELLED, CANCELLED, f"cancelled by DELETE {why}")
            return cls(id, False, "null", cancelled.to_dict(), attempts, 0.0)
        result = future.result()
        error = None if result.error is None else result.error.to_dict()
        value = json_text(result.value) if error is None else "null"
        return cls(id, error is None, value, error, result.attempts, result.elapsed, result.worker)

    @classmethod
    def from_journal(cls, row: Outcome) -> Final:
        return cls(
            row["index"],
            row["ok"],
            json.dumps(row["value"]),
            row["error"],
            row["attempts"],
            row["elapsed"],
            row["worker"],
        )

    @property
    def error_text(self) -> str | None:
        return None if self.error is None else json.dumps(self.error)

    def body(self) -> bytes:
        """SPEC section 4's answer: {"id", "ok", "value", "error", "attempts", "elapsed"}."""
        return (
            f'{{"id": {self.id}, "ok": {"true" if self.ok else "false"}, "value": {self.value}, '
            f'"error": {self.error_text or "null"}, "attempts": {self.attempts}, '
            f'"elapsed": {self.elapsed!r}}}'
        ).encode()
