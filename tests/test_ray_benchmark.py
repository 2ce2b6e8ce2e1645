"""benchmarks/ray_overhead.py runs end to end on tiny workloads and prints its table.

Timings are not asserted (a shared machine; noise at this size): the table has a row per
workload and a verdict for each of the issue's targets.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

from helpers import REPO_DIR, child_env, run  # noqa: E402

SCRIPT = REPO_DIR / "benchmarks" / "ray_overhead.py"


@pytest.mark.timeout(180)
def test_ray_overhead_prints_its_table(tmp_path: Path) -> None:
    sizes = ["--noop-jobs", 400, "--jobs-1ms", 40, "--jobs-10ms", 8]
    r = run(
        [sys.executable, SCRIPT, "--repeat", 1, *sizes], cwd=tmp_path, env=child_env(), timeout=170
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {
        m[1]: m[0]
        for m in re.finditer(r"^(no-op|cpu 1 ms|cpu 10 ms|sleep 10 ms)\s.*$", r.stdout, re.M)
    }
    assert list(rows) == ["no-op", "cpu 1 ms", "cpu 10 ms", "sleep 10 ms"], r.stdout
    for name in ("no-op", "cpu 1 ms", "cpu 10 ms"):
        assert re.search(r">= \S+: (met|missed)$", rows[name]), rows[name]
    assert "target" in r.stdout and "ray.init" in r.stdout
