"""Workers as Ray actors: the same pools and pipelines on a Ray cluster.

Each worker is one actor (``num_cpus=1``, ``max_restarts=0``, ``max_task_retries=0``: batchpool
counts attempts, never Ray) holding the unpickled tasks, so ``setup()`` runs once per actor and
``teardown()`` at a clean stop. The supervisor sees the usual handle (backends/__init__.py):

    send(RUN)      queued in the handle as one call of a batch of jobs, sized by the
                   supervisor as for local workers (sizing.BatchSizer); at most DEPTH calls
                   are submitted to the actor at a time (``actor.run.remote``), the rest can
                   still be handed back by STEAL
    a thread       per handle: waits for the calls to complete (their futures), writes each
                   RESULTS message to ``conn`` (a pipe) as the actor produced it, and closes
                   the write end of the ``sentinel`` pipe once the actor is dead
    running()      a lone job (a call of one job) while nothing else is in flight: the
                   actor is sent nothing behind it until it answers, so a crash or a timeout
                   is charged to exactly that job (see RayWorker.running for why). A batch
                   names none (messages.UNPACKING): an actor that dies or times out in one
                   has each job it had not answered rerun alone (ledger.attribute), and only
                   the one that kills it again is charged. A batch's deadline runs from its
                   start, with the timeout of one job, and it carries at most a quarter of
                   that in measured work (sizing.py): one that overstays it all the same is
                   killed and its jobs rerun alone, charged nothing
    kill()         ``ray.kill(actor, no_restart=True)``

Start: ``start_worker`` creates the actor and returns; its describe and setup calls wait in Ray
until Ray places it, which may be never while the cluster has no free CPU. The handle's thread
says STARTED (the pid) once it is placed and READY once set up; the supervisor waits for
neither (workforce.py: an actor without room waits on while others serve, and a pool that none
serves gives up after its start timeout, as for workers that cannot start).

Exit codes from ``reap()``: 0 after a clean stop or a retirement (teardown ran), or a stop
before Ray placed it; 3 (workercore.EXIT_START_FAILED) when unpickling the tasks or ``setup()``
raised; -9 (SIGKILL) when batchpool killed the actor (a timeout, terminate, a stop past its
grace); None when the actor died on its own (os._exit, a segfault, the OOM killer, a lost
node): Ray does not report the process's exit status, so JobError.exitcode is None for crashes
on Ray, and ``exit_detail`` carries Ray's reason instead ("Ray says: ...", in JobError.message).

Payloads and values travel through Ray as the same pickled blobs as on a pipe, so pickling
failures are charged exactly as locally. Task classes are unpickled by reference: their module
must be importable on every node (pipeline files given by path are imported from that path,
the driver's ``__main__`` script too where the tasks come from it, as under spawn, and the
driver's ``sys.path`` entries that exist on the node are appended). See docs/cluster.md.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from enum import Enum
from functools import partial
from multiprocessing.connection import Pipe
from typing import TYPE_CHECKING, Any, Final, Literal

import psutil
import ray
import ray.exceptions

if TYPE_CHECKING:
    from ray.actor import ActorHandle

from .. import workercore
from ..channel import Channel
from ..messages import (
    IDLE,
    RETURNED,
    RUN,
    STARTED,
    STEAL,
    STOP,
    UNPACKING,
    Results,
    dumps,
    loads,
    run_ids,
)
from ..rates import GateFiles, GateSpec, open_gates
from ..registry import terminate_all_at_exit
from ..task import Task
from . import WorkerSpec

log = logging.getLogger("batchpool")

# Ray shuts itself down at exit, and it registered that when imported, above: register the
# termination of pools still open again, after it, so it runs first, while Ray still works.
atexit.register(terminate_all_at_exit)

DEPTH = 2  # calls submitted to an actor at once: the next job waits in its queue, not in ours
CONNECT_TIMEOUT = 5.0  # seconds to reach a cluster's address
IDLE_PING = 1.0  # seconds: an idle actor is pinged: a death between jobs is seen, charged to none
DEATH_WAIT = 10.0  # seconds a killed actor gets to be reported dead
RSS_EVERY = 0.5  # seconds between the actor's samples of its own memory
EXIT_KILLED = -signal.SIGKILL
DETAIL_CHARS = 300  # of Ray's reason for a death, in JobError.message

# kinds of call
_DESCRIBE, _SETUP, _RUN, _PING, _STOP = "describe", "setup", "run", "ping", "stop"


class _Actor:
    """The remote side: one per worker, driving the worker core (workercore.py) as the local
    worker process does. Every method catches what the user's code raises, so a call fails
    only when the actor process dies."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.runner: workercore.Runner | None = None
        self.retirement = workercore.Retirement(None, None)
        self.outbox: list[bytes] = []  # the messages of the call in progress

    def describe(self) -> tuple[int, str]:
        return os.getpid(), ray.get_runtime_context().get_node_id()

    def ping(self) -> None:
        return None

    def setup(
        self,
        tasks_blob: bytes,
        preload: tuple[tuple[str, str], ...],
        sys_path: tuple[str, ...],
        main: tuple[str, str] | None,
        max_tasks: int | None,
        max_memory: int | None,
        gates: tuple[GateSpec, ...],
    ) -> tuple[bytes, int | None, bool]:
        tasks, hello = workercore.start(tasks_blob, preload, partial(_prepare, sys_path, main))
        if tasks is None:
            sys.stderr.flush()
            return dumps(hello), None, False
        self.tasks = tasks
        self.retirement = workercore.Retirement(max_tasks, max_memory, report_every=RSS_EVERY)
        self.runner = workercore.Runner(tasks, self._keep, self.retirement, gates=open_gates(gates))
        return dumps(hello), self.retirement.sample(time.monotonic()), True

    def run(self, header: bytes, blob: bytes) -> tuple[list[bytes], bool, int | None] | None:
        """The RESULTS messages of one RUN message, whether the actor retires, its RSS."""
        runner = self.runner
        if runner is None or self.retirement.reason:  # queued behind a retirement (or a
            return None  # failed setup): the supervisor requeued these jobs
        _, runs = loads(header)
        runner.run_batch(deque(runner.unpack(runs, blob)))
        messages, self.outbox = self.outbox, []
        return messages, self.retirement.reason is not None, self.retirement.rss

    def stop(self) -> None:
        """Tear down and exit (by itself: no word from Ray's control plane needed)."""
        workercore.stop(self.tasks)
        sys.stdout.flush()
        sys.stderr.flush()
        ray.actor.exit_actor()

    def _keep(self, message: Results) -> None:
        self.outbox.append(dumps(message))


def _prepare(sys_path: tuple[str, ...], main: tuple[str, str] | None) -> None:
    """Before the tasks unpickle: the driver's sys.path entries that exist here, and its
    ``__main__`` where the tasks come from it."""
    for path in sys_path:
        if path not in sys.path and os.path.isdir(path):
            sys.path.append(path)
    if main is not None:
        _import_main(*main)


def _main_module() -> tuple[str, str] | None:
    """How an actor can import the driver's ``__main__``, as the spawn start method does:
    ("module", name) for ``python -m name``, ("file", path) for a script, None otherwise."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return "module", spec.name
    path = getattr(main, "__file__", None)
    if path and path.endswith(".py") and os.path.isfile(path):
        return "file", os.path.abspath(path)
    return None


MAIN_ALIAS = "__batchpool_main__"  # not __mp_main__: a Ray worker has one already, itself


def _import_main(kind: str, name: str) -> None:
    """In an actor: import the driver's main module under another name (its ``if __name__ ==
    "__main__"`` block does not run) and let ``__main__.X`` unpickle from it."""
    if MAIN_ALIAS not in sys.modules:
        if kind == "module":
            sys.modules[MAIN_ALIAS] = importlib.import_module(name)
        else:
            workercore.import_files([(MAIN_ALIAS, name)])
    sys.modules["__main__"] = sys.modules[MAIN_ALIAS]


def init_ray(procs: int, address: str | None) -> bool:
    """Connect this process to Ray if it is not yet; True if this call started Ray (the
    backend then shuts it down at close). ``address=None`` starts a local instance with
    ``procs`` CPUs (or joins $RAY_ADDRESS where that is set, as in a Ray job); "auto",
    "HOST:PORT" or "ray://HOST:PORT" joins a running cluster."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {
        "ignore_reinit_error": True,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None  # a Ray job's driver: its cluster
    if address is None:  # "local": a new instance, even where `ray start` made one
        options.update(address="local", num_cpus=procs, include_dashboard=False)
    else:
        _check_reachable(address)
        options.update(address=address)
    # ray.init installs a SIGTERM handler that exits at once; the application's own handler
    # (a pipeline's clean drain on SIGTERM) must stay in charge.
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    # The daemons of a local instance join this process group. Ray blocks SIGINT in them so a
    # Ctrl-C to the group spares them; SIGTERM to the group must spare them too, or the
    # attempts in flight could not drain. (A blocked mask survives exec; the cost is a slower
    # ray.shutdown, which falls back from SIGTERM to SIGKILL after a second.)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}) if address is None else None
    try:
        ray.init(**options)
    except ConnectionError as exc:
        raise ConnectionError(f"cannot connect to Ray at {address}: {exc}") from exc
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    return True


def _check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on: ray.init would retry for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise ConnectionError(f"cannot connect to Ray at {address}: {exc}") from None


class RayBackend:
    """Starts one actor per worker slot; owns the Ray connection if it made it."""

    chunksize = None  # batches, sized by the supervisor: see the module docstring
    batch_deadline = True  # an actor's call names no job: its clock is the batch's

    def __init__(self, procs: int, spec: WorkerSpec, address: str | None = None) -> None:
        self.spec = spec
        self.gates = GateFiles(spec.rates)
        self.owns_ray = init_ray(procs, address)
        self.actor_class = ray.remote(_Actor).options(
            num_cpus=1, max_restarts=0, max_task_retries=0
        )
        self.sys_path = tuple(dict.fromkeys(os.path.abspath(p or os.curdir) for p in sys.path))
        self.node_id = _local_node_id()
        # Task classes of the driver's __main__ (a script's): the actors import that too.
        self.main = _main_module() if b"__main__" in spec.tasks_blob else None
        try:
            cpus = ray.cluster_resources().get("CPU", 0)
        except Exception:
            cpus = procs
        if cpus < procs:
            log.warning(
                "the Ray cluster has %g CPUs for %d workers: those beyond them wait for room "
                "while the others serve",
                cpus,
                procs,
            )

    def start_worker(self, slot: int) -> RayWorker:
        return RayWorker(self, slot)

    def close(self) -> None:
        self.gates.remove()
        if self.owns_ray and ray.is_initialized():
            try:
                ray.shutdown()
            except Exception:
                log.debug("ray.shutdown failed", exc_info=True)


class _Call:
    """One call to the actor: queued (future None), then submitted."""

    __slots__ = ("kind", "args", "job", "ids", "lone", "future", "at")

    def __init__(
        self, kind: str, args: tuple[Any, ...] = (), job: int = IDLE, ids: list[int] | None = None
    ) -> None:
        self.kind = kind
        self.args = args  # for the actor's method ``kind``
        self.job = job  # a lone job's id
        self.ids = ids or []  # a RUN's jobs
        # A RUN of one job: it goes to an actor with nothing else in flight, and nothing is
        # submitted behind it until it is answered (see RayWorker.running).
        self.lone = len(self.ids) == 1
        self.future: Future[Any] | None = None  # set once submitted
        self.at = 0.0  # monotonic time it was submitted; 0: still ours (STEAL may take it)

    def done(self) -> bool:
        return self.future is not None and self.future.done()


class RayWorker:
    """The supervisor's handle to one actor (see the module docstring).

    Locking: ``_cond`` guards the call queue and is never held while calling into Ray (Ray
    runs the futures' done callbacks, which take it, on its own threads); ``_submitting``
    keeps submissions in queue order, which is the order the actor runs them in.
    """

    # No FLUSH: an actor's call answers its whole batch at its end, so a deadline kills it at
    # once; what a batch it was running had finished comes back "cancelled" (one job per call,
    # chunksize=1, keeps every finished result).
    flushes = False
    sends_buffers = False  # a Ray call carries one payloads blob

    def __init__(self, backend: RayBackend, slot: int) -> None:
        self.slot = slot
        self.conn, self._out = Pipe(duplex=False)
        self.channel = Channel(self.conn.fileno())  # what the supervisor reads
        self.sentinel, self._sentinel_w = os.pipe()
        self._cond = threading.Condition(threading.Lock())
        self._submitting = threading.Lock()
        self._calls: deque[_Call] = deque()  # oldest first; the first DEPTH are submitted
        self._last_done = 0.0  # time.monotonic() of the latest answer
        self._replies: list[bytes] = []  # RETURNED messages for the thread to write
        self._killing = False
        self._leaving = False  # stopping or retiring: no more jobs
        self._ended = False
        self._rss: int | None = None
        self.exitcode: int | None = None
        self.exit_detail: str | None = None  # Ray's reason, when the actor died on its own
        self._kill_code: int | None = EXIT_KILLED  # what reap() says after a kill
        self.pid = 0  # known once Ray placed the actor (STARTED)
        self._node = backend.node_id
        self._placed = False
        self._proc: psutil.Process | None = None  # the actor's process, where it is ours too
        try:
            # Returns at once: Ray places the actor when the cluster has room, and the calls
            # below wait in Ray meanwhile. Ray types remote() as "a handle or the class" (for
            # methods typed by its @ray.method); on an actor class it returns a handle.
            self.actor: ActorHandle[_Actor] = backend.actor_class.remote()  # type: ignore[assignment]
        except BaseException:
            self._close_ends()
            raise
        spec = backend.spec
        setup = (
            spec.tasks_blob,
            spec.preload,
            backend.sys_path,
            backend.main,
            spec.max_tasks,
            spec.max_memory,
            backend.gates.specs,  # actors of this machine share its workers' gates
        )
        self._calls.extend([_Call(_DESCRIBE), _Call(_SETUP, setup)])
        self._submit()
        self._thread = threading.Thread(
            target=self._serve, name=f"batchpool-ray-{slot}", daemon=True
        )
        self._thread.start()

    # -- the handle protocol ---------------------------------------------------------------
    def send(
        self, blob: bytes, payloads: bytes | None = None, buffers: Sequence[memoryview] = ()
    ) -> bool:
        message = loads(blob)
        tag = message[0]
        with self._cond:
            if self._ended or self._killing:
                return False
            if tag == RUN:
                if self._leaving:
                    return False
                ids = run_ids(message[1])
                job = ids[0] if len(ids) == 1 else IDLE
                self._calls.append(_Call(_RUN, (blob, payloads), job, ids))
            elif tag == STEAL:
                self._steal()
                return True
            elif tag == STOP:
                if self._leaving:
                    return True
                self._leaving = True
                if not self._placed:  # no setup() ran, no teardown() is owed: stop waiting
                    self._kill_code = 0  # for room, and end as a stopped worker does
                    self._killing = True
                    self._cond.notify_all()
                else:
                    self._calls.append(_Call(_STOP))
            else:
                log.debug("ray worker %s: unknown message %r", self.pid, tag)
                return True
        if self._killing:
            self._kill_actor()
        else:
            self._submit()
        return True

    def running(self) -> tuple[int, float]:
        """The job in progress, named only where no other call can be: a lone job, alone in
        the actor. When an actor dies, Ray fails every call it had not answered, and the
        answer of one it completed can be lost with it (its reply still in flight): the
        oldest failed call is not always the one that ran. So a lone job goes to an actor
        with nothing else in flight and nothing follows it until it is answered. A batch in
        flight names none (UNPACKING), with its start: when the previous call was answered,
        if that was after it was submitted."""
        with self._cond:
            for call in self._calls:
                if not call.at:
                    break
                if call.kind == _PING:  # answers at once: what runs is behind it
                    continue
                if call.kind != _RUN:
                    break
                start = max(call.at, self._last_done)
                return (call.job, start) if call.lone else (UNPACKING, start)
            return IDLE, 0.0

    def rss(self) -> int | None:
        return self._rss

    def kill(self) -> None:
        with self._cond:
            self._killing = True
            self._cond.notify_all()
        self._kill_actor()

    def reap(self) -> int | None:
        self._thread.join(DEATH_WAIT + 5)
        if self._thread.is_alive():  # pragma: no cover - Ray never reported the death
            log.warning("ray worker %s: no word of its death; giving up on it", self.pid)
        for close in (self.conn.close, lambda: os.close(self.sentinel)):
            try:
                close()
            except OSError:
                pass
        return self.exitcode

    # -- calls -----------------------------------------------------------------------------
    def _submit(self) -> None:
        """Submit the queued calls that fit in the actor's DEPTH, in queue order."""
        with self._submitting:
            with self._cond:
                todo = []
                for i, call in enumerate(self._calls):
                    if i >= DEPTH or (call.lone and i):  # a lone job waits for the others
                        break
                    if not call.at:
                        call.at = time.monotonic()
                        todo.append(call)
                    if call.lone:  # and nothing goes behind it
                        break
            for call in todo:
                try:
                    if not ray.is_initialized():
                        raise ray.exceptions.RayActorError(error_msg="Ray was shut down")
                    future = getattr(self.actor, call.kind).remote(*call.args).future()
                except Exception as exc:  # Ray itself is gone: the actor with it
                    future = _failed(exc)
                with self._cond:
                    call.future = future
                future.add_done_callback(self._wake)

    def _wake(self, _: object = None) -> None:
        with self._cond:
            self._cond.notify_all()

    def _steal(self) -> None:
        """Hand back the jobs not submitted to the actor yet (those can no longer be)."""
        kept: deque[_Call] = deque()
        ids: list[int] = []
        for call in self._calls:
            if call.kind == _RUN and not call.at:
                ids.extend(call.ids)
            else:
                kept.append(call)
        self._calls = kept
        self._replies.append(dumps((RETURNED, ids)))
        self._cond.notify_all()

    # -- the thread --------------------------------------------------------------------------
    def _serve(self) -> None:
        code: int | None = None
        try:
            code = self._loop()
        except BaseException:
            log.exception("ray worker %s: its thread failed", self.pid)
            self.kill()
        finally:
            with self._cond:
                self.exitcode = code
                self._ended = True
            for close in (self._out.close, lambda: os.close(self._sentinel_w)):
                try:
                    close()
                except OSError:
                    pass

    def _loop(self) -> int | None:
        while True:
            replies, call, killing = self._next()
            for reply in replies:
                self._write(reply)
            if call is None:
                if killing:
                    return self._await_death(self._kill_code)
                continue
            assert call.future is not None  # _next hands out answered calls only
            try:
                value = call.future.result()
            except Exception as exc:
                if killing or self._killing:
                    return self._await_death(self._kill_code)
                if call.kind == _STOP:  # exit_actor(): the call never answers
                    return self._await_death(0)
                self.exit_detail = f"Ray says: {_death_cause(exc)}"
                log.info("ray worker %s died: %s", self.pid, self.exit_detail)
                if not isinstance(exc, _DEAD):  # not surely dead (unreachable, Ray trouble)
                    self._kill_actor()
                    self._await_death(None)
                return None  # the call stays first: running() names its job
            with self._cond:
                self._calls.popleft()
                self._last_done = time.monotonic()
            self._submit()
            code = self._answer(call, value)
            if code is not _CONTINUE:
                return code

    def _next(self) -> tuple[list[bytes], _Call | None, bool]:
        """Wait for something to do: replies to write, the oldest call answered, or a kill."""
        while True:
            with self._cond:
                while True:
                    replies, self._replies = self._replies, []
                    call = self._calls[0] if self._calls and self._calls[0].done() else None
                    if replies or call is not None or self._killing:
                        return replies, call, self._killing
                    if self._calls:
                        self._cond.wait()
                    elif not self._cond.wait(IDLE_PING) and not self._calls:
                        self._calls.append(_Call(_PING))  # is the idle actor still there?
                        break
            self._submit()

    def _answer(self, call: _Call, value: Any) -> int | None | Literal[_Answer.CONTINUE]:
        if call.kind == _RUN:
            if value is None:
                return _CONTINUE  # refused: it was queued behind a retirement
            messages, retiring, self._rss = value
            for message in messages:
                self._write(message)
            if retiring:
                with self._cond:
                    self._leaving = True
                    self._calls = deque(c for c in self._calls if c.at)
                    self._calls.append(_Call(_STOP))
                self._submit()
            return _CONTINUE
        if call.kind == _DESCRIBE:
            pid, node = value
            with self._cond:
                self.pid, self._placed = pid, True
            # On this node, the process itself tells when the actor is dead, Ray or no Ray.
            self._proc = _process(pid) if node == self._node else None
            self._write(dumps((STARTED, pid)))
            return _CONTINUE
        if call.kind == _SETUP:
            message, self._rss, ok = value
            self._write(message)
            if ok:
                return _CONTINUE
            self._kill_actor()
            return self._await_death(workercore.EXIT_START_FAILED)
        if call.kind == _STOP:  # answered after all: make sure it goes
            self._kill_actor()
            return self._await_death(0)
        return _CONTINUE  # a ping

    def _write(self, message: bytes) -> None:
        try:
            self._out.send_bytes(message)
        except OSError:  # the supervisor has reaped us already
            pass

    def _kill_actor(self) -> None:
        if not ray.is_initialized():  # shut down: its actors went with it (and calls into
            return  # Ray now would start a new instance)
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # already dead, or Ray is gone
            log.debug("ray.kill of worker %s failed", self.pid, exc_info=True)

    def _await_death(self, code: int | None) -> int | None:
        """Return ``code`` once the actor is dead: its process gone (on this node), or Ray
        reporting it dead (a call to it fails)."""
        deadline = time.monotonic() + DEATH_WAIT
        while True:
            left = deadline - time.monotonic()
            if self._proc is not None:
                if not _alive(self._proc):
                    return code
                if left > 0:
                    time.sleep(0.01)  # inside a deadline-bound loop
                    continue
            if not ray.is_initialized():
                return code
            if left <= 0:
                log.warning(
                    "ray worker %s: not reported dead %g s after a kill", self.pid, DEATH_WAIT
                )
                return code
            try:
                ray.get(self.actor.ping.remote(), timeout=min(1.0, left))
            except ray.exceptions.GetTimeoutError:
                continue
            except Exception:
                return code
            time.sleep(0.01)  # the kill has not landed yet; the loop is deadline-bound

    def _close_ends(self) -> None:
        for fd in (self.sentinel, self._sentinel_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.conn.close()
        self._out.close()


def _local_node_id() -> str | None:
    """This process's Ray node, None under Ray Client (the driver is elsewhere)."""
    try:
        from ray.util.client import ray as client

        if client.is_connected():
            return None
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def _death_cause(exc: BaseException) -> str:
    """Ray's reason for an actor's death in its own words, less its header and its advice:
    "The actor is dead because its worker process has died. Worker exit type: ...", "...
    because its node has died", "... killed by the memory monitor"."""
    try:
        lines = [line for line in str(exc).splitlines() if line and not line[0].isspace()]
    except Exception:
        lines = []
    text = " ".join(lines).removeprefix(_DEAD_HEADER).strip() or repr(exc)
    for advice in (" Some common causes", " To troubleshoot", " If the process"):
        text = text.partition(advice)[0]
    return text[:DETAIL_CHARS]


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None  # gone already: Ray will say so


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _failed(exc: BaseException) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_exception(exc)
    return future


class _Answer(Enum):
    CONTINUE = "continue"


_CONTINUE: Final = _Answer.CONTINUE  # what _answer() returns when the actor goes on
# The error that means the actor is gone for good. Others (ActorUnavailableError, a
# RayActorError too: it may come back) get the actor killed first.
_DEAD = getattr(ray.exceptions, "ActorDiedError", ray.exceptions.RayActorError)
_DEAD_HEADER = "The actor died unexpectedly before finishing this task."
