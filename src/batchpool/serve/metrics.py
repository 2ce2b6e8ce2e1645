"""Prometheus metrics of a pool (SPEC section 5), read from its ``Metrics`` snapshots.

A collector, not a second set of counters: every scrape takes one ``Pool.metrics()`` snapshot
and renders it, so Prometheus sees exactly what the pool counts. Per-stage counts (jobs,
attempts, retries, timeouts, crashes, the attempt-time histogram) carry the stage's name; what
belongs to the whole pool (queue, workers, restarts, memory) carries ``stage="all"``. In a
pipeline a job counts as submitted to each stage it enters and succeeded in each it passes:
the pipeline's totals are the first stage's submitted and the last stage's succeeded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..pool import Pool
from ..results import Metrics, StageMetrics
from ..sampling import BOUNDS

ALL = "all"  # the stage label of pool-wide values
LABELS = ["pipeline", "stage"]

# (metric name without _total, help, StageMetrics field)
_STAGE_COUNTERS = (
    ("batchpool_jobs_submitted", "Jobs that entered the stage.", "submitted"),
    ("batchpool_jobs_succeeded", "Jobs that passed the stage.", "succeeded"),
    ("batchpool_jobs_failed", "Jobs that failed for good in the stage.", "failed"),
    ("batchpool_jobs_cancelled", "Jobs cancelled before they ran in the stage.", "cancelled"),
    ("batchpool_attempts_started", "Attempts started.", "started"),
    ("batchpool_retries", "Retries scheduled after failed attempts.", "retried"),
    ("batchpool_timeouts", "Attempts stopped by their timeout.", "timed_out"),
    ("batchpool_crashes", "Attempts whose worker died.", "crashed"),
)
_POOL_VALUES: tuple[tuple[Any, str, str, str], ...] = (
    (CounterMetricFamily, "batchpool_worker_restarts", "Workers replaced.", "worker_restarts"),
    (GaugeMetricFamily, "batchpool_jobs_queued", "Jobs waiting, retries included.", "queued"),
    (GaugeMetricFamily, "batchpool_jobs_in_flight", "Jobs in workers' hands.", "in_flight"),
    (GaugeMetricFamily, "batchpool_workers", "Worker processes alive.", "workers"),
)


def stage_labels(names: Sequence[str]) -> list[str]:
    """One label per stage: its class name, numbered where two stages share one."""
    labels = []
    for i, name in enumerate(names):
        labels.append(name if names.count(name) == 1 else f"{name}-{names[:i].count(name) + 1}")
    return labels


class PoolCollector(Collector):
    """Renders one pool's snapshot at each scrape; nothing until a snapshot source is set."""

    def __init__(
        self,
        pipeline: str,
        stages: Sequence[str],
        snapshot: Callable[[], Metrics] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.stages = stage_labels(stages)
        self.snapshot = snapshot
        self._lock = threading.Lock()
        self._started: dict[str, int] = {}  # per stage: the most attempts started yet shown

    def collect(self) -> Iterator[Metric]:
        if self.snapshot is None:
            return
        m = self.snapshot()
        started = self._never_falling([s.started for s in m.stages])
        for name, doc, field in _STAGE_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=LABELS)
            for i, (label, stage) in enumerate(zip(self.stages, m.stages, strict=False)):
                count = started[i] if field == "started" else getattr(stage, field)
                family.add_metric([self.pipeline, label], count)
            yield family
        pool = [self.pipeline, ALL]
        for kind, name, doc, field in _POOL_VALUES:
            family = kind(name, doc, labels=LABELS)
            family.add_metric(pool, getattr(m, field))
            yield family
        rss = GaugeMetricFamily(
            "batchpool_worker_rss_bytes", "Resident memory of a worker.", labels=[*LABELS, "worker"]
        )
        for w in m.per_worker:
            rss.add_metric([*pool, str(w.pid)], w.rss)
        yield rss
        yield from self._histogram(m.stages)

    def _never_falling(self, started: list[int]) -> list[int]:
        """``started`` as a counter may show it. Metrics.started falls back when a worker hands
        unstarted jobs back (they count again when they start): Prometheus would take a fall for
        a reset and count the whole total again, so a scrape shows the most seen yet, which the
        true count reaches again as the handed-back jobs start (it stays above it by the jobs
        handed back and then cancelled, which never start)."""
        with self._lock:
            for label, count in zip(self.stages, started, strict=False):
                self._started[label] = max(count, self._started.get(label, 0))
            return [self._started[label] for label in self.stages[: len(started)]]

    def _histogram(self, stages: Sequence[StageMetrics]) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "batchpool_attempt_duration_seconds",
            "Seconds of the attempts that returned (ran to a result or an exception).",
            labels=LABELS,
        )
        for label, stage in zip(self.stages, stages, strict=False):
            counts = stage.attempt_buckets
            if not counts:
                continue
            cumulative, buckets = 0, []
            for bound, count in zip([*BOUNDS, float("inf")], counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else repr(float(bound))
                buckets.append((le, cumulative))
            family.add_metric([self.pipeline, label], buckets, stage.attempt_sum)
        yield family


def registry(collector: PoolCollector) -> CollectorRegistry:
    """A registry of the pool's metrics alone (not this process's default registry)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


class Exporter:
    """``batchpool run --metrics-port``: an HTTP server of /metrics in a thread of its own,
    bound at once (so a port in use is refused before any job runs); the run attaches its
    pool's snapshots once the pool exists."""

    def __init__(self, host: str, port: int, pipeline: str, stages: Sequence[str]) -> None:
        self.collector = PoolCollector(pipeline, stages)
        self._server, self._thread = start_http_server(port, host, registry(self.collector))
        self.port: int = self._server.server_port

    def attach(self, pool: Pool) -> None:
        self.collector.snapshot = pool.metrics

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not threading.current_thread():
            self._thread.join()
