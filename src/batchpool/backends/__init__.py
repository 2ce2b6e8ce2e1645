"""Where workers run. The supervisor keeps every decision (dispatch, retries, timeouts, the
journal); a backend only starts workers and gives the supervisor a handle to each:

    handle.slot, handle.pid        which worker (pid: for JobResult.worker and the logs; 0
                                   until a worker started late says STARTED, see below)
    handle.channel                 a channel.Channel: the worker's messages (receive()), and
                                   what waits to be written to it (wants_write, flush())
    handle.sentinel                a descriptor that becomes readable when the worker is dead
    handle.send(blob, payloads=None, buffers=()) -> bool
                                   a message to the worker (RUN: with its payloads frame,
                                   and the big payloads left out of it, see
                                   messages.dumps_out_of_band), never blocking; False if it is
                                   gone
    handle.sends_buffers           whether send() takes such buffers (else every payload is
                                   pickled in band)
    handle.running() -> (job id, started at)   the job in progress (IDLE between jobs) and
                                   its start in time.monotonic() seconds: crash and timeout
                                   attribution inside a batch
    handle.rss() -> int | None     resident memory in bytes, if known
    handle.kill()                  now, with SIGKILL semantics (timeouts, terminate)
    handle.flushes                 whether it answers FLUSH (see cancelling.py)
    handle.reap() -> int | None    after the sentinel fired: the exit code (negative: signal)
    handle.exit_detail             after reap(): what else the backend knows of the death,
                                   for JobError.message (Ray: why the actor died), or None

``backend.start_worker(slot)`` returns a handle at once, never waiting for the worker: a local
process is started by then; a Ray actor is placed when the cluster has room, and its handle
says STARTED (messages.py) with its pid then. ``backend.close()`` releases what the backend
holds; ``backend.chunksize`` (None, or an int) fixes the jobs per RUN message where the
backend needs it (today none does: a Ray worker names no job inside a batch, and its jobs
rerun alone when it dies in one); ``backend.batch_deadline`` says whether a RUN message runs
against one deadline, its first job's timeout from its start (Ray), rather than a clock per
job (local), so that the supervisor keeps its work well inside it. Messages are those of
batchpool.messages, whatever carries them. ``Backend`` and ``WorkerHandle`` below say the same
to the type checker.

Backends: "local" (backends/local.py, processes of this machine) and "ray" (backends/ray.py,
actors of a Ray cluster; needs the ``ray`` extra). ``make_backend`` picks one by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from ..channel import Channel
from ..sizing import Tuning

BACKENDS = ("local", "ray")


class WorkerSpec(NamedTuple):
    """What every worker of a pool is started with. A NamedTuple, as are the other records
    on a worker's import path (Tuning, Policy): then a worker never imports ``dataclasses``
    (with ``inspect``, 6-8 ms of each forkserver's start), and each class costs ~60 us to
    build instead of ~500 for a frozen dataclass."""

    tasks_blob: bytes  # the pickled list of stage tasks: sent once per worker
    preload: tuple[tuple[str, str], ...]  # (module name, file path) to import first
    max_tasks: int | None
    max_memory: int | None
    # The caller owns SIGINT/SIGTERM/SIGHUP (a pipeline run drains on them): a forkserver it
    # starts is made immune to them. Off for a plain Pool, because the forkserver is shared
    # with every pool of the process (multiprocessing's own too) and its children inherit
    # its signal mask: their terminate() would no longer end them.
    own_signals: bool = False
    # Per stage, attempt starts per second (None: no limit): the backend makes the gates
    # (rates.GateFiles) its workers take their starts from.
    rates: tuple[float | None, ...] = ()
    tuning: Tuning = Tuning()  # its flush_every and nice


class WorkerHandle(Protocol):
    """The supervisor's handle to one started worker (see the module docstring)."""

    @property
    def slot(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def channel(self) -> Channel: ...
    @property
    def sentinel(self) -> int: ...
    def send(
        self, blob: bytes, payloads: bytes | None = None, buffers: Sequence[memoryview] = ()
    ) -> bool: ...
    def running(self) -> tuple[int, float]: ...
    def rss(self) -> int | None: ...
    def kill(self) -> None: ...
    def reap(self) -> int | None: ...
    @property
    def flushes(self) -> bool: ...
    @property
    def sends_buffers(self) -> bool: ...
    @property
    def exit_detail(self) -> str | None: ...


class Backend(Protocol):
    """Where a pool's workers run (see the module docstring)."""

    @property
    def chunksize(self) -> int | None: ...
    @property
    def batch_deadline(self) -> bool: ...
    def start_worker(self, slot: int) -> WorkerHandle: ...
    def close(self) -> None: ...


class BackendUnavailable(ImportError):
    """A backend whose optional dependency is not installed."""


def check_backend(name: str, address: str | None) -> None:
    """ValueError for an unknown backend, or an address a backend cannot use."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
    if address is not None and name != "ray":
        raise ValueError(f"address is for the ray backend, not {name!r}")


def make_backend(
    name: str, start_method: str, procs: int, spec: WorkerSpec, address: str | None = None
) -> Backend:
    """The backend called ``name``: "local" (processes started by ``start_method``) or "ray"
    (actors; ``address`` None starts a local Ray instance, "auto" or "ray://..." joins a
    cluster). Raises ValueError for an unknown name, BackendUnavailable without ray."""
    check_backend(name, address)
    if name == "ray":
        try:
            from .ray import RayBackend
        except ImportError as exc:
            if (exc.name or "").partition(".")[0] != "ray":
                raise  # not Ray missing: a bug, with its traceback
            raise BackendUnavailable(
                f"the ray backend needs Ray: pip install '.[ray]' ({exc})"
            ) from exc
        return RayBackend(procs, spec, address)
    from .local import LocalBackend

    return LocalBackend(start_method, procs, spec)
