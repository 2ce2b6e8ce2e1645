"""Choosing a backend: unknown names and misplaced addresses are refused before anything
starts, and the Ray backend without Ray installed is a clear error, from the API and the CLI.

These run whether or not Ray is installed (test_ray_backend.py needs it): "without Ray" is
made real in a child interpreter where ``import ray`` fails.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from faults import Square
from helpers import bp, child_env

from batchpool import Pool
from batchpool.backends import BackendUnavailable

pytestmark = pytest.mark.timeout(60)

NO_RAY = "import sys; sys.modules['ray'] = None\n"  # `import ray` now fails as if not installed

# Eight jobs that leave a trace in BP_RUNS if any of them ever runs.
JOBS_PY = """
import os

from batchpool import Pipeline, Task


class Work(Task):
    def run(self, n):
        with open(os.environ["BP_RUNS"], "a") as f:
            f.write(f"{n}\\n")
        return n


pipeline = Pipeline(list(range(8)), Work(), name="jobs")
"""


def python(code: str, cwd: Path | None = None, **env: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=child_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"backend": "dask"}, r"backend must be one of \['local', 'ray'\], got 'dask'"),
        ({"backend": ""}, "backend must be one of"),
        ({"address": "auto"}, "address is for the ray backend, not 'local'"),
        ({"backend": "local", "address": "ray://10.0.0.1:10001"}, "address is for the ray"),
    ],
)
def test_bad_backend_settings_are_refused_before_anything_starts(
    options: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Pool(Square(), 1, **options)


def test_ray_backend_without_ray_installed() -> None:
    r = python(
        NO_RAY
        + textwrap.dedent("""
        import batchpool
        from batchpool.backends import BackendUnavailable
        from faults import Square
        try:
            batchpool.Pool(Square(), 1, backend="ray")
        except BackendUnavailable as exc:
            assert isinstance(exc, ImportError)
            print(exc)
        else:
            raise SystemExit("no error")
        """)
    )
    assert r.returncode == 0, r.stderr
    assert "pip install '.[ray]'" in r.stdout
    assert issubclass(BackendUnavailable, ImportError)  # `except ImportError` catches it


def test_cli_backend_ray_without_ray_installed(tmp_path: Path) -> None:
    (tmp_path / "jobs.py").write_text(textwrap.dedent(JOBS_PY))
    main = NO_RAY + "from batchpool.cli import main; main(prog_name='batchpool')"
    r = subprocess.run(
        [sys.executable, "-c", main, "run", "jobs.py", "--backend", "ray"],
        cwd=tmp_path,
        env=child_env(BP_RUNS=tmp_path / "runs"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "batchpool: --backend ray needs Ray: pip install 'ray>=2.9' (in a checkout: "
        "pip install '.[ray]')"
    ]
    assert not (tmp_path / "runs").exists()  # refused before any job ran
    assert not (tmp_path / ".batchpool").exists()  # and before a journal was made


def test_a_broken_ray_backend_module_is_not_reported_as_ray_missing() -> None:
    """Only Ray's own absence reads as "install Ray": an ImportError of batchpool's backend
    module itself (a broken install, a bug) surfaces as what it is."""
    r = python(
        textwrap.dedent("""
        import sys
        sys.modules["batchpool.backends.ray"] = None  # the module fails to import
        import batchpool
        from batchpool.backends import BackendUnavailable
        from faults import Square
        try:
            batchpool.Pool(Square(), 1, backend="ray")
        except BackendUnavailable as exc:
            raise SystemExit(f"disguised as Ray missing: {exc}")
        except ImportError as exc:
            print(f"ImportError: {exc.name}")
        """)
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ImportError: batchpool.backends.ray"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--address", "auto"], "--address is for --backend ray"),
        (["--backend", "dask"], "--backend"),
    ],
)
def test_cli_backend_choices(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "jobs.py").write_text(textwrap.dedent(JOBS_PY))
    r = bp("run", "jobs.py", *args, cwd=tmp_path, env=child_env(BP_RUNS=tmp_path / "runs"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert message in r.stderr
    assert not (tmp_path / "runs").exists()
