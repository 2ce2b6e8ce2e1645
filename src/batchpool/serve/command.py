"""``batchpool serve``, once the CLI has checked its options and loaded its target: the journal,
the socket, the pool, the service and uvicorn, opened in the order that refuses a bad setting
before anything starts, and closed so that no worker outlives the command."""

from __future__ import annotations

import gc
import logging
import os
import select
import socket
import sys
import time
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import uvicorn

from .. import logs
from ..pool import Pool
from ..results import Metrics
from ..sizing import Tuning
from .app import build_app
from .metrics import PoolCollector, registry
from .server import HTTPProtocol, Server, bind
from .service import Service
from .store import ServeJournal
from .target import Target

log = logging.getLogger("batchpool")

# Every job of a server is awaited by someone: latency over throughput. Messages of ~10 ms of
# work keep most of the queue in the supervisor, where the next free worker takes from it (as
# ProcessPoolExecutor's shared queue does), rather than in a mailbox behind a worker that the
# kernel happens to slow down; results leave a worker within 5 ms; and the workers yield the
# CPU to the HTTP loop and the supervisor, so answers (refusals above all) stay prompt when the
# workers saturate every core. benchmarks/serve.py measured each of the three.
# Allocations between two collections of the cyclic GC's youngest generation (Python's default:
# 700). A job's objects (its future, block, result and the request's) live until it is
# answered, tens of ms; at 700 a collection came every ~25 ms under load and carried nearly all
# of them into the older generations, whose collections then walked them again. Every ~10,000,
# most have been freed by then: under a 4x overload the GC's time fell from ~150-270 ms to
# ~15-25 ms per 10 s, and its longest pauses (which every request waits out) with it.
GC_YOUNG = 10_000
SERVING = Tuning(batch_seconds=0.01, flush_every=0.005, nice=10, lazy_submits=True)


class CannotListen(Exception):
    """The address is taken, or not this machine's: one line for the CLI."""


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    procs: int | tuple[int, int] | None = None  # N, or (MIN, MAX) to scale
    max_queue: int = 1000
    max_body: int = 1024**2
    journal: str | PathLike[str] | None = None
    verbose: int = 0
    quiet: bool = False
    pool_options: dict[str, Any] = field(default_factory=dict)


def serve(target: Target, settings: Settings) -> int:
    """Serve until a signal; the exit code (0 after a drain). Raises JournalError, CannotListen
    or ValueError/TypeError (pool settings) before serving anything."""
    started = time.monotonic()
    journal, sock, pool = _open(target, settings)
    service = Service(pool, max_queue=settings.max_queue, journal=journal)
    server: Server | None = None
    try:
        resumed = service.resume()
        collector = PoolCollector(target.name, [type(s).__name__ for s in target.stages])
        collector.snapshot = pool.metrics
        app = build_app(service, registry(collector), settings.max_body)
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=settings.verbose >= 2,
            lifespan="off",
            timeout_graceful_shutdown=None,
            server_header=False,
            http=HTTPProtocol,
        )
        _route_uvicorn_logs()
        server = Server(config, service)
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        _announce(target, settings, pool, url, journal, resumed)
        # Out of the cyclic GC's sight from now on: what start-up made (modules, the app, the
        # pool) lives as long as the server, and each full collection would walk it again.
        gc.freeze()
        gc.set_threshold(GC_YOUNG, 10, 10)
        server.run(sockets=[sock])
    finally:
        sock.close()
        if pool._host is not None:  # the event loop has ended: a thread finishes the rest
            pool._host.detach()
        if server is None or server.signal is None or server.hard:
            service.terminate()  # no drain asked for (or cut short): stop now
        else:
            service.drain()  # done already, unless uvicorn stopped on its own: a no-op then
    how = "" if server.signal is None else f"; stopped by {server.signal.name}"
    if server.hard:
        how += " twice, at once"
    _log_end(target, pool.metrics(), time.monotonic() - started, how)
    if server.hard:
        assert server.signal is not None
        return 128 + int(server.signal)
    return 0 if server.started else 1


def _open(target: Target, settings: Settings) -> tuple[ServeJournal | None, socket.socket, Pool]:
    """The journal, the listening socket, the pool: each refusal closes what was opened."""
    journal = ServeJournal(settings.journal, target.name) if settings.journal else None
    try:
        try:
            sock = bind(settings.host, settings.port)
        except OSError as exc:
            where = f"{settings.host}:{settings.port}"
            raise CannotListen(f"cannot listen on {where}: {exc.strerror or exc}") from None
        try:
            pool = Pool._for_stages(
                target.stages,
                settings.procs,
                preload=target.preload,
                tuning=SERVING,
                hosted=hasattr(select, "epoll"),  # else in a thread of its own
                **settings.pool_options,
            )
        except BaseException:
            sock.close()
            raise
    except BaseException:
        if journal is not None:
            journal.close()
        raise
    return journal, sock, pool


def _announce(
    target: Target,
    settings: Settings,
    pool: Pool,
    url: str,
    journal: ServeJournal | None,
    resumed: int,
) -> None:
    """Where it listens, on the terminal (unless -q: the tests read the port there) and, with
    its settings, in the log (--log-file)."""
    procs = settings.procs or pool.procs
    if isinstance(procs, tuple):
        workers = f"{procs[0]} to {procs[1]} workers"
    else:
        workers = f"{procs} worker{'s' if procs != 1 else ''}"
    lines = [f"serving {target.name} with {workers} on {url}"]
    if journal is not None:
        lines.append(f"journal {journal.path}: {resumed} accepted jobs resumed")
    if not settings.quiet:
        for line in lines:
            print(f"batchpool: {line}", file=sys.stderr, flush=True)
    where = "none" if journal is None else f"{journal.path}, {resumed} accepted jobs resumed"
    log.info(
        "serve %s: started in pid %d on %s; %s; max queue %d; journal %s",
        target.name,
        os.getpid(),
        url,
        pool._describe(),
        settings.max_queue,
        where,
    )


def _log_end(target: Target, m: Metrics, elapsed: float, how: str) -> None:
    log.info(
        "serve %s: ended after %.2f s: %d jobs accepted, %d ok, %d failed, %d cancelled; %s%s",
        target.name,
        elapsed,
        m.submitted,
        m.succeeded,
        m.failed,
        m.cancelled,
        logs.incidents(m),
        how,
    )


def _route_uvicorn_logs() -> None:
    """uvicorn's lines (errors; with -vv each request) through batchpool's handlers, each
    keeping its own level (the log file takes INFO whatever the terminal's)."""
    logger = logging.getLogger("uvicorn")
    logger.handlers = list(logging.getLogger("batchpool").handlers)
    logger.propagate = False
    logger.setLevel(logging.getLogger("batchpool").level)
