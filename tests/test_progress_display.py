"""The progress bar as a person sees it: the CLI with stderr on a real pseudo-terminal, every
drawing of the bar read back and checked (total, ETA, counts, clock, width)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import environ, on_terminal, write

pytestmark = pytest.mark.timeout(90)

FRAME = re.compile(r"(\d+)/(\d+) \[(\d\d):(\d\d)<")


def frames(screen: str) -> list[dict[str, int | None]]:
    """Each drawing of the bar that shows a total: done, total, elapsed seconds, and its ok
    and failed counts (None where not shown), in any order."""
    found = []
    for part in screen.split("\r"):
        m = FRAME.search(part)
        if m:
            done, total, mins, secs = map(int, m.groups())
            counts = {k: re.search(rf"\b{k}=(\d+)", part) for k in ("ok", "failed")}
            found.append(
                {
                    "done": done,
                    "total": total,
                    "elapsed": 60 * mins + secs,
                    **{k: int(c.group(1)) if c else None for k, c in counts.items()},
                }
            )
    return found


# BP_N jobs of BP_SLEEP seconds from a source of kind BP_SOURCE: "list", "lambda" (a callable
# returning a list), "generator" (a generator function, with total=BP_N given to Pipeline).
SOURCES_PY = """
import os
import time

from batchpool import Pipeline, Task

N = int(os.environ["BP_N"])


class Nap(Task):
    def run(self, n):
        time.sleep(float(os.environ.get("BP_SLEEP", "0")))
        return n


def numbers():
    yield from range(N)


if os.environ["BP_SOURCE"] == "list":
    pipeline = Pipeline(list(range(N)), Nap(), name="bar")
elif os.environ["BP_SOURCE"] == "lambda":
    pipeline = Pipeline(lambda: list(range(N)), Nap(), name="bar")
else:
    pipeline = Pipeline(numbers, Nap(), name="bar", total=N)
"""


@pytest.fixture
def bar_py(tmp_path: Path) -> Path:
    return write(tmp_path / "bar.py", SOURCES_PY)


@pytest.mark.parametrize("source", ["lambda", "generator"])
def test_total_and_eta_for_a_callable_source(tmp_path: Path, bar_py: Path, source: str) -> None:
    """The README's lazy form, Pipeline(lambda: ...), and a generator with total=N."""
    env = environ(BP_N=12, BP_SLEEP=0.05, BP_SOURCE=source)
    code, screen = on_terminal(["run", bar_py, "--procs", "2"], tmp_path, env=env)
    assert code == 0, screen
    drawn = frames(screen)
    assert drawn and all(f["total"] == 12 for f in drawn), screen
    assert "100%|" in screen
    assert any("<00:0" in part and "/12" in part for part in screen.split("\r")[:-1]), screen


def test_ok_count_never_lags_the_bar(tmp_path: Path, bar_py: Path) -> None:
    env = environ(BP_N=60, BP_SLEEP=0.01, BP_SOURCE="list")
    code, screen = on_terminal(["run", bar_py, "--procs", "2"], tmp_path, env=env)
    assert code == 0, screen
    drawn = frames(screen)
    assert len(drawn) >= 2, screen
    lagging = [f for f in drawn if f["ok"] is None or f["ok"] + f["failed"] != f["done"]]
    assert not lagging, lagging


def test_clock_runs_while_long_jobs_run(tmp_path: Path, bar_py: Path) -> None:
    """No result for 2.5 s: the bar is redrawn anyway, its clock moving, jobs in flight shown."""
    env = environ(BP_N=1, BP_SLEEP=2.5, BP_SOURCE="list")
    code, screen = on_terminal(["run", bar_py, "--procs", "1"], tmp_path, env=env)
    assert code == 0, screen
    waiting = [f["elapsed"] for f in frames(screen) if f["done"] == 0]
    assert len(set(waiting)) >= 2 and max(waiting) >= 1, screen
    assert "running=1" in screen


def test_a_terminal_of_zero_columns_still_gets_a_bar(tmp_path: Path, bar_py: Path) -> None:
    env = environ(BP_N=4, BP_SOURCE="list")
    code, screen = on_terminal(["run", bar_py, "--procs", "1"], tmp_path, columns=0, env=env)
    assert code == 0, screen
    assert "100%|██████████| 4/4" in screen, screen
    assert "4 jobs: 4 ok, 0 failed" in screen
