"""One contender's measuring process, driven by run.py over a pipe (one JSON line each way).

Why a separate process per contender: a hung or crashed library can then be killed with its
whole process group without taking the suite down; libraries with process-wide singletons
(loky, joblib) cannot leak state into each other; and the supervisor whose memory `stream1m`
reports is this process alone, with nothing but its own library imported.

Run as ``python harness.py CONTENDER``; not an entry point for people.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent))

from contenders import CONTENDERS, Contender, Session  # noqa: E402
from workloads import WORKLOADS, Calibration, Workload, stream_source  # noqa: E402


class RssSampler:
    """Peak resident memory of this process, sampled by a thread every `interval` seconds."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.baseline = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def verify(values: list[int], expected_count: int, expected_sum: int) -> None:
    """Refuse a timing whose results are wrong: a fast wrong answer is not a result."""
    if len(values) != expected_count:
        raise RuntimeError(f"got {len(values)} results for {expected_count} jobs")
    if sum(values) != expected_sum:
        raise RuntimeError("results do not match the payloads (checksum mismatch)")


def opened(contender: Contender, workload: Workload, cell: dict[str, Any]) -> Session:
    return contender.opener(workload.fn, cell["procs"], cell["start_method"])


def measure_startup(contender: Contender, workload: Workload, cell: dict[str, Any]) -> dict:
    """Pool construction to the first result of one job, the pool's own call path included."""
    t0 = time.perf_counter()
    session = opened(contender, workload, cell)
    try:
        raw = session.run([0])
        wall = time.perf_counter() - t0
        verify(session.values(raw), 1, 0)
        session.close()
    except BaseException:
        session.terminate()
        raise
    return {"wall": wall, "n": 1}


def measure_throughput(contender: Contender, workload: Workload, cell: dict[str, Any]) -> dict:
    """A warm pool (started and warmed up untimed), then one timed batch; closing is untimed."""
    n = cell["n"]
    payloads = workload.build(n, Calibration(**cell["calibration"]), cell["scale"])
    expected = sum(workload.expect(p) for p in payloads)
    t_open = time.perf_counter()
    session = opened(contender, workload, cell)
    try:
        session.values(session.run(workload.warmup(cell["procs"])))
        cpu0, t0 = time.process_time(), time.perf_counter()
        raw = session.run(payloads)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        values = session.values(raw)
        verify(values if workload.check is None else list(map(workload.check, values)), n, expected)
        t1 = time.perf_counter()
        session.close()
        close_s = time.perf_counter() - t1
    except BaseException:
        session.terminate()
        raise
    setup_s = t0 - t_open
    return {"wall": wall, "n": n, "supervisor_cpu": cpu, "setup_s": setup_s, "close_s": close_s}


def measure_stream(contender: Contender, workload: Workload, cell: dict[str, Any]) -> dict:
    """A lazy generator through imap(ordered=False); peak RSS of this (supervisor) process."""
    n = cell["n"]
    session = opened(contender, workload, cell)
    try:
        session.values(session.run(workload.warmup(cell["procs"])))
        with RssSampler() as rss:
            cpu0, t0 = time.process_time(), time.perf_counter()
            count, total = session.stream(stream_source(n))  # type: ignore[attr-defined]
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if count != n or total != n * (n - 1) // 2:
            raise RuntimeError(f"stream returned {count} results for {n} jobs or a bad checksum")
        session.close()
    except BaseException:
        session.terminate()
        raise
    return {
        "wall": wall,
        "n": n,
        "supervisor_cpu": cpu,
        "rss_before": rss.baseline,
        "rss_peak": rss.peak,
    }


MEASURES = {"startup": measure_startup, "throughput": measure_throughput, "stream": measure_stream}


def run_cell(contender: Contender, cell: dict[str, Any]) -> dict[str, Any]:
    """Measure one cell; any failure becomes an error reply instead of ending the harness."""
    workload = WORKLOADS[cell["workload"]]
    try:
        return {"ok": True, **MEASURES[workload.kind](contender, workload, cell)}
    except Exception as exc:
        return {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:500],
            "traceback": traceback.format_exc()[-4000:],
        }


def protocol_channel() -> TextIO:
    """Keep the real stdout for replies; point fd 1 at stderr so stray prints cannot corrupt it.

    Libraries and workers that print (warnings, progress) then land in the harness log.
    """
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


def main(name: str) -> None:
    channel = protocol_channel()
    contender = CONTENDERS[name]
    reason = contender.unavailable()
    hello = {
        "hello": name,
        "pid": os.getpid(),
        "available": reason is None,
        "reason": reason,
        "version": contender.version() if reason is None else None,
    }
    channel.write(json.dumps(hello) + "\n")
    for line in sys.stdin:
        cell = json.loads(line)
        if cell.get("op") == "quit":
            break
        channel.write(json.dumps(run_cell(contender, cell)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
