"""Tasks and payloads for the engine-hardening tests (test_hardening.py), importable under
every start method (see faults.py for why this lives at the top of tests/)."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from faults import Base, mark_unique, record_attempt


def in_worker() -> bool:
    return multiprocessing.parent_process() is not None


class HoldGil(Base):
    """ "hold": a C call that keeps the GIL for ``seconds`` (the worker's reader thread cannot
    drain its pipe meanwhile); anything else: its length. Marks each start."""

    def __init__(self, marker_dir: str, seconds: float, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)
        self.seconds = seconds

    def run(self, payload: Any) -> Any:
        if payload == "hold":
            record_attempt(self.marker_dir, "hold")
            ctypes.PyDLL(None).sleep(int(self.seconds))
            return "held"
        return len(payload)


def _raise_system_exit() -> None:
    raise SystemExit(3)


class ReduceRaises:
    """A payload whose pickling raises SystemExit, in the supervisor's thread."""

    def __reduce__(self) -> Any:
        raise SystemExit("no pickling me")


def _rebuild_in_worker_only(exc_name: str) -> Any:
    if not in_worker():
        raise {"SystemExit": SystemExit, "KeyboardInterrupt": KeyboardInterrupt}[exc_name]()
    return "rebuilt"


class LoadsOnlyInWorker:
    """Pickles anywhere; unpickling raises ``exc_name`` outside a worker (the supervisor)."""

    def __init__(self, exc_name: str) -> None:
        self.exc_name = exc_name

    def __reduce__(self) -> Any:
        return (_rebuild_in_worker_only, (self.exc_name,))


class ReturnsParentBomb(Base):
    """Returns a value whose rebuild raises ``payload`` (an exception name) in the parent;
    "fine" returns "fine"."""

    def run(self, payload: Any) -> Any:
        return payload if payload == "fine" else LoadsOnlyInWorker(payload)


def _refuse_in_worker() -> Any:
    if in_worker():
        raise ValueError("this payload does not load in a worker")
    return "loaded"


class RefusedInWorker:
    """Pickles in the parent; unpickling raises in the worker."""

    def __reduce__(self) -> Any:
        return (_refuse_in_worker, ())


def _hang_in_worker() -> Any:
    if in_worker():
        time.sleep(3600)
    return "loaded"


class HangsInWorker:
    """Pickles in the parent; unpickling hangs in the worker."""

    def __reduce__(self) -> Any:
        return (_hang_in_worker, ())


class Describe(Base):
    """A payload's type name (so payloads that load in the worker can be told apart)."""

    def run(self, payload: Any) -> Any:
        return payload if isinstance(payload, int) else type(payload).__name__


class SetupHangs(Base):
    def setup(self) -> None:
        time.sleep(3600)

    def run(self, payload: Any) -> Any:
        return payload


class SetupWorksTwice(Base):
    """setup() succeeds for the first two workers, then fails; "crash" payloads exit the
    worker after ``payload``'s delay (a "crash:1.5" waits 1.5 s first)."""

    def __init__(self, marker_dir: str, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)

    def setup(self) -> None:
        if record_attempt(self.marker_dir, "setup") > 2:
            raise RuntimeError("setup fails from the third worker on")

    def run(self, payload: Any) -> Any:
        delay = float(payload.partition(":")[2] or 0)
        time.sleep(delay)
        os._exit(1)


def _sleep_forever() -> None:
    time.sleep(3600)


class HelperThenExit(Base):
    """setup() starts a helper process (of the given multiprocessing start method) that
    inherits the worker's descriptors and records its pid; run() exits the worker."""

    def __init__(self, marker_dir: str, method: str, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)
        self.method = method

    def setup(self) -> None:
        helper = multiprocessing.get_context(self.method).Process(target=_sleep_forever)
        helper.start()
        mark_unique(self.marker_dir, "helper", str(helper.pid))

    def run(self, payload: Any) -> Any:
        os._exit(11)


class StartsChildren(Base):
    """Starts a subprocess, a subprocess in a session of its own and a forked child, all
    sleeping; records their pids; returns."""

    def __init__(self, marker_dir: str, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)

    def run(self, payload: Any) -> Any:
        pids = [
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"]).pid,
            subprocess.Popen(["sleep", "3600"], start_new_session=True).pid,
        ]
        pid = os.fork()
        if pid == 0:
            time.sleep(3600)
            os._exit(0)
        pids.append(pid)
        mark_unique(self.marker_dir, "child", " ".join(map(str, pids)))
        return payload


class TeardownHangs(Base):
    def teardown(self) -> None:
        time.sleep(3600)

    def run(self, payload: Any) -> Any:
        return payload


class LeavesThread(Base):
    """Leaves a non-daemon thread running: interpreter shutdown would wait for it."""

    def run(self, payload: Any) -> Any:
        threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
        return payload


class Marked(Base):
    """Records each attempt; sleeps ``seconds`` on "slow"; returns the payload."""

    def __init__(self, marker_dir: str, seconds: float = 0.0, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)
        self.seconds = seconds

    def run(self, payload: Any) -> Any:
        record_attempt(self.marker_dir, payload)
        if payload == "slow":
            time.sleep(self.seconds)
        return payload


def pids_in(marker_dir: str | os.PathLike, prefix: str) -> list[int]:
    return [
        int(p) for path in Path(marker_dir).glob(f"{prefix}.*") for p in path.read_text().split()
    ]
