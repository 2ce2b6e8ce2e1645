"""What the run journal costs: pipeline throughput with and without it, and the supervisor's
peak memory on long journaled runs from a generator.

    python benchmarks/journal_cost.py            # full: 20k no-op / 3k 1 ms jobs; 100k and 1M
    python benchmarks/journal_cost.py --quick    # 5k / 600 jobs; 20k and 100k

Throughput: ``Pipeline(list, Task).run(procs=2, progress=False, journal=PATH)`` against
``journal=None``, in this process, wall time of the whole run (pool start included), best of
``--repeat`` runs, the two arms alternating so that a busier spell hits both. Memory: a fresh
child process per size runs a journaled pipeline over a lazy generator of no-op jobs while a
thread samples its own RSS every 50 ms (psutil); bounded memory means the peak does not grow
with the number of jobs.

A watchdog stops a run (SIGINT to this process: the pipeline drains) that delivers no result for
``STALL_S`` seconds; such a run is reported as stalled, not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # handed on to workers by multiprocessing

from harness import RssSampler  # noqa: E402
from workloads import CallTask, calibrate, noop, spin, stream_source  # noqa: E402

import batchpool  # noqa: E402
from batchpool import JobResult, Pipeline, RunReport  # noqa: E402

PROCS = 2
MB = 1024 * 1024
STALL_S = 10.0  # no result for this long: the run is stuck


class Checksum:
    """Sink: counts and sums the values, so a wrong or short run is refused, not timed."""

    def __init__(self) -> None:
        self.count = self.total = 0

    def __call__(self, result: JobResult) -> None:
        if result.ok:
            self.count += 1
            self.total += result.value


class Watchdog:
    """Interrupts this process (SIGINT: the running pipeline drains and raises
    KeyboardInterrupt, which ``run`` below turns into None) when the sink has seen no new
    result for ``STALL_S`` seconds."""

    def __init__(self, sink: Checksum) -> None:
        self.sink = sink
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def _watch(self) -> None:
        seen, since = -1, time.monotonic()
        while not self._stop.wait(0.25):
            if self.sink.count != seen:
                seen, since = self.sink.count, time.monotonic()
            elif time.monotonic() - since > STALL_S:
                self.fired = True
                os.kill(os.getpid(), signal.SIGINT)
                return

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def run(self, pipe: Pipeline, path: Path | None) -> RunReport | None:
        """The pipeline's report, or None when this watchdog stopped it."""
        try:
            return pipe.run(procs=PROCS, progress=False, journal=path)
        except KeyboardInterrupt:
            if not self.fired:
                raise
            return None


def timed_run(
    payloads: Iterable[Any], fn: Callable[[Any], Any], n: int, expected_sum: int, journal: bool
) -> float | None:
    """Seconds for one pipeline run over ``payloads`` (None: it stalled); checks every job came
    back right."""
    sink = Checksum()
    pipe = Pipeline(payloads, CallTask(fn), name="journal_cost", sink=sink)
    with tempfile.TemporaryDirectory(prefix="journal-cost-") as tmp:
        path = Path(tmp) / "journal.sqlite" if journal else None
        with Watchdog(sink) as dog:
            t0 = time.perf_counter()
            report = dog.run(pipe, path)
            took = time.perf_counter() - t0
        if dog.fired:
            print(f"  (stalled: {sink.count} of {n} jobs, journal={journal})", file=sys.stderr)
            return None
        if path is not None:
            with sqlite3.connect(path) as conn:
                rows = conn.execute("SELECT count(*) FROM jobs WHERE status = 'ok'").fetchone()[0]
            if rows != n:
                raise RuntimeError(f"journal holds {rows} ok rows for {n} jobs")
    if report is None or report.succeeded != n or sink.count != n or sink.total != expected_sum:
        raise RuntimeError(f"wrong run: {report.succeeded}/{sink.count} ok of {n}")
    return took


def throughput(quick: bool, repeat: int) -> list[dict[str, Any]]:
    cal = calibrate()
    loops = cal.loops(1.0)
    cases = [
        ("no-op", list(range(5_000 if quick else 20_000)), noop),
        ("1 ms pure Python", [loops] * (600 if quick else 3_000), spin),
    ]
    rows = []
    for name, payloads, fn in cases:
        n, expected = len(payloads), sum(payloads)
        timed_run(payloads[: 4 * PROCS], fn, 4 * PROCS, sum(payloads[: 4 * PROCS]), True)  # warm
        best = {False: float("inf"), True: float("inf")}
        stalls = {False: 0, True: 0}
        for _ in range(repeat):
            for journal in (False, True):
                took = timed_run(payloads, fn, n, expected, journal)
                if took is None:
                    stalls[journal] += 1
                else:
                    best[journal] = min(best[journal], took)
        rows.append(
            {
                "workload": name,
                "jobs": n,
                "plain": n / best[False],
                "journal": n / best[True],
                "ratio": best[False] / best[True],
                "extra": best[True] - best[False],
                "stalls": f"{stalls[False]}/{stalls[True]} of {repeat}",
            }
        )
    return rows


def rss_child(n: int) -> None:
    """In a fresh process: a journaled run of ``n`` no-op jobs from a generator; print JSON."""
    with tempfile.TemporaryDirectory(prefix="journal-cost-") as tmp:
        path = Path(tmp) / "journal.sqlite"
        sink = Checksum()
        pipe = Pipeline(stream_source(n), CallTask(noop), name="journal_cost_rss", sink=sink)
        with RssSampler() as rss, Watchdog(sink) as dog:
            t0 = time.perf_counter()
            report = dog.run(pipe, path)
            took = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
    if report is not None and (report.succeeded != n or sink.total != n * (n - 1) // 2):
        raise RuntimeError(f"wrong run: {report.succeeded} ok of {n}")
    row = {"jobs": n, "baseline": rss.baseline, "peak": rss.peak, "secs": took, "bytes": size}
    print(json.dumps({**row, "done": sink.count, "stalled": dog.fired}))


def memory(sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(n)],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"memory run of {n} jobs failed:\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs: a smoke run")
    parser.add_argument("--repeat", type=int, help="runs per arm, best kept [3; 2 with --quick]")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    repeat = args.repeat or (2 if args.quick else 3)
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    print(
        f"batchpool {batchpool.__version__}, Python {platform.python_version()} "
        f"({platform.python_implementation()}), {cores} cores ({usable} usable), "
        f"SQLite {sqlite3.sqlite_version}, procs={PROCS}, "
        f"{'quick' if args.quick else 'full'} mode, best of {repeat}"
    )
    started = time.perf_counter()

    print("\nthroughput, jobs/s (wall time of Pipeline.run, pool start included)")
    print(
        f"{'workload':<18} {'jobs':>7} {'no journal':>11} {'journal':>9} {'journal/none':>13} "
        f"{'extra s/run':>12} {'stalls none/journal':>20}"
    )
    for r in throughput(args.quick, repeat):
        print(
            f"{r['workload']:<18} {r['jobs']:>7} {r['plain']:>11,.0f} {r['journal']:>9,.0f} "
            f"{r['ratio']:>13.2f} {r['extra']:>12.3f} {r['stalls']:>20}"
        )

    sizes = [20_000, 100_000] if args.quick else [100_000, 1_000_000]
    print("\nsupervisor peak RSS, journaled no-op jobs from a generator (fresh process each)")
    print(
        f"{'jobs':>9} {'baseline MB':>12} {'peak MB':>8} {'growth MB':>10} "
        f"{'journal MB':>11} {'jobs/s':>8}"
    )
    for r in memory(sizes):
        stalled = f"  STALLED after {r['done']:,} jobs" if r["stalled"] else ""
        print(
            f"{r['jobs']:>9,} {r['baseline'] / MB:>12.1f} {r['peak'] / MB:>8.1f} "
            f"{(r['peak'] - r['baseline']) / MB:>10.1f} {r['bytes'] / MB:>11.1f} "
            f"{r['done'] / r['secs']:>8,.0f}{stalled}"
        )
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
