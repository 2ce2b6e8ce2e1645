"""The contenders: batchpool and its peers, each behind the same small session interface.

A session is one pool opened for one measurement. Every adapter uses the library the way its
documentation suggests for a batch of independent calls, with the start method the run asked
for wherever the library lets the caller choose, and says which method it really used.
Libraries are imported lazily, inside the harness process that runs that contender only.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import multiprocessing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from workloads import CallTask

TaskFn = Callable[[Any], int]


class Session(Protocol):
    """One open pool. `run` is the only timed call; `values` turns its result into plain ints."""

    def run(self, payloads: Sequence[Any]) -> Any: ...
    def values(self, raw: Any) -> list[int]: ...
    def close(self) -> None: ...
    def terminate(self) -> None: ...


def tuned_chunksize(n: int, procs: int) -> int:
    """The usual hand-tuned chunk size, ceil(n / (4 * procs)): four chunks per worker."""
    return max(1, math.ceil(n / (4 * procs)))


class PlainSession:
    """Shared behaviour of the peers, whose results already are the plain return values."""

    def values(self, raw: Any) -> list[int]:
        return list(raw)


class MpPoolSession(PlainSession):
    """multiprocessing.Pool with imap_unordered (chunksize 1 or tuned) or map (automatic)."""

    def __init__(self, fn: TaskFn, procs: int, start_method: str, mode: str) -> None:
        self.fn, self.procs, self.mode = fn, procs, mode
        self.pool = multiprocessing.get_context(start_method).Pool(procs)

    def run(self, payloads: Sequence[Any]) -> list[int]:
        if self.mode == "map":
            return self.pool.map(self.fn, payloads)
        chunksize = 1 if self.mode == "c1" else tuned_chunksize(len(payloads), self.procs)
        return list(self.pool.imap_unordered(self.fn, payloads, chunksize))

    def close(self) -> None:
        self.pool.close()
        self.pool.join()

    def terminate(self) -> None:
        self.pool.terminate()
        self.pool.join()


class ExecutorSession(PlainSession):
    """concurrent.futures.ProcessPoolExecutor: map (chunksize 1 or tuned) or one submit per job."""

    def __init__(self, fn: TaskFn, procs: int, start_method: str, mode: str) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.fn, self.procs, self.mode = fn, procs, mode
        context = multiprocessing.get_context(start_method)
        self.executor = ProcessPoolExecutor(procs, mp_context=context)

    def run(self, payloads: Sequence[Any]) -> list[int]:
        if self.mode == "submit":
            futures = [self.executor.submit(self.fn, p) for p in payloads]
            return [f.result() for f in futures]
        chunksize = 1 if self.mode == "c1" else tuned_chunksize(len(payloads), self.procs)
        return list(self.executor.map(self.fn, payloads, chunksize=chunksize))

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    def terminate(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        kill = getattr(self.executor, "terminate_workers", None)  # Python 3.14+
        if kill is not None:
            kill()


def loky_context(start_method: str) -> str | None:
    """loky refuses "fork" for its reusable executor; fall back to its own default then."""
    return None if start_method == "fork" else start_method


class LokySession(PlainSession):
    """loky's reusable executor, map with its default chunksize (1)."""

    def __init__(self, fn: TaskFn, procs: int, start_method: str) -> None:
        import loky

        self.fn = fn
        self.executor = loky.get_reusable_executor(
            max_workers=procs, context=loky_context(start_method)
        )

    def run(self, payloads: Sequence[Any]) -> list[int]:
        return list(self.executor.map(self.fn, payloads))

    def close(self) -> None:
        # Reusable executors outlive a call by design; kill it so the next cell starts clean.
        self.executor.shutdown(wait=True, kill_workers=True)

    def terminate(self) -> None:
        self.executor.shutdown(wait=False, kill_workers=True)


class JoblibSession(PlainSession):
    """joblib.Parallel(n_jobs=procs): default loky backend, automatic batch size."""

    def __init__(self, fn: TaskFn, procs: int, start_method: str) -> None:
        import joblib

        self.fn, self.delayed = fn, joblib.delayed
        self.parallel = joblib.Parallel(n_jobs=procs)

    def run(self, payloads: Sequence[Any]) -> list[int]:
        return self.parallel(self.delayed(self.fn)(p) for p in payloads)

    def close(self) -> None:
        self._shutdown(wait=True)

    def terminate(self) -> None:
        self._shutdown(wait=False)

    @staticmethod
    def _shutdown(wait: bool) -> None:
        # joblib keeps loky's reusable executor alive between calls; asking for one with other
        # settings retires joblib's, and killing that fresh (still empty) one leaves nothing.
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=wait, kill_workers=True)


class PebbleSession(PlainSession):
    """pebble.ProcessPool.map with the tuned chunk size (pebble's default is 1)."""

    def __init__(self, fn: TaskFn, procs: int, start_method: str) -> None:
        import pebble

        self.fn, self.procs = fn, procs
        context = multiprocessing.get_context(start_method)
        self.pool = pebble.ProcessPool(max_workers=procs, context=context)

    def run(self, payloads: Sequence[Any]) -> list[int]:
        chunksize = tuned_chunksize(len(payloads), self.procs)
        return list(self.pool.map(self.fn, payloads, chunksize=chunksize).result())

    def close(self) -> None:
        self.pool.close()
        self.pool.join()

    def terminate(self) -> None:
        self.pool.stop()
        self.pool.join()


class MpireSession(PlainSession):
    """mpire.WorkerPool.map with its default chunking; keep_alive so the warm-up's workers stay."""

    def __init__(self, fn: TaskFn, procs: int, start_method: str) -> None:
        import mpire

        self.fn = fn
        self.pool = mpire.WorkerPool(n_jobs=procs, start_method=start_method, keep_alive=True)

    def run(self, payloads: Sequence[Any]) -> list[int]:
        return self.pool.map(self.fn, payloads)

    def close(self) -> None:
        self.pool.stop_and_join()

    def terminate(self) -> None:
        self.pool.terminate()


class BatchpoolSession:
    """batchpool.Pool with its reliability features on (retries=3, timeout=60)."""

    def __init__(self, fn: TaskFn, procs: int, start_method: str, mode: str) -> None:
        import batchpool

        self.mode = mode
        self.pool = batchpool.Pool(
            CallTask(fn), procs, start_method=start_method, retries=3, timeout=60
        )

    def run(self, payloads: Sequence[Any]) -> list[Any]:
        if self.mode == "map":
            return self.pool.map(payloads)
        return list(self.pool.imap(payloads, ordered=False))

    def values(self, raw: list[Any]) -> list[int]:
        failed = [r for r in raw if not r.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} jobs failed; first: {failed[0].error}")
        return [r.value for r in raw]

    def stream(self, source: Iterable[Any]) -> tuple[int, int]:
        """Consume imap over a lazy source, keeping only a count and a checksum."""
        count = total = 0
        for result in self.pool.imap(source, ordered=False):
            if not result.ok:
                raise RuntimeError(f"job {result.index} failed: {result.error}")
            count += 1
            total += result.value
        return count, total

    def close(self) -> None:
        self.pool.close()

    def terminate(self) -> None:
        self.pool.terminate()


@dataclass(frozen=True)
class Contender:
    """A named way of running a batch, with what it needs to be importable.

    `distribution` names the package whose version is reported ("" for the standard library);
    `method` says which start method the library really used for a requested one.
    """

    name: str
    alias: str
    module: str
    distribution: str
    opener: Callable[[TaskFn, int, str], Session]
    method: Callable[[str], str] = lambda requested: requested
    streams: bool = False

    @property
    def is_batchpool(self) -> bool:
        return self.module == "batchpool"

    def unavailable(self) -> str | None:
        """Why this contender cannot run here, or None. Imports the library as a side effect."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            return f"{self.module} is not installed ({exc})"
        if self.is_batchpool and not hasattr(module, "Pool"):
            return "batchpool.Pool does not exist yet"
        return None

    def version(self) -> str:
        if not self.distribution:
            return "stdlib"
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"


def _mp(mode: str) -> Callable[[TaskFn, int, str], Session]:
    return lambda fn, procs, sm: MpPoolSession(fn, procs, sm, mode)


def _ppe(mode: str) -> Callable[[TaskFn, int, str], Session]:
    return lambda fn, procs, sm: ExecutorSession(fn, procs, sm, mode)


def _bp(mode: str) -> Callable[[TaskFn, int, str], Session]:
    return lambda fn, procs, sm: BatchpoolSession(fn, procs, sm, mode)


def _loky_method(requested: str) -> str:
    return "loky (fork refused)" if loky_context(requested) is None else requested


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("batchpool.map", "bp.map", "batchpool", "batchpool", _bp("map")),
        Contender("batchpool.imap", "bp.imap", "batchpool", "batchpool", _bp("imap"), streams=True),
        Contender("mp.imap_unordered(c=1)", "mp.c1", "multiprocessing", "", _mp("c1")),
        Contender("mp.imap_unordered(c=tuned)", "mp.tuned", "multiprocessing", "", _mp("tuned")),
        Contender("mp.map", "mp.map", "multiprocessing", "", _mp("map")),
        Contender("ppe.map(c=1)", "ppe.c1", "concurrent.futures", "", _ppe("c1")),
        Contender("ppe.map(c=tuned)", "ppe.tuned", "concurrent.futures", "", _ppe("tuned")),
        Contender("ppe.submit", "ppe.sub", "concurrent.futures", "", _ppe("submit")),
        Contender("loky.map", "loky", "loky", "loky", LokySession, method=_loky_method),
        Contender(
            "joblib.Parallel",
            "joblib",
            "joblib",
            "joblib",
            JoblibSession,
            method=lambda requested: "loky (joblib default)",
        ),
        Contender("pebble.map(c=tuned)", "pebble", "pebble", "pebble", PebbleSession),
        Contender("mpire.map", "mpire", "mpire", "mpire", MpireSession),
    )
}

REFERENCES = ("batchpool.map", "batchpool.imap")  # ratios use the first of these present


def resolve(names: str | None) -> list[Contender]:
    """Contenders by full name or alias (comma-separated), in the canonical order."""
    if not names:
        return list(CONTENDERS.values())
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    known = {c.name for c in CONTENDERS.values()} | {c.alias for c in CONTENDERS.values()}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"unknown contender(s): {', '.join(unknown)}; known: {sorted(known)}")
    return [c for c in CONTENDERS.values() if c.name in wanted or c.alias in wanted]
