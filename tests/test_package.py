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


def _worker_pids_and_runs(tmp_path: Path, script: str, *argv: str) -> tuple[set[int], list[int]]:
    """Run ``script`` (it prints the pids of the workers that ran its jobs); the pids of the
    processes that ran its module body (it appends them to runs.txt)."""
    (tmp_path / "main.py").write_text(script)
    runs = tmp_path / "runs.txt"
    out = subprocess.run(
        [sys.executable, "main.py", str(runs), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    workers = {int(pid) for pid in out.stdout.split()}
    return workers, [int(line) for line in runs.read_text().split()]


MAIN_SCRIPT = """\
import os, sys
with open(sys.argv[1], "a") as runs:
    runs.write(f"{os.getpid()}\\n")
MODE = sys.argv[2]  # a script that reads its command line as it is imported
from batchpool import Pool, Task

class Pid(Task):
    def run(self, x):
        assert MODE == "argv-seen"
        return os.getpid()

if __name__ == "__main__":
    with Pool(Pid(), procs=3, start_method="forkserver") as pool:
        print(*sorted({r.value for r in pool.map(range(60))}))
"""


def test_forkserver_workers_share_the_main_script_the_server_imported(tmp_path: Path) -> None:
    # CPython up to 3.13.7 never preloads __main__ in the forkserver (gh-126631): each worker
    # would run the script, and import what it imports, again before its first job.
    workers, runs = _worker_pids_and_runs(tmp_path, MAIN_SCRIPT, "argv-seen")
    assert workers
    assert len(runs) == 2  # the script itself, and the forkserver (with the script's argv)
    assert not workers & set(runs)


def test_a_main_script_the_forkserver_cannot_import_is_run_by_each_worker(tmp_path: Path) -> None:
    script = MAIN_SCRIPT.replace(
        "import os, sys\n",
        "import os, sys\n"
        "if __name__ == '__main__':\n"
        "    os.environ['SCRIPT_PID'] = str(os.getpid())\n"
        "elif os.getppid() == int(os.environ['SCRIPT_PID']):  # the forkserver's parent\n"
        "    raise RuntimeError('not here')\n",
    )
    workers, runs = _worker_pids_and_runs(tmp_path, script, "argv-seen")
    assert workers and workers <= set(runs)  # as multiprocessing always did: results all the same


def test_forkserver_workers_share_the_pipeline_file_the_server_imported(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "batchpool"
    (tmp_path / "pids.py").write_text(
        "import os\n"
        "from batchpool import Pipeline, Task\n"
        "with open('runs.txt', 'a') as runs:\n"
        "    runs.write(f'{os.getpid()}\\n')\n"
        "class Pid(Task):\n"
        "    def run(self, x):\n"
        "        return os.getpid()\n"
        "pipeline = Pipeline(range(40), Pid(), sink=lambda r: print('WORKER', r.value))\n"
    )
    out = subprocess.run(
        [str(script), "run", "pids.py", "--procs", "2", "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    workers = {int(line.split()[1]) for line in lines if line.startswith("WORKER")}
    runs = [int(line) for line in (tmp_path / "runs.txt").read_text().split()]
    assert workers
    assert len(runs) == 2  # the command, and the forkserver
    assert not workers & set(runs)


def test_a_huge_command_line_is_not_announced_to_the_forkserver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One environment variable over 128 KiB and Linux refuses to start the server at all.
    import json

    from batchpool.preload import ENV, LIMIT, announced

    monkeypatch.setattr(sys, "argv", ["script.py", "x" * LIMIT])
    with announced([("batchpool_pipeline_p", "/tmp/p.py")]):
        assert json.loads(os.environ[ENV]) == {"files": [["batchpool_pipeline_p", "/tmp/p.py"]]}
    assert ENV not in os.environ
    monkeypatch.setattr(sys, "argv", ["script.py", "--fast"])
    with announced([]):
        assert json.loads(os.environ[ENV])["argv"] == ["script.py", "--fast"]
    assert ENV not in os.environ
