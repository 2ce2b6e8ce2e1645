"""Where the per-job overhead goes: CPU time per no-op job in the parent and in the workers.

Wall-clock jobs/s on a small shared machine swings with its neighbours; CPU time per job moves
far less, and splitting it between the supervisor's process and the workers shows which side
limits no-op throughput. Peers run in the same process run, interleaved, on the same payloads.

    python benchmarks/overhead.py [--jobs N] [--repeat R] [--procs P]
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import CallTask, noop  # noqa: E402

import batchpool  # noqa: E402


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


class _GcClock:
    """Seconds the parent spends in the cyclic garbage collector (gc.callbacks), whichever
    thread triggers it: the share of its CPU that comes from the objects a pool hands out
    (a JobResult per job is tracked by the collector; an int, as Pool.map returns, is not)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._began

    def __enter__(self) -> _GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def _measure(run: Callable[[], object], pids: list[int], n: int) -> dict[str, float]:
    workers0, parent0, t0 = _cpu(pids), time.process_time(), time.perf_counter()
    with _GcClock() as collector:
        run()
    wall = time.perf_counter() - t0
    parent, workers = time.process_time() - parent0, _cpu(pids) - workers0
    return {
        "rate": n / wall,
        "parent_us": parent / n * 1e6,
        "gc_us": collector.total / n * 1e6,
        "workers_us": workers / n * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    payloads = list(range(args.jobs))
    ctx = multiprocessing.get_context("forkserver")
    rows: dict[str, list[dict[str, float]]] = {}
    with (
        batchpool.Pool(CallTask(noop), args.procs, retries=3, timeout=60) as bp,
        ctx.Pool(args.procs) as mp,
    ):
        bp.map(range(4 * args.procs))
        mp.map(noop, range(4 * args.procs))
        mp_pids = [p.pid for p in mp._pool]  # type: ignore[attr-defined]
        few = payloads[: args.jobs // 10]  # one message per job: a tenth is plenty
        contenders = {
            "batchpool.map": (lambda: bp.map(payloads), bp.pids(), len(payloads)),
            "mp.map": (lambda: mp.map(noop, payloads), mp_pids, len(payloads)),
            "mp.imap_unordered(c=1)": (
                lambda: list(mp.imap_unordered(noop, few)),
                mp_pids,
                len(few),
            ),
        }
        for _ in range(args.repeat):
            for name, (run, pids, n) in contenders.items():
                rows.setdefault(name, []).append(_measure(run, pids, n))
    print(
        f"{args.jobs:,} no-op jobs, procs={args.procs}, forkserver, median of {args.repeat}; "
        f"Python {sys.version.split()[0]}, {psutil.cpu_count()} CPUs"
    )
    print(
        f"{'contender':24s} {'jobs/s':>10s} {'parent us/job':>14s} {'of it in GC':>12s} "
        f"{'workers us/job':>15s}"
    )
    for name, runs in rows.items():
        rate, parent, in_gc, workers = (
            statistics.median(r[key] for r in runs)
            for key in ("rate", "parent_us", "gc_us", "workers_us")
        )
        print(f"{name:24s} {rate:10,.0f} {parent:14.2f} {in_gc:12.2f} {workers:15.2f}")
    print(_ceiling(statistics.median(r["parent_us"] for r in rows["batchpool.map"])))


def _ceiling(parent_us: float) -> str:
    """One supervisor thread does every job's parent-side work: at ``parent_us`` of its CPU per
    job it sustains at most 1 / parent_us jobs/s, whatever the core count, so it keeps up with
    as many cores as that rate fills with jobs of a given length."""
    if parent_us <= 0:
        return "ceiling: not measured (too few jobs for the CPU clock)"
    rate = 1e6 / parent_us
    cores = ", ".join(f"{rate * seconds:,.0f} cores of {label} jobs" for label, seconds in CORES)
    return f"ceiling: one supervisor sustains {rate:,.0f} no-op jobs/s; it keeps up with {cores}"


CORES = (("100 us", 100e-6), ("1 ms", 1e-3))


if __name__ == "__main__":
    main()
