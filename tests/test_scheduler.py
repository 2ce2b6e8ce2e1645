"""The scheduler's invariants, as properties over random sequences of operations on blocks of
jobs: every job is handed out exactly once unless put back, higher priorities first and new jobs
of one priority in the order they came, a message gets as many jobs as asked for when there are
that many, work under way goes first within its priority, a solo job travels alone, remove()
takes out exactly the block named (ready or waiting for its retry), and a rate-limited stage
is admitted no faster than its rate, to idle workers only, with ``next_due`` naming the next
admission instead of a time already past. Pure logic: no processes."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpool.jobs import Block
from batchpool.scheduler import Scheduler

EPS = 1e-9
PRIORITIES = st.sampled_from([0, 0, 0, 1, 5, -2])

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 5), PRIORITIES),
        st.tuples(st.just("take"), st.integers(1, 6)),
        st.tuples(st.just("requeue"), st.integers(0, 4), st.booleans()),
        st.tuples(st.just("defer"), st.integers(0, 4), st.floats(0, 10)),
        st.tuples(st.just("release"), st.floats(0, 2)),
        st.tuples(st.just("remove"), st.integers(0, 20)),
        st.tuples(st.just("remove_where"), st.integers(2, 5), st.integers(0, 4)),
    ),
    max_size=60,
)


def block(jobs: list[int], priority: int = 0, stage: int = 0) -> Block:
    """A block whose payloads name its jobs."""
    b = Block(list(jobs), list(jobs), None, priority=priority)
    b.stage = stage
    return b


def jobs_of(blocks: list[Block]) -> list[int]:
    return [job for b in blocks for job in b.payload]


def singles(blocks: list[Block], solo: bool) -> list[Block]:
    """As JobBook.requeue(solo=True) puts them back."""
    if not solo:
        return blocks
    out = [s for b in blocks for s in b.singles()]
    for s in out:
        s.solo = True
    return out


def waiting_blocks(s: Scheduler) -> list[Block]:
    return [b for _, b in s._waiting.items()]


@settings(max_examples=300, deadline=None)
@given(OPS, st.integers(1, 4))
def test_each_job_leaves_once_best_priority_first_fifo_within_one(
    ops: list[tuple], size: int
) -> None:
    s = Scheduler()
    names = itertools.count()
    held: list[Block] = []  # taken and not put back: a worker has them
    out: list[Block] = []  # left for good (taken and kept, or removed)
    added: list[int] = []
    priority_of: dict[int, int] = {}
    fresh_taken: dict[int, list[int]] = {}  # per priority: jobs taken for the first time
    seen: set[int] = set()
    now = 0.0
    for op in ops:
        if op[0] == "add":
            new = [block([next(names) for _ in range(size)], op[2]) for _ in range(op[1])]
            added.extend(jobs_of(new))
            priority_of.update((job, op[2]) for job in jobs_of(new))
            s.add(new)
        elif op[0] == "take":
            ready = len(s)
            best = max((b.priority for b in s), default=None)
            solo_first = s.head(now) is not None and s.head(now).solo
            taken = s.take(op[1], now)
            got = jobs_of(taken)
            assert len(s) == ready - len(got)
            if taken:
                assert taken[0].priority == best, "the highest priority goes first"
                levels = [b.priority for b in taken]
                assert levels == sorted(levels, reverse=True)
            if any(b.solo for b in taken):
                assert len(got) == 1, "a solo job travels alone"
            elif not any(b.solo for b in s):
                assert len(got) == min(op[1], ready), "as many as asked for, if there"
            assert not solo_first or len(taken) == 1
            for job in got:
                assert job not in jobs_of(held), "handed out twice"
                if job not in seen:
                    seen.add(job)
                    fresh_taken.setdefault(priority_of[job], []).append(job)
            for b in taken:
                b.ids = list(b.payload)  # as JobBook.take gives ids
            held.extend(taken)
        elif op[0] == "requeue" and held:
            k = min(op[1], len(held))
            back, held[:] = held[:k], held[k:]
            s.push_front(singles(back, op[2]))
        elif op[0] == "defer" and held:
            b = held.pop(min(op[1], len(held) - 1))
            s.defer(b, now + op[2])
        elif op[0] == "release":
            now += op[1]
            s.release(now)
        elif op[0] == "remove":
            candidates = list(s) + waiting_blocks(s)
            if candidates:
                b = candidates[op[1] % len(candidates)]
                before = len(s) + s.waiting
                assert s.remove(b)
                assert len(s) + s.waiting == before - b.size, "exactly that block"
                assert not s.remove(b)
                out.append(b)
        elif op[0] == "remove_where":
            mod, rest = op[1], op[2] % op[1]

            def pick(b: Block, mod: int = mod, rest: int = rest) -> bool:
                return b.payload[0] % mod == rest

            expected = {id(b) for b in list(s) + waiting_blocks(s) if pick(b)}
            removed = s.remove_where(pick)
            assert {id(b) for b in removed} == expected
            assert not any(pick(b) for b in list(s) + waiting_blocks(s))
            out.extend(removed)
    left = len(s) + s.waiting
    out.extend(held)
    rest_blocks = s.drain()
    assert len(jobs_of(rest_blocks)) == left, "ready and waiting jobs counted as they are"
    assert len(s) == 0 and s.waiting == 0
    assert sorted(jobs_of(out + rest_blocks)) == added, "lost or duplicated"
    for priority, jobs in fresh_taken.items():
        assert jobs == sorted(jobs), f"new jobs of priority {priority} left out of order"


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20), st.integers(0, 19), st.integers(1, 8), st.integers(1, 7))
def test_work_under_way_goes_first_in_its_order(n: int, k: int, size: int, chunk: int) -> None:
    s = Scheduler()
    s.add([block(list(range(i, min(n, i + chunk)))) for i in range(0, n, chunk)])
    taken = s.take(n, 0.0)
    assert jobs_of(taken) == list(range(n))
    back = jobs_of(taken)[: min(k, n)]
    s.add([block([100, 101, 102])])
    s.push_front([block(back)])
    first: list[int] = []
    while len(s):
        first.extend(jobs_of(s.take(size, 0.0)))
    assert first == back + [100, 101, 102]


def test_work_under_way_goes_first_within_its_priority_only() -> None:
    s = Scheduler()
    s.add([block([0, 1]), block([2], priority=3)])
    s.push_front([block([9])])  # handed back, priority 0: ahead of 0 and 1, behind 2
    assert jobs_of(s.take(10, 0.0)) == [2, 9, 0, 1]


def test_a_due_retry_keeps_its_priority() -> None:
    s = Scheduler()
    retry = block([7], priority=2)
    s.defer(retry, 1.0)
    s.add([block([0]), block([1], priority=5)])
    s.release(1.0)
    assert jobs_of(s.take(10, 0.0)) == [1, 7, 0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=20))
def test_retries_come_back_when_due_earliest_first(delays: list[float]) -> None:
    s = Scheduler()
    for i, delay in enumerate(delays):
        b = block([i])
        b.ids = [i]
        s.defer(b, delay)
    assert s.waiting == len(delays)
    assert s.next_due() == min(delays)
    s.release(min(delays) - 1e-9 if min(delays) > 0 else -1.0)
    assert len(s) == 0
    s.release(max(delays))
    order = jobs_of(s.take(len(delays), max(delays)))
    assert [delays[i] for i in order] == sorted(delays)
    assert s.next_due() is None and s.waiting == 0


def test_remove_takes_a_block_waiting_for_its_retry() -> None:
    s = Scheduler()
    waiting, other = block([1]), block([2])
    s.defer(waiting, 5.0)
    s.defer(other, 6.0)
    assert s.remove(waiting) and s.waiting == 1
    assert not s.remove(waiting)
    s.release(10.0)
    assert jobs_of(s.take(5, 0.0)) == [2]


def test_solo_cut_stops_a_batch_before_a_solo_job() -> None:
    s = Scheduler()
    c = block([2])
    c.solo = True
    s.add([block([0, 1])])
    s.add([block([3])])
    s.push_front([c])  # c first, alone
    assert s.take(4, 0.0) == [c]
    assert jobs_of(s.take(4, 0.0)) == [0, 1, 3]


def test_a_block_is_cut_to_the_size_asked_for_and_keeps_the_rest_in_front() -> None:
    s = Scheduler()
    s.add([block(list(range(10))), block([10, 11])])
    first = s.take(4, 0.0)
    assert [b.payload for b in first] == [[0, 1, 2, 3]]
    assert first[0].index == [0, 1, 2, 3] and first[0].data is first[0].payload
    assert len(s) == 8
    assert jobs_of(s.take(7, 0.0)) == list(range(4, 11))
    assert jobs_of(s.take(7, 0.0)) == [11]


# -- rate-limited stages ----------------------------------------------------------------------

RATE_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 2), st.integers(1, 4), PRIORITIES),
        st.tuples(st.just("take"), st.floats(0, 0.3), st.integers(1, 5), st.booleans()),
        st.tuples(st.just("retry"), st.floats(0, 0.5)),
    ),
    max_size=80,
)


def within_bound(times: list[float], rate: float) -> bool:
    """In any window of T seconds at most rate * T + 1 of ``times`` (sorted)."""
    return all(
        j - i + 1 <= rate * (times[j] - times[i]) + 1 + EPS
        for i in range(len(times))
        for j in range(i + 1, len(times))
    )


@settings(max_examples=300, deadline=None)
@given(RATE_OPS, st.sampled_from([0.5, 3.0, 20.0, 1000.0]), st.sampled_from([2.0, 7.0]))
def test_rate_limited_stages_keep_their_bound_and_go_alone_to_idle_workers(
    ops: list[tuple], rate0: float, rate2: float
) -> None:
    """Stage 0 and stage 2 are limited (each its own bucket), stage 1 is not; arrivals,
    retries and the times of takes are random."""
    rates: list[float | None] = [rate0, None, rate2]
    s = Scheduler(rates)
    names = itertools.count()
    starts: dict[int, list[float]] = {0: [], 2: []}
    held: list[Block] = []
    added = 0
    now = 0.0
    for op in ops:
        if op[0] == "add":
            stage = op[1]
            s.add([block([next(names) for _ in range(op[2])], op[3], stage)])
            added += op[2]
        elif op[0] == "retry" and held:
            s.defer(held.pop(0), now + op[1])
        elif op[0] == "take":
            now += op[1]
            s.release(now)
            idle = op[3]
            head = s.head(now, idle)
            first = None if head is None else head.payload[0]  # before take() cuts it
            taken = s.take(op[2], now, idle)
            assert first == (taken[0].payload[0] if taken else None), "head() is what goes"
            for b in taken:
                if rates[b.stage] is not None:
                    assert idle and len(jobs_of(taken)) == 1, "alone, to an idle worker"
                    starts[b.stage].append(now)
            held.extend(taken)
            due = s.next_due()
            assert due is None or due > now, "a time already past would spin the loop"
            if not taken and len(s):  # nothing went: what waits is not admitted yet
                assert due is not None or not idle
    for stage, times in starts.items():
        rate = rates[stage]
        assert rate is not None and within_bound(times, rate), (stage, times)
    assert len(jobs_of(held)) + len(s) + s.waiting == added


def test_a_limited_job_admitted_waits_for_an_idle_worker_and_busy_ones_get_nothing() -> None:
    s = Scheduler([5.0, None])
    s.add([block([0], stage=1), block([1, 2], stage=0)])
    # equal priority: the later stage first
    assert jobs_of(s.take(5, 0.0, idle=False)) == [0]
    assert s.take(5, 0.0, idle=False) == []  # the admitted limited job waits for idle
    assert s.next_due() is None  # admitted already: a worker's message will wake the loop
    assert jobs_of(s.take(5, 0.0, idle=True)) == [1]
    assert s.next_due() == pytest.approx(0.2)
    assert s.take(5, 0.1, idle=True) == []
    s.add([block([3], stage=1)])
    assert jobs_of(s.take(5, 0.1, idle=False)) == [3], "not admitted: others pass"
    assert jobs_of(s.take(5, 0.2, idle=True)) == [2]


def test_later_stages_go_first_across_lanes_at_equal_priority_higher_priority_wins() -> None:
    s = Scheduler([None, 10.0])
    s.add([block([0], stage=0), block([1], stage=1)])
    assert jobs_of(s.take(5, 0.0)) == [1]
    s.add([block([2], stage=1), block([3], priority=1, stage=0)])
    assert jobs_of(s.take(1, 1.0)) == [3]
    assert jobs_of(s.take(1, 1.0)) == [2]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(0, 5)), max_size=40))
def test_a_limited_lane_never_blocks_the_others(adds: list[tuple[int, float]]) -> None:
    """Whatever a limited stage holds, ready jobs of unlimited stages go to any worker."""
    s = Scheduler([1.0])
    s.add([block([100 + i], stage=0) for i in range(5)])
    s.take(1, 0.0)  # the bucket is used: nothing of stage 0 before t = 1
    names = itertools.count()
    for priority, at in adds:
        s.add([block([next(names)], priority, stage=1)])
        taken = s.take(1, min(at, 0.999), idle=False)
        assert jobs_of(taken) and taken[0].stage == 1


def pick_all(_: Block) -> bool:
    return True


@pytest.mark.parametrize("where", [pick_all, lambda b: b.stage == 1])
def test_remove_where_reaches_limited_lanes_and_waiting_blocks(
    where: Callable[[Block], bool],
) -> None:
    s = Scheduler([None, 2.0])
    limited, free, waiting = block([1], stage=1), block([2]), block([3], stage=1)
    s.add([limited, free])
    s.defer(waiting, 9.0)
    removed = s.remove_where(where)
    assert {id(b) for b in removed} == {id(b) for b in (limited, free, waiting) if where(b)}
    assert len(s) + s.waiting == 3 - len(removed)
