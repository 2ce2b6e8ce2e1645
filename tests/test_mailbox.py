"""The local worker's mailbox (batchpool.worker._Mailbox), in this process: the main thread
takes jobs from the left of the batch under way while the reader thread answers STEAL from the
right, with no lock per job. Whatever the interleaving, each job is run or handed back, never
both and never neither, and what runs is the front of the batch, in order. The pool tests
steal from real workers; here the race itself is forced, thousands of times a run."""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest
from faults import Base

from batchpool.messages import RESULTS, RETURNED, RUN, dumps, loads
from batchpool.worker import _Mailbox
from batchpool.workercore import Retirement, Runner

pytestmark = pytest.mark.timeout(120)


class _Wire:
    """The worker's end of the pipe: keeps what the mailbox sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def send_bytes(self, blob: bytes) -> None:
        self.sent.append(loads(blob))


class Echo(Base):
    def run(self, payload: Any) -> Any:
        return payload


def _run_with_a_steal(n: int, after: int) -> tuple[list[int], list[int]]:
    """Run a batch of ``n`` no-op jobs while another thread steals once, as soon as about
    ``after`` jobs have run; (ids answered in order, ids handed back)."""
    wire = _Wire()
    box = _Mailbox(wire)  # type: ignore[arg-type]  # only send_bytes is used
    runner = Runner([Echo()], box.send, Retirement(None, None))
    ids = list(range(1000, 1000 + n))
    box.jobs.extend(runner.unpack([(range(1000, 1000 + n), 0)], dumps(ids)))

    def steal() -> None:
        while len(box.jobs) > n - after:  # racy on purpose: any moment near ``after``
            pass
        box._give_back()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as it goes
    thief = threading.Thread(target=steal)
    thief.start()
    try:
        runner.run_batch(box.jobs)
    finally:
        thief.join()
        sys.setswitchinterval(switch)
    answered = [i for m in wire.sent if m[0] == RESULTS for i in m[1]]
    [returned] = [m[1] for m in wire.sent if m[0] == RETURNED]
    return answered, returned


def test_a_steal_mid_batch_hands_back_exactly_the_jobs_that_did_not_start() -> None:
    n = 10_000
    ids = list(range(1000, 1000 + n))
    for after in [0, 1, n - 1, n, *range(97, n, 331)]:  # the ends, and 30 points between
        answered, returned = _run_with_a_steal(n, after)
        assert answered == ids[: len(answered)], after  # the front, in order, once each
        assert returned == ids[len(answered) :], after  # the rest, in order, once each


def test_a_steal_takes_the_messages_not_unpacked_yet_after_the_batch_under_way() -> None:
    wire = _Wire()
    box = _Mailbox(wire)  # type: ignore[arg-type]
    box.jobs.extend([(1, 0, "a"), (2, 0, "b")])
    box.pending.append((RUN, [(range(3, 4), 0), (range(4, 5), 1)], bytearray(dumps(["c", "d"]))))
    box._give_back()
    assert wire.sent == [(RETURNED, [1, 2, 3, 4])]
    assert not box.jobs and not box.pending
