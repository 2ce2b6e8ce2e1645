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

import uvicorn

from .service import Service

log = logging.getLogger("batchpool")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self.signal: signal.Signals | None = None  # the first one
        self.hard = False  # a second signal came

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
