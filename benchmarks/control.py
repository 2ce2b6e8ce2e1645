"""The control features (SPEC section 3), measured: one section per measure, each short (a few
seconds) and printing its own table. Times of starts are taken inside run() (time.monotonic(),
which every process of the machine shares), not at the caller, so they show what the workers did.

    python benchmarks/control.py [--only SECTION[,SECTION]] [--procs P] [--free-cpu]

Sections (add yours to SECTIONS at the bottom):

- rate      rate-limit accuracy: n jobs at 10, 100 and 1,000 starts/s, n = rate * 3 s + 1;
            achieved = (n - 1) / (last start - first start), the most starts any 1 s window
            holds against the bound (rate + 1), and the closest two starts against 1 / rate
- priority  a priority-10 job submitted behind 10,000 queued jobs of ~0.25 ms: submit to
            start, against a priority-0 job submitted the same way
- noop      what priorities cost the no-op path: parent CPU per job of map() with the task's
            priority and with priority=5, interleaved; the before/after against main is
            `python benchmarks/overhead.py` on each tree (README, "Priorities and rate limits")
- deadline  from a map()'s deadline to its return, with N attempts running (each would take
            60 s, so each is stopped: its worker killed and replaced) and 1,000 jobs queued
            behind them; cancel_pending() with 10,000 jobs queued: call to return; and what a
            deadline costs the no-op path: parent CPU per job of map() and map(deadline=600),
            interleaved (the before/after against main is `python benchmarks/overhead.py` on
            each tree)
- scaling   autoscaling reaction time: a pool of procs=(1, P) given a backlog of 50 ms jobs,
            the time from submit to each added worker alive and to P; then, with the backlog
            done, the time from its last result until it is back to 1 (idle_timeout 0.5 s).
            ``--free-cpu`` counts every CPU as free (scaling.MIN_IDLE_CORES = 0): on a machine
            kept busy by other work the pool rightly does not grow; this times the mechanism
            anyway
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import CallTask, noop  # noqa: E402

import batchpool  # noqa: E402
from batchpool import Pool, Task, scaling  # noqa: E402

REPEAT = 3
RATE_SECONDS = 3.0  # each rate runs this long: 30 intervals even at 10/s
QUEUED = 10_000  # jobs ahead of the prioritized one
NAP = 0.00025  # seconds a queued job sleeps
DEADLINE = 0.5  # seconds: long enough for the N attempts to be running
BEHIND = 1_000  # jobs queued behind the running ones when the deadline passes
PENDING = 10_000  # jobs queued when cancel_pending() is called
NAP = 0.05  # seconds a job of the scaling backlog sleeps: workers wait, as on I/O
IDLE_TIMEOUT = 0.5  # seconds, for the scaling section


def started_at(_: object) -> float:
    """A job that reports when run() started it."""
    return time.monotonic()


def nap_then_start(_: object) -> float:
    started = time.monotonic()
    time.sleep(NAP)
    return started


# -- rate: rate-limit accuracy --------------------------------------------------------------------


def most_in_window(times: list[float], seconds: float) -> int:
    most = j = 0
    for i, t in enumerate(times):
        while times[j] < t - seconds:
            j += 1
        most = max(most, i - j + 1)
    return most


def rate_accuracy(procs: int) -> None:
    print(f"rate limits: achieved vs asked, {procs} workers, starts timed inside run()")
    print(
        f"{'asked/s':>8s} {'jobs':>6s} {'achieved/s':>11s} {'ratio':>6s} {'max in 1 s':>11s}",
        end="",
    )
    print(f" {'bound':>6s} {'closest gap':>12s} {'interval':>9s}")
    for rate in (10, 100, 1000):
        n = int(rate * RATE_SECONDS) + 1
        with Pool(CallTask(started_at), procs, rate_limit=rate) as pool:
            pool.map(range(2 * procs))  # workers up; the bucket's next slot is taken here too
            times = sorted(r.value for r in pool.map(range(n)))
        achieved = (n - 1) / (times[-1] - times[0])
        gap = min(b - a for a, b in zip(times, times[1:], strict=False))
        print(
            f"{rate:8,d} {n:6,d} {achieved:11,.1f} {achieved / rate:6.3f} "
            f"{most_in_window(times, 1.0):11d} {rate + 1:6d} {gap * 1e3:9.3f} ms "
            f"{1e3 / rate:6.3f} ms"
        )


# -- priority: a high-priority job behind a long queue -------------------------------------------


def start_delay(procs: int, priority: int) -> float:
    """Seconds from submit() to run() of one job submitted with ``priority`` while QUEUED jobs
    of priority 0 wait (map() in another thread)."""
    with Pool(CallTask(nap_then_start), procs) as pool:
        pool.map(range(4 * procs))  # warm: workers up, job time measured
        backlog = threading.Thread(target=_map_quietly, args=(pool,))
        backlog.start()
        while pool.metrics().started < 4 * procs + 100:
            time.sleep(0.001)  # benchmark only: waits for the queue to be under way
        submitted = time.monotonic()
        started = pool.submit("job", priority=priority).result(timeout=120).value
        pool.terminate()
        backlog.join()
    return float(started - submitted)


def _map_quietly(pool: Pool) -> None:
    try:
        pool.map(range(QUEUED))
    except batchpool.PoolClosed:
        pass  # terminated once the measured job has run


def priority_latency(procs: int) -> None:
    print(f"a job submitted behind {QUEUED:,} queued jobs of ~{NAP * 1e3:g} ms, {procs} workers")
    print(f"{'priority':>8s} {'submit to start (median of 3)':>30s}")
    for priority in (10, 0):
        delays = [start_delay(procs, priority) for _ in range(REPEAT)]
        print(f"{priority:8d} {statistics.median(delays) * 1e3:27,.1f} ms")


# -- noop: what priorities cost the no-op path ------------------------------------------------


def noop_cost(procs: int) -> None:
    _parent_cpu_per_job(procs, "map(priority=5)", {"priority": 5})


def _parent_cpu_per_job(procs: int, label: str, options: dict[str, Any]) -> None:
    """The parent's CPU per no-op job of map() and of map(**options), interleaved, 5 times."""
    n = 200_000
    payloads = list(range(n))
    runs: dict[str, list[float]] = {"map()": [], label: []}
    with Pool(CallTask(noop), procs, retries=3, timeout=60) as pool:
        pool.map(range(4 * procs))
        calls: dict[str, Callable[[], object]] = {
            "map()": lambda: pool.map(payloads),
            label: lambda: pool.map(payloads, **options),
        }
        for _ in range(5):
            for name, call in calls.items():
                cpu = time.process_time()
                call()
                runs[name].append((time.process_time() - cpu) / n * 1e6)
    print(f"no-op path: parent CPU per job, {n:,} jobs, {procs} workers, median of 5")
    for name, us in runs.items():
        print(f"{name:18s} {statistics.median(us):6.2f} us/job")


class Nap(Task):
    """Sleeps ``payload`` seconds."""

    def run(self, payload: float) -> float:
        time.sleep(payload)
        return payload


# -- deadline: from a map()'s deadline to its return ------------------------------------------


def deadline_to_return(running: int) -> float:
    """Seconds from the deadline of map() to its return, ``running`` attempts stopped. One job
    per message, so that each worker runs one of the long jobs."""
    with Pool(Nap(), running, chunksize=1) as pool:
        _all_ready(pool, running)
        called = time.monotonic()
        results = pool.map([60.0] * running + [0.001] * BEHIND, deadline=DEADLINE)
        returned = time.monotonic()
        stopped = sum(1 for r in results[:running] if r.attempts and not r.ok)
        assert stopped == running, f"{stopped} of {running} running attempts stopped"
    return returned - called - DEADLINE


def cancel_pending_time(procs: int) -> tuple[float, int]:
    """Seconds cancel_pending() takes with PENDING jobs queued (and prefetched) behind
    ``procs`` running ones, and how many it cancelled."""
    with Pool(Nap(), procs) as pool:
        _all_ready(pool, procs)
        base = pool.metrics().started
        backlog = threading.Thread(target=pool.map, args=([1.0] * procs + [0.0] * PENDING,))
        backlog.start()
        while pool.metrics().started < base + 1:
            time.sleep(0.001)  # benchmark only: waits for a long job to be running
        began = time.monotonic()
        cancelled = pool.cancel_pending()
        took = time.monotonic() - began
        backlog.join()
    return took, cancelled


def deadline_noop_cost(procs: int) -> None:
    _parent_cpu_per_job(procs, "map(deadline=600)", {"deadline": 600})


def _all_ready(pool: Pool, procs: int) -> None:
    """Until every worker has answered jobs: all are up and take work."""
    while sum(1 for w in pool.metrics().per_worker if w.jobs) < procs:
        pool.map([0.01] * (4 * procs))


def deadline_latency(procs: int) -> None:
    print(f"deadline of map() to its return: N attempts stopped, {BEHIND:,} jobs queued behind")
    print(f"{'running':>8s} {'deadline to return (median of 3, min-max)':>44s}")
    for running in sorted({1, procs, 2 * procs}):
        times = [deadline_to_return(running) for _ in range(REPEAT)]
        print(
            f"{running:8d} {statistics.median(times) * 1e3:25.1f} ms "
            f"({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})"
        )
    deadline_noop_cost(procs)
    runs = [cancel_pending_time(procs) for _ in range(REPEAT)]
    took = statistics.median(t for t, _ in runs)
    print(
        f"cancel_pending() with {PENDING + procs:,} jobs submitted, 1 or more running: "
        f"{took * 1e3:.1f} ms (median of 3); cancelled {', '.join(str(n) for _, n in runs)}"
    )


# -- scaling: autoscaling reaction time -----------------------------------------------------


def scale_once(high: int) -> tuple[list[float], float]:
    """(seconds from the backlog's submit to 2, 3, ... high workers alive, nan for a count
    never reached; seconds from the backlog's last result to 1 worker alive)."""
    with Pool(Nap(), procs=(1, high), idle_timeout=IDLE_TIMEOUT) as pool:
        pool.map([0.0, 0.0])  # the first worker up
        jobs = [pool.submit(NAP) for _ in range(int(high * 4 / NAP))]  # ~4 s on `high` workers
        submitted = time.monotonic()
        reached = [float("nan")] * (high + 1)
        while not all(job.done() for job in jobs):
            workers = pool.metrics().workers
            for n in range(2, workers + 1):
                if reached[n] != reached[n]:  # nan: first seen now
                    reached[n] = time.monotonic() - submitted
            time.sleep(0.001)  # benchmark only: looks every millisecond
        done = time.monotonic()
        while len(pool.pids()) > 1 and time.monotonic() - done < 10 * IDLE_TIMEOUT:
            time.sleep(0.001)
        back = time.monotonic() - done
    return reached[2:], back


def scaling_reaction(procs: int) -> None:
    high = max(2, procs)
    runs = [scale_once(high) for _ in range(REPEAT)]
    cpu = "every CPU counted free" if scaling.MIN_IDLE_CORES == 0 else "CPU gate on"
    print(
        f"autoscaling, procs=(1, {high}), a backlog of {NAP * 1e3:g} ms jobs, "
        f"idle_timeout={IDLE_TIMEOUT:g} s, {cpu}, median of {REPEAT}"
    )
    print(f"{'workers alive':>14s} {'after submit':>13s}")
    for i in range(high - 1):
        after = statistics.median(r[0][i] for r in runs)
        print(f"{i + 2:14d} {'never' if after != after else f'{after * 1e3:,.0f} ms':>13s}")
    back = statistics.median(r[1] for r in runs)
    print(
        f"back to 1 worker: {back * 1e3:,.0f} ms after the last result (workers idle from "
        "when the queue ran dry, so this can undercut idle_timeout)"
    )


SECTIONS: dict[str, Callable[[int], None]] = {
    "rate": rate_accuracy,
    "priority": priority_latency,
    "noop": noop_cost,
    "deadline": deadline_latency,
    "scaling": scaling_reaction,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections, comma separated")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--free-cpu", action="store_true", help="scaling: count every CPU free")
    args = parser.parse_args()
    if args.free_cpu:
        scaling.MIN_IDLE_CORES = 0.0
    print(f"batchpool {batchpool.__version__}, Python {sys.version.split()[0]}")
    for name in args.only.split(","):
        print()
        SECTIONS[name](args.procs)


if __name__ == "__main__":
    main()
