"""``batchpool serve`` over real HTTP (SPEC section 4) and the Prometheus metrics (section 5).

Each test starts the real command in a session of its own, listening on 127.0.0.1 on a port the
kernel picks (its first line names it), talks to it with httpx or a raw socket, and ends it with
SIGTERM, checking that it exits 0 with no process of its session left.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import (
    CHILD_DEADLINE,
    TESTS_DIR,
    Child,
    bp,
    environ,
    group_alive,
    one_line,
    read_line,
    read_lines,
    start,
    wait_for,
    write,
)
from hypothesis import given
from hypothesis import strategies as st

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from batchpool import Pool  # noqa: E402
from batchpool.journal import JournalWriter  # noqa: E402
from batchpool.results import Metrics, StageMetrics  # noqa: E402
from batchpool.serve.final import Final  # noqa: E402
from batchpool.serve.metrics import PoolCollector, registry, stage_labels  # noqa: E402
from batchpool.serve.service import Full, Service  # noqa: E402

SERVE_TASKS = TESTS_DIR / "serve_tasks.py"
RESULT_KEYS = {"id", "ok", "value", "error", "attempts", "elapsed"}
STARTED = 30.0  # seconds a server gets to start listening


class Served:
    """A running ``batchpool serve`` and a client of it."""

    def __init__(self, proc: Child, url: str) -> None:
        self.proc = proc
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=CHILD_DEADLINE)
        self.output = ""

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)

    def post(self, payload: Any, **params: Any) -> Any:
        return self.client.post("/jobs", json=payload, params=params)

    def get(self, id: int) -> Any:
        return self.client.get(f"/jobs/{id}")

    def final(self, id: int, timeout: float = 20.0) -> dict[str, Any]:
        """Poll until the job's result is in."""

        def answered() -> Any:
            r = self.get(id)
            assert r.status_code in (200, 202), r.text
            return r.json() if r.status_code == 200 else None

        return wait_for(answered, timeout, f"the result of job {id}", interval=0.05)  # type: ignore[no-any-return]

    def metrics(self) -> dict[str, Any]:
        return families(self.client.get("/metrics").text)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = CHILD_DEADLINE) -> int:
        """Signal it, wait for its end; its exit code (its output in ``output``)."""
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = CHILD_DEADLINE) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit within {timeout:g} s") from None
        self.output += self.proc.stdout.read()  # type: ignore[union-attr]
        self.client.close()
        wait_for(lambda: not group_alive(self.proc.pid), 10, "the server's workers to exit")
        return code


@contextmanager
def serving(
    cwd: Path, target: str = "Work", *options: Any, procs: int = 1, env: Any = None
) -> Iterator[Served]:
    """``batchpool serve serve_tasks.py:TARGET`` on 127.0.0.1 and a free port. A test ends it
    (``stop``); one that fails is killed, its whole session."""
    proc = start(
        "serve",
        f"{SERVE_TASKS}:{target}",
        "--port",
        0,
        "--procs",
        procs,
        *options,
        cwd=cwd,
        env=env,
        stderr=subprocess.STDOUT,
    )
    with proc:
        line = read_line(proc, STARTED)
        found = re.search(r"http://([\d.]+:\d+)", line)
        assert found, line
        server = Served(proc, f"http://{found.group(1)}")
        try:
            yield server
        finally:
            server.client.close()


def families(text: str) -> dict[str, Any]:
    """Prometheus text, parsed by prometheus_client's own parser: name -> family."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(family: Any, suffix: str = "", **labels: str) -> float:
    """The one sample of ``family`` (name + ``suffix``) with these labels."""
    found = [
        s.value
        for s in family.samples
        if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (family, labels)
    return found[0]  # type: ignore[no-any-return]


# -- the table of SPEC section 4 ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_post_waits_and_answers_the_result(tmp_path: Path) -> None:
    with serving(tmp_path, procs=2) as s:
        wait_for(lambda: s.client.get("/healthz").json()["workers"] == 2, 20, "two workers")
        health = s.client.get("/healthz")
        assert health.status_code == 200
        assert health.json() == {"workers": 2, "queued": 0, "in_flight": 0}
        r = s.post(7)
        assert r.status_code == 200
        body = r.json()
        assert set(body) == RESULT_KEYS
        assert body["ok"] is True and body["value"] == 49 and body["error"] is None
        assert body["attempts"] == 1 and body["elapsed"] >= 0
        assert r.headers["location"] == f"/jobs/{body['id']}"
        failed = s.post({"n": 3, "fail": True})
        assert failed.status_code == 200  # a failed job is an answer, not an HTTP error
        error = failed.json()["error"]
        assert failed.json()["ok"] is False and failed.json()["value"] is None
        assert (error["kind"], error["type"]) == ("error", "PermanentError")
        assert error["message"] == "payload 3 refused"
        assert s.get(body["id"]).json() == body  # polled later: the same answer
        assert s.stop() == 0


@pytest.mark.timeout(60)
def test_the_workers_of_a_server_run_at_a_lower_cpu_priority(tmp_path: Path) -> None:
    with serving(tmp_path, procs=2) as s:
        own = psutil.Process(s.proc.pid).nice()
        niceness = {s.post({"nice": True}).json()["value"] for _ in range(4)}
        assert niceness == {min(own + 10, 19)}
        assert s.stop() == 0


@pytest.mark.timeout(60)
def test_wait_0_answers_202_and_the_job_is_polled(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with serving(tmp_path) as s:  # one worker
        r = s.post({"n": 1, "sleep": 1.0, "runs": str(runs)}, wait=0)
        assert r.status_code == 202
        first = r.json()["id"]
        assert r.json() == {"id": first} and r.headers["location"] == f"/jobs/{first}"
        later = [s.post({"n": n}, wait=0).json()["id"] for n in (2, 3, 4)]
        wait_for(lambda: read_lines(runs) == ["1"], 10, "the first job to start")
        assert s.get(first).status_code == 202
        assert s.get(first).json() == {"id": first, "state": "running"}
        # A worker holds one job besides the one it runs (until jobs are timed): the last waits.
        assert s.get(later[-1]).json() == {"id": later[-1], "state": "queued"}
        assert s.final(first)["value"] == 1
        assert [s.final(id)["value"] for id in later] == [2, 3, 4]
        missing = s.get(later[-1] + 100)
        assert missing.status_code == 404 and "error" in missing.json()
        assert s.stop() == 0


@pytest.mark.timeout(60)
def test_a_job_waiting_for_its_retry_is_retrying_and_can_be_cancelled(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cut, kept = str(tmp_path / "cut"), str(tmp_path / "kept")
    with serving(tmp_path, "Flaky", procs=2) as s:
        ids = [s.post({"flag": f, "runs": str(runs)}, wait=0).json()["id"] for f in (cut, kept)]

        def retrying() -> bool:  # both first attempts failed: their retries are a second away
            return all(s.get(id).json().get("state") == "retrying" for id in ids)

        wait_for(retrying, 10, "state retrying")
        assert len(read_lines(runs)) == 2
        r = s.client.delete(f"/jobs/{ids[0]}")  # SPEC 3: cancellable while waiting for a retry
        assert r.status_code == 200
        cancelled = r.json()
        assert cancelled["error"]["kind"] == "cancelled" and cancelled["attempts"] == 1
        result = s.final(ids[1])  # its retry was due after the cancelled one's
        assert result["ok"] and result["value"] == "second attempt" and result["attempts"] == 2
        assert sorted(read_lines(runs)) == sorted([cut, kept, kept])  # no second attempt of cut
        assert s.get(ids[0]).json() == cancelled
        assert s.stop() == 0


@pytest.mark.timeout(60)
def test_delete_cancels_only_a_job_not_started(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with serving(tmp_path) as s:
        running = s.post({"n": 1, "sleep": 1.0, "runs": str(runs)}, wait=0).json()["id"]
        ids = [s.post({"n": n, "runs": str(runs)}, wait=0).json()["id"] for n in (2, 3, 4)]
        wait_for(lambda: read_lines(runs) == ["1"], 10, "the first job to start")
        queued = ids[-1]
        r = s.client.delete(f"/jobs/{queued}")
        assert r.status_code == 200
        cancelled = r.json()
        assert set(cancelled) == RESULT_KEYS and cancelled["ok"] is False
        assert cancelled["error"]["kind"] == "cancelled" and cancelled["attempts"] == 0
        assert cancelled["error"]["message"] == "cancelled by DELETE before it started"
        assert s.get(queued).json() == cancelled  # final
        again = s.client.delete(f"/jobs/{queued}")
        assert again.status_code == 409 and again.json()["state"] == "final"
        busy = s.client.delete(f"/jobs/{running}")
        assert busy.status_code == 409 and busy.json()["state"] == "running"
        assert s.client.delete("/jobs/999").status_code == 404
        assert s.final(running)["ok"]
        assert [s.final(id)["ok"] for id in ids[:-1]] == [True, True]
        assert sorted(read_lines(runs)) == ["1", "2", "3"]  # the cancelled job never ran
        assert s.stop() == 0


@pytest.mark.timeout(60)
def test_priority_puts_a_job_ahead_of_those_queued(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with serving(tmp_path) as s:  # one worker
        s.post({"n": 1, "sleep": 0.5, "runs": str(runs)}, wait=0)
        wait_for(lambda: read_lines(runs) == ["1"], 10, "the first job to start")
        low = [s.post({"n": n, "runs": str(runs)}, wait=0).json()["id"] for n in (2, 3, 4)]
        high = s.post({"n": 10, "runs": str(runs)}, wait=0, priority=10).json()["id"]
        assert s.final(high)["value"] == 10
        for id in low:
            s.final(id)
        # It waited for the running attempt only (SPEC 3: prefetched jobs are taken back).
        assert read_lines(runs)[:2] == ["1", "10"]
        assert sorted(read_lines(runs)[2:]) == ["2", "3", "4"]
        assert s.stop() == 0


@pytest.mark.timeout(60)
def test_rate_limit_spaces_the_starts(tmp_path: Path) -> None:
    with serving(tmp_path, "Work", "--rate-limit", "5/s", procs=2) as s:
        started = time.monotonic()
        ids = [s.post(n, wait=0).json()["id"] for n in range(6)]
        assert [s.final(id)["value"] for id in ids] == [n * n for n in range(6)]
        # 6 starts at 5/s: at most 5 * T + 1 in any T seconds, so the last is >= 1 s after the first
        assert time.monotonic() - started >= 0.95
        assert s.stop() == 0


@pytest.mark.timeout(60)
def test_a_scaling_pool_and_the_log_file(tmp_path: Path) -> None:
    """--procs MIN:MAX and --log-file, with -q: nothing on the terminal, every line in the file
    (start with settings, the failure, the signal, the end with counts)."""
    log = tmp_path / "serve.log"
    args = ["serve", f"{SERVE_TASKS}:Work", "--port", 0, "--procs", "1:2", "-q"]
    with start(*args, "--log-file", log, cwd=tmp_path, stderr=subprocess.STDOUT) as proc:
        started = wait_for(
            lambda: (
                re.search(r"started in pid \d+ on (http://\S+); procs 1:2", log.read_text())
                if log.exists()
                else None
            ),
            STARTED,
            "the start line",
        )
        url = started.group(1)
        assert httpx.post(f"{url}/jobs", json=3, timeout=30).json()["value"] == 9
        assert not httpx.post(f"{url}/jobs", json={"n": 1, "fail": True}, timeout=30).json()["ok"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=CHILD_DEADLINE) == 0
        assert proc.stdout.read() == ""  # type: ignore[union-attr]
    text = log.read_text()
    assert "failed for good (PermanentError: payload 1 refused)" in text
    assert "SIGTERM: finishing 0 accepted jobs" in text
    end = re.search(r"serve Work: ended after [\d.]+ s: 2 jobs accepted, 1 ok, 1 failed", text)
    assert end and "stopped by SIGTERM" in text


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(tmp_path: Path) -> None:
    def chunks() -> Iterator[bytes]:
        yield from [b"[" + b"1," * 200] * 4  # no Content-Length: sent chunked

    with serving(tmp_path, "Work", "--max-body", "1KB") as s:
        cases: list[tuple[str, str, dict[str, Any], int]] = [
            ("POST", "/jobs", {"content": b"{not json"}, 400),
            ("POST", "/jobs", {"content": b"\xff\xfe\x00"}, 400),
            ("POST", "/jobs", {"content": b""}, 400),
            ("POST", "/jobs", {"content": b"[" + b"1," * 1000 + b"1]"}, 413),
            ("POST", "/jobs", {"content": chunks()}, 413),
            ("POST", "/jobs?priority=high", {"json": 1}, 400),
            ("POST", "/jobs?wait=maybe", {"json": 1}, 400),
            ("GET", "/nowhere", {}, 404),
            ("GET", "/jobs/12345", {}, 404),
            ("GET", "/jobs/abc", {}, 404),
            ("DELETE", "/jobs/-1", {}, 404),
            ("PUT", "/jobs", {"json": 1}, 405),
            ("POST", "/healthz", {}, 405),
            ("DELETE", "/metrics", {}, 405),
        ]
        for method, path, kwargs, status in cases:
            r = s.client.request(method, path, **kwargs)
            assert r.status_code == status, (method, path, r.text)
            assert r.headers["content-type"] == "application/json", (method, path)
            assert isinstance(r.json()["error"], str) and r.json()["error"], (method, path)
        assert s.post(6).json()["value"] == 36  # still serving, on the same connection
        assert s.stop() == 0


@pytest.mark.timeout(60)
def test_a_client_that_stops_waiting_neither_cancels_nor_loses_its_job(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with serving(tmp_path) as s:
        body = json.dumps({"n": 5, "sleep": 0.5, "runs": str(runs)}).encode()
        with socket.create_connection(s.address, timeout=10) as sock:
            sock.sendall(
                b"POST /jobs HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = b""
            while b"\r\n\r\n" not in head:  # the status line and headers come at once
                chunk = sock.recv(4096)
                assert chunk, head
                head += chunk
        # gone, before the job has finished
        assert head.startswith(b"HTTP/1.1 200")
        location = re.search(rb"location: (/jobs/\d+)", head, re.IGNORECASE)
        assert location, head
        id = int(location.group(1).rsplit(b"/", 1)[1])
        assert s.final(id)["value"] == 5
        assert read_lines(runs) == ["5"]
        assert s.stop() == 0


# -- backpressure ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_full_queue_answers_429_and_keeps_nothing_of_the_refused(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with serving(tmp_path, "Work", "--max-queue", "4") as s:
        start_together = threading.Barrier(20)

        def post(n: int) -> Any:
            start_together.wait(timeout=10)
            payload = {"n": n, "sleep": 0.3, "runs": str(runs)}
            return httpx.post(f"{s.url}/jobs", json=payload, timeout=CHILD_DEADLINE)

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(post, range(20)))
        accepted = [r.json() for r in answers if r.status_code == 200]
        refused = [r for r in answers if r.status_code == 429]
        assert len(accepted) + len(refused) == 20, [r.status_code for r in answers]
        assert refused and len(accepted) >= 4
        for r in refused:
            assert int(r.headers["retry-after"]) >= 1
            assert "queue full" in r.json()["error"]
        assert all(a["ok"] for a in accepted)
        assert len({a["id"] for a in accepted}) == len(accepted)
        # Exactly the accepted jobs ran, once each; a refused one left no trace.
        assert sorted(read_lines(runs)) == sorted(str(a["value"]) for a in accepted)
        jobs = s.metrics()["batchpool_jobs_submitted"]
        assert value(jobs, "_total", stage="Work") == len(accepted)
        assert s.stop() == 0


def test_finished_results_kept_are_bounded() -> None:
    """Without a journal only the newest ``keep`` results stay; admission counts live jobs."""

    async def scenario(service: Service) -> None:
        lives = [await service.submit(n) for n in range(3)]
        with pytest.raises(Full):
            await service.submit(99)  # three live jobs: the queue is full
        assert [(await service.wait(live)).value for live in lives] == ["0", "1", "4"]
        more = [await service.submit(n) for n in (3, 4)]
        for live in more:
            await service.wait(live)

    with Pool(__import__("serve_tasks").Work(), 1) as pool:
        service = Service(pool, max_queue=3, keep=2)
        asyncio.run(scenario(service))
        assert service.lookup(1) is None and service.lookup(3) is None  # forgotten
        assert isinstance(service.lookup(5), Final) and service.lookup(5).value == "16"  # type: ignore[union-attr]
        assert len(service.done) == 2 and not service.live


# -- shutdown -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigterm_drains_accepted_jobs_answers_waiters_and_exits_0(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with serving(tmp_path) as s, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            httpx.post, f"{s.url}/jobs", json={"n": 1, "sleep": 1.5, "runs": str(runs)}, timeout=30
        )
        wait_for(lambda: read_lines(runs) == ["1"], 10, "the first job to start")
        queued = [s.post({"n": n, "runs": str(runs)}, wait=0).json()["id"] for n in (2, 3)]
        s.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: s.client.get("/healthz").status_code == 503, 10, "healthz 503")
        refused = s.post(4)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
        assert s.get(queued[0]).status_code in (200, 202)  # polls are still answered
        answer = waiting.result(timeout=30)
        assert answer.status_code == 200 and answer.json()["value"] == 1
        assert s.wait() == 0
        assert sorted(read_lines(runs)) == ["1", "2", "3"]  # the queued jobs ran too
        assert "SIGTERM: finishing 3 accepted jobs" in s.output


@pytest.mark.timeout(60)
def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with serving(tmp_path) as s:
        s.post({"n": 1, "sleep": 60, "runs": str(runs)}, wait=0)
        wait_for(lambda: read_lines(runs) == ["1"], 10, "the job to start")
        s.proc.send_signal(signal.SIGINT)
        wait_for(lambda: s.client.get("/healthz").status_code == 503, 10, "the drain")
        started = time.monotonic()
        assert s.stop(signal.SIGINT, timeout=20) == 130
        assert time.monotonic() - started < 15  # not the job's 60 s


# -- durability -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_job_the_journal_cannot_record_is_refused_503_and_kept_nowhere(tmp_path: Path) -> None:
    journal, runs = tmp_path / "serve.sqlite", tmp_path / "runs"
    with serving(tmp_path, "Work", "--journal", journal) as s:
        first = s.post({"n": 1, "runs": str(runs)}).json()
        # Another process holds the write lock: the server's commit gives up after SQLite's
        # busy timeout (5 s), and the request that waited on it is refused.
        with closing(sqlite3.connect(journal, isolation_level=None)) as blocker:
            blocker.execute("BEGIN EXCLUSIVE")
            refused = s.post({"n": 2, "runs": str(runs)})
            blocker.execute("ROLLBACK")
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert "cannot write" in refused.json()["error"]
        after = s.post({"n": 3, "runs": str(runs)}).json()
        assert after["ok"] and after["value"] == 3
        assert sorted(read_lines(runs)) == ["1", "3"]  # the refused job never ran
        assert s.client.get("/healthz").json()["queued"] == 0
        assert s.stop() == 0
    exported = bp("results", journal, cwd=tmp_path).stdout.splitlines()
    assert sorted(json.loads(line)["value"] for line in exported) == [1, 3]
    assert first["id"] < after["id"]


@pytest.mark.timeout(90)
def test_a_killed_server_restarted_on_its_journal_answers_every_accepted_job(
    tmp_path: Path,
) -> None:
    journal, runs = tmp_path / "serve.sqlite", tmp_path / "runs"
    options = ("--journal", journal)
    with serving(tmp_path, "Work", *options) as s:
        before = s.post({"n": 0, "runs": str(runs)}).json()
        ids = {
            s.post({"n": n, "sleep": 0.3, "runs": str(runs)}, wait=0).json()["id"]: n
            for n in range(1, 6)
        }
        wait_for(lambda: "1" in read_lines(runs), 10, "the second job to start")
        os.killpg(s.proc.pid, signal.SIGKILL)
        assert s.wait() == -signal.SIGKILL
    finished = sum(1 for n in read_lines(runs) if n != "0")  # started, at least
    with serving(tmp_path, "Work", *options) as s:
        resumed = int(re.search(r"(\d+) accepted jobs resumed", read_line(s.proc, 10)).group(1))  # type: ignore[union-attr]
        assert 5 - finished <= resumed <= 5
        for id, n in ids.items():
            assert s.final(id)["value"] == n
        assert s.get(before["id"]).json() == before  # answered before the kill
        new = s.post(7).json()
        assert new["id"] > max(ids)  # ids are never given out twice
        assert s.stop() == 0  # a drain leaves the journal whole: `batchpool results` reads it
    exported = bp("results", journal, cwd=tmp_path).stdout.splitlines()
    assert sorted(json.loads(line)["value"] for line in exported) == [0, 1, 2, 3, 4, 5, 49]
    ran = read_lines(runs)
    assert sorted(set(ran)) == [str(n) for n in range(6)]
    assert len(ran) - 6 <= 1  # again: only the attempt the kill cut short
    with closing(sqlite3.connect(journal)) as db:
        rows = db.execute("SELECT idx, status FROM jobs").fetchall()
    assert sorted(rows) == sorted((id, "ok") for id in [before["id"], *ids, new["id"]])


def test_a_journal_of_a_run_is_refused(tmp_path: Path, jobs: Path) -> None:
    run_journal = JournalWriter(tmp_path / "run.sqlite", "jobs")
    run_journal.begin(total=8, resume=False)
    run_journal.close()
    refused = bp("serve", jobs, "--port", 0, "--journal", tmp_path / "run.sqlite", cwd=tmp_path)
    assert refused.returncode == 2
    assert "holds a run of pipeline 'jobs', not a server's jobs" in one_line(refused.stderr)


# -- targets and refusals -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_pipeline_serves_each_request_through_its_stages(tmp_path: Path) -> None:
    with serving(tmp_path, "pipeline") as s:
        r = s.post(3).json()
        assert r["ok"] and r["value"] == 18 and r["attempts"] == 2  # (3 * 3) * 2
        m = s.metrics()
        jobs = m["batchpool_jobs_succeeded"]
        assert value(jobs, "_total", pipeline="served", stage="Work") == 1
        assert value(jobs, "_total", pipeline="served", stage="Double") == 1
        assert s.stop() == 0


@pytest.mark.parametrize(
    ("target", "options", "message"),
    [
        ("serve_tasks.py:NOT_A_TASK", (), "is a int, not a batchpool.Pipeline or Task"),
        ("serve_tasks.py:NeedsArgument", (), "cannot build serve_tasks.py:NeedsArgument()"),
        ("serve_tasks.py:Nothing", (), "no attribute 'Nothing'"),
        ("serve_tasks.py:Work", ("--max-queue", "0"), "--max-queue"),
        ("serve_tasks.py:Work", ("--max-body", "big"), "not a size"),
        ("serve_tasks.py:Work", ("--retries", "-1"), "--retries"),
        ("serve_tasks.py:Work", ("--rate-limit", "fast"), "--rate-limit"),
        ("serve_tasks.py:Work", ("--procs", "3:1"), "MIN <= MAX"),
    ],
)
def test_bad_targets_and_settings_are_refused_in_one_line(
    target: str, options: tuple[str, ...], message: str
) -> None:
    done = bp("serve", target, "--port", 0, *options, cwd=TESTS_DIR)
    assert done.returncode == 2
    assert message in one_line(done.stderr)


def test_a_port_in_use_is_refused_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = bp("serve", f"{SERVE_TASKS}:Work", "--port", port, cwd=tmp_path)
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in one_line(done.stderr, strict=True)


def _hide_extra(tmp_path: Path) -> dict[str, str]:
    """A child environment where the serve extra's modules cannot be imported."""
    write(
        tmp_path / "hide" / "sitecustomize.py",
        """
        import sys

        class Hidden:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in ("starlette", "uvicorn", "prometheus_client"):
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None

        sys.meta_path.insert(0, Hidden())
        """,
    )
    env = environ()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "hide"), env["PYTHONPATH"]])
    return env


def test_without_the_extra_serve_and_metrics_port_say_how_to_install_it(
    tmp_path: Path, jobs: Path
) -> None:
    env = _hide_extra(tmp_path)
    done = bp("serve", f"{SERVE_TASKS}:Work", cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert "pip install '.[serve]'" in one_line(done.stderr, strict=True)
    done = bp("run", jobs, "--metrics-port", "0", cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert "pip install '.[serve]'" in one_line(done.stderr, strict=True)
    assert not (tmp_path / ".batchpool").exists()  # refused before anything ran


# -- metrics --------------------------------------------------------------------------------------

COUNTERS = [
    "batchpool_jobs_submitted",
    "batchpool_jobs_succeeded",
    "batchpool_jobs_failed",
    "batchpool_jobs_cancelled",
    "batchpool_attempts_started",
    "batchpool_retries",
    "batchpool_timeouts",
    "batchpool_crashes",
    "batchpool_worker_restarts",
]
GAUGES = ["batchpool_jobs_queued", "batchpool_jobs_in_flight", "batchpool_workers"]


@pytest.mark.timeout(60)
def test_metrics_are_prometheus_text_with_the_names_of_the_spec(tmp_path: Path) -> None:
    with serving(tmp_path, procs=2) as s:
        for payload in ({"n": 1, "sleep": 0.02}, {"n": 2, "sleep": 0.3}, {"n": 3, "fail": True}):
            s.post(payload)
        m = s.metrics()
        for name in COUNTERS:
            assert m[name].type == "counter", name
        for name in [*GAUGES, "batchpool_worker_rss_bytes"]:
            assert m[name].type == "gauge", name
        for family in m.values():
            if family.name.startswith("batchpool_"):
                for sample in family.samples:
                    assert sample.labels["pipeline"] == "Work", sample
                    assert sample.labels["stage"] in ("Work", "all"), sample
        assert value(m["batchpool_jobs_submitted"], "_total", stage="Work") == 3
        assert value(m["batchpool_jobs_succeeded"], "_total", stage="Work") == 2
        assert value(m["batchpool_jobs_failed"], "_total", stage="Work") == 1
        assert value(m["batchpool_attempts_started"], "_total", stage="Work") == 3
        assert value(m["batchpool_workers"], stage="all") == 2
        pids = {s.labels["worker"] for s in m["batchpool_worker_rss_bytes"].samples}
        assert len(pids) == 2

        def rss_sampled() -> bool:  # every second, by the supervisor
            return all(x.value > 0 for x in s.metrics()["batchpool_worker_rss_bytes"].samples)

        wait_for(rss_sampled, 10, "the workers' RSS")
        histogram = m["batchpool_attempt_duration_seconds"]
        assert histogram.type == "histogram"
        assert value(histogram, "_count", stage="Work") == 3  # every attempt that returned
        assert value(histogram, "_bucket", stage="Work", le="0.01") == 1  # the failure's
        assert value(histogram, "_bucket", stage="Work", le="0.25") == 2
        assert value(histogram, "_bucket", stage="Work", le="+Inf") == 3
        assert 0.32 <= value(histogram, "_sum", stage="Work") < 1.0
        assert s.stop() == 0


@pytest.mark.timeout(60)
def test_run_metrics_port_is_scraped_mid_run(tmp_path: Path, jobs: Path) -> None:
    runs = tmp_path / "runs"
    env = environ(BP_N=6, BP_SLEEP=0.4, BP_RUNS=runs)
    args = ["run", jobs, "--procs", 2, "--no-journal", "--no-progress", "--metrics-port", 0]
    with start(*args, cwd=tmp_path, env=env, stderr=subprocess.STDOUT) as proc:
        line = read_line(proc, STARTED)
        url = re.search(r"http://\S+/metrics", line)
        assert url, line
        wait_for(lambda: read_lines(runs), 20, "the run to start jobs")
        m = families(httpx.get(url.group(0), timeout=10).text)
        assert proc.poll() is None  # mid-run
        assert value(m["batchpool_jobs_submitted"], "_total", pipeline="jobs", stage="Work") >= 1
        assert value(m["batchpool_workers"], pipeline="jobs", stage="all") == 2
        assert proc.wait(timeout=CHILD_DEADLINE) == 0


def test_run_metrics_port_in_use_is_refused_before_the_run(tmp_path: Path, jobs: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = bp("run", jobs, "--metrics-port", port, cwd=tmp_path)
    assert done.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in one_line(done.stderr, strict=True)
    assert not (tmp_path / ".batchpool").exists()


# -- pure logic -----------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(JSON_VALUES, st.integers(min_value=1), st.integers(min_value=0, max_value=9))
def test_an_answer_is_json_carrying_the_value(payload: Any, id: int, attempts: int) -> None:
    from batchpool.journal.encoding import json_text

    final = Final(id, True, json_text(payload), None, attempts, 0.25)
    body = json.loads(final.body())
    assert body == {
        "id": id,
        "ok": True,
        "value": payload,
        "error": None,
        "attempts": attempts,
        "elapsed": 0.25,
    }


@given(st.lists(st.integers(0, 50), min_size=1, max_size=30))
def test_attempts_started_never_fall_between_scrapes(counts: list[int]) -> None:
    """Metrics.started falls when a worker hands jobs back unstarted; a counter must not."""
    snapshots = iter([Metrics(stages=(StageMetrics(started=n),)) for n in counts])
    collector = PoolCollector("p", ["Work"], lambda: next(snapshots))
    shown = []
    for _ in counts:
        text = generate_latest(registry(collector)).decode()
        shown.append(value(families(text)["batchpool_attempts_started"], "_total"))
    assert shown == [max(counts[: i + 1]) for i in range(len(counts))]


@given(st.lists(st.sampled_from(["Parse", "Score", "Save"]), min_size=1, max_size=8))
def test_stage_labels_are_unique_and_keep_unique_names(names: list[str]) -> None:
    labels = stage_labels(names)
    assert len(set(labels)) == len(names)
    for name, label in zip(names, labels, strict=True):
        assert label == name if names.count(name) == 1 else label.startswith(f"{name}-")


# -- the coalescing transport ------------------------------------------------------------------
async def _coalescing_pair() -> tuple[Any, socket.socket]:
    """A Coalescing over a real stream transport, and the socket at the other end."""
    from batchpool.serve.server import Coalescing

    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    return Coalescing(transport, loop), theirs


async def _received(sock: socket.socket, want: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = b""
    while len(got) < want:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, want - len(got)), 5)
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.timeout(30)
def test_writes_of_one_loop_iteration_leave_together() -> None:
    async def main() -> None:
        transport, theirs = await _coalescing_pair()
        with closing(theirs):
            transport.write(b"HTTP/1.1 429 Too Many Requests\r\n\r\n")
            transport.write(b'{"error": "full"}')
            with pytest.raises(BlockingIOError):  # nothing sent yet: a plain transport would have
                theirs.recv(100)
            await asyncio.sleep(0)  # the iteration ends
            assert theirs.recv(100) == b'HTTP/1.1 429 Too Many Requests\r\n\r\n{"error": "full"}'
            transport.write(b"next")  # a later iteration: sent on its own
            assert await _received(theirs, 4) == b"next"
            transport.close()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_closing_a_coalescing_transport_sends_what_it_holds_first() -> None:
    async def main() -> None:
        transport, theirs = await _coalescing_pair()
        with closing(theirs):
            transport.write(b"last words")
            transport.close()
            assert transport.is_closing()
            transport.write(b"after the end")  # dropped, no error
            assert await _received(theirs, 100) == b"last words"  # then EOF

    asyncio.run(main())
