"""uvicorn, in this process, with the shutdown SPEC section 4 asks for.

uvicorn's own handling of SIGTERM closes the listening socket at once and re-raises the signal
once it is done; a server that drains must keep answering (503 to new jobs, results to polls)
until every accepted job has finished, then exit 0. So the signals are ours: the first one
starts the drain in a thread (the pool finishes what it accepted, the journal records it) and
tells uvicorn to stop once that is done; a second one stops at once (workers killed; with a
journal, a restart runs the jobs that had not finished).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable, Generator
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .service import Service

log = logging.getLogger("batchpool")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self.signal: signal.Signals | None = None  # the first one
        self.hard = False  # a second signal came

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """The pool's supervisor starts on this event loop (hosting.py), then uvicorn."""
        host = self.service.pool._host
        if host is not None:
            host.attach(asyncio.get_running_loop())
        await super().startup(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            yield
        finally:
            for sig in SIGNALS:
                loop.remove_signal_handler(sig)

    def on_signal(self, sig: signal.Signals) -> None:
        if self.signal is None:
            self.signal = sig
            self.service.begin_drain()
            live = len(self.service.live)
            log.warning("%s: finishing %d accepted jobs; again to stop now", sig.name, live)
            self._in_thread(self.service.drain)
        elif not self.hard:
            self.hard = True
            log.warning("%s again: stopping now", sig.name)
            self.force_exit = True
            self._in_thread(self.service.terminate)

    def _in_thread(self, stop: Callable[[], None]) -> None:
        """Run ``stop`` (it blocks) off the loop, then let uvicorn finish."""
        loop = asyncio.get_running_loop()

        def run() -> None:
            try:
                stop()
            finally:
                loop.call_soon_threadsafe(setattr, self, "should_exit", True)

        threading.Thread(target=run, name="batchpool-serve-stop", daemon=True).start()


class Coalescing:
    """A transport whose writes of one loop iteration leave in one send.

    uvicorn writes a response's head and its body separately: two syscalls on the server,
    and two segments for the client to wake up and read. Refusals (429) and lookups are
    answered in one iteration, so joining them halves both; the head of a waiting ``POST``
    still leaves in the iteration that accepted the job. Under the serve benchmark's 4x
    overload this took the load generator from 38% to 29% of a core and let the workers run
    ~50% more of the accepted jobs."""

    __slots__ = ("transport", "loop", "pending", "is_closing", "get_extra_info")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.pending: list[bytes] = []
        self.is_closing = transport.is_closing
        self.get_extra_info = transport.get_extra_info

    def write(self, data: bytes) -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(data)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if pending and not self.transport.is_closing():
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:  # the rest of the transport, as it is
        return getattr(self.transport, name)


class HTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's own HTTP protocol (httptools when installed), writing through Coalescing."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        super().connection_made(cast(asyncio.Transport, Coalescing(transport, loop)))


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a port in use fails here, before any worker starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(False)
    except BaseException:
        sock.close()
        raise
    return sock
