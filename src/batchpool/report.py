"""What a pipeline run reports: RunReport, the attempt times behind its p50/p95, and the message
of a run whose workers could not start."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .formatting import safe_repr
from .futures import broken_message
from .results import JobError, JobResult, Metrics

TIMING_SAMPLES = 10_000  # reservoir for p50/p95 attempt time: bounded memory


@dataclass
class RunReport:
    """What a run did. ``to_dict()`` is JSON-serialisable."""

    succeeded: int
    failed: int
    elapsed: float
    metrics: Metrics
    failures: list[JobResult]
    interrupted: bool
    total: int = 0  # jobs with a final outcome, earlier runs' included
    skipped: int = 0  # of those, recorded by an earlier run and not run again
    # "SIGINT", "SIGTERM", "SIGHUP", "deadline", "source", "sink", "journal", "setup"
    stopped_by: str | None = None
    error: str | None = None  # traceback or message of what stopped the run
    attempt_p50: float | None = None
    attempt_p95: float | None = None
    peak_rss: int = 0  # bytes, largest worker RSS sampled
    journal: str | None = None
    stage_names: list[str] = field(default_factory=list)  # task class names; see metrics.stages

    def to_dict(self) -> dict[str, Any]:
        return {
            "succeeded": self.succeeded,
            "failed": self.failed,
            "total": self.total,
            "skipped": self.skipped,
            "elapsed": self.elapsed,
            "interrupted": self.interrupted,
            "stopped_by": self.stopped_by,
            "error": self.error,
            "attempt_p50": self.attempt_p50,
            "attempt_p95": self.attempt_p95,
            "peak_rss": self.peak_rss,
            "journal": self.journal,
            "stage_names": self.stage_names,
            "metrics": self.metrics.to_dict(),
            "failures": [
                {
                    "index": r.index,
                    "payload": safe_repr(r.payload),
                    "attempts": r.attempts,
                    "error": r.error.to_dict() if r.error else None,
                }
                for r in self.failures
            ],
        }


class AttemptTimes:
    """A uniform sample of the final attempts' times (algorithm R), for their p50 and p95."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.seen = 0
        self.rand = random.Random(0)

    def add(self, elapsed: float) -> None:
        self.seen += 1
        if len(self.values) < TIMING_SAMPLES:
            self.values.append(elapsed)
        else:
            slot = self.rand.randrange(self.seen)
            if slot < TIMING_SAMPLES:
                self.values[slot] = elapsed

    def quantiles(self, *qs: float) -> list[float | None]:
        ordered = sorted(self.values)
        if not ordered:
            return [None for _ in qs]
        return [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in qs]


def cannot_start(broken: JobError, failed: int, *, journaled: bool) -> str:
    """The setup error, with its traceback, and the way on: the jobs that did not run are not
    recorded, so a resume runs them once the cause is fixed."""
    lines = [broken.traceback.rstrip()] if broken.traceback else []
    lines.append(broken_message(broken))
    if not journaled:
        lines.append("the jobs that did not run were not done: fix the cause and run again")
    else:
        hint = "the jobs that did not run are not recorded: fix the cause, then use --resume"
        if failed:
            jobs = "job" if failed == 1 else "jobs"
            hint += f" (or --retry-failed to rerun the {failed} failed {jobs} too)"
        lines.append(hint)
    return "\n".join(lines)
