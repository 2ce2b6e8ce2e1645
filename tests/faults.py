"""Fault-injecting tasks and payloads, importable under every start method.

This module lives at the top of tests/ (pytest puts that folder on sys.path, and child scripts
get it through PYTHONPATH), so workers started by fork, forkserver or spawn unpickle these
classes by reference.

Counts that must survive a worker's death (attempts, setups) are kept as files in a marker
directory: one file per event, created atomically.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from batchpool import PermanentError, Task

# -- marker files --------------------------------------------------------------------------------


def mark(marker_dir: str | os.PathLike, name: str, text: str = "") -> Path:
    """Create a new file ``name`` with ``text`` atomically (write a temp file, then hard-link
    it: readers never see a half-written marker). Raises FileExistsError if it exists."""
    d = Path(marker_dir)
    tmp = d / f".tmp-{uuid.uuid4().hex}"
    tmp.write_text(text)
    try:
        os.link(tmp, d / name)
    finally:
        tmp.unlink()
    return d / name


def mark_unique(marker_dir: str | os.PathLike, prefix: str, text: str = "") -> Path:
    return mark(marker_dir, f"{prefix}.{uuid.uuid4().hex}", text)


def record_attempt(marker_dir: str | os.PathLike, key: Any) -> int:
    """Record one attempt for ``key``; return its number (1 for the first) across processes.
    Each marker holds ``monotonic_time pid`` (CLOCK_MONOTONIC is system-wide on Linux)."""
    n = 1
    while True:
        try:
            mark(marker_dir, f"{key}.attempt.{n}", f"{time.monotonic()!r} {os.getpid()}")
            return n
        except FileExistsError:
            n += 1


def attempts_of(marker_dir: str | os.PathLike, key: Any) -> list[tuple[float, int]]:
    """(monotonic time, pid) of each recorded attempt of ``key``, in attempt order."""
    found = []
    for path in Path(marker_dir).glob(f"{key}.attempt.*"):
        n = int(path.name.rsplit(".", 1)[1])
        at, pid = path.read_text().split()
        found.append((n, float(at), int(pid)))
    found.sort()
    assert [n for n, _, _ in found] == list(range(1, len(found) + 1)), found
    return [(at, pid) for _, at, pid in found]


def append_line(path: str | os.PathLike, text: str) -> None:
    """One line appended with a single O_APPEND write: whole lines, even from several
    processes at once."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)


def count_marks(marker_dir: str | os.PathLike, prefix: str) -> int:
    return len(list(Path(marker_dir).glob(f"{prefix}.*")))


def marks_by_pid(marker_dir: str | os.PathLike, prefix: str) -> dict[int, int]:
    """For markers named ``{prefix}-{pid}.<unique>``: how many per pid."""
    counts: dict[int, int] = {}
    for path in Path(marker_dir).glob(f"{prefix}-*"):
        pid = int(path.name[len(prefix) + 1 :].split(".", 1)[0])
        counts[pid] = counts.get(pid, 0) + 1
    return counts


# -- exceptions that do not survive pickling ------------------------------------------------------


class TwoArgError(Exception):
    """Pickles, but cannot be rebuilt: __init__ takes two required arguments."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code={code} detail={detail}")
        self.code = code
        self.detail = detail


class LockError(Exception):
    """Cannot be pickled at all: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class BadStrError(Exception):
    """str() of it raises: the failure must still be reported."""

    def __str__(self) -> str:
        raise RuntimeError("no string for you")


class CustomRetryable(KeyError):
    """A subclass of a retry_on class, defined only here."""


def raise_unpicklable_error(kind: str) -> None:
    """The function name must show up in the reported traceback text."""
    if kind == "lock":
        raise LockError("holds a lock and cannot be pickled")
    raise TwoArgError(7, "cannot be rebuilt")


# -- the failures of the fault matrix -------------------------------------------------------------

FAILURES = ("exception", "unpicklable", "exit", "sigkill", "hang")


def do_fault(failure: str) -> None:
    """Fail the current process in the named way."""
    if failure == "exception":
        raise ValueError("injected fault")
    if failure == "unpicklable":
        raise LockError("injected unpicklable fault")
    if failure == "exit":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(13)
    if failure == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if failure == "hang":
        while True:
            time.sleep(3600)
    raise AssertionError(f"unknown failure {failure!r}")


def _fault_then_build(failure: str) -> FaultOnUnpickle:
    do_fault(failure)
    return FaultOnUnpickle(failure)  # pragma: no cover - do_fault never returns


class FaultOnPickle:
    """Fails (in the process that pickles it) when pickled."""

    def __init__(self, failure: str) -> None:
        self.failure = failure

    def __reduce__(self):
        do_fault(self.failure)
        raise AssertionError("unreachable")  # pragma: no cover


class FaultOnUnpickle:
    """Pickles fine; fails (in the process that unpickles it) when rebuilt."""

    def __init__(self, failure: str) -> None:
        self.failure = failure

    def __reduce__(self):
        return (_fault_then_build, (self.failure,))


class RefusesPickle:
    """__reduce__ raises ValueError."""

    def __reduce__(self):
        raise ValueError("refuses to be pickled")


def _explode(message: str) -> None:
    raise ValueError(message)


class FailsUnpickle:
    """Pickles, but its reconstruction raises ValueError."""

    def __reduce__(self):
        return (_explode, ("cannot be rebuilt",))


# -- tasks -----------------------------------------------------------------------------------------


class Base(Task):
    """Task with fast retries by default; keyword arguments set policy attributes."""

    backoff = 0.0
    jitter = 0.0

    def __init__(self, **policy: Any) -> None:
        for name, value in policy.items():
            setattr(self, name, value)


class Echo(Base):
    def run(self, payload: Any) -> Any:
        return payload


class Square(Base):
    """payload -> payload * payload. Optionally appends each payload it runs to the file
    ``runs``, sleeps ``delay`` seconds first, and raises PermanentError for payloads in
    ``fail``."""

    def __init__(
        self,
        runs: str | os.PathLike | None = None,
        fail: frozenset = frozenset(),
        delay: float = 0.0,
        **policy: Any,
    ) -> None:
        super().__init__(**policy)
        self.runs = runs
        self.fail = fail
        self.delay = delay

    def run(self, payload: Any) -> Any:
        if self.runs:
            append_line(self.runs, str(payload))
        if self.delay:
            time.sleep(self.delay)
        if payload in self.fail:
            raise PermanentError(f"payload {payload} is refused")
        return payload * payload


class Length(Base):
    def run(self, payload: Any) -> Any:
        return len(payload)


class Raise(Base):
    """Raise the named exception (a builtin, PermanentError, or one of this module's)."""

    def __init__(self, exc_type_name: str = "ValueError", **policy: Any) -> None:
        super().__init__(**policy)
        self.exc_type_name = exc_type_name

    def run(self, payload: Any) -> Any:
        import builtins

        cls = globals().get(self.exc_type_name) or getattr(builtins, self.exc_type_name)
        raise cls(f"raised for {payload!r}")


class RaiseUnpicklable(Base):
    def __init__(self, kind: str = "lock", **policy: Any) -> None:
        super().__init__(**policy)
        self.kind = kind

    def run(self, payload: Any) -> Any:
        raise_unpicklable_error(self.kind)


class FailTimes(Base):
    """Raise ValueError on the first ``n`` attempts of each payload, then return the payload.
    Attempts are counted by marker files, so counts survive worker deaths."""

    def __init__(self, n: int, marker_dir: str, **policy: Any) -> None:
        super().__init__(**policy)
        self.n = n
        self.marker_dir = str(marker_dir)

    def run(self, payload: Any) -> Any:
        attempt = record_attempt(self.marker_dir, payload)
        if attempt <= self.n:
            raise ValueError(f"attempt {attempt} of {payload!r} fails")
        return payload


class ExitTimes(Base):
    """os._exit(code) on the first ``n`` attempts (None: always), then return the payload."""

    def __init__(self, n: int | None, marker_dir: str, code: int = 13, **policy: Any) -> None:
        super().__init__(**policy)
        self.n = n
        self.marker_dir = str(marker_dir)
        self.code = code

    def run(self, payload: Any) -> Any:
        attempt = record_attempt(self.marker_dir, payload)
        if self.n is None or attempt <= self.n:
            sys.stderr.flush()
            os._exit(self.code)
        return payload


class KillSelfTimes(Base):
    """SIGKILL itself on the first ``n`` attempts (None: always), then return the payload."""

    def __init__(self, n: int | None, marker_dir: str, **policy: Any) -> None:
        super().__init__(**policy)
        self.n = n
        self.marker_dir = str(marker_dir)

    def run(self, payload: Any) -> Any:
        attempt = record_attempt(self.marker_dir, payload)
        if self.n is None or attempt <= self.n:
            os.kill(os.getpid(), signal.SIGKILL)
        return payload


class Segfault(Base):
    def run(self, payload: Any) -> Any:
        if payload == "segv":
            ctypes.string_at(0)
        return payload


class Hang(Base):
    """Payload "hang": sleep forever in C; "spin": busy-loop in Python; "gil": loop in C without
    ever letting another thread of the worker run; else return it."""

    def run(self, payload: Any) -> Any:
        if payload == "hang":
            while True:
                time.sleep(3600)
        if payload == "gil":
            return sum(range(10**15))
        if payload == "spin":
            while True:
                pass
        return payload


class SpawnChildAndHang(Base):
    """Starts a grandchild process (recording its pid), then hangs: a timeout kill must not
    leave the grandchild behind."""

    def __init__(self, marker_dir: str, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)

    def run(self, payload: Any) -> Any:
        import subprocess

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        mark_unique(self.marker_dir, f"grandchild-{child.pid}")
        while True:
            time.sleep(3600)


class Sleep(Base):
    """Sleep ``seconds`` (or ``payload`` seconds when None), return the payload."""

    def __init__(self, seconds: float | None = None, **policy: Any) -> None:
        super().__init__(**policy)
        self.seconds = seconds

    def run(self, payload: Any) -> Any:
        time.sleep(self.seconds if self.seconds is not None else payload)
        return payload


class SleepMarked(Base):
    """Records each attempt (with the pid, so a test can signal that worker), sleeps
    ``seconds`` on the first attempt of a payload starting with "slow", returns the payload."""

    def __init__(self, marker_dir: str, seconds: float, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)
        self.seconds = seconds

    def run(self, payload: Any) -> Any:
        attempt = record_attempt(self.marker_dir, payload)
        if str(payload).startswith("slow") and attempt == 1:
            time.sleep(self.seconds)
        return payload


class SetupFails(Base):
    """setup() always raises; each call leaves a marker."""

    def __init__(self, marker_dir: str, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)

    def setup(self) -> None:
        mark_unique(self.marker_dir, f"setup-{os.getpid()}")
        raise RuntimeError("setup boom")

    def run(self, payload: Any) -> Any:
        return payload


class SetupFailsOnce(Base):
    """The very first setup() of any worker raises; later ones succeed."""

    def __init__(self, marker_dir: str, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)

    def setup(self) -> None:
        if record_attempt(self.marker_dir, "setup") == 1:
            raise RuntimeError("first setup fails")

    def run(self, payload: Any) -> Any:
        return payload


class CountSetup(Base):
    """Leaves a marker per setup() and teardown() call, named by pid; run returns the pid."""

    def __init__(self, marker_dir: str, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)
        self.ready = False

    def setup(self) -> None:
        mark_unique(self.marker_dir, f"setup-{os.getpid()}")
        self.ready = True

    def run(self, payload: Any) -> Any:
        assert self.ready, "run() before setup()"
        return os.getpid()

    def teardown(self) -> None:
        mark_unique(self.marker_dir, f"teardown-{os.getpid()}")


class Paced(CountSetup):
    """CountSetup's markers (setup and teardown, by pid), and a run that appends
    ``payload pid`` to ``marker_dir/runs`` (every attempt, once) and sleeps ``seconds``."""

    def __init__(self, marker_dir: str, seconds: float, **policy: Any) -> None:
        super().__init__(marker_dir, **policy)
        self.seconds = seconds

    def run(self, payload: Any) -> Any:
        append_line(os.path.join(self.marker_dir, "runs"), f"{payload} {os.getpid()}")
        time.sleep(self.seconds)
        return os.getpid()


class CountUnpickles(Base):
    """Leaves a marker each time an instance is unpickled, named by pid; run returns the pid."""

    def __init__(self, marker_dir: str, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        mark_unique(self.marker_dir, f"unpickle-{os.getpid()}")

    def run(self, payload: Any) -> Any:
        return os.getpid()


class SleepPid(Base):
    """Sleeps ``payload`` seconds; returns the pid."""

    def run(self, payload: Any) -> Any:
        if payload:
            time.sleep(payload)
        return os.getpid()


class RecordPid(Base):
    def run(self, payload: Any) -> Any:
        return os.getpid()


class UnpicklableResult(Base):
    """Payload "lambda" / "lock" / "refuse": a value that cannot be pickled; "unload": one
    that pickles but fails to unpickle; anything else comes back as is."""

    def run(self, payload: Any) -> Any:
        if payload == "lambda":
            return lambda: None
        if payload == "lock":
            return threading.Lock()
        if payload == "refuse":
            return RefusesPickle()
        if payload == "unload":
            return FailsUnpickle()
        return payload


class MemoryHog(Base):
    """Allocates ``mb`` MB (touched, so it is resident) per job and keeps it; returns the pid."""

    def __init__(self, mb: int, **policy: Any) -> None:
        super().__init__(**policy)
        self.mb = mb
        self.hoard: list[bytearray] = []

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "hoard"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.hoard = []

    def run(self, payload: Any) -> Any:
        if self.mb:
            self.hoard.append(bytearray(b"\x01") * (self.mb * 1024 * 1024))
        return os.getpid()


class Mixed(Base):
    """Behaviour chosen by the payload ``(key, action, times, value)``: perform ``action`` on
    the first ``times`` attempts of ``key`` (None: on every attempt), then return ``value``.

    Actions: "ok", "raise" (ValueError), "permanent" (PermanentError), "exit" (os._exit(13)),
    "kill" (SIGKILL itself), "hang", "sleep" (sleeps ``value`` seconds, returns it).
    """

    def __init__(self, marker_dir: str, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)

    def run(self, payload: Any) -> Any:
        key, action, times, value = payload
        if action == "ok":
            return value
        if action == "sleep":
            time.sleep(value)
            return value
        if times is not None and record_attempt(self.marker_dir, key) > times:
            return value
        if action == "raise":
            raise ValueError(f"job {key} fails")
        if action == "permanent":
            raise PermanentError(f"job {key} fails for good")
        if action == "exit":
            do_fault("exit")
        if action == "kill":
            do_fault("sigkill")
        if action == "hang":
            do_fault("hang")
        raise AssertionError(f"unknown action {action!r}")


class FaultTask(Base):
    """The fault matrix's task: fails in ``phase`` in the way ``failure`` names.

    phase "start": while the worker unpickles the task; "setup": in setup(); "run": in run()
    on the payload "fault"; "result": run() returns, for the payload "fault", a value whose
    pickling fails (in the worker); "result-unpickle": a value whose unpickling fails (in the
    supervisor's process). Every other payload is echoed.
    """

    def __init__(self, phase: str, failure: str, **policy: Any) -> None:
        super().__init__(**policy)
        self.phase = phase
        self.failure = failure

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.phase == "start":
            do_fault(self.failure)

    def setup(self) -> None:
        if self.phase == "setup":
            do_fault(self.failure)

    def run(self, payload: Any) -> Any:
        if payload != "fault":
            return payload
        if self.phase == "run":
            do_fault(self.failure)
        if self.phase == "result":
            if self.failure == "unpicklable":
                return lambda: None
            return FaultOnPickle(self.failure)
        if self.phase == "result-unpickle":
            return FaultOnUnpickle(self.failure)
        return payload


class Chaos(Base):
    """test_chaos: behaviour chosen deterministically by the payload (the job's index); "ok"
    jobs sleep ``work`` seconds."""

    def __init__(self, marker_dir: str, work: float = 0.0, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)
        self.work = work

    @staticmethod
    def plan(i: int) -> str:
        if i % 100 == 3:
            return "raise"  # every attempt
        if i % 200 == 11:
            return "exit"  # every attempt
        if i % 100 == 23:
            return "exit-once"
        if i % 100 == 37:
            return "kill-once"
        if i % 250 == 41:
            return "hang-once"
        return "ok"

    def run(self, i: int) -> Any:
        plan = self.plan(i)
        if plan == "ok":
            time.sleep(self.work)
            return i * i
        if plan == "raise":
            raise ValueError(f"job {i} always fails")
        if plan == "exit":
            do_fault("exit")
        if record_attempt(self.marker_dir, i) == 1:
            do_fault({"exit-once": "exit", "kill-once": "sigkill", "hang-once": "hang"}[plan])
        return i * i


class Frame:
    """A payload that hands pickle a writable buffer of its own, as a numpy array does."""

    def __init__(self, data: bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> Any:
        return Frame, (pickle.PickleBuffer(self.data),)


class Digest(Base):
    """(type name, length, sha256) of the payload: what a worker received, byte for byte (a
    Frame's data is written to first: it must arrive writable). A payload starting with 0xFF
    exits the worker (os._exit) on its first attempt."""

    def __init__(self, marker_dir: str = "", **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)

    def run(self, payload: Any) -> Any:
        import hashlib

        if isinstance(payload, Frame):
            payload.data[0] = payload.data[0]  # TypeError if it came back read-only
            payload = payload.data
        if payload[:1] == b"\xff" and record_attempt(self.marker_dir, "crash") == 1:
            os._exit(13)
        return type(payload).__name__, len(payload), hashlib.sha256(payload).hexdigest()


class Blob(Base):
    """payload i -> ``size`` bytes of i % 256: small jobs with big results."""

    def __init__(self, size: int = 1024 * 1024, **policy: Any) -> None:
        super().__init__(**policy)
        self.size = size

    def run(self, payload: int) -> bytes:
        return bytes([payload % 256]) * self.size


def _tell_sigint_handler(conn: Any) -> None:
    # Told through a pipe: a process forked from a forked pytest under coverage exits 1.
    conn.send(signal.getsignal(signal.SIGINT) is signal.default_int_handler)


class ChildSignals(Base):
    """Starts children the ways a task does (a subprocess; a forked and a spawned
    multiprocessing process), ends each with SIGTERM and returns how each ended (its exit
    code, or "ignored SIGTERM"), with the worker's pid and whether a forked child has
    Python's SIGINT handler back."""

    def run(self, payload: Any) -> dict[str, Any]:
        import multiprocessing
        import subprocess

        out: dict[str, Any] = {"pid": os.getpid()}
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        child.terminate()
        try:
            out["subprocess"] = child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            out["subprocess"] = "ignored SIGTERM"
        for method in ("fork", "spawn"):
            ctx = multiprocessing.get_context(method)
            p = ctx.Process(target=time.sleep, args=(60,))  # type: ignore[attr-defined]
            p.start()
            p.terminate()
            p.join(5)
            if p.exitcode is None:
                p.kill()
                p.join()
                out[method] = "ignored SIGTERM"
            else:
                out[method] = p.exitcode
        ours, theirs = multiprocessing.get_context("fork").Pipe()
        p = multiprocessing.get_context("fork").Process(target=_tell_sigint_handler, args=(theirs,))
        p.start()
        out["fork SIGINT handler"] = ours.recv() if ours.poll(5) else "no answer"
        p.join(5)
        return out
