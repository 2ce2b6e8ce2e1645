"""Pure unit tests of batch sizing (sizing.BatchSizer): no processes, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchpool.sizing import (
    MAX_BATCH,
    MAX_MESSAGE_BYTES,
    PER_JOB_OVERHEAD,
    TARGET_BATCH_SECONDS,
    TIMEOUT_SHARE,
    BatchSizer,
)
from batchpool.streaming import WINDOW_BYTES, window

pytestmark = pytest.mark.timeout(30)


def test_a_stage_not_timed_yet_sends_one_job() -> None:
    assert BatchSizer(2, None).jobs_per_message(1) == 1


def test_a_message_carries_about_its_batch_seconds_of_work() -> None:
    batches, serving = BatchSizer(1, None), BatchSizer(1, None, batch_seconds=0.01)
    for sizer in (batches, serving):
        sizer.timed(0, seconds=0.1, jobs=100)  # 1 ms a job
    per_job = 0.001 + PER_JOB_OVERHEAD
    assert batches.jobs_per_message(0) == int(TARGET_BATCH_SECONDS / per_job) == 248
    assert serving.jobs_per_message(0) == int(0.01 / per_job) == 9


def test_a_batch_with_one_deadline_carries_a_share_of_it() -> None:
    """Where a batch runs against one job's timeout (Ray), its work stays a quarter of it;
    a stage without a timeout, or a longer one, keeps the usual batch."""
    sizer = BatchSizer(3, None, batch_deadlines=[0.2, None, 10.0])
    for stage in range(3):
        sizer.timed(stage, seconds=0.06 - PER_JOB_OVERHEAD, jobs=1)  # 60 ms a job
    assert 0.2 * TIMEOUT_SHARE < 0.06
    assert sizer.jobs_per_message(0) == 1  # alone: under the timeout whatever it takes
    assert sizer.jobs_per_message(1) == sizer.jobs_per_message(2) == 4  # 0.25 s of work
    fast = BatchSizer(1, None, batch_deadlines=[0.2])
    fast.timed(0, seconds=0.001 - PER_JOB_OVERHEAD, jobs=1)
    assert fast.jobs_per_message(0) == round(0.2 * TIMEOUT_SHARE / 0.001) == 50
    assert BatchSizer(1, 5, batch_deadlines=[0.01]).jobs_per_message(0) == 5  # a fixed size wins


def test_a_fixed_chunksize_wins() -> None:
    sizer = BatchSizer(1, 7, batch_seconds=0.01)
    sizer.timed(0, seconds=1.0, jobs=1)
    assert sizer.jobs_per_message(0) == 7


def test_the_estimate_follows_the_newest_batches() -> None:
    sizer = BatchSizer(1, None)
    sizer.timed(0, seconds=0.01, jobs=1)
    for _ in range(40):  # the jobs became 100x slower
        sizer.timed(0, seconds=1.0, jobs=1)
    assert sizer.jobs_per_message(0) == 1


@given(
    seconds=st.floats(min_value=0.0, max_value=1e4, allow_nan=False),
    jobs=st.integers(min_value=1, max_value=10**6),
    batch_seconds=st.floats(min_value=1e-4, max_value=10.0),
)
def test_jobs_per_message_stays_within_one_and_max_batch(
    seconds: float, jobs: int, batch_seconds: float
) -> None:
    sizer = BatchSizer(1, None, batch_seconds)
    sizer.timed(0, seconds, jobs)
    assert 1 <= sizer.jobs_per_message(0) <= MAX_BATCH


def test_big_payloads_cut_the_message_to_the_byte_budget() -> None:
    sizer = BatchSizer(1, None)
    per_job = sizer.sized(0, payload_bytes=10 * 1024**2, jobs=10)  # 1 MiB each
    assert per_job == 1024**2 + 1
    assert sizer.fit_bytes(0, 100, None) == MAX_MESSAGE_BYTES // per_job
    assert sizer.fit_bytes(0, 100, head_bytes=64 * 1024**2) == 1  # the next one is huge
    assert not sizer.should_probe(0, 100)
    small = BatchSizer(1, None)
    small.sized(0, payload_bytes=100, jobs=10)
    assert small.should_probe(0, 100)  # small so far: the next payload is probed


def test_big_results_cut_the_message_as_big_payloads_do() -> None:
    sizer = BatchSizer(2, None)
    sizer.timed(0, seconds=0.003, jobs=10)  # fast jobs: hundreds per message by time alone
    sizer.sized(0, payload_bytes=100, jobs=10)  # small payloads...
    assert sizer.fit_bytes(0, 500, None) == 500
    sizer.answered(0, result_bytes=10 * 1024**2, jobs=10)  # ...and 1 MiB back per job
    assert sizer.wire_bytes(0) == 1024**2 + 1
    assert sizer.fit_bytes(0, 500, None) == MAX_MESSAGE_BYTES // (1024**2 + 1)
    assert window(sizer, procs=2) == WINDOW_BYTES // (1024**2 + 1)  # imap's read-ahead too
    assert sizer.fit_bytes(1, 500, None) == 500  # per stage
    sizer.answered(0, result_bytes=1000, jobs=10)  # the last message's size counts
    assert sizer.fit_bytes(0, 500, None) == 500


def test_payloads_that_grew_are_cut_back_to_a_moderate_message() -> None:
    assert BatchSizer.oversized(jobs=10, payload_bytes=MAX_MESSAGE_BYTES) is None
    assert BatchSizer.oversized(jobs=100, payload_bytes=10 * MAX_MESSAGE_BYTES) == 9
    assert BatchSizer.oversized(jobs=10, payload_bytes=30 * MAX_MESSAGE_BYTES) == 1
    assert BatchSizer.oversized(jobs=1, payload_bytes=10 * MAX_MESSAGE_BYTES) is None
