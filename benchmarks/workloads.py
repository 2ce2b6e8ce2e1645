"""Benchmark workloads: the functions every contender runs, and how their inputs are built.

Everything a worker needs lives at module level here, so it pickles by reference and imports
cleanly in a worker under fork, forkserver and spawn alike: run.py and harness.py put this
directory on sys.path, and multiprocessing hands sys.path on to the children it starts.

Payloads are deliberately never tuples or dicts: mpire unpacks those into arguments, which
would make it run a different call from everyone else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

try:
    from batchpool import Task
except ImportError:  # batchpool itself missing: the peers can still be measured
    Task = object  # type: ignore[assignment,misc]

BLOB_BYTES = 1_000_000  # "1 MB" payloads; MB/s in the report is decimal megabytes
UNEVEN_FACTOR = 500  # the slow jobs of `uneven` take this many times a normal one
UNEVEN_SHARE = 0.01  # ... and are about this share of the jobs


# --- the task functions (the same ones for every contender) ------------------------------------


def noop(x: int) -> int:
    """Return the payload: the job costs nothing, so only the pool's per-job overhead shows."""
    return x


def spin(loops: int) -> int:
    """Burn CPU in pure Python for `loops` iterations (calibrated in the parent) and return it.

    Pure Python holds the GIL and scales linearly with `loops`, so one calibration of loops per
    millisecond predicts every job's cost, and returning `loops` lets the caller verify the result.
    """
    acc = 0
    for i in range(loops):
        acc ^= i
    return loops if acc >= 0 else -1


def size_of(blob: bytes) -> int:
    """Return the payload's length: the cost is shipping the bytes to the worker, not the work."""
    return len(blob)


def blob_of(i: int) -> bytes:
    """Return 1 MB made from a small payload: the cost is shipping the result back."""
    return bytes([i % 251]) * BLOB_BYTES


def blob_check(value: bytes) -> int:
    """A result of blob_of as an int for the checksum: its length and its first byte."""
    return len(value) + value[0]


def blob_expected(i: int) -> int:
    return BLOB_BYTES + i % 251


class CallTask(Task):  # type: ignore[misc,valid-type]
    """The batchpool Task for a workload: its run() calls the very function the peers call.

    Holding a module-level function as an attribute keeps the instance picklable by reference,
    and batchpool pickles it once per worker, not once per job.
    """

    def __init__(self, fn: Callable[[Any], int]) -> None:
        self.fn = fn

    def run(self, payload: Any) -> int:
        return self.fn(payload)


# --- calibration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """How many `spin` loops this machine runs per millisecond, measured once in the parent.

    The loop counts it yields go into the payloads, so every contender does identical work even
    if the machine gets busier later in the run.
    """

    loops_per_ms: float

    def loops(self, ms: float) -> int:
        return max(1, round(self.loops_per_ms * ms))


def calibrate(target_s: float = 0.02, rounds: int = 7) -> Calibration:
    """Time `spin` on a probe sized to about `target_s`, keeping the fastest of several rounds.

    The minimum, not the mean, is the best estimate of the undisturbed speed on a shared machine:
    interference only ever adds time.
    """
    probe = 10_000
    while True:  # grow the probe until one call is long enough to time reliably
        t0 = time.perf_counter()
        spin(probe)
        took = time.perf_counter() - t0
        if took >= target_s / 4:
            break
        probe *= 4
    probe = max(probe, round(probe * target_s / took))
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        spin(probe)
        best = min(best, time.perf_counter() - t0)
    return Calibration(loops_per_ms=probe / (best * 1000.0))


# --- workload definitions -----------------------------------------------------------------------

Builder = Callable[[int, Calibration, float], list[Any]]  # (n, calibration, job-length scale)


def uneven_layout(n: int) -> tuple[int, int]:
    """(first index, count) of the slow jobs of `uneven`: at least two, side by side, early.

    Two or more adjacent slow jobs land in the same static chunk, which is exactly the case that
    chunked scheduling handles badly; one alone would barely show it.
    """
    count = max(2, round(n * UNEVEN_SHARE))
    first = min(max(1, n // 100), max(0, n - count))
    return first, count


def build_ints(n: int, cal: Calibration, scale: float = 1.0) -> list[int]:
    return list(range(n))


def spin_builder(ms: float) -> Builder:
    """A payload builder for `n` identical spin jobs of about `ms` milliseconds each."""

    def build(n: int, cal: Calibration, scale: float = 1.0) -> list[int]:
        return [cal.loops(ms * scale)] * n

    return build


def build_uneven(n: int, cal: Calibration, scale: float = 1.0) -> list[int]:
    short = cal.loops(1.0 * scale)
    payloads = [short] * n
    first, count = uneven_layout(n)
    payloads[first : first + count] = [short * UNEVEN_FACTOR] * count
    return payloads


def build_blobs(n: int, cal: Calibration, scale: float = 1.0) -> list[bytes]:
    """n distinct 1 MB payloads.

    Distinct objects matter: pickle memoises repeated references within one dump, so n copies
    of one bytes object would ship once per chunk and flatter every chunking contender.
    """
    return [bytes([i % 251]) * BLOB_BYTES for i in range(n)]


def stream_source(n: int) -> Iterator[int]:
    """A lazy generator of no-op payloads: the pool must consume it without materialising it."""
    yield from range(n)


@dataclass(frozen=True)
class Workload:
    """One benchmark scenario: what runs, on what input, and how its cost is accounted.

    kind: "startup" (pool construction to first result), "throughput" (warm pool, timed batch)
    or "stream" (lazy generator through batchpool's imap only, with supervisor RSS sampled).
    units: the cost model for serial time, in the same units as `probe` payloads
    (spin loops, or one per job), so a short serial probe scales to the whole batch.
    """

    name: str
    description: str
    kind: str
    fn: Callable[[Any], int]
    sizes: tuple[int, ...]
    quick_sizes: tuple[int, ...]
    build: Builder
    expect: Callable[[Any], int]
    unit_cost: Callable[[Any, Calibration], float]
    bytes_per_job: int = 0
    quick_scale: float = 1.0
    check: Callable[[Any], int] | None = None  # a result as its int for the checksum

    def sizes_for(self, quick: bool) -> tuple[int, ...]:
        return self.quick_sizes if quick else self.sizes

    def scale_for(self, quick: bool) -> float:
        """Job-length factor: --quick may shorten jobs too, keeping the workload's shape."""
        return self.quick_scale if quick else 1.0

    def warmup(self, procs: int) -> list[Any]:
        """A few cheap payloads for the same function: they start workers and import code."""
        if self.fn is spin:
            return [1000] * (2 * procs)
        if self.fn is size_of:
            return [bytes([i]) * 1000 for i in range(2 * procs)]
        return list(range(2 * procs))

    def probe(self, cal: Calibration) -> list[Any]:
        """Cheap, representative payloads to time in-process for the serial-time estimate."""
        if self.fn is spin:
            return [cal.loops(1.0)] * 20  # ~20 ms; spin cost is linear in its loop count
        if self.fn is size_of:
            return build_blobs(10, cal)
        if self.fn is blob_of:
            return list(range(10))
        return list(range(20_000))

    def total_units(self, n: int, cal: Calibration, scale: float) -> float:
        """The batch's total cost in probe units, without building n megabyte payloads."""
        if self.fn is size_of:
            return float(n)
        return float(sum(self.unit_cost(p, cal) for p in self.build(n, cal, scale)))


def one_unit(payload: Any, cal: Calibration) -> float:
    return 1.0


def loops_units(payload: int, cal: Calibration) -> float:
    return float(payload)


def _spin_workload(name: str, ms: float, sizes: int, quick: int) -> Workload:
    return Workload(
        name=name,
        description=f"pure-Python loop calibrated to ~{ms:g} ms per job",
        kind="throughput",
        fn=spin,
        sizes=(sizes,),
        quick_sizes=(quick,),
        build=spin_builder(ms),
        expect=int,
        unit_cost=loops_units,
    )


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="startup",
            description="pool construction to the first result of one no-op job, fresh process",
            kind="startup",
            fn=noop,
            sizes=(1,),
            quick_sizes=(1,),
            build=build_ints,
            expect=int,
            unit_cost=one_unit,
        ),
        Workload(
            name="noop",
            description="returns its int payload: pure per-job overhead",
            kind="throughput",
            fn=noop,
            sizes=(200_000,),
            quick_sizes=(2_000,),
            build=build_ints,
            expect=int,
            unit_cost=one_unit,
        ),
        _spin_workload("cpu100us", 0.1, 40_000, 600),
        _spin_workload("cpu1ms", 1.0, 5_000, 100),
        _spin_workload("cpu10ms", 10.0, 600, 12),
        Workload(
            name="payload1mb",
            description="1 MB bytes payload per job, returns its length: IPC bandwidth",
            kind="throughput",
            fn=size_of,
            sizes=(256,),
            quick_sizes=(20,),
            build=build_blobs,
            expect=len,
            unit_cost=one_unit,
            bytes_per_job=BLOB_BYTES,
        ),
        Workload(
            name="result1mb",
            description="an int in, 1 MB bytes back per job: IPC bandwidth the other way",
            kind="throughput",
            fn=blob_of,
            sizes=(256,),
            quick_sizes=(20,),
            build=build_ints,
            expect=blob_expected,
            unit_cost=one_unit,
            bytes_per_job=BLOB_BYTES,
            check=blob_check,
        ),
        Workload(
            name="uneven",
            description=(
                f"1 ms jobs, ~{UNEVEN_SHARE:.0%} of them {UNEVEN_FACTOR}x longer and bunched "
                "near the start: punishes static chunking"
            ),
            kind="throughput",
            fn=spin,
            sizes=(2_000,),
            quick_sizes=(200,),
            build=build_uneven,
            expect=int,
            unit_cost=loops_units,
            quick_scale=0.1,  # quick: 0.1 ms jobs, 50 ms slow ones; same shape, 10x cheaper
        ),
        Workload(
            name="stream1m",
            description="no-op jobs from a lazy generator via batchpool imap(ordered=False)",
            kind="stream",
            fn=noop,
            sizes=(100_000, 1_000_000),
            quick_sizes=(20_000, 100_000),
            build=build_ints,
            expect=int,
            unit_cost=one_unit,
        ),
    )
}
