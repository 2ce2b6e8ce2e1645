"""The progress bar (tqdm, on stderr when it is a terminal) and the end-of-run summary.

The bar is redrawn when results come in and, on its own timer, while long jobs run, so its
clock and rate never freeze. Its counts are read when it is drawn, so they never lag the bar.
Pool metrics (retries, restarts, jobs in flight) are sampled outside any drawing: the pool's
lock is never taken while tqdm's is held (a log line from the supervisor takes them the other
way round).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import IO, TYPE_CHECKING, Any, NoReturn

from tqdm import tqdm

from .results import JobResult, Metrics

if TYPE_CHECKING:
    from .report import RunReport

    _Tqdm = tqdm[NoReturn]  # the stubs' tqdm is generic in what it iterates: nothing here
else:
    _Tqdm = tqdm

log = logging.getLogger("batchpool")

REFRESH_EVERY = 0.5  # seconds between metrics snapshots for the postfix and peak RSS
TICK = 1.0  # seconds between redraws while no result comes in


class _Bar(_Tqdm):
    """tqdm with its postfix made at draw time, and a bar of fixed width (tqdm's, for an
    unknown width) where the terminal reports 0 columns, instead of a bar squeezed to
    nothing."""

    def __init__(self, *args: Any, postfix: Callable[[], str], **kwargs: Any) -> None:
        self._make_postfix = postfix  # before tqdm's __init__, which may draw
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> MutableMapping[str, Any]:
        d = super().format_dict
        d["postfix"] = self._make_postfix()
        if (d.get("ncols") or 0) < 1:  # tqdm makes 0 columns -1 (one for the cursor)
            d["ncols"] = None
        return d


class Progress:
    """Counts results; draws a bar only where a person can see it; logs final failures
    (``-v``) and every result and the pool's state (``-vv``)."""

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
        self.metrics = metrics
        self.ok = self.failed = 0
        self.peak_rss = 0
        self.fixed_total = total is not None
        self._last: Metrics | None = None  # the latest snapshot, drawn from
        self._next_refresh = 0.0
        self._lock = threading.Lock()  # counts and bar move together; taken before tqdm's
        self.bar = _Bar(
            total=total,
            file=stream,
            unit="job",
            mininterval=0.2,
            dynamic_ncols=True,
            disable=not visible,
            postfix=self._postfix,
        )
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if visible:
            self._ticker = threading.Thread(
                target=self._tick, name="batchpool-progress", daemon=True
            )
            self._ticker.start()

    def set_total(self, total: int | None) -> None:
        """The source's length, once known (a callable source's result); from any thread.
        An explicit total given at construction wins."""
        if total is not None and not self.fixed_total:
            self.bar.total = total

    def skip(self, ok: bool) -> None:
        """A job finished by an earlier run (resume)."""
        self._count(ok)

    def update(self, result: JobResult) -> None:
        """A final result of this run."""
        if not result.ok and result.error is not None:
            err = result.error
            log.info(
                "job %s failed after %d attempt(s): %s: %s",
                result.index,
                result.attempts,
                err.type,
                err.message,
            )
        elif log.isEnabledFor(logging.DEBUG):
            log.debug(
                "job %s: ok after %d attempt(s), %.3f s on worker %s",
                result.index,
                result.attempts,
                result.elapsed,
                result.worker,
            )
        self._count(result.ok)

    def _count(self, ok: bool) -> None:
        with self._lock:
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
        """Sample the pool's metrics (for the postfix, peak RSS and -vv)."""
        m = self.metrics()
        self._last = m
        for w in m.per_worker:
            self.peak_rss = max(self.peak_rss, w.rss)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "pool: %d done (%d ok, %d failed), %d queued, %d running, %d workers, "
                "%d retries, %d restarts",
                self.ok + self.failed,
                self.ok,
                self.failed,
                m.queued,
                m.in_flight,
                m.workers,
                m.retried,
                m.worker_restarts,
            )

    def _postfix(self) -> str:
        m = self._last
        text = f"ok={self.ok}, failed={self.failed}"
        if m is not None:
            text += f", running={m.in_flight}, retries={m.retried}, restarts={m.worker_restarts}"
        return text

    def _tick(self) -> None:
        while not self._stop.wait(TICK):
            self.refresh()
            with self._lock:
                self.bar.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
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
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
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
    if len(m.stages) > 1:  # what each stage did: where the time and the failures went
        names = report.stage_names or [f"stage {k + 1}" for k in range(len(m.stages))]
        for k, (name, stage) in enumerate(zip(names, m.stages, strict=False)):
            lines.append(
                f"  stage {k + 1} {name}: {stage.submitted} in, {stage.succeeded} ok, "
                f"{stage.failed} failed, {stage.retried} retries; attempt time p50 "
                f"{_duration(stage.attempt_p50)}, p95 {_duration(stage.attempt_p95)}"
            )
    if report.journal:
        lines.append(f"journal: {report.journal}")
    return "\n".join(lines)
