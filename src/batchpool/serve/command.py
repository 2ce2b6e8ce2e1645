"""``batchpool serve``, once the CLI has checked its options and loaded its target: the journal,
the socket, the pool, the service and uvicorn, opened in the order that refuses a bad setting
before anything starts, and closed so that no worker outlives the command."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import uvicorn

from ..pool import Pool
from .app import build_app
from .metrics import PoolCollector, registry
from .server import Server, bind
from .service import Service
from .store import ServeJournal
from .target import Target


class CannotListen(Exception):
    """The address is taken, or not this machine's: one line for the CLI."""


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    procs: int | None = None
    max_queue: int = 1000
    max_body: int = 1024**2
    journal: str | PathLike[str] | None = None
    verbose: int = 0
    quiet: bool = False
    pool_options: dict[str, Any] = field(default_factory=dict)


def serve(target: Target, settings: Settings) -> int:
    """Serve until a signal; the exit code (0 after a drain). Raises JournalError, OSError
    (the socket) or ValueError/TypeError (pool settings) before serving anything."""
    journal = ServeJournal(settings.journal, target.name) if settings.journal else None
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        if journal is not None:
            journal.close()
        where = f"{settings.host}:{settings.port}"
        raise CannotListen(f"cannot listen on {where}: {exc.strerror or exc}") from None
    except BaseException:
        if journal is not None:
            journal.close()
        raise
    try:
        pool = Pool._for_stages(
            target.stages, settings.procs, preload=target.preload, **settings.pool_options
        )
    except BaseException:
        sock.close()
        if journal is not None:
            journal.close()
        raise
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
        )
        _route_uvicorn_logs(settings.verbose, settings.quiet)
        server = Server(config, service)
        host, port = sock.getsockname()[:2]
        if not settings.quiet:
            _announce(target, pool.procs, host, port, journal, resumed)
        server.run(sockets=[sock])
    finally:
        sock.close()
        if server is None or server.signal is None or server.hard:
            service.terminate()  # no drain asked for (or cut short): stop now
        else:
            service.drain()  # done already, unless uvicorn stopped on its own: a no-op then
    if server.hard:
        assert server.signal is not None
        return 128 + int(server.signal)
    return 0 if server.started else 1


def _announce(
    target: Target, procs: int, host: str, port: int, journal: ServeJournal | None, resumed: int
) -> None:
    where = f"[{host}]" if ":" in host else host
    workers = f"{procs} worker{'s' if procs != 1 else ''}"
    lines = [f"serving {target.name} with {workers} on http://{where}:{port}"]
    if journal is not None:
        lines.append(f"journal {journal.path}: {resumed} accepted jobs resumed")
    for line in lines:
        print(f"batchpool: {line}", file=sys.stderr, flush=True)


def _route_uvicorn_logs(verbose: int, quiet: bool) -> None:
    """uvicorn's lines (errors; with -vv each request) through batchpool's handler."""
    logger = logging.getLogger("uvicorn")
    logger.handlers = list(logging.getLogger("batchpool").handlers)
    logger.propagate = False
    logger.setLevel(logging.ERROR if quiet else logging.INFO if verbose >= 2 else logging.WARNING)
