"""What a worker holds and who is to blame (ledger.py): pure logic, no processes."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from batchpool.ledger import WorkerView, attribute
from batchpool.messages import FLUSHING, IDLE, UNPACKING


@dataclass(eq=False)
class J:
    id: int
    solo: bool = False


class Proc:
    slot, pid = 0, 1234


def view(*jobs: J) -> WorkerView:
    w = WorkerView(Proc())
    w.sent(list(jobs))
    return w


def test_the_running_job_is_blamed_by_its_id() -> None:
    a, b, c = J(1), J(2), J(3)
    assert attribute(deque([a, b, c]), 2) == (b, False)
    assert attribute(deque([a, b, c]), 9) == (None, False)  # answered already


def test_between_jobs_a_batch_reruns_alone_and_an_isolated_job_is_blamed() -> None:
    a, b = J(1), J(2)
    for unsure in (IDLE, UNPACKING, FLUSHING):
        assert attribute(deque([a, b]), unsure) == (None, True)
    solo = J(5, solo=True)
    assert attribute(deque([solo, b]), UNPACKING) == (solo, False)
    assert attribute(deque([a]), FLUSHING) == (a, False)  # pickling a lone job's result
    assert attribute(deque([a]), IDLE) == (None, True)  # it may have died before starting
    assert attribute(deque(), IDLE) == (None, False)


@given(st.integers(1, 40), st.integers(0, 40))
def test_answers_in_order_take_exactly_the_front(n: int, k: int) -> None:
    jobs = [J(i) for i in range(n)]
    w = view(*jobs)
    k = min(k, n)
    assert w.answered([j.id for j in jobs[:k]]) == jobs[:k]
    assert list(w.held) == jobs[k:]
    assert w.assigned == n  # answers do not give back quota


def test_answers_after_a_kill_or_a_steal_find_their_jobs() -> None:
    a, b, c, d = J(1), J(2), J(3), J(4)
    w = view(a, b, c, d)
    assert w.answered([2, 9, 4]) == [b, None, d]  # 9: charged to a kill already
    assert list(w.held) == [a, c]


def test_a_steal_hands_back_jobs_and_quota() -> None:
    a, b, c = J(1), J(2), J(3)
    w = view(a, b, c)
    w.stealing = True
    assert w.returned({2, 3}) == [b, c]
    assert list(w.held) == [a] and w.assigned == 1 and w.stealing  # a's result will clear it
    assert w.returned({1}) == [a]
    assert not w.held and not w.stealing  # nothing left whose result could clear it
