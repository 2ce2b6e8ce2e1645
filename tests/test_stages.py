"""Multi-stage accounting: a job's attempts add up every stage's, the job counts add up per
job (not per stage-job), and each stage reports its own counters and attempt times."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from helpers import bp, check_invariants, child_env, output_rows
from stage_tasks import Double, FailFirstOfFives

from batchpool import Pool

PIPE = """
from batchpool import Pipeline
from stage_tasks import Double, FailFirstOfFives

first = FailFirstOfFives({markers!r}, retries=2, backoff=0)
pipeline = Pipeline(range(20), first, Double(retries=1, backoff=0), name="two")
"""


@pytest.mark.timeout(90)
def test_two_stage_run_counts_jobs_once_and_attempts_across_stages(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    (tmp_path / "pipe.py").write_text(textwrap.dedent(PIPE.format(markers=str(markers))))
    r = bp(
        "run", "pipe.py", "--procs", 2, "--report", "r.json", "--output", "o.jsonl",
        cwd=tmp_path, env=child_env(), timeout=60,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr  # job 7 fails in stage 2
    rows = output_rows(tmp_path / "o.jsonl", 20)
    # 2 attempts per job (one a stage); the fives took one more in stage 1; job 7 failed
    # stage 2 twice (retries=1) after one attempt in stage 1.
    expected = [3 if i % 5 == 0 else 2 for i in range(20)]
    expected[7] = 3
    assert [x["attempts"] for x in rows] == expected
    report = json.loads((tmp_path / "r.json").read_text())
    m = report["metrics"]
    assert (m["submitted"], m["succeeded"], m["failed"], m["cancelled"]) == (20, 19, 1, 0)
    one, two = m["stages"]
    assert (one["submitted"], one["started"], one["succeeded"], one["retried"]) == (20, 24, 20, 4)
    assert (two["submitted"], two["started"], two["succeeded"], two["failed"]) == (20, 21, 19, 1)
    assert two["retried"] == 1
    assert m["started"] == one["started"] + two["started"]
    assert one["attempt_p50"] is not None and two["attempt_p95"] is not None
    assert report["stage_names"] == ["FailFirstOfFives", "Double"]
    assert "stage 1 FailFirstOfFives: 20 in, 20 ok, 0 failed, 4 retries" in r.stderr
    assert "stage 2 Double: 20 in, 19 ok, 1 failed, 1 retries" in r.stderr


@pytest.mark.timeout(60)
def test_pool_metrics_of_a_stage_pool_add_up(tmp_path: Path) -> None:
    tasks = [FailFirstOfFives(str(tmp_path), retries=2), Double(retries=0)]
    with Pool._for_stages(tasks, 2) as pool:
        results = pool.map(range(10))
    assert [r.attempts for r in results] == [3 if i % 5 == 0 else 2 for i in range(10)]
    assert [r.ok for r in results] == [i != 7 for i in range(10)]
    m = pool.metrics()
    check_invariants(m)
    assert (m.submitted, m.succeeded, m.failed) == (10, 9, 1)
    assert [s.submitted for s in m.stages] == [10, 10]
