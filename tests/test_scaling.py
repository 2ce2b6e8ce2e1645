"""Autoscaling: the pure policy (scaling.decide) under hypothesis, then real pools that grow
under a backlog, shrink when idle, resize on demand, on every backend; the settings refused."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
from faults import Echo, Paced, Sleep, marks_by_pid
from helpers import pid_gone, read_lines, run_jobs, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpool import Pipeline, Pool, PoolClosed, scaling
from batchpool.scaling import Bounds, Machine, View, Worker, decide

GB = 1024**3
REACH = 20.0  # seconds to reach a worker count: generous, the machine is shared and loaded


# -- the policy, without processes ------------------------------------------------------------

bounds_st = st.integers(1, 6).flatmap(
    lambda low: st.builds(
        Bounds, st.just(low), st.integers(low, 8), st.sampled_from([0.5, 1.0, 10.0])
    )
)
machine_st = st.builds(
    Machine,
    cpu_busy=st.floats(0.0, 1.0),
    cores=st.integers(1, 64),
    available=st.integers(0, 64).map(lambda n: n * GB // 4),
    total=st.just(16 * GB),
)


@st.composite
def worker_st(draw: st.DrawFn, slot: int) -> Worker:
    ready = draw(st.booleans())
    return Worker(
        slot=slot,
        ready=ready,
        busy=ready and draw(st.booleans()),
        idle_since=draw(st.floats(0.0, 100.0)),
        leaving=draw(st.booleans()),
    )


@st.composite
def case_st(draw: st.DrawFn) -> tuple[Bounds, View]:
    bounds = draw(bounds_st)
    # a pool the supervisor keeps within its bounds: at least ``low`` active, at most ``high``
    # alive
    alive = draw(st.integers(bounds.low, bounds.high))
    workers = [draw(worker_st(slot)) for slot in range(alive)]
    for i in range(bounds.low):
        if workers[i].leaving:
            workers[i] = Worker(i, workers[i].ready, workers[i].busy, workers[i].idle_since, False)
    view = View(
        now=draw(st.floats(0.0, 200.0)),
        workers=workers,
        waiting=draw(st.integers(0, 50)),
        machine=draw(machine_st),
        largest_rss=draw(st.integers(0, 8)) * GB // 2,
    )
    return bounds, view


def active(view: View) -> list[Worker]:
    return [w for w in view.workers if not w.leaving]


@settings(deadline=None)  # a shared, loaded machine: time is no property here
@given(case_st())
def test_never_above_max_nor_below_min(case: tuple[Bounds, View]) -> None:
    bounds, view = case
    d = decide(bounds, view)
    assert len(view.workers) + d.grow <= bounds.high
    assert len(active(view)) - len(d.retire) - len(d.drain) >= bounds.low
    assert not (d.grow and (d.retire or d.drain)), "grow and shrink at once"
    mine = {w.slot for w in active(view)}
    assert set(d.retire) <= mine and set(d.drain) <= mine, "retires a worker leaving already"
    assert not set(d.retire) & set(d.drain)
    assert bool(d.grow or d.retire or d.drain) == bool(d.why), "an event without a reason"


@settings(deadline=None)  # a shared, loaded machine: time is no property here
@given(case_st())
def test_grows_only_under_its_conditions(case: tuple[Bounds, View]) -> None:
    bounds, view = case
    d = decide(bounds, view)
    m = view.machine
    conditions = (
        view.waiting > 0
        and all(w.ready and w.busy for w in active(view))
        and len(view.workers) < bounds.high
        and (1 - m.cpu_busy) * m.cores >= scaling.MIN_IDLE_CORES
        and m.available >= 2 * view.largest_rss
        and m.available >= 0.10 * m.total
    )
    assert d.grow == conditions


@settings(deadline=None)  # a shared, loaded machine: time is no property here
@given(case_st())
def test_retires_idle_workers_past_their_timeout_longest_idle_first(
    case: tuple[Bounds, View],
) -> None:
    bounds, view = case
    d = decide(bounds, view)
    if view.machine.pressed:
        return
    idle = [w for w in active(view) if w.ready and not w.busy]
    due = sorted(
        (w for w in idle if w.idle_since + bounds.idle_timeout <= view.now),
        key=lambda w: w.idle_since,
    )
    spare = len(active(view)) - bounds.low
    assert not d.drain, "a busy worker retired without memory pressure"
    assert list(d.retire) == [w.slot for w in due][: max(0, spare)]
    later = [w.idle_since + bounds.idle_timeout for w in idle if w.slot not in d.retire]
    if later and spare > len(d.retire):
        assert d.wake_at == min(later) and d.wake_at > view.now
    else:
        assert d.wake_at is None


@settings(deadline=None)  # a shared, loaded machine: time is no property here
@given(case_st())
def test_memory_pressure_sheds_down_to_min_and_never_grows(case: tuple[Bounds, View]) -> None:
    bounds, view = case
    if not view.machine.pressed:
        return
    d = decide(bounds, view)
    assert not d.grow
    now_active = len(active(view)) - len(d.retire) - len(d.drain)
    assert now_active == bounds.low  # the case holds at least ``low`` active workers
    by_slot = {w.slot: w for w in view.workers}
    assert all(not by_slot[s].busy for s in d.retire)
    assert all(by_slot[s].busy for s in d.drain)
    # those without a job go first
    if d.drain:
        assert all(w.busy or w.slot in d.retire for w in active(view))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_simulated_pool_grows_one_at_a_time_within_bounds(data: st.DataObject) -> None:
    """Drive decide() through random events as the supervisor would, applying each decision:
    a grown worker is not ready until it starts, so it grows by one per start."""
    bounds = data.draw(bounds_st)
    workers = {s: Worker(s, False, False, 0.0, False) for s in range(bounds.low)}
    now = 0.0
    rich = Machine(0.0, 8, 15 * GB, 16 * GB)
    for _ in range(40):
        event = data.draw(st.sampled_from(["start", "busy", "idle", "exit", "tick"]))
        slots = sorted(workers)
        slot = data.draw(st.sampled_from(slots)) if slots else None
        now += data.draw(st.floats(0.0, 2.0))
        w = workers.get(slot) if slot is not None else None
        if w is not None and event == "start":
            workers[slot] = Worker(slot, True, False, now, w.leaving)
        elif w is not None and event == "busy" and w.ready and not w.leaving:
            workers[slot] = Worker(slot, True, True, w.idle_since, False)
        elif w is not None and event == "idle" and w.ready:
            workers[slot] = Worker(slot, True, False, now, w.leaving)
        elif w is not None and event == "exit" and w.leaving:
            del workers[slot]
        waiting = data.draw(st.integers(0, 5))
        view = View(now, list(workers.values()), waiting, rich, 0)
        d = decide(bounds, view)
        if d.grow:
            assert not any(not x.ready for x in workers.values() if not x.leaving)
            new = next(s for s in range(bounds.high) if s not in workers)
            workers[new] = Worker(new, False, False, now, False)
        for s in d.retire + d.drain:
            x = workers[s]
            workers[s] = Worker(s, x.ready, x.busy, x.idle_since, True)
        assert len(workers) <= bounds.high
        assert sum(not x.leaving for x in workers.values()) >= bounds.low


# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("procs", "idle_timeout", "message"),
    [
        ((0, 2), 10.0, "1 <= min <= max"),
        ((3, 1), 10.0, "1 <= min <= max"),
        ((1,), 10.0, "(min, max) pair"),
        ((1, 2.5), 10.0, "(min, max) pair"),
        ((True, 2), 10.0, "(min, max) pair"),
        ([1, 2], 10.0, "(min, max) pair"),
        ((1, 2), 0, "idle_timeout"),
        ((1, 2), -1, "idle_timeout"),
        ((1, 2), float("nan"), "idle_timeout"),
        ((1, 2), float("inf"), "idle_timeout"),
        ((1, 2), "10", "idle_timeout"),
    ],
)
def test_check_refuses_bad_settings(procs: object, idle_timeout: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        scaling.check(procs, idle_timeout)


def test_check_accepts_equal_bounds() -> None:
    assert scaling.check((2, 2), 0.5) == Bounds(2, 2, 0.5)


# -- real pools ------------------------------------------------------------------------------


@pytest.fixture
def headroom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count every CPU as free. The test machine is shared: other work may keep its CPUs busy,
    and then a pool rightly does not grow; these tests are about how it grows."""
    monkeypatch.setattr(scaling, "MIN_IDLE_CORES", 0.0)


class Peak:
    """Samples a pool's live workers every few ms in a thread, by its own account (pids())
    and, under fork, by the processes this one has (less those it had before: a forkserver,
    a resource tracker of earlier tests): the most alive at once."""

    def __init__(self, pool: Pool, before: set[int]) -> None:
        self.pool = pool
        self.most = 0
        self.before = before  # children() before the pool was made
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Peak:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        self.thread.join()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(0.003):
            listed = [p for p in self.pool.pids() if not pid_gone(p)]
            children = []
            if self.pool.start_method == "fork":
                pids = {c.pid for c in me.children()} - self.before
                children = [p for p in pids if not pid_gone(p)]
            self.most = max(self.most, len(listed), len(children))


def children() -> set[int]:
    return {c.pid for c in psutil.Process().children()}


def teardowns(marker_dir: Path) -> int:
    """Workers that stopped cleanly (CountSetup marks each teardown())."""
    return sum(marks_by_pid(marker_dir, "teardown").values())


def runs_of(marker_dir: Path) -> Counter[str]:
    """How many times each payload ran (Paced writes a line per attempt)."""
    return Counter(line.split()[0] for line in read_lines(marker_dir / "runs"))


@pytest.mark.timeout(90)
def test_grows_to_max_under_a_backlog_never_beyond_then_idles_back_to_min(
    tmp_path: Path, headroom: None
) -> None:
    task = Paced(str(tmp_path), 0.2)
    before = children()
    with (
        Pool(task, procs=(1, 3), idle_timeout=0.5, start_method="fork") as pool,
        Peak(pool, before) as peak,
    ):
        assert wait_for(lambda: len(pool.pids()) == 1, REACH, "the first worker")
        futures = [pool.submit(i) for i in range(40)]
        wait_for(lambda: pool.metrics().workers == 3, REACH, "3 workers under the backlog")
        results = [f.result(timeout=60) for f in futures]
        wait_for(lambda: len(pool.pids()) == 1, REACH, "one worker again, once idle")
        m = pool.metrics()
        # the two retired workers stopped cleanly: their teardown() ran
        assert teardowns(tmp_path) == 2
    assert all(r.ok and r.attempts == 1 for r in results)
    assert peak.most == 3
    assert (m.scaled_up, m.scaled_down, m.worker_restarts) == (2, 2, 0)
    assert runs_of(tmp_path) == Counter(str(i) for i in range(40))  # each job ran once
    assert len(marks_by_pid(tmp_path, "setup")) == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("limit", "value"), [("MIN_IDLE_CORES", 1e9), ("RSS_MARGIN", 10**12)])
def test_no_growth_without_cpu_or_memory_headroom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str, value: float
) -> None:
    """A machine without a free core, or without room for two more of its largest worker,
    keeps the pool at its minimum whatever the backlog."""
    monkeypatch.setattr(scaling, limit, value)
    before = children()
    with Pool(Paced(str(tmp_path), 0.1), procs=(1, 3), start_method="fork") as pool:
        with Peak(pool, before) as peak:
            results = run_jobs(pool, range(15))
        m = pool.metrics()
    assert all(r.ok for r in results)
    assert peak.most == 1 and m.scaled_up == 0


@pytest.mark.timeout(90)
def test_memory_pressure_retires_busy_workers_after_their_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, headroom: None
) -> None:
    """Under pressure the surplus goes at the next look (about a second), busy workers after
    their current job, down to min: none is killed, no job is lost or run twice."""
    with Pool(Paced(str(tmp_path), 0.25), procs=(1, 3), start_method="forkserver") as pool:
        futures = [pool.submit(i) for i in range(24)]
        pool.resize(3)
        wait_for(lambda: pool.metrics().workers == 3, REACH, "3 workers")
        wait_for(lambda: len(marks_by_pid(tmp_path, "setup")) == 3, REACH, "3 workers set up")
        monkeypatch.setattr(scaling, "PRESSURE", 1.01)  # all memory counts as taken
        wait_for(lambda: len(pool.pids()) == 1, REACH, "shed to 1 worker")
        assert not all(f.done() for f in futures), "shed only once the work was over"
        results = [f.result(timeout=60) for f in futures]
        m = pool.metrics()
        assert teardowns(tmp_path) == 2  # stopped, not killed
    assert all(r.ok and r.attempts == 1 for r in results)
    assert runs_of(tmp_path) == Counter(str(i) for i in range(24))
    assert (m.scaled_up, m.scaled_down, m.crashed, m.worker_restarts) == (2, 2, 0, 0)


@pytest.mark.timeout(90)
def test_resize_up_and_down_mid_run_loses_no_job(tmp_path: Path) -> None:
    """A plain pool of 2 grows to 4 and shrinks to 1 while 60 jobs run: every job ran once,
    the retired workers stopped cleanly, and 1 is where it stays."""
    with Pool(Paced(str(tmp_path), 0.05), 2, start_method="forkserver") as pool:
        futures = [pool.submit(i) for i in range(60)]
        pool.resize(4)
        wait_for(lambda: pool.metrics().workers == 4, REACH, "4 workers")
        assert pool.procs == 4
        pool.resize(1)
        wait_for(lambda: len(pool.pids()) == 1, REACH, "1 worker")
        assert not all(f.done() for f in futures), "resized only once the work was over"
        results = [f.result(timeout=60) for f in futures]
        m = pool.metrics()
        assert teardowns(tmp_path) == 3
    assert all(r.ok and r.attempts == 1 for r in results)
    assert runs_of(tmp_path) == Counter(str(i) for i in range(60))
    assert (m.scaled_up, m.scaled_down, m.worker_restarts) == (2, 3, 0)


@pytest.mark.timeout(60)
def test_a_plain_pool_keeps_its_idle_workers() -> None:
    """procs=N does not scale: a worker idle far longer than idle_timeout stays."""
    with Pool(Sleep(), 2, idle_timeout=0.05, start_method="forkserver") as pool:
        pids = wait_for(lambda: len(pool.pids()) == 2 and pool.pids(), REACH, "2 workers")
        run_jobs(pool, [1.0])  # one worker busy for a second, the other idle all along
        assert sorted(pool.pids()) == sorted(pids)
        assert pool.metrics().scaled_down == 0


def test_resize_refuses_counts_outside_the_bounds() -> None:
    with Pool(Echo(), procs=(1, 3), start_method="forkserver") as pool:
        for n in (0, 4, -1, 2.0, True):
            with pytest.raises(ValueError, match="resize"):
                pool.resize(n)  # type: ignore[arg-type]
    with Pool(Echo(), 1, start_method="forkserver") as pool, pytest.raises(ValueError):
        pool.resize(0)
    with pytest.raises(PoolClosed):
        pool.resize(2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"procs": (0, 2)}, "1 <= min <= max"),
        ({"procs": (3, 1)}, "1 <= min <= max"),
        ({"procs": (1, 2, 3)}, "(min, max) pair"),
        ({"procs": "2"}, "procs must be an integer"),
        ({"procs": (1, 2), "idle_timeout": 0}, "idle_timeout"),
        ({"procs": (1, 2), "idle_timeout": -1}, "idle_timeout"),
        ({"procs": 2, "idle_timeout": 0}, "idle_timeout"),
    ],
)
def test_bad_settings_refused_when_the_pool_is_built(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Pool(Echo(), **options)


@pytest.mark.timeout(60)
def test_pipeline_run_with_procs_min_max(headroom: None) -> None:
    pipeline = Pipeline(range(12), Sleep(0.1), name="scaling")
    report = pipeline.run(procs=(1, 3), idle_timeout=0.5, journal=None, progress=False)
    assert report.succeeded == 12 and report.failed == 0
    assert 0 < report.metrics.scaled_up <= 2
    with pytest.raises(ValueError, match="1 <= min <= max"):
        pipeline.run(procs=(3, 1), journal=None, progress=False)
