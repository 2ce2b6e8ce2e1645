"""The scheduler's invariants, as properties over random sequences of operations on blocks of
jobs: every job is handed out exactly once unless put back, new jobs leave in the order they
came, a message gets as many jobs as asked for when there are that many, work under way goes
first, a solo job travels alone. Pure logic: no processes."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from batchpool.jobs import Block
from batchpool.scheduler import Scheduler

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 5)),
        st.tuples(st.just("take"), st.integers(1, 6)),
        st.tuples(st.just("requeue"), st.integers(0, 4), st.booleans()),
        st.tuples(st.just("defer"), st.integers(0, 4), st.floats(0, 10)),
        st.tuples(st.just("release"), st.floats(0, 2)),
        st.tuples(st.just("remove"), st.integers(0, 20)),
    ),
    max_size=60,
)


def block(jobs: list[int]) -> Block:
    """A block whose payloads name its jobs."""
    return Block(list(jobs), list(jobs), None)


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


@settings(max_examples=300, deadline=None)
@given(OPS, st.integers(1, 4))
def test_each_job_leaves_exactly_once_and_new_jobs_in_order(ops: list[tuple], size: int) -> None:
    s = Scheduler()
    names = itertools.count()
    held: list[Block] = []  # taken and not put back: a worker has them
    out: list[Block] = []  # left for good (taken and kept, or removed)
    added: list[int] = []
    fresh_taken: list[int] = []  # jobs taken for the first time, in order
    seen: set[int] = set()
    now = 0.0
    for op in ops:
        if op[0] == "add":
            new = [block([next(names) for _ in range(size)]) for _ in range(op[1])]
            added.extend(jobs_of(new))
            s.add(new)
        elif op[0] == "take":
            ready = len(s)
            solo_first = s.head() is not None and s.head().solo
            taken = s.take(op[1])
            got = jobs_of(taken)
            assert len(s) == ready - len(got)
            if any(b.solo for b in taken):
                assert len(got) == 1, "a solo job travels alone"
            elif not any(b.solo for b in s):
                assert len(got) == min(op[1], ready), "as many as asked for, if there"
            assert not solo_first or len(taken) == 1
            for job in got:
                assert job not in jobs_of(held), "handed out twice"
                if job not in seen:
                    seen.add(job)
                    fresh_taken.append(job)
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
            ready_blocks = list(s)
            if ready_blocks:
                b = ready_blocks[op[1] % len(ready_blocks)]
                assert s.remove(b)
                assert not s.remove(b)
                out.append(b)
    left = len(s) + s.waiting
    out.extend(held)
    rest = s.drain()
    assert len(jobs_of(rest)) == left, "ready and waiting jobs counted as they are"
    assert len(s) == 0 and s.waiting == 0
    assert sorted(jobs_of(out + rest)) == added, "lost or duplicated"
    assert fresh_taken == sorted(fresh_taken), "new jobs left out of order"


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20), st.integers(0, 19), st.integers(1, 8), st.integers(1, 7))
def test_work_under_way_goes_first_in_its_order(n: int, k: int, size: int, chunk: int) -> None:
    s = Scheduler()
    s.add([block(list(range(i, min(n, i + chunk)))) for i in range(0, n, chunk)])
    taken = s.take(n)
    assert jobs_of(taken) == list(range(n))
    back = jobs_of(taken)[: min(k, n)]
    s.add([block([100, 101, 102])])
    s.push_front([block(back)])
    first: list[int] = []
    while len(s):
        first.extend(jobs_of(s.take(size)))
    assert first == back + [100, 101, 102]


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
    order = jobs_of(s.take(len(delays)))
    assert [delays[i] for i in order] == sorted(delays)
    assert s.next_due() is None and s.waiting == 0


def test_solo_cut_stops_a_batch_before_a_solo_job() -> None:
    s = Scheduler()
    c = block([2])
    c.solo = True
    s.add([block([0, 1])])
    s.add([block([3])])
    s.push_front([c])  # c first, alone
    assert s.take(4) == [c]
    assert jobs_of(s.take(4)) == [0, 1, 3]


def test_a_block_is_cut_to_the_size_asked_for_and_keeps_the_rest_in_front() -> None:
    s = Scheduler()
    s.add([block(list(range(10))), block([10, 11])])
    first = s.take(4)
    assert [b.payload for b in first] == [[0, 1, 2, 3]]
    assert first[0].index == [0, 1, 2, 3] and first[0].data is first[0].payload
    assert len(s) == 8
    assert jobs_of(s.take(7)) == list(range(4, 11))
    assert jobs_of(s.take(7)) == [11]
