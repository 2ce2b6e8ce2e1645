"""A pool's supervisor hosted on an asyncio event loop (batchpool.hosting, what ``serve`` does):
real workers, a real loop; handed to a thread of its own when the loop ends first."""

from __future__ import annotations

import asyncio
import threading

import pytest
from faults import Square

from batchpool import JobResult, Pool

pytestmark = pytest.mark.timeout(60)


def test_a_hosted_supervisor_passes_on_the_loop_then_a_thread_finishes_its_work() -> None:
    pool = Pool._for_stages([Square()], 2, hosted=True)
    assert pool._host is not None

    async def serve() -> tuple[JobResult, str, object]:
        assert pool._host is not None
        pool._host.attach(asyncio.get_running_loop())
        first = await asyncio.wait_for(asyncio.wrap_future(pool.submit(3)), 30)
        assert pool._supervisor.thread is threading.current_thread()  # no thread of its own
        try:  # the loop's thread makes the passes: waiting there would wait forever
            pool.map([1])
            refused = "waited"
        except RuntimeError as exc:
            refused = str(exc)
        return first, refused, pool.submit(4)  # the loop ends before this one is done

    first, refused, late = asyncio.run(serve())
    pool._host.detach()
    try:
        assert first.ok and first.value == 9
        assert "would wait forever" in refused
        assert late.result(timeout=30).value == 16  # type: ignore[attr-defined]
        assert pool._supervisor.thread is not threading.current_thread()
        assert [r.value for r in pool.map(range(5))] == [0, 1, 4, 9, 16]
    finally:
        pool.close()
    assert pool.metrics().succeeded == 7


def test_a_hosted_pool_never_attached_still_runs_and_closes() -> None:
    """A server that failed before its loop ran: detach() starts the thread instead."""
    pool = Pool._for_stages([Square()], 1, hosted=True)
    future = pool.submit(5)  # queued before anything runs
    assert pool._host is not None
    pool._host.detach()
    assert future.result(timeout=30).value == 25
    pool.close()
    assert pool.metrics().succeeded == 1
