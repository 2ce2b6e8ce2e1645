"""Priorities and rate limits with real worker processes (SPEC section 3): a high-priority job
waits only for the attempts already running (prefetched jobs are taken back), retries keep their
priority, map/imap take one, and rate limits bound attempt starts across the pool -- retries
included, per stage in a pipeline, from the CLI too. Starts are recorded inside run() by
tests/priority_tasks.py; order is judged by those records, never by wall-clock thresholds (the
only timing asserted is the lower bound a rate implies)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import bp, environ, one_line, run_jobs, wait_for, write
from priority_tasks import Stamp, most_in_window, starts

from batchpool import Pipeline, Pool

pytestmark = pytest.mark.timeout(60)


def position(log: Path, payload: str) -> int:
    """Where the first start of ``payload`` comes in the order of all starts."""
    return [s.payload for s in starts(log)].index(payload)


def queue_behind(pool: Pool, log: Path, n: int, **submit: Any) -> tuple[list[Any], int]:
    """Submit ``n`` jobs "low0"...; once the first has started, how many have (the running
    ones, and those finished already)."""
    futures = [pool.submit(f"low{i}", **submit) for i in range(n)]
    started = wait_for(lambda: len(starts(log)), 10, "the first low job to start")
    return futures, started


# -- priorities ---------------------------------------------------------------------------------


def test_a_high_priority_job_waits_only_for_the_attempts_already_running(tmp_path: Path) -> None:
    """One worker, 30 jobs of 50 ms queued (chunksize 10: a batch and the next one prefetched
    sit in its mailbox), then a priority-10 job: the prefetched jobs are taken back and it runs
    next. Without the take-back it would wait for up to 20 of them."""
    log = tmp_path / "starts"
    with Pool(Stamp(log, delay=0.05), 1, chunksize=10) as pool:
        futures, started = queue_behind(pool, log, 30)
        urgent = pool.submit("urgent", priority=10)
        assert urgent.result(timeout=30).ok
        assert all(f.result(timeout=30).ok for f in futures)
    # ``started`` had begun (one of them still running); one more may have begun before the
    # supervisor read the submit.
    assert position(log, "urgent") <= started + 1, [s.payload for s in starts(log)]


def test_retries_keep_their_priority(tmp_path: Path) -> None:
    """A priority-10 job fails once; behind it wait 20 jobs of priority 5. Its retry, due
    0.1 s after the failure, comes back ahead of the priority-5 jobs not started by then (a
    retry that fell back to priority 0 would run after all of them)."""
    log = tmp_path / "starts"
    task = Stamp(log, delay=0.05, flaky=frozenset({"urgent"}), retries=2, backoff=0.1)
    with Pool(task, 1, chunksize=5) as pool:
        urgent = pool.submit("urgent", priority=10)
        futures = [pool.submit(f"mid{i}", priority=5) for i in range(20)]
        result = urgent.result(timeout=30)
        assert all(f.result(timeout=30).ok for f in futures)
    assert result.ok and result.attempts == 2
    order = starts(log)
    first, second = [i for i, s in enumerate(order) if s.payload == "urgent"]
    assert first == 0
    due = order[first].at + 0.05 + 0.1  # the earliest the retry could be due
    started_by_then = sum(1 for s in order if s.at <= due)
    # Ahead of the retry: the jobs started before it was due, the one running then, and one
    # that may start while the supervisor hears of it.
    assert second <= started_by_then + 1, [s.payload for s in order]
    assert second < len(order) - 5


def test_map_and_imap_take_a_priority(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    with Pool(Stamp(log, delay=0.02), 1, chunksize=5) as pool:
        futures, started = queue_behind(pool, log, 40)
        mapped = pool.map([f"map{i}" for i in range(4)], priority=3)
        assert [r.value for r in mapped] == [f"map{i}" for i in range(4)]
        before_imap = len(starts(log))
        streamed = list(pool.imap([f"imap{i}" for i in range(4)], priority=3))
        assert [r.value for r in streamed] == [f"imap{i}" for i in range(4)]
        assert all(f.result(timeout=30).ok for f in futures)
    payloads = [s.payload for s in starts(log)]
    # each call's jobs run together, as soon as the jobs running (and one more) let them
    first_map = payloads.index("map0")
    assert first_map <= started + 1, payloads
    assert payloads[first_map : first_map + 4] == [f"map{i}" for i in range(4)], payloads
    first_imap = payloads.index("imap0")
    assert first_imap <= before_imap + 1, payloads
    assert payloads[first_imap : first_imap + 4] == [f"imap{i}" for i in range(4)], payloads


def test_the_tasks_priority_is_the_default_and_an_argument_overrides_it(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    with Pool(Stamp(log, delay=0.02, priority=4), 1, chunksize=5) as pool:
        futures, started = queue_behind(pool, log, 30, priority=0)
        default = pool.submit("default")  # the task's 4: ahead of the priority-0 ones
        lower = pool.submit("lower", priority=-1)
        assert default.result(timeout=30).ok and lower.result(timeout=30).ok
        assert all(f.result(timeout=30).ok for f in futures)
    payloads = [s.payload for s in starts(log)]
    assert payloads.index("default") <= started + 1, payloads
    assert payloads[-1] == "lower", payloads


@pytest.mark.parametrize("bad", ["high", True, 1.5, "0"])
def test_a_priority_that_is_no_integer_is_refused_when_called(tmp_path: Path, bad: Any) -> None:
    with Pool(Stamp(tmp_path / "starts"), 1) as pool:
        with pytest.raises(ValueError, match="priority must be an integer"):
            pool.submit(1, priority=bad)
        with pytest.raises(ValueError, match="priority must be an integer"):
            pool.map([1], priority=bad)
        with pytest.raises(ValueError, match="priority must be an integer"):
            pool.imap([1], priority=bad)
        assert pool.metrics().submitted == 0
    with pytest.raises(ValueError, match="priority must be an integer"):
        Pool(Stamp(tmp_path / "starts", priority=bad), 1)


# -- rate limits --------------------------------------------------------------------------------


def check_bound(times: list[float], rate: float) -> None:
    """In any window of T seconds at most rate * T + 1 starts, for T from one interval to 2 s.
    The workers take their starts an interval apart at the stage's gate (tests/test_rates.py);
    the instant run() records trails that by a few microseconds, or by a preemption on a busy
    machine, so two starts a hair closer than an interval are not judged here."""
    for window in (1 / rate, 0.5, 1.0, 2.0):
        assert most_in_window(times, window) <= rate * window + 1 + 1e-9, (window, times)


def span(times: list[float]) -> float:
    """Seconds from the first start to the last: n starts at a rate take (n - 1) / rate; the
    bounds asserted leave an interval for the instants run() records."""
    return times[-1] - times[0]


def test_forty_jobs_at_20_per_second_on_two_workers(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    with Pool(Stamp(log), 2, rate_limit="20/s") as pool:
        t0 = time.monotonic()
        results = pool.map(range(40))
        took = time.monotonic() - t0
    assert [r.value for r in results] == list(range(40))
    times = [s.at for s in starts(log)]
    assert len(times) == 40
    assert took >= 1.9 and span(times) >= 1.9
    assert most_in_window(times, 1.0) <= 21
    check_bound(times, 20)


def test_retries_count_against_the_limit(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    payloads = [str(i) for i in range(8)]
    task = Stamp(log, flaky=frozenset(payloads), retries=1, rate_limit="10/s")
    with Pool(task, 2) as pool:
        results = run_jobs(pool, payloads, timeout=30)
        m = pool.metrics()
    assert all(r.ok and r.attempts == 2 for r in results)
    assert m.started == 16 and m.retried == 8
    times = [s.at for s in starts(log)]
    assert len(times) == 16 and span(times) >= 1.4
    check_bound(times, 10)


def test_each_stage_of_a_pipeline_has_a_limit_of_its_own(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    pipeline = Pipeline(
        [str(i) for i in range(10)],
        Stamp(log, tag="a", rate_limit="10/s"),
        Stamp(log, tag="b", rate_limit=5),
    )
    report = pipeline.run(2, journal=None, progress=False)
    assert report.succeeded == 10
    a = [s.at for s in starts(log, "a")]
    b = [s.at for s in starts(log, "b")]
    check_bound(a, 10)
    check_bound(b, 5)
    assert span(b) >= 1.6
    # One bucket for both would allow 11 starts a second at most; two buckets share nothing.
    assert most_in_window(sorted(a + b), 1.0) > 11


def test_pool_rate_limit_overrides_every_stage(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    pipeline = Pipeline(
        [str(i) for i in range(6)], Stamp(log, tag="a"), Stamp(log, tag="b", rate_limit="100/s")
    )
    report = pipeline.run(2, journal=None, progress=False, rate_limit="5/s")
    assert report.succeeded == 6
    for tag in "ab":
        times = [s.at for s in starts(log, tag)]
        check_bound(times, 5)
        assert span(times) >= 0.8


@pytest.mark.parametrize(
    ("rate", "delay", "why"),
    [(4, 0.0, "the next admission"), (100, 0.25, "an idle worker for an admitted job")],
)
def test_waiting_burns_no_cpu(tmp_path: Path, rate: float, delay: float, why: str) -> None:
    """The supervisor sleeps until the next admission (the scheduler's next_due), or until a
    worker's message when an admitted job waits for an idle one: over a second of waiting,
    this process (the supervisor's thread included) spends a small fraction of a CPU (about
    0.3% here; a loop that polled would spend half of one)."""
    with Pool(Stamp(tmp_path / "starts", delay=delay), 1, rate_limit=rate) as pool:
        pool.map(range(1))
        cpu, wall = time.process_time(), time.monotonic()
        pool.map(range(5))
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    assert wall >= 0.9, why
    assert cpu < 0.25 * wall, f"{cpu:.2f} s of CPU in {wall:.2f} s waiting for {why}"


def test_the_gates_files_go_with_the_pool(tmp_path: Path) -> None:
    def gate_dirs() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("batchpool-rates-*"))

    before = gate_dirs()
    with Pool(Stamp(tmp_path / "starts"), 2, rate_limit=50) as pool:
        assert [r.value for r in pool.map(range(3))] == [0, 1, 2]
        made = gate_dirs() - before
        assert len(made) == 1
    assert not any(d.exists() for d in made)
    with Pool(Stamp(tmp_path / "starts"), 1) as pool:  # no limit, no gate
        pool.map(range(2))
        assert gate_dirs() - before == set()


@pytest.mark.parametrize("bad", ["fast", "-1/s", 0, "10/x", -2.0, "0/m", True])
def test_bad_rate_limits_are_refused_when_the_pool_is_built(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match="rate_limit"):
        Pool(Stamp(tmp_path / "starts"), 1, rate_limit=bad)
    with pytest.raises(ValueError, match="rate_limit"):
        Pool(Stamp(tmp_path / "starts", rate_limit=bad), 1)


def test_a_limited_stage_does_not_stall_behind_unlimited_work(tmp_path: Path) -> None:
    """Stage b is limited, stage a is not and has plenty queued: b's jobs start while a still
    runs (once admitted, a job of b waits for the next idle worker, and busy workers are not
    fed meanwhile), not after all of a. (a runs ~1 s, several of its workers' 0.25 s result
    flushes: b's jobs exist only once a's results are in.)"""
    log = tmp_path / "starts"
    pipeline = Pipeline(
        [str(i) for i in range(60)],
        Stamp(log, tag="a", delay=0.03),
        Stamp(log, tag="b", rate_limit="40/s"),
    )
    report = pipeline.run(2, journal=None, progress=False)
    assert report.succeeded == 60
    a = [s.at for s in starts(log, "a")]
    b = [s.at for s in starts(log, "b")]
    assert sum(1 for t in b if t < a[-1]) >= 3, "b waited for all of a"
    check_bound(b, 40)


def test_prefetched_jobs_make_way_for_a_better_rate_limited_job(tmp_path: Path) -> None:
    """Stage b is rate-limited and ranks higher (priority 5) than stage a, whose jobs fill the
    one worker's mailbox (chunksize 20). Once a job of a is done, its job of b is admitted;
    the prefetched jobs of a come back, and it starts after the one running (and the ~8 done
    before the worker reported them: it sends results every 0.25 s), not after the rest of
    the batch (the 20th)."""
    log = tmp_path / "starts"
    pipeline = Pipeline(
        [str(i) for i in range(40)],
        Stamp(log, tag="a", delay=0.03),
        Stamp(log, tag="b", rate_limit="50/s", priority=5),
    )
    report = pipeline.run(1, journal=None, progress=False, chunksize=20)
    assert report.succeeded == 40
    tags = [s.tag for s in starts(log)]
    assert tags.index("b") < 15, tags


# -- the command line ---------------------------------------------------------------------------

RATED_PY = """
import os

from priority_tasks import Stamp

from batchpool import Pipeline

pipeline = Pipeline([str(i) for i in range(12)], Stamp(os.environ["STARTS"]), name="rated")
"""


def test_cli_rate_limit_spaces_the_starts(tmp_path: Path) -> None:
    write(tmp_path / "rated.py", RATED_PY)
    log = tmp_path / "starts"
    r = bp(
        "run",
        "rated.py",
        "--procs",
        2,
        "--rate-limit",
        "10/s",
        "--no-journal",
        cwd=tmp_path,
        env=environ(STARTS=log),
    )
    assert r.returncode == 0, r.stderr
    times = [s.at for s in starts(log)]
    assert len(times) == 12 and span(times) >= 1.0
    check_bound(times, 10)


@pytest.mark.parametrize("bad", ["fast", "-1/s", "0", "10/x"])
def test_cli_bad_rate_limit_exits_2_with_one_line(tmp_path: Path, bad: str) -> None:
    write(tmp_path / "rated.py", RATED_PY)
    log = tmp_path / "starts"
    r = bp("run", "rated.py", "--rate-limit", bad, cwd=tmp_path, env=environ(STARTS=log))
    assert r.returncode == 2, r.stderr
    assert "--rate-limit" in one_line(r.stderr)
    assert not log.exists() and not (tmp_path / ".batchpool").exists()
