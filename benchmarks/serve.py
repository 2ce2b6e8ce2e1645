"""``batchpool serve`` under load, side by side with the server a user would write instead.

    python benchmarks/serve.py                 # ~10 s per cell: concurrency 32 and 64, ab, overload
    python benchmarks/serve.py --seconds 3     # shorter cells (numbers rougher)
    python benchmarks/serve.py --repeat 3      # three rounds, alternating; medians

Both servers run a ~1 ms pure-Python CPU job per request (``workloads.spin``, calibrated here)
on ``--procs`` worker processes, each in a process of its own on 127.0.0.1:

- ``batchpool``: ``batchpool serve benchmarks/serve.py:Spin`` (a waiting ``POST /jobs``);
- ``baseline``: Starlette + uvicorn, ``await loop.run_in_executor(ProcessPoolExecutor, ...)``
  per request (``python benchmarks/serve.py --baseline-server PORT``).

The load generator is Apache Bench (``apt-get install apache2-utils``) when ``ab`` is installed,
else a lean asyncio HTTP/1.1 client of this file (keep-alive; httpx's own pool spent more CPU
per request than the servers did); ``--client`` picks one. Closed loop: ``C`` clients, each sending
its next request when its last is answered. The cells alternate between the two servers.

Then ``ab -n 3000 -c 32`` once against each (failed requests must be 0), and an overload: an
open loop offering ``--overload`` (4) times batchpool's best rate above, for the same time, to a
batchpool server with ``--max-queue 64`` and to the baseline (no queue limit), with the asyncio
client (it times each status apart, from the moment each request was due, and the 429s also
from the moment each was written, without the client's own lateness in sending): 200s and
429s a second and their p99, requests not sent (every connection busy) and not answered 10 s
after the last was sent, the client's own lag (due to sent, p99: on a small machine the load
generator competes for the cores too, and its delays count in the latencies), the server's RSS
over the run (sampled every 0.5 s), and accepted jobs lost (jobs the server's /metrics counts
as submitted minus the 200s received).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workloads import calibrate, spin  # noqa: E402

from batchpool import Task  # noqa: E402
from batchpool.headroom import busy_share  # noqa: E402

JSON_HEADERS = {"content-type": "application/json"}
OPEN_CONNECTIONS = 512  # of the open-loop client
DRAIN_SECONDS = 10.0  # open loop: how long answers are awaited after the last request


class Spin(Task):  # type: ignore[misc,valid-type]
    """The served job: ``spin(loops)``; batchpool serve builds it with no arguments."""

    def run(self, loops: int) -> int:
        return spin(loops)


# -- the baseline server -------------------------------------------------------------------------


def baseline_server(port: int, procs: int) -> None:
    """What one would write by hand: Starlette + uvicorn + run_in_executor on a process pool."""
    from concurrent.futures import ProcessPoolExecutor

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    executor = ProcessPoolExecutor(procs)

    async def post(request: Request) -> JSONResponse:
        loops = await request.json()
        value = await asyncio.get_running_loop().run_in_executor(executor, spin, loops)
        return JSONResponse({"value": value})

    app = Starlette(routes=[Route("/jobs", post, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    executor.shutdown()


# -- servers under test --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One server process in a process group of its own, in this script's session; ``url``
    once it answers. Not in a session of its own: Linux gives each session an autogroup and
    shares the CPU between autogroups as wholes, so the load generator would compete with the
    server's worker processes as an equal whatever their nice values, which no client on
    another machine does."""

    def __init__(self, name: str, procs: int, *, max_queue: int | None = None) -> None:
        self.name = name
        self.port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        if name == "batchpool":
            argv = [sys.executable, "-m", "batchpool.cli", "serve", f"{HERE / 'serve.py'}:Spin"]
            argv += ["--procs", str(procs), "--port", str(self.port), "-q"]
            argv += ["--max-queue", str(max_queue or 1_000_000)]
        else:
            argv = [sys.executable, str(HERE / "serve.py"), "--baseline-server", str(self.port)]
            argv += ["--procs", str(procs)]
        self.proc = subprocess.Popen(argv, env=env, process_group=0, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}")
            try:
                if httpx.post(f"{self.url}/jobs", json=1, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} server did not answer within {timeout:g} s")

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def cpu(self) -> float:
        """CPU seconds of the server's own process (its HTTP loop and, for batchpool, the
        supervisor), not of its workers."""
        import psutil

        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    def submitted(self) -> int | None:
        """Jobs the server accepted, from its /metrics (batchpool only)."""
        if self.name != "batchpool":
            return None
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            if family.name == "batchpool_jobs_submitted":
                return int(sum(s.value for s in family.samples if s.name.endswith("_total")))
        return None

    def close(self) -> None:
        """SIGTERM, then SIGKILL to what is left of its session: the baseline's executor
        workers outlive it (uvicorn re-raises the SIGTERM before the executor shuts down)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


# -- load ----------------------------------------------------------------------------------------


@dataclass
class Load:
    """What one cell measured."""

    server: str
    client: str
    concurrency: int
    seconds: float
    completed: int  # answers with status 200
    rate: float  # 200s per second
    p50_ms: float | None
    p99_ms: float | None
    failed: int = 0  # transport errors, or (ab) its "Failed requests"
    statuses: dict[int, int] = field(default_factory=dict)  # answers by status
    p50_429_ms: float | None = None
    p99_429_ms: float | None = None
    p99_429_wire_ms: float | None = None  # from written to read: without the client's lag
    p99_lag_ms: float | None = None  # open loop: the client's own delay in sending, p99
    rss: list[int] = field(default_factory=list)  # server RSS samples, bytes
    lost: int | None = None
    offered: float = 0.0  # open loop: requests a second sent
    unsent: int = 0  # open loop: due while every connection was busy
    unanswered: int = 0  # open loop: no answer DRAIN_SECONDS after the last was sent
    # open loop, in one core's terms: the server process's CPU / wall, the load generator's
    # (this process), and the whole machine's busy share (of all its cores)
    server_cpu: float | None = None
    client_cpu: float | None = None
    machine_busy: float | None = None
    turn: int = 0


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Connection:
    """One keep-alive HTTP/1.1 connection of the load generator: a request out, the status
    and body in (Content-Length or chunked). Lean on purpose (a Protocol parsing bytes, no
    stream readers): on a 2-core machine the client shares the cores with the server under
    test, and every microsecond it spends is taken from the server and counted in the
    latencies; httpx's pool spends more CPU per request than the servers measured here."""

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.address = (host, port)
        self.request = request
        self.protocol: _Response | None = None

    async def post(self) -> tuple[int, float, float]:
        """(status, when the request was written, when its answer was read)."""
        if self.protocol is None:
            loop = asyncio.get_running_loop()
            _, self.protocol = await loop.create_connection(_Response, *self.address)
        protocol = self.protocol
        sent = time.perf_counter()
        try:
            status, close, read = await protocol.send(self.request)
        except (OSError, EOFError, IndexError, ValueError):
            self.close()
            raise
        if close:
            self.close()
        return status, sent, read

    def close(self) -> None:
        if self.protocol is not None:
            self.protocol.close()
            self.protocol = None


class _Response(asyncio.Protocol):
    """Reads one response at a time off the bytes received: (status, whether it closes, when
    its last byte was read)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bool, float]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bool, float]]:
        assert self.transport is not None
        if self.transport.is_closing():
            raise EOFError("the server closed the connection")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        parsed = _parse(self.buffer)
        if parsed is not None and self.waiter is not None and not self.waiter.done():
            used, status, close = parsed
            del self.buffer[:used]
            self.waiter.set_result((status, close, time.perf_counter()))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(EOFError("the server closed the connection"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _parse(buffer: bytearray) -> tuple[int, int, bool] | None:
    """A whole response at the start of ``buffer``: (bytes it takes, status, closes); None
    while incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    status = int(head.split(None, 2)[1])
    close = b"\r\nconnection: close" in head
    at = end + 4
    if b"\r\ntransfer-encoding: chunked" in head:
        while True:
            line_end = buffer.find(b"\r\n", at)
            if line_end < 0:
                return None
            size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
            at = line_end + 2 + size + 2
            if len(buffer) < at:
                return None
            if size == 0:
                return at, status, close
    found = head.find(b"\r\ncontent-length:")
    length = 0 if found < 0 else int(head[found + 17 :].split(b"\r\n", 1)[0])
    if len(buffer) < at + length:
        return None
    return at + length, status, close


def asyncio_load(
    url: str, body: bytes, seconds: float, *, concurrency: int = 0, rate: float = 0.0
) -> dict[str, Any]:
    """Closed loop (``concurrency`` clients, each sending its next request when its last is
    answered) or open loop (``rate`` requests a second on a fixed schedule, each timed from
    the moment it was due, so a server that falls behind cannot hide it; up to OPEN_CONNECTIONS
    at once, what finds none free is counted ``unsent``). Latencies by status."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    request = (
        f"POST /jobs HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    times: dict[int, list[float]] = defaultdict(list)
    # from sent to read: the server's answer time, without the client's delay in sending
    wire: dict[int, list[float]] = defaultdict(list)
    lags: list[float] = []  # from due to sent: the client's own delay (open loop)
    counts = {"errors": 0, "unsent": 0, "unanswered": 0}

    async def send(connection: Connection, due: float) -> bool:
        try:
            status, sent, read = await connection.post()
        except (OSError, EOFError, IndexError, ValueError):
            counts["errors"] += 1
            return False
        lags.append(sent - due)
        times[status].append(read - due)
        wire[status].append(read - sent)
        return True

    async def closed(stop: float) -> None:
        async def one() -> None:
            connection = Connection(host, int(port), request)
            while time.perf_counter() < stop:
                await send(connection, time.perf_counter())
            connection.close()

        await asyncio.gather(*(one() for _ in range(concurrency)))

    async def open_(stop: float) -> None:
        idle: list[Connection] = []
        opened = 0
        pending: set[asyncio.Task[None]] = set()

        async def fire(connection: Connection, due: float) -> None:
            await send(connection, due)
            idle.append(connection)

        due = time.perf_counter()
        while due < stop:
            ahead = due - time.perf_counter()
            if ahead > 0:
                await asyncio.sleep(ahead)
            if idle:
                connection = idle.pop()
            elif opened < OPEN_CONNECTIONS:
                connection = Connection(host, int(port), request)
                opened += 1
            else:
                counts["unsent"] += 1
                due += 1 / rate
                continue
            task = asyncio.ensure_future(fire(connection, due))
            pending.add(task)
            task.add_done_callback(pending.discard)
            due += 1 / rate
        if pending:
            _, late = await asyncio.wait(pending, timeout=DRAIN_SECONDS)
            counts["unanswered"] = len(late)
            for task in late:
                task.cancel()
        for connection in idle:
            connection.close()

    async def main() -> float:
        began = time.perf_counter()
        await (open_ if rate else closed)(began + seconds)
        return time.perf_counter() - began

    try:
        import uvloop

        elapsed = uvloop.run(main())
    except ImportError:
        elapsed = asyncio.run(main())
    return {"times": times, "wire": wire, "lags": lags, "elapsed": elapsed, **counts}


def run_asyncio(
    server: Server, body: bytes, seconds: float, *, concurrency: int = 0, rate: float = 0.0
) -> Load:
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            samples.append(server.rss())

    sampler = threading.Thread(target=sample, daemon=True)
    before = server.submitted()
    samples.append(server.rss())
    sampler.start()
    shares = CpuShares(server)
    try:
        out = asyncio_load(f"{server.url}/jobs", body, seconds, concurrency=concurrency, rate=rate)
    finally:
        stop.set()
        sampler.join()
    server_cpu, client_cpu, machine_busy = shares.read()
    times, elapsed = out["times"], out["elapsed"]
    ok = times.get(200, [])
    after = server.submitted()
    lost = None if before is None or after is None else (after - before) - len(ok)
    return Load(
        server=server.name,
        client="asyncio",
        concurrency=concurrency,
        seconds=elapsed,
        completed=len(ok),
        rate=len(ok) / elapsed,
        p50_ms=_ms(quantile(ok, 0.5)),
        p99_ms=_ms(quantile(ok, 0.99)),
        failed=out["errors"],
        statuses={status: len(t) for status, t in sorted(times.items())},
        p50_429_ms=_ms(quantile(times.get(429, []), 0.5)),
        p99_429_ms=_ms(quantile(times.get(429, []), 0.99)),
        p99_429_wire_ms=_ms(quantile(out["wire"].get(429, []), 0.99)),
        p99_lag_ms=_ms(quantile(out["lags"], 0.99)) if rate else None,
        rss=samples,
        lost=lost,
        offered=rate,
        unsent=out["unsent"],
        unanswered=out["unanswered"],
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        machine_busy=machine_busy,
    )


class CpuShares:
    """Who had the cores during a cell: on a small machine the generator, the server's loop
    and its workers share them, and a latency tail follows the busiest."""

    def __init__(self, server: Server) -> None:
        import psutil

        self.server = server
        self.wall = time.perf_counter()
        self.server_cpu = server.cpu()
        self.client_cpu = time.process_time()
        self.machine = psutil.cpu_times()

    def read(self) -> tuple[float, float, float]:
        """(server CPU / wall, client CPU / wall, busy share of the whole machine)."""
        import psutil

        wall = time.perf_counter() - self.wall
        busy = busy_share(self.machine, psutil.cpu_times())
        return (
            (self.server.cpu() - self.server_cpu) / wall,
            (time.process_time() - self.client_cpu) / wall,
            busy,
        )


def run_ab(
    server: Server, body: bytes, concurrency: int, *, seconds: float | None, n: int | None
) -> Load:
    """Apache Bench: ``-l`` as the answers' lengths vary (ids, times), which ab would count
    as failures; no keep-alive (ab speaks HTTP/1.0)."""
    with tempfile.TemporaryDirectory() as tmp:
        payload, percentiles = Path(tmp) / "payload.json", Path(tmp) / "percentiles.csv"
        payload.write_bytes(body)
        argv = ["ab", "-q", "-l", "-c", str(concurrency), "-p", str(payload)]
        argv += ["-T", "application/json", "-e", str(percentiles)]
        argv += ["-t", f"{seconds:g}", "-n", "10000000"] if seconds else ["-n", str(n)]
        out = subprocess.run(argv + [f"{server.url}/jobs"], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"ab failed: {out.stderr.strip()}")
        with open(percentiles) as f:
            table = {int(float(row[0])): float(row[1]) for row in list(csv.reader(f))[1:]}

    def number(label: str) -> float:
        found = re.search(rf"^{label}:\s+([\d.]+)", out.stdout, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    complete, non2xx = int(number("Complete requests")), int(number("Non-2xx responses"))
    taken = number("Time taken for tests")
    return Load(
        server=server.name,
        client="ab",
        concurrency=concurrency,
        seconds=taken,
        completed=complete - non2xx,
        rate=(complete - non2xx) / taken,
        p50_ms=table[50],
        p99_ms=table[99],
        failed=int(number("Failed requests")),
        statuses={200: complete - non2xx, 0: non2xx} if non2xx else {200: complete},
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# -- the report ----------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def throughput_table(cells: list[Load]) -> str:
    rows = ["| server | client | concurrency | requests/s | p50 ms | p99 ms | failed |"]
    rows.append("|---|---|---:|---:|---:|---:|---:|")
    for c in cells:
        rows.append(
            f"| {c.server} | {c.client} | {c.concurrency} | {_f(c.rate, 0)} | {_f(c.p50_ms)} "
            f"| {_f(c.p99_ms)} | {c.failed} |"
        )
    return "\n".join(rows)


def medians(cells: list[Load]) -> list[Load]:
    """One row per (server, client, concurrency): the median of each number over the rounds."""
    groups: dict[tuple[str, str, int], list[Load]] = defaultdict(list)
    for c in cells:
        groups[(c.server, c.client, c.concurrency)].append(c)
    rows = []
    for (server, client, concurrency), runs in groups.items():
        rows.append(
            Load(
                server=server,
                client=client,
                concurrency=concurrency,
                seconds=sum(r.seconds for r in runs),
                completed=sum(r.completed for r in runs),
                rate=statistics.median(r.rate for r in runs),
                p50_ms=statistics.median(r.p50_ms or 0.0 for r in runs),
                p99_ms=statistics.median(r.p99_ms or 0.0 for r in runs),
                failed=sum(r.failed for r in runs),
            )
        )
    return rows


def ratios(cells: list[Load]) -> str:
    """batchpool / baseline within each round (the two ran back to back), then the median and
    the range over the rounds."""
    by_round: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    pending: dict[tuple[str, int, int], Load] = {}
    for c in cells:
        key = (c.client, c.concurrency, c.turn)
        other = pending.pop(key, None)
        if other is None:
            pending[key] = c
            continue
        ours, base = (c, other) if c.server == "batchpool" else (other, c)
        if base.rate and base.p99_ms and ours.p99_ms:
            by_round[(c.client, c.concurrency)].append(
                (ours.rate / base.rate, ours.p99_ms / base.p99_ms)
            )
    lines = []
    for (client, concurrency), pairs in by_round.items():
        rate = [r for r, _ in pairs]
        p99 = [p for _, p in pairs]
        lines.append(
            f"- {client}, concurrency {concurrency}: requests/s {statistics.median(rate):.2f}x "
            f"the baseline's ({min(rate):.2f}-{max(rate):.2f}), p99 {statistics.median(p99):.2f}x "
            f"({min(p99):.2f}-{max(p99):.2f}), over {len(pairs)} rounds"
        )
    return "\n".join(lines)


def overload_table(cells: list[Load]) -> str:
    rows = [
        "| server | 200/s | 200 p99 ms | 429/s | 429 p50 ms | 429 p99 ms "
        "| 429 p99 ms written → read | unsent | unanswered "
        "| client lag p99 ms | CPU server / client / machine | RSS MB first / max / last "
        "| accepted lost |"
    ]
    rows.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for c in cells:
        mb = [r / 2**20 for r in c.rss] or [0.0]
        rows.append(
            f"| {c.server} | {_f(c.rate, 0)} | {_f(c.p99_ms)} "
            f"| {_f(c.statuses.get(429, 0) / c.seconds, 0)} | {_f(c.p50_429_ms)} "
            f"| {_f(c.p99_429_ms)} | {_f(c.p99_429_wire_ms)} | {c.unsent} | {c.unanswered} "
            f"| {_f(c.p99_lag_ms)} "
            f"| {_pct(c.server_cpu)} / {_pct(c.client_cpu)} / {_pct(c.machine_busy)} "
            f"| {mb[0]:.0f} / {max(mb):.0f} / {mb[-1]:.0f} | "
            f"{'-' if c.lost is None else c.lost} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per cell (default 10)")
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--concurrency", default="32,64")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the cells (medians)")
    parser.add_argument("--client", choices=["auto", "ab", "asyncio"], default="auto")
    parser.add_argument("--max-queue", type=int, default=64, help="of the overload's server")
    parser.add_argument(
        "--overload", type=float, default=4.0, help="offered rate / batchpool's best rate"
    )
    parser.add_argument("--json", type=Path, help="also write the cells here")
    parser.add_argument("--baseline-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        baseline_server(args.baseline_server, args.procs)
        return
    client = args.client
    if client == "auto":
        client = "ab" if shutil.which("ab") else "asyncio"
    elif client == "ab" and not shutil.which("ab"):
        parser.error("ab is not installed (apt-get install apache2-utils)")
    loops = calibrate().loops(1.0)
    body = json.dumps(loops).encode()
    print(
        f"1 ms job = spin({loops}); {args.procs} workers; client {client}; "
        f"{args.seconds:g} s per cell",
        flush=True,
    )
    cells: list[Load] = []
    servers = {name: Server(name, args.procs) for name in ("batchpool", "baseline")}
    try:
        for turn in range(args.repeat):
            order = ["batchpool", "baseline"][:: 1 if turn % 2 == 0 else -1]
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                for name in order:
                    if client == "ab":
                        cell = run_ab(
                            servers[name], body, concurrency, seconds=args.seconds, n=None
                        )
                    else:
                        cell = run_asyncio(
                            servers[name], body, args.seconds, concurrency=concurrency
                        )
                    cell.turn = turn
                    cells.append(cell)
                    print(throughput_table([cell]).splitlines()[-1], flush=True)
        checks = []
        if shutil.which("ab"):
            for name in ("batchpool", "baseline"):
                checks.append(run_ab(servers[name], body, 32, seconds=None, n=3000))
    finally:
        for server in servers.values():
            server.close()
    capacity = max(c.rate for c in medians(cells) if c.server == "batchpool")
    offered = args.overload * capacity
    overload = []
    for name in ("batchpool", "baseline"):
        server = Server(name, args.procs, max_queue=args.max_queue)
        try:
            overload.append(run_asyncio(server, body, args.seconds, rate=offered))
        finally:
            server.close()
    print(f"\n## Throughput and latency (medians of {args.repeat} rounds)\n")
    print(throughput_table(medians(cells)))
    print()
    print(ratios(cells))
    if checks:
        print("\n## ab -n 3000 -c 32\n")
        print(throughput_table(checks))
    print(
        f"\n## Overload: {offered:,.0f} requests/s offered ({args.overload:g}x batchpool's "
        f"best {capacity:,.0f}/s), batchpool --max-queue {args.max_queue}\n"
    )
    print(overload_table(overload))
    if args.json:
        data = {"cells": cells, "ab_3000": checks, "overload": overload}
        args.json.write_text(
            json.dumps({k: [asdict(c) for c in v] for k, v in data.items()}, indent=2)
        )


if __name__ == "__main__":
    main()
