"""The benchmark suite runs end to end in --quick mode and writes well-formed JSON.

Timings are not asserted: the machine is shared and the numbers are noise at this size. What
is checked is that the suite completes, exits 0, and records every cell it planned.
One repeat keeps it inside the timeout on a busy 2-core machine; the shape does not change.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"


@pytest.mark.timeout(120)
def test_quick_run_writes_complete_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--repeat", "1", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=115,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    assert set(doc) >= {"meta", "calibration", "serial_seconds", "runs", "summary"}
    meta = doc["meta"]
    for key in ("cpu_count", "python", "platform", "versions", "settings", "methods"):
        assert key in meta
    assert meta["settings"]["quick"] is True
    assert doc["calibration"]["loops_per_ms"] > 0

    ran = set(meta["versions"])  # contenders that were importable here
    assert {"mp.map", "ppe.submit"} <= ran  # the standard library is always there
    repeats = meta["settings"]["repeat"]
    for run in doc["runs"]:
        assert {"ok", "repeat", "workload", "n", "contender"} <= set(run)
        if run["ok"]:
            assert run["wall"] > 0
        else:
            assert run["error"]
            # the standard library's pools are always there and must measure cleanly
            assert not run["contender"].startswith(("mp.", "ppe.")), run
    cells = {(r["workload"], r["n"], r["contender"]) for r in doc["runs"]}
    for cell in cells:
        got = [r for r in doc["runs"] if (r["workload"], r["n"], r["contender"]) == cell]
        assert len(got) == repeats, cell
    assert {w for w, _, _ in cells} >= {"startup", "noop", "cpu1ms", "payload1mb", "uneven"}
    assert {c for _, _, c in cells if c in ran} == ran  # every available contender ran

    rows = doc["summary"]
    assert rows and all({"label", "contender", "runs", "rate_median"} <= set(r) for r in rows)
    assert "par.eff" in proc.stdout  # the table was printed


@pytest.mark.timeout(60)
def test_overhead_split_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--jobs", "2000", "--repeat=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=55,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    *table, ceiling = proc.stdout.splitlines()[2:]
    rows = {line.split()[0]: line.split()[1:] for line in table}
    assert set(rows) == {"batchpool.map", "mp.map", "mp.imap_unordered(c=1)"}
    for rate, parent_us, gc_us, workers_us in rows.values():
        # CPU times tick at 10 ms: a few thousand jobs may read 0 for the workers
        assert float(rate.replace(",", "")) > 0 and float(parent_us) >= 0 <= float(workers_us)
        assert float(gc_us) >= 0  # wall time in the collector: not bounded by a CPU clock
    assert ceiling.startswith("ceiling: "), proc.stdout
    parent_us = float(rows["batchpool.map"][1])
    if parent_us > 0:  # the ceiling is 1 / the parent's CPU per job, and the cores follow
        found = re.fullmatch(
            r"ceiling: one supervisor sustains ([\d,]+) no-op jobs/s; it keeps up with "
            r"([\d,]+) cores of 100 us jobs, ([\d,]+) cores of 1 ms jobs",
            ceiling,
        )
        assert found, ceiling
        rate, cores_100us, cores_1ms = (int(g.replace(",", "")) for g in found.groups())
        assert rate == pytest.approx(1e6 / parent_us, rel=0.01 / parent_us)  # the table rounds
        assert abs(cores_100us - rate * 100e-6) <= 1 and abs(cores_1ms - rate * 1e-3) <= 1
