"""The progress bar (tqdm, on stderr when it is a terminal) and the end-of-run summary."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from tqdm import tqdm

from .results import Metrics

if TYPE_CHECKING:
    from .pipeline import RunReport

REFRESH_EVERY = 0.5  # seconds between metrics snapshots for the postfix and peak RSS


class Progress:
    """Counts results; draws a bar only where a person can see it."""

    def __init__(
        self,
        total: int | None,
        *,
        enabled: bool,
        metrics: Callable[[], Metrics],
        stream: IO[str] | None = None,
    ) -> None:
        stream = stream or sys.stderr
        visible = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(
            total=total,
            file=stream,
            unit="job",
            mininterval=0.2,
            dynamic_ncols=True,
            disable=not visible,
        )
        self.metrics = metrics
        self.ok = self.failed = 0
        self.peak_rss = 0
        self._next_refresh = 0.0

    def skip(self, ok: bool) -> None:
        """A job finished by an earlier run (resume)."""
        self.update(ok)

    def update(self, ok: bool) -> None:
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        self.bar.update(1)
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + REFRESH_EVERY
            self.refresh()

    def refresh(self) -> None:
        m = self.metrics()
        for w in m.per_worker:
            self.peak_rss = max(self.peak_rss, w.rss)
        self.bar.set_postfix(
            ok=self.ok,
            failed=self.failed,
            retries=m.retried,
            restarts=m.worker_restarts,
            refresh=False,
        )

    def close(self) -> None:
        self.refresh()
        self.bar.close()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def summary(report: RunReport) -> str:
    """Counts, elapsed, jobs/s, p50/p95 attempt time, retries and restarts, peak RSS."""
    m = report.metrics
    ran = report.total - report.skipped
    rate = ran / report.elapsed if report.elapsed > 0 else 0.0
    head = f"{report.total} jobs: {report.succeeded} ok, {report.failed} failed"
    if report.skipped:
        head += f" ({report.skipped} from an earlier run)"
    if report.interrupted:
        head += f"; stopped by {report.stopped_by}"
    lines = [
        f"{head} in {report.elapsed:.2f} s ({rate:.1f} jobs/s)",
        f"attempt time p50 {_duration(report.attempt_p50)}, p95 {_duration(report.attempt_p95)}; "
        f"retries {m.retried}, timeouts {m.timed_out}, crashes {m.crashed}, "
        f"worker restarts {m.worker_restarts}; peak worker RSS {_size(report.peak_rss)}",
    ]
    if report.journal:
        lines.append(f"journal: {report.journal}")
    return "\n".join(lines)
