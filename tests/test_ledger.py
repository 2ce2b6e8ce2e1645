"""The ledger of what a worker holds, in blocks of jobs, and who is charged when it dies or
hangs: pure logic, no processes. A worker answers in the order it was sent, in answers of any
length; a job named by the progress slot gets a block of its own, so exactly it is charged."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from batchpool.jobs import Block
from batchpool.ledger import WorkerView, attribute
from batchpool.messages import FLUSHING, IDLE, UNPACKING


def sent(*sizes: int) -> tuple[WorkerView, list[Block]]:
    """A worker sent blocks of these sizes, with ids 0, 1, 2, ... in order."""
    w = WorkerView(SimpleNamespace(slot=0, pid=1))
    first = 0
    blocks = []
    for size in sizes:
        b = Block(range(size), [f"p{i}" for i in range(size)], None)
        b.ids = range(first, first + size)  # as JobBook.take gives them
        first += size
        blocks.append(b)
    w.sent(blocks)
    return w, blocks


def ids_of(blocks: list) -> list:
    return [None if b is None else list(b.ids) for b in blocks]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=6), st.data())
def test_answers_of_any_length_take_every_job_once_in_order(sizes: list[int], data) -> None:
    w, _ = sent(*sizes)
    total = sum(sizes)
    got: list[int] = []
    while len(got) < total:
        n = data.draw(st.integers(1, total - len(got)))
        answer = list(range(len(got), len(got) + n))
        blocks = w.answered(answer)
        assert None not in blocks
        assert [i for b in blocks for i in b.ids] == answer
        assert [p for b in blocks for p in b.payload] == [
            f"p{i}" for i in _positions(sizes, answer)
        ]
        got.extend(answer)
        assert w.holding == total - len(got)
    assert not w.held


def _positions(sizes: list[int], ids: list[int]) -> list[int]:
    """Each id's position in its own block (the payload names it)."""
    starts = list(itertools.accumulate([0] + sizes))
    return [i - max(s for s in starts if s <= i) for i in ids]


def test_a_crash_in_a_block_of_1000_isolates_exactly_the_running_job() -> None:
    w, _ = sent(1000)
    found, rerun_alone = attribute(w.held, 500)
    assert not rerun_alone
    job = w.isolate(*found)
    assert job.ids == range(500, 501) and job.payload == ["p500"] and job.index == range(500, 501)
    assert [b.ids[0] for b in w.held] == [0, 500, 501]
    assert [b.size for b in w.held] == [500, 1, 499]
    assert w.holding == 1000
    w.held.remove(job)
    rest = w.take_all()
    assert sum(b.size for b in rest) == 999 and w.holding == 0


def test_an_answer_past_a_job_charged_already_names_it_none() -> None:
    w, _ = sent(5)
    job = w.isolate(*attribute(w.held, 2)[0])
    w.held.remove(job)  # charged to a timeout kill
    w.holding -= 1
    blocks = w.answered([0, 1, 2, 3])
    assert ids_of(blocks) == [[0, 1], None, [3]]
    assert ids_of(list(w.held)) == [[4]] and w.holding == 1


def test_a_steal_hands_back_the_jobs_not_started_in_runs() -> None:
    w, _ = sent(6, 4)
    back = w.returned({2, 3, 5, 6, 9})
    assert ids_of(back) == [[2, 3], [5], [6], [9]]
    assert ids_of(list(w.held)) == [[0, 1], [4], [7, 8]]
    assert w.holding == 5 and w.assigned == 5
    w.answered([0, 1, 4, 7, 8])
    assert not w.held and w.holding == 0


def test_no_single_job_named_by_the_slot() -> None:
    w, _ = sent(3)
    assert attribute(w.held, IDLE) == (None, True)  # several candidates: each reruns alone
    assert attribute(w.held, UNPACKING) == (None, True)
    assert attribute(w.held, FLUSHING) == (None, True)
    one, _ = sent(1)
    assert attribute(one.held, FLUSHING) == ((one.held[0], 0), False)  # a lone job's results
    alone, blocks = sent(1, 2)
    blocks[0].solo = True
    assert attribute(alone.held, IDLE) == ((blocks[0], 0), False)  # isolated already
    empty, _ = sent()
    assert attribute(empty.held, IDLE) == (None, False)
    assert attribute(w.held, 77) == (None, False)  # not held: its result is in already


def test_a_block_cut_or_parted_keeps_each_jobs_index_payload_and_data_together() -> None:
    b = Block(range(10, 15), ["a", "b", "c", "d", "e"], None)
    first = b.part(1, 3)
    assert first.data is first.payload == ["b", "c"]  # a first stage runs on the payloads
    b.data = ["A", "B", "C", "D", "E"]  # a later stage runs on the values of the one before
    b.ids = range(5)
    b.attempts, b.prior, b.worker = 1, 2, 7
    head = b.cut(2)
    assert (head.index, head.payload, head.data, head.ids) == (
        range(10, 12),
        ["a", "b"],
        ["A", "B"],
        range(2),
    )
    assert (b.index, b.payload, b.data, b.ids) == (
        range(12, 15),
        ["c", "d", "e"],
        ["C", "D", "E"],
        range(2, 5),
    )
    assert [(s.index, s.payload, s.data) for s in b.singles()] == [
        (range(12, 13), ["c"], ["C"]),
        (range(13, 14), ["d"], ["D"]),
        (range(14, 15), ["e"], ["E"]),
    ]
    results = head.results(["x", "y"], None, [0.5, 0.25])
    assert [(r.index, r.payload, r.value, r.attempts, r.elapsed, r.worker) for r in results] == [
        (10, "a", "x", 3, 0.5, 7),
        (11, "b", "y", 3, 0.25, 7),
    ]
