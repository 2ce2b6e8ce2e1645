"""The scheduler's invariants, as properties over random sequences of operations: every job is
handed out exactly once unless put back, new jobs leave in the order they came, work under way
goes first, a solo job travels alone. Pure logic: no processes."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from batchpool.scheduler import Scheduler


@dataclass(eq=False)
class J:
    id: int
    solo: bool = False


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


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_each_job_leaves_exactly_once_and_new_jobs_in_order(ops: list[tuple]) -> None:
    s = Scheduler()
    ids = iter(range(10**6))
    held: list[J] = []  # taken and not put back: a worker has them
    out: list[J] = []  # left for good (taken and kept, or removed)
    added: list[J] = []
    fresh_taken: list[int] = []  # ids of jobs taken for the first time, in order
    seen: set[int] = set()
    now = 0.0
    for op in ops:
        if op[0] == "add":
            jobs = [J(next(ids)) for _ in range(op[1])]
            added.extend(jobs)
            s.add(jobs)
        elif op[0] == "take":
            taken = s.take(op[1])
            assert len(taken) <= op[1]
            if any(j.solo for j in taken):
                assert len(taken) == 1, "a solo job travels alone"
            for j in taken:
                assert j not in held, "handed out twice"
                if j.id not in seen:
                    seen.add(j.id)
                    fresh_taken.append(j.id)
            held.extend(taken)
        elif op[0] == "requeue" and held:
            k = min(op[1], len(held))
            back, held[:] = held[:k], held[k:]
            for j in back:
                j.solo = j.solo or op[2]
            s.push_front(back)
        elif op[0] == "defer" and held:
            j = held.pop(min(op[1], len(held) - 1))
            s.defer(j, now + op[2])
        elif op[0] == "release":
            now += op[1]
            s.release(now)
        elif op[0] == "remove":
            ready = list(s)
            if ready:
                j = ready[op[1] % len(ready)]
                assert s.remove(j)
                assert not s.remove(j)
                out.append(j)
    out.extend(held)
    rest = s.drain()
    assert len(s) == 0 and s.waiting == 0
    everything = out + rest
    assert sorted(j.id for j in everything) == [j.id for j in added], "lost or duplicated"
    assert fresh_taken == sorted(fresh_taken), "new jobs left out of order"


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20), st.integers(0, 19), st.integers(1, 8))
def test_work_under_way_goes_first_in_its_order(n: int, k: int, size: int) -> None:
    s = Scheduler()
    jobs = [J(i) for i in range(n)]
    s.add(jobs)
    taken = s.take(n)
    back = taken[: min(k, n)]
    s.add([J(100 + i) for i in range(3)])
    s.push_front(back)
    first = []
    while len(s):
        first.extend(s.take(size))
    assert first[: len(back)] == back
    assert [j.id for j in first[len(back) :]] == [100, 101, 102]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=20))
def test_retries_come_back_when_due_earliest_first(delays: list[float]) -> None:
    s = Scheduler()
    jobs = [J(i) for i in range(len(delays))]
    for job, delay in zip(jobs, delays, strict=True):
        s.defer(job, delay)
    assert s.next_due() == min(delays)
    s.release(min(delays) - 1e-9 if min(delays) > 0 else -1.0)
    assert len(s) == 0
    s.release(max(delays))
    order = s.take(len(jobs))
    assert [delays[j.id] for j in order] == sorted(delays)
    assert s.next_due() is None


def test_solo_cut_stops_a_batch_before_a_solo_job() -> None:
    s = Scheduler()
    a, b, c, d = J(0), J(1), J(2, solo=True), J(3)
    s.add([a, b])
    s.add([d])
    s.push_front([c])  # c first, alone
    assert s.take(4) == [c]
    assert s.take(4) == [a, b, d]
