"""I/O-bound work: fetch 200 pages over HTTP under a rate limit, retrying the flaky ones.

No outside network: the source starts a small HTTP server of its own (``http.server``, in a
thread of the supervisor process, on 127.0.0.1 and a port the system picks) and yields the
full URL of each page, so workers started any way (fork, forkserver, spawn) know where to
fetch. The server plays a real site's moods, decided by the page number:

- most pages answer at once with a little HTML;
- every 10th page is slow (0.2 s), as a loaded backend is;
- every 25th page answers "503 Service Unavailable" to its first request: the task raises,
  batchpool retries after a short backoff, and the second request succeeds (a 404 would be
  a ``PermanentError``: retrying cannot help, so it would fail at once).

``Fetch.rate_limit`` bounds the request starts across all workers ("50/s"), retries included;
I/O work like this is where ``--procs MIN:MAX`` pays: workers wait on the network, not on a
CPU. The sink, in the supervisor, tallies the pages and, after the last, writes
``fetch_summary.json`` and prints one line.

    batchpool run pipelines/fetch.py --procs 4
    batchpool run pipelines/fetch.py --procs 2:8 --log-file fetch.log   # scales; logs it
    python pipelines/fetch.py                       # the same run from the Python API

``FETCH_PAGES`` (200) and ``FETCH_RATE`` ("50/s") set the size and the rate, for a quick try.
"""

from __future__ import annotations

import json
import os
import re
import socketserver
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from batchpool import PermanentError, Pipeline, Task

PAGES = int(os.environ.get("FETCH_PAGES", "200"))
RATE = os.environ.get("FETCH_RATE", "50/s")
SUMMARY = "fetch_summary.json"
SLOW_EVERY, SLOW_SECONDS = 10, 0.2
FLAKY_EVERY = 25


class Site(BaseHTTPRequestHandler):
    """GET /page/N: page N, in its mood (see the module docstring)."""

    requests: dict[int, int] = {}  # page -> requests so far (the flaky ones fail the first)
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        match = re.fullmatch(r"/page/(\d+)", self.path)
        if match is None:
            self.send_error(404, "no such page")
            return
        page = int(match.group(1))
        with self.lock:
            self.requests[page] = seen = self.requests.get(page, 0) + 1
        if page % FLAKY_EVERY == FLAKY_EVERY - 1 and seen == 1:
            self.send_error(503, "try again later")
            return
        if page % SLOW_EVERY == SLOW_EVERY - 1:
            time.sleep(SLOW_SECONDS)
        body = f"<html><title>Page {page}</title><p>{'lorem ipsum ' * page}</p></html>"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the run's own log says what failed


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # socketserver's 5 drops connections of a busy moment

    def server_bind(self) -> None:
        # HTTPServer's own looks its host up (socket.getfqdn) while holding the C library's
        # resolver lock; a worker forked (--start-method fork) in that moment inherits the lock
        # held and hangs in its first connect. Nothing here needs the name.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


def serve() -> ThreadingHTTPServer:
    """The site, answering in a daemon thread of this process until ``shutdown()``."""
    server = _Server(("127.0.0.1", 0), Site)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="fetch-site", daemon=True).start()
    return server


class Pages:
    """The source (called at run, in the supervisor): starts the site and yields its URLs;
    the sink stops the site once every page is in."""

    server: ThreadingHTTPServer | None = None

    def __call__(self) -> Iterator[str]:
        self.server = server = serve()
        host, port = server.server_address[:2]
        return (f"http://{host!s}:{port}/page/{n}" for n in range(PAGES))

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class Fetch(Task):
    retries = 2
    backoff = 0.05
    timeout = 10.0
    rate_limit = RATE  # request starts per second across all workers, retries included

    def run(self, url: str) -> dict[str, object]:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                html = response.read().decode()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise PermanentError(f"{url}: 404 not found") from None
            raise ConnectionError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        title = re.search(r"<title>(.*?)</title>", html)
        return {"url": url, "bytes": len(html), "title": title.group(1) if title else None}


class Summary:
    """The sink: counts pages, bytes and retried fetches; writes the summary after the last."""

    def __init__(self, pages: Pages) -> None:
        self.pages = pages
        self.ok = 0
        self.bytes = 0
        self.retried = 0
        self.failed: list[int] = []

    def __call__(self, result) -> None:
        if result.ok:
            self.ok += 1
            self.bytes += result.value["bytes"]
        else:
            self.failed.append(result.index)
        self.retried += result.attempts > 1
        if self.ok + len(self.failed) < PAGES:
            return
        self.pages.stop()
        summary = {
            "pages": PAGES,
            "ok": self.ok,
            "failed": sorted(self.failed),
            "retried": self.retried,
            "bytes": self.bytes,
        }
        with open(SUMMARY, "w", encoding="utf-8") as out:
            json.dump(summary, out, indent=2)
        failed = ", ".join(f"/page/{n}" for n in sorted(self.failed)) or "none"
        print(
            f"fetched {self.ok} of {PAGES} pages ({self.bytes:,} bytes), {self.retried} after "
            f"a retry; failed for good: {failed}"
        )


pages = Pages()
pipeline = Pipeline(pages, Fetch(), name="fetch", sink=Summary(pages), total=PAGES)

if __name__ == "__main__":  # required: workers import this file again to find Fetch
    report = pipeline.run(procs=(2, 8))
    sys.exit(1 if report.failed or report.error else 0)
