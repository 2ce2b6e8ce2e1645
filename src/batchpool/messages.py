"""The closed set of messages that cross the process boundary, and how they are encoded.

Every message is a plain tuple ``(TAG, ...)`` pickled with the highest protocol and framed by
``Connection.send_bytes``. Tuples of builtins pickle several times faster than dataclasses, and
this path runs once per batch of jobs, so the shapes are tuples documented here (the type
checker sees some of them as aliases below):

supervisor -> worker
    (RUN, runs) + payloads                 run these jobs, in order; ``runs``: per block of
                                           the message, (its job ids as a range, its stage):
                                           nothing is sent per job but the payload, which
                                           follows as a frame of its own: one pickled list
                                           (20x cheaper than a pickle per job)
    (RUN, runs, kinds) + payloads + buffers
                                           the same, with the big buffers left out of the
                                           pickle, each in a frame of its own after it
                                           (dumps_out_of_band: megabytes are not copied into
                                           a pickle); ``kinds``: one byte per buffer, 1 where
                                           it must come back writable (buffer_kinds)
    (STOP,)                                the sentinel: tear down and exit 0
    (STEAL,)                               hand back every job not started yet (another
                                           worker is idle); answered by RETURNED at once
    (FLUSH,)                               send the results of the jobs that have ended, now
                                           (a deadline is about to kill this worker while it
                                           runs a job); answered at once, by a RESULTS of
                                           those (none if there are none) and then FLUSHED

worker -> supervisor
    (STARTED, pid)                         the worker's process exists now: sent only where it
                                           comes later than start_worker() returns (a Ray
                                           actor, once Ray placed it); its start clock begins
    (READY, pid)                           setup() done; send jobs
    (START_FAILED, error)                  task unpickling or setup() raised; exiting
    (RETURNED, job_ids)                    the answer to STEAL: these never started
    (FLUSHED,)                             the answer to FLUSH: every result of a job that
                                           ended before it was sent ahead of it
    (EXITING, peak_rss)                    a clean exit (stop, retirement) is under way; the
                                           worker's peak resident memory in bytes
    (RESULTS, job_ids, outcomes, elapsed, values_blob, retiring)
        values_blob: one pickled list, per job the return value (OK) or an error tuple.
                     From a local worker the message is one frame whose values_blob is
                     ``layout``: the sizes of the values' pickle and of its out-of-band
                     buffers, which follow the message's own pickle in the frame
                     (results_frame, results_values: no copy of a big value on the way)
        OK           the value; the worker pickles it, so a value that cannot be pickled
                     is charged to its own job (UNPICKLABLE)
        ERROR/FATAL  an exception in run(); ERROR may be retried, FATAL may not
        UNPICKLABLE  a serialization failure, never retried
        SPLIT        the batch's payloads could not be unpickled as a whole: run each job
                     alone to find the culprit (no attempt is charged)
        retiring     None, or why the worker leaves after this message (max_tasks_per_worker,
                     max_memory); the jobs it has not answered go back to the queue

Batches keep the fast path to one pickle per direction per message; when a batch fails as a
whole (a payload or value that cannot be unpickled on the other side), its jobs run again one
per message, so the failure is charged to exactly one job.

error tuple: (type_name, message, traceback_text) -- plain data, so an exception class that
cannot be pickled or imported in the supervisor still reports faithfully.

Besides the pipe, each worker owns two int64 slots of a shared array (see ``progress_slot``):
the id of the job it is running (FLUSHING or UNPACKING while it (un)pickles a batch, IDLE
between batches and wherever it may wait: a rate limit's gate, an RSS sample) and that job's
start time in monotonic ns. Between two jobs of a batch the slot keeps naming the one that
ended, for the few hundred ns of bookkeeping before the next is written: a write less per job.
A kill from outside that lands in that gap is charged to the job that just ended; its result
was not sent yet, so that attempt is lost either way.
They let the supervisor attribute a crash or a timeout to the exact job inside a batch without
a message per job.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Sequence
from functools import partial
from itertools import chain, repeat
from typing import Any, Protocol, cast

RUN = 1
STOP = 2
STEAL = 3
FLUSH = 4
READY = 10
START_FAILED = 11
RESULTS = 12
RETURNED = 13
EXITING = 14
FLUSHED = 15
STARTED = 16

OK = 0
ERROR = 1
FATAL = 2
UNPICKLABLE = 3
SPLIT = 4

IDLE = -1  # progress slot value between batches
FLUSHING = -2  # progress slot value while pickling and sending a batch of results
UNPACKING = -3  # progress slot value while unpickling the payloads of a batch of jobs

dumps = partial(pickle.dumps, protocol=pickle.HIGHEST_PROTOCOL)
loads = pickle.loads

OUT_OF_BAND = 64 * 1024  # bytes: a buffer this big travels as a frame of its own
OutOfBand = tuple[bytes, list[memoryview]]  # a pickle, and the buffers left out of it
Layout = tuple[int, list[int], bytes]  # where results_frame put them: sizes, buffer_kinds


def dumps_out_of_band(data: Sequence[Any]) -> OutOfBand:
    """A list of payloads or of values: its pickle, and the big buffers left out of it
    (pickle protocol 5's out-of-band buffers), to be sent as they are. Pickling megabytes in
    band copies them into a fresh buffer, page faults included: ~40% of the supervisor's CPU
    when 1 MiB payloads stream through.

    What goes out of band: buffers of OUT_OF_BAND bytes or more that an item hands pickle
    itself (a numpy array, a bytearray do), and ``bytes`` items that big when the list's first
    item is one (pickle never asks about plain bytes, so they are wrapped here; looking
    through every list would cost small jobs a check each). The other side reads a read-only
    buffer into ``bytes`` (the task or the caller gets that very object) and a writable one
    into a ``bytearray`` (an array stays writable): ``buffer_kinds`` says which is which."""
    first = data[0] if data else None
    if type(first) is bytes and len(first) >= OUT_OF_BAND:
        data = [
            pickle.PickleBuffer(p) if type(p) is bytes and len(p) >= OUT_OF_BAND else p
            for p in data
        ]
    buffers: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        view = buffer.raw()
        if view.nbytes < OUT_OF_BAND:
            return True  # in band: a frame per small array would cost more than the copy
        buffers.append(view)
        return False

    return pickle.dumps(data, protocol=5, buffer_callback=out_of_band), buffers


def buffer_kinds(buffers: Sequence[memoryview]) -> bytes:
    """Per out-of-band buffer, 1 if the other side must give it back writable."""
    return bytes(0 if view.readonly else 1 for view in buffers)


def results_frame(message: Results) -> list[bytes | memoryview]:
    """A RESULTS message whose values_blob is an OutOfBand, as the parts of one frame: the
    message pickled with the layout of what follows in place of the values, then their
    pickle and buffers as they are. One frame, so a reader of frames needs nothing new; the
    worker copies none of it (a pickle in a pickle would copy the values twice more)."""
    tag, ids, outcomes, elapsed, values, retiring = message
    blob, buffers = cast(OutOfBand, values)
    layout = (len(blob), [view.nbytes for view in buffers], buffer_kinds(buffers))
    return [dumps((tag, ids, outcomes, elapsed, layout, retiring)), blob, *buffers]


def results_values(
    frame: bytes | bytearray, layout: Layout
) -> tuple[memoryview, list[bytes | bytearray]]:
    """The values' pickle (a view into ``frame``) and its buffers, from the end of a frame
    made by results_frame: each buffer copied out once, into the object that unpickling
    hands back (``bytes``, or a ``bytearray`` where it must be writable)."""
    blob_size, sizes, kinds = layout
    view = memoryview(frame)
    at = len(view) - blob_size - sum(sizes)
    if at < 0:
        raise ValueError("a RESULTS frame shorter than its layout")
    blob = view[at : at + blob_size]
    at += blob_size
    buffers: list[bytes | bytearray] = []
    for size, writable in zip(sizes, kinds, strict=True):
        part = view[at : at + size]
        buffers.append(bytearray(part) if writable else bytes(part))
        at += size
    return blob, buffers


Runs = list[tuple[range, int]]  # a RUN message's jobs: (job ids, stage) per block
ErrorInfo = tuple[str, str, str]  # the error tuple: (type name, message, traceback text)
# (RESULTS, job_ids, outcomes, elapsed, values_blob, retiring)
Results = tuple[int, list[int], list[int], list[float], bytes | OutOfBand, str | None]
# What a worker says once started: (READY, pid) or (START_FAILED, error)
Hello = tuple[int, int] | tuple[int, ErrorInfo]


class ProgressSlots(Protocol):
    """The shared int64 array of progress slots (a list where nobody else reads them)."""

    def __getitem__(self, index: int, /) -> int: ...
    def __setitem__(self, index: int, value: int, /) -> None: ...


def run_ids(runs: Runs) -> list[int]:
    """The job ids of a RUN message, in order."""
    return list(chain.from_iterable(ids for ids, _ in runs))


def run_jobs(runs: Runs, payloads: list[Any]) -> list[tuple[int, int, Any]]:
    """A RUN message's jobs as (id, stage, payload), in order."""
    stages = chain.from_iterable(repeat(stage, len(ids)) for ids, stage in runs)
    ids = chain.from_iterable(ids for ids, _ in runs)
    return list(zip(ids, stages, payloads, strict=True))


def progress_slot(slot: int) -> tuple[int, int]:
    """Indexes of (running job id, started monotonic ns) for a worker slot."""
    return 2 * slot, 2 * slot + 1


def error_tuple(exc: BaseException, tb: str | None = None) -> ErrorInfo:
    """An exception as plain data; never raises, whatever the exception does in __str__."""
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not lose the failure itself
        message = f"<unprintable {type(exc).__name__}>"
    if tb is None:
        try:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        except Exception:
            tb = ""
    return (type(exc).__name__, message, tb)
