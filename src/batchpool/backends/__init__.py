"""Where workers run. The supervisor keeps every decision (dispatch, retries, timeouts, the
journal); a backend only starts workers and gives the supervisor a handle to each:

    handle.slot, handle.pid        which worker (pid: for JobResult.worker and the logs)
    handle.conn                    poll() / recv_bytes(): messages from the worker
    handle.sentinel                waitable by multiprocessing.connection.wait; ready at death
    handle.send(blob) -> bool      a message to the worker; False if it is gone
    handle.running() -> (job id, started at)   the job in progress (IDLE between jobs) and
                                   its start in time.monotonic() seconds: crash and timeout
                                   attribution inside a batch
    handle.rss() -> int | None     resident memory in bytes, if known
    handle.kill()                  now, with SIGKILL semantics (timeouts, terminate)
    handle.reap() -> int | None    after the sentinel fired: the exit code (negative: signal)

``backend.start_worker(slot)`` returns a started handle; ``backend.close()`` releases what the
backend holds. Messages are those of batchpool.messages, whatever carries them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker of a pool is started with."""

    tasks_blob: bytes  # the pickled list of stage tasks: sent once per worker
    preload: tuple[tuple[str, str], ...]  # (module name, file path) to import first
    max_tasks: int | None
    max_memory: int | None
