"""The package's public names, and what a worker process has to import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import batchpool

pytestmark = pytest.mark.timeout(60)


def test_every_public_name_resolves() -> None:
    for name in batchpool.__all__:
        assert getattr(batchpool, name) is not None
    assert set(batchpool.__all__) <= set(dir(batchpool))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        batchpool.Nope  # noqa: B018


def test_a_worker_imports_neither_the_journal_nor_the_progress_bar() -> None:
    # Every worker (and the forkserver) imports batchpool.worker before its first job.
    code = (
        "import sys, batchpool.worker; "
        "print(sorted(m for m in ('sqlite3', 'tqdm', 'click', 'batchpool.pipeline') "
        "if m in sys.modules))"
    )
    # Without coverage's start-up hook (CI measures every process): it imports sqlite3 itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_PROCESS_")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_importing_the_pool_leaves_psutil_for_its_first_use() -> None:
    # A forkserver worker imports the user's main module, and with it batchpool.Pool, before
    # its first job: ~10 ms of psutil there would be on every worker's start-up path.
    code = "import sys; from batchpool import Pool; print('psutil' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_PROCESS_")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_pipeline_worker_imports_only_what_runs_jobs(tmp_path: Path) -> None:
    # multiprocessing reruns the parent's main script in each forkserver worker unless the
    # module is named *.__main__; for the script that would be click and the whole CLI. And
    # the worker imports the pipeline's file, and with it batchpool.pipeline: which must not
    # bring the journal, the progress bar or the supervisor (~100 ms of a worker's start-up).
    script = Path(sys.executable).parent / "batchpool"
    assert script.exists(), "an install (pip install -e .) puts the script beside python"
    (tmp_path / "mods.py").write_text(
        "import sys\n"
        "from batchpool import Pipeline, Task\n"
        "class Mods(Task):\n"
        "    def run(self, x):\n"
        "        heavy = ('click', 'batchpool.cli', 'sqlite3', 'tqdm', 'batchpool.supervisor')\n"
        "        return sorted(m for m in heavy if m in sys.modules)\n"
        "pipeline = Pipeline([0], Mods(), sink=lambda r: print('WORKER', r.value))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_PROCESS_")}
    out = subprocess.run(
        [str(script), "run", "mods.py", "--procs", "1", "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "WORKER []" in out.stdout
