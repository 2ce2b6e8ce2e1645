"""Serialization failures are charged to one job, as one attempt, never retried."""

from __future__ import annotations

import hashlib
import pickle
import threading
from pathlib import Path

import pytest
from faults import (
    Blob,
    Digest,
    Echo,
    FailsUnpickle,
    Frame,
    Length,
    RefusesPickle,
    UnpicklableResult,
)
from helpers import check_invariants, run_jobs

from batchpool import Pool
from batchpool.messages import (
    OK,
    OUT_OF_BAND,
    RESULTS,
    buffer_kinds,
    dumps_out_of_band,
    results_frame,
    results_values,
)

pytestmark = pytest.mark.timeout(90)


def _assert_serialization(r, type_name: str | None = None) -> None:
    assert not r.ok
    assert r.value is None
    assert r.error.kind == "serialization"
    assert r.attempts == 1
    assert r.error.type
    if type_name is not None:
        assert r.error.type == type_name


@pytest.mark.parametrize(
    "bad, type_name",
    [
        (lambda: None, None),
        (threading.Lock(), "TypeError"),
        (RefusesPickle(), "ValueError"),
    ],
    ids=["lambda", "lock", "reduce-raises"],
)
@pytest.mark.parametrize("chunksize", ["auto", 10])
def test_unpicklable_payload(bad, type_name, chunksize) -> None:
    payloads = [0, 1, bad, 3, 4]
    with Pool(Echo(retries=3), procs=2, chunksize=chunksize) as pool:
        results = run_jobs(pool, payloads, timeout=60)
        metrics = pool.metrics()
        after = pool.map(range(5))
    _assert_serialization(results[2], type_name)
    if type_name == "ValueError":
        assert "refuses to be pickled" in results[2].error.message
    for i in (0, 1, 3, 4):
        assert results[i].ok and results[i].value == i and results[i].attempts == 1
    assert [r.value for r in after] == list(range(5))
    assert metrics.crashed == 0 and metrics.retried == 0
    check_invariants(metrics)


def test_unpicklable_payload_in_map_and_imap() -> None:
    with Pool(Echo(), procs=2) as pool:
        mapped = pool.map([1, RefusesPickle(), 3])
        streamed = list(pool.imap([1, RefusesPickle(), 3]))
    for results in (mapped, streamed):
        assert [r.index for r in results] == [0, 1, 2]
        _assert_serialization(results[1], "ValueError")
        assert results[0].value == 1 and results[2].value == 3


@pytest.mark.parametrize("chunksize", ["auto", 10])
def test_payload_that_fails_to_unpickle_in_the_worker(chunksize) -> None:
    payloads = [0, 1, FailsUnpickle(), 3, 4]
    with Pool(Echo(retries=3), procs=2, chunksize=chunksize) as pool:
        results = run_jobs(pool, payloads, timeout=60)
        metrics = pool.metrics()
    _assert_serialization(results[2], "ValueError")
    assert "cannot be rebuilt" in results[2].error.message
    for i in (0, 1, 3, 4):
        assert results[i].ok and results[i].value == i and results[i].attempts == 1
    assert metrics.crashed == 0 and metrics.worker_restarts == 0
    check_invariants(metrics)


@pytest.mark.parametrize(
    "bad, type_name",
    [("lambda", None), ("lock", "TypeError"), ("refuse", "ValueError")],
)
@pytest.mark.parametrize("chunksize", ["auto", 10])
def test_unpicklable_result(bad, type_name, chunksize) -> None:
    payloads = ["a", "b", bad, "d", "e"]
    with Pool(UnpicklableResult(retries=3), procs=2, chunksize=chunksize) as pool:
        results = run_jobs(pool, payloads, timeout=60)
        metrics = pool.metrics()
    _assert_serialization(results[2], type_name)
    for i in (0, 1, 3, 4):
        assert results[i].ok and results[i].value == payloads[i] and results[i].attempts == 1
    assert metrics.crashed == 0 and metrics.worker_restarts == 0
    check_invariants(metrics)


@pytest.mark.parametrize("chunksize", ["auto", 10])
def test_result_that_fails_to_unpickle_in_the_parent(chunksize) -> None:
    payloads = ["a", "b", "unload", "d", "e"]
    with Pool(UnpicklableResult(retries=3), procs=2, chunksize=chunksize) as pool:
        results = run_jobs(pool, payloads, timeout=60)
        metrics = pool.metrics()
        after = pool.map(range(5))
    _assert_serialization(results[2], "ValueError")
    assert "cannot be rebuilt" in results[2].error.message
    for i in (0, 1, 3, 4):
        assert results[i].ok and results[i].value == payloads[i] and results[i].attempts == 1
    assert [r.value for r in after] == list(range(5))
    check_invariants(metrics)


def test_large_payload_round_trip() -> None:
    big = b"\x5a" * (64 * 1024 * 1024)
    with Pool(Length(), procs=2) as pool:
        results = run_jobs(pool, [big, b"small", big], timeout=60)
    assert [r.value for r in results] == [len(big), 5, len(big)]
    assert all(r.ok and r.attempts == 1 for r in results)


def test_payloads_that_grow_from_bytes_to_megabytes() -> None:
    # Tiny jobs first: batches grow to hundreds of jobs. Then a tiny head and megabytes behind
    # it: the batch sized for tiny payloads is cut and the rest go back to the queue, uncharged.
    grown = [b"x"] + [bytes([i]) * 1_500_000 for i in range(40)]
    with Pool(Length(), procs=2) as pool:
        assert all(r.ok for r in pool.map([b"y"] * 2_000))
        results = run_jobs(pool, grown, timeout=60)
        metrics = pool.metrics()
    assert [r.value for r in results] == [len(p) for p in grown]
    assert all(r.ok and r.attempts == 1 for r in results)
    check_invariants(metrics)
    assert metrics.started == metrics.submitted == 2_000 + len(grown)


def test_large_payload_streamed_through_imap() -> None:
    chunk = 8 * 1024 * 1024

    def source():
        for i in range(12):
            yield bytes([i]) * chunk

    with Pool(Length(), procs=2) as pool:
        results = list(pool.imap(source()))
    assert [r.value for r in results] == [chunk] * 12


def test_large_result_round_trip() -> None:
    size = 32 * 1024 * 1024
    with Pool(Echo(), procs=1) as pool:
        r = run_jobs(pool, [b"\x01" * size], timeout=60)[0]
    assert r.ok and len(r.value) == size


# -- big bytes payloads, sent out of band (messages.dumps_out_of_band) ---------------------------
class BytesKind(bytes):
    """A bytes subclass: pickled in band, whatever its size, and back as itself."""


def _digest(payload: bytes | bytearray | Frame) -> tuple[str, int, str]:
    data = payload.data if isinstance(payload, Frame) else payload
    return type(data).__name__, len(data), hashlib.sha256(data).hexdigest()


def test_big_buffers_leave_the_pickle_and_come_back_as_the_worker_reads_them() -> None:
    big, other = b"\x01" * OUT_OF_BAND, bytes(range(256)) * 1024
    frame = Frame(bytearray(other))
    data = [big, 7, other, bytearray(big), BytesKind(big), frame, Frame(bytearray(9)), big]
    blob, buffers = dumps_out_of_band(data)
    # exact bytes and big writable buffers only; the bytearray and the subclass: in band
    assert [bytes(b) for b in buffers] == [big, other, other, big]
    assert buffer_kinds(buffers) == b"\x00\x00\x01\x00"
    assert 2 * OUT_OF_BAND < len(blob) < 3 * OUT_OF_BAND
    kinds = buffer_kinds(buffers)
    received = [bytearray(b) if k else bytes(b) for b, k in zip(buffers, kinds, strict=True)]
    back = pickle.loads(blob, buffers=received)
    assert back[:5] == data[:5] and back[7] == big
    assert [type(x) for x in back[:5]] == [type(x) for x in data[:5]]
    assert back[0] is received[0] and back[2] is received[1]  # no copy in the worker
    assert back[5].data is received[2] and back[6].data == bytearray(9)  # writable, whole
    assert dumps_out_of_band([b"x", big])[1] == []  # only a batch led by big bytes is looked at
    assert dumps_out_of_band([b"y" * (OUT_OF_BAND - 1)])[1] == []


def test_big_bytes_payloads_arrive_whole_in_band_or_out(tmp_path: Path) -> None:
    big = [bytes([i]) * (OUT_OF_BAND + 7 * i) for i in range(1, 9)]
    led_by_big = [big[0], b"small", bytearray(big[1]), BytesKind(big[2]), *big[3:], big[0]]
    led_by_small = [b"small", *big]
    frames = [Frame(bytearray(b)) for b in big[:4]] + [b"tail", Frame(bytearray(b"tiny"))]
    with Pool(Digest(tmp_path), procs=2) as pool:
        for payloads in (led_by_big, led_by_small, big * 8, frames):
            results = run_jobs(pool, payloads, timeout=60)
            assert [r.value for r in results] == [_digest(p) for p in payloads]
            assert all(r.attempts == 1 for r in results)


def test_a_worker_dying_on_a_big_payload_is_charged_that_job_alone(tmp_path: Path) -> None:
    payloads = [bytes([i]) * (256 * 1024) for i in range(12)]
    payloads[5] = b"\xff" * (256 * 1024)  # exits its worker on the first attempt
    with Pool(Digest(tmp_path, retries=2), procs=2) as pool:
        results = run_jobs(pool, payloads, timeout=60)
        metrics = pool.metrics()
    assert [r.value for r in results] == [_digest(p) for p in payloads]
    assert [r.attempts for r in results] == [2 if i == 5 else 1 for i in range(12)]
    assert metrics.crashed == 1
    check_invariants(metrics)


# -- big values, sent back out of band (messages.results_frame) -----------------------------------
def test_results_are_one_frame_with_their_big_values_after_the_message_as_they_are() -> None:
    big, other = b"\x02" * OUT_OF_BAND, bytes(range(256)) * 300
    values = [big, 7, Frame(bytearray(other)), other, "small"]
    message = (RESULTS, [1, 2, 3, 4, 5], [OK] * 5, [0.5] * 5, dumps_out_of_band(values), None)
    parts = results_frame(message)
    assert [p.obj for p in parts[2:]] == [big, bytearray(other), other]  # the values, no copy
    assert parts[2].obj is big and parts[4].obj is other
    frame = bytearray(b"".join(bytes(p) for p in parts))  # as the supervisor's channel reads it
    header = pickle.loads(frame)  # the message's own pickle: what follows it is left alone
    assert header[:4] == message[:4] and header[5] is None
    view, buffers = results_values(frame, header[4])
    back = pickle.loads(view, buffers=buffers)
    assert back[0] == big and back[1] == 7 and back[3] == other and back[4] == "small"
    assert type(back[0]) is bytes and back[0] is buffers[0]  # copied out once, handed over
    assert type(back[2].data) is bytearray and back[2].data == other  # writable, whole
    back[2].data[0] = 1
    with pytest.raises(ValueError, match="shorter than its layout"):
        results_values(frame[: len(parts[0])], header[4])


def test_big_values_come_back_whole_and_an_unpicklable_one_is_charged_alone() -> None:
    big = [bytes([i]) * (OUT_OF_BAND + 5 * i) for i in range(1, 7)]
    frames = [Frame(bytearray(b)) for b in big[:3]]
    with Pool(Echo(), procs=2) as pool:
        for payloads in (big * 6, [b"small", *big], frames + big):
            results = run_jobs(pool, payloads, timeout=60)
            assert all(r.ok and r.attempts == 1 for r in results)
            for r, p in zip(results, payloads, strict=True):
                if isinstance(p, Frame):
                    assert type(r.value.data) is bytearray and r.value.data == p.data
                    r.value.data[0] = 0  # writable in the caller too
                else:
                    assert type(r.value) is bytes and r.value == p
    payloads: list = [big[0], "lock", big[1], "unload", big[2]]
    with Pool(UnpicklableResult(), procs=2) as pool:
        results = run_jobs(pool, payloads, timeout=60)
        metrics = pool.metrics()
    assert [r.ok for r in results] == [True, False, True, False, True]
    assert [r.value for r in results[::2]] == big[:3]
    for r in results[1::2]:
        _assert_serialization(r)
    check_invariants(metrics)


def test_fast_jobs_with_big_results_answer_in_moderate_messages() -> None:
    """A message sized by time alone would hold hundreds of these: the worker would keep every
    result until it sent them as one frame of hundreds of MiB (its peak RSS shows it)."""
    with Pool(Blob(), procs=2) as pool:
        results = run_jobs(pool, list(range(600)), timeout=90)
    assert [r.value[:1] for r in results] == [bytes([i % 256]) for i in range(600)]
    assert all(len(r.value) == 1024 * 1024 for r in results)
    assert 0 < pool.metrics().peak_rss < 160 * 1024 * 1024
