"""Every example in pipelines/ runs both ways, ``batchpool run pipelines/x.py`` and
``python pipelines/x.py``, on small inputs (set by environment variables), and says what it
produced."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from helpers import CLI, PIPELINES_DIR, environ, run

pytestmark = pytest.mark.timeout(120)

SMALL = {
    "PRIMES_RANGES": 3,
    "MANDELBROT_TILE": 10,
    "LOGS_FILES": 3,
    "LOGS_LINES": 300,
    "FETCH_PAGES": 30,
    "FETCH_RATE": "100/s",
}
WAYS = {
    "batchpool run": lambda path: [*CLI, "run", path, "--procs", "2"],
    "python": lambda path: [sys.executable, path],
}


def _primes_below(limit: int) -> int:
    sieve = bytearray([1]) * limit
    sieve[:2] = b"\0\0"
    for n in range(2, int(limit**0.5) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytes(len(range(n * n, limit, n)))
    return sum(sieve)


def _run(name: str, way: str, cwd: Path) -> tuple[int, str]:
    r = run(WAYS[way](PIPELINES_DIR / f"{name}.py"), cwd=cwd, env=environ(**SMALL), timeout=100)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stdout


@pytest.mark.parametrize("way", sorted(WAYS))
def test_primes(tmp_path: Path, way: str) -> None:
    code, out = _run("primes", way, tmp_path)
    assert code == 0
    assert out == f"{_primes_below(30_000)} primes below 30,000\n"


@pytest.mark.parametrize("way", sorted(WAYS))
def test_mandelbrot(tmp_path: Path, way: str) -> None:
    code, out = _run("mandelbrot", way, tmp_path)
    assert code == 0
    assert out == "wrote mandelbrot.pgm: 80x60 pixels in 48 tiles\n"
    header = b"P5\n80 60\n255\n"
    data = (tmp_path / "mandelbrot.pgm").read_bytes()
    assert data.startswith(header) and len(data) == len(header) + 80 * 60


@pytest.mark.parametrize("way", sorted(WAYS))
def test_logs_etl(tmp_path: Path, way: str) -> None:
    code, out = _run("logs_etl", way, tmp_path)
    assert code == 0
    assert out.startswith("3 log files, 900 requests: error rate ")
    summary = json.loads((tmp_path / "logs_summary.json").read_text())
    assert summary["files"] == 3 and summary["requests"] == 900


@pytest.mark.parametrize("way", sorted(WAYS))
def test_flaky(tmp_path: Path, way: str) -> None:
    """Exit code 1 on purpose: three jobs fail for good, and it says which."""
    code, out = _run("flaky", way, tmp_path)
    assert code == 1
    assert out == "21 of 24 jobs ok, retries included; failed for good: 7, 13, 19\n"


@pytest.mark.parametrize("way", ["fork", "forkserver", "spawn", "python"])
def test_fetch(tmp_path: Path, way: str) -> None:
    """The site runs in the supervisor; workers of every start method reach it by the URLs
    the source yields. Page 24 fails once (503) and succeeds on its retry."""
    path = PIPELINES_DIR / "fetch.py"
    log = tmp_path / "fetch.log"
    argv = [*CLI, "run", path, "--procs", "4", "--start-method", way, "--log-file", log]
    r = run(
        [sys.executable, path] if way == "python" else argv,
        cwd=tmp_path,
        env=environ(**SMALL),
        timeout=100,
    )
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(
        r"fetched 30 of 30 pages \([\d,]+ bytes\), 1 after a retry; failed for good: none\n",
        r.stdout,
    ), r.stdout + (log.read_text() if log.exists() else "")
    summary = json.loads((tmp_path / "fetch_summary.json").read_text())
    assert summary["ok"] == 30 and summary["failed"] == [] and summary["retried"] == 1
