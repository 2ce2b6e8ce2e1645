"""What running on Ray costs: jobs/s of the same pool, local processes vs Ray actors.

    python benchmarks/ray_overhead.py [--procs 2] [--repeat 3]

Same machine, same procs, same tasks (benchmarks/workloads.py): a no-op (per-job overhead),
CPU-bound jobs calibrated to 1 ms and 10 ms, and a 10 ms sleep (dispatch latency without CPU
contention). Ray gets a local instance with ``procs`` CPUs, started once and not timed (nor is
pool construction: actors start once per pool); each cell warms its pool up, then times one
``map``. Medians over repeats, local and Ray interleaved; the last column holds Ray to the
targets of issue 15 (no-op >= 20,000 jobs/s, 1 ms >= 0.85x local, 10 ms >= 0.95x local).
About two minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # workloads; actors get sys.path too

from workloads import CallTask, calibrate, noop, spin  # noqa: E402

import batchpool  # noqa: E402


def sleep10ms(x: int) -> int:
    time.sleep(0.01)
    return x


def cell(backend: str, task: batchpool.Task, payloads: list, procs: int) -> tuple[float, float]:
    """(seconds to build the pool and warm it up, jobs/s of one timed map)."""
    t0 = time.perf_counter()
    with batchpool.Pool(task, procs, backend=backend) as pool:
        pool.map(payloads[: 4 * procs])  # warm-up: every worker started and set up
        built = time.perf_counter() - t0
        t1 = time.perf_counter()
        results = pool.map(payloads)
        took = time.perf_counter() - t1
    if not all(r.ok for r in results) or len(results) != len(payloads):
        raise SystemExit(f"{backend}: wrong results")
    return built, len(payloads) / took


def verdict(target: tuple[float | None, float | None] | None, ray: float, local: float) -> str:
    """ "met" or "missed" against a target of jobs/s or of a share of local's; "" without."""
    if target is None:
        return ""
    rate, share = target
    goal = f">= {rate:.0f}/s" if rate is not None else f">= {share:.2f}x"
    met = ray >= rate if rate is not None else share is not None and ray >= share * local
    return f"{goal}: {'met' if met else 'missed'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--noop-jobs", type=int, default=40000)
    parser.add_argument("--jobs-1ms", type=int, default=2000)
    parser.add_argument("--jobs-10ms", type=int, default=400)
    args = parser.parse_args()

    import ray

    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=args.procs,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    ray_init = time.perf_counter() - t0
    cal = calibrate()
    workloads = [
        ("no-op", CallTask(noop), list(range(args.noop_jobs))),
        ("cpu 1 ms", CallTask(spin), [cal.loops(1.0)] * args.jobs_1ms),
        ("cpu 10 ms", CallTask(spin), [cal.loops(10.0)] * args.jobs_10ms),
        ("sleep 10 ms", CallTask(sleep10ms), list(range(args.jobs_10ms))),
    ]
    # (jobs/s, or None) and (share of local, or None) that Ray must reach
    targets = {"no-op": (20000.0, None), "cpu 1 ms": (None, 0.85), "cpu 10 ms": (None, 0.95)}
    rates: dict[tuple[str, str], list[float]] = {}
    builds: dict[str, list[float]] = {"local": [], "ray": []}
    started = time.perf_counter()
    for r in range(args.repeat):
        for name, task, payloads in workloads:
            order = ("local", "ray") if r % 2 == 0 else ("ray", "local")
            for backend in order:
                built, rate = cell(backend, task, payloads, args.procs)
                builds[backend].append(built)
                rates.setdefault((name, backend), []).append(rate)
    ray.shutdown()

    ideal = args.procs / 0.010
    print(f"procs={args.procs}, repeat={args.repeat}, medians (min-max) of jobs/s")
    print(f"{'workload':<12} {'local':>22} {'ray':>22} {'ray/local':>10}  target")
    for name, _, _ in workloads:
        local, ray_ = rates[(name, "local")], rates[(name, "ray")]
        ml, mr = statistics.median(local), statistics.median(ray_)
        print(
            f"{name:<12} {ml:>9.0f} ({min(local):>6.0f}-{max(local):>6.0f}) "
            f"{mr:>9.0f} ({min(ray_):>6.0f}-{max(ray_):>6.0f}) {mr / ml:>10.2f}  "
            f"{verdict(targets.get(name), mr, ml)}"
        )
    print(f"(10 ms jobs: at most {ideal:.0f} jobs/s on {args.procs} workers)")
    print(
        f"ray.init {ray_init:.1f} s (not in the table); pool build + warm-up median: "
        f"local {statistics.median(builds['local']):.2f} s, "
        f"ray {statistics.median(builds['ray']):.2f} s; "
        f"total {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
