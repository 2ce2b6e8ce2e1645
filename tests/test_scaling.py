"""Autoscaling: the pure policy (scaling.decide) under hypothesis, then real pools that grow
under a backlog, shrink when idle, resize on demand, on every backend; the settings refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpool import scaling
from batchpool.scaling import Bounds, Machine, View, Worker, decide

GB = 1024**3


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


@settings(max_examples=200)
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
