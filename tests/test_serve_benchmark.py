"""benchmarks/serve.py runs end to end, short, with its own asyncio client (CI has no ``ab``).

Timings are not asserted (a shared machine, one-second cells): what is checked is that both
servers answered, nothing failed, the overload was refused with 429s rather than queued, no
accepted job was lost, and no process is left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_DIR, child_env

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("httpx")

SERVE_BENCH = REPO_DIR / "benchmarks" / "serve.py"


@pytest.mark.timeout(120)
def test_the_serve_benchmark_runs_short(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    argv = [sys.executable, str(SERVE_BENCH), "--seconds", "1", "--concurrency", "4"]
    argv += ["--client", "asyncio", "--procs", "1", "--max-queue", "4", "--json", str(out)]
    proc = subprocess.run(
        argv, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=110
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert {c["server"] for c in doc["cells"]} == {"batchpool", "baseline"}
    for cell in doc["cells"]:
        assert cell["completed"] > 0 and cell["failed"] == 0, cell
        assert set(cell["statuses"]) == {"200"}, cell
    ours, theirs = doc["overload"]
    assert ours["server"] == "batchpool" and theirs["server"] == "baseline"
    assert ours["statuses"].get("429", 0) > 0  # 4x its capacity: refused, not queued
    assert ours["lost"] == 0
    assert "## Overload" in proc.stdout
