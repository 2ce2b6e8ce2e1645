"""The sink and the journal: a result reaches the sink only once it is committed, so a run
killed with SIGKILL and resumed never hands the sink a result twice; a resumed run replays what
earlier runs recorded, so its sink ends with the same data as an uninterrupted run's.

The real ``batchpool run`` CLI in child processes; the sink writes one line per call to a file
with one O_APPEND write ("L index" for a result of this run, "R index" for a replayed one), so
the file survives the kill and tells which results the sink saw, and how.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import pytest
from helpers import group_alive, wait_for

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-c", "from batchpool.cli import main; main(prog_name='batchpool')"]
REPO = Path(__file__).resolve().parents[1]
RUN_DEADLINE = 90.0

SINK_PY = """
import os
import time

from batchpool import Pipeline, Task

N = int(os.environ["SINK_N"])


class Tick(Task):
    retries = 0

    def run(self, n):
        time.sleep(float(os.environ.get("SINK_SLEEP", "0.002")))
        return {"n": n, "bytes": bytes([n % 256])}


def sink(result):
    tag = "R" if getattr(result, "replayed", False) else "L"
    n = result.index
    same = result.payload == n and result.value == {"n": n, "bytes": bytes([n % 256])}
    fd = os.open(os.environ["SINK_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{tag} {n} {'same' if same else 'DIFFERENT'}\\n".encode())
    finally:
        os.close(fd)


pipeline = Pipeline(list(range(N)), Tick(), name="sinkonce", sink=sink)
"""


def environ(**extra: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SINK_")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """The CLI in its own session; stderr to a file, so it never blocks on a full pipe."""
    with open(cwd / "stderr.txt", "wb") as err:
        return subprocess.Popen(
            [*CLI, *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def finish(proc: subprocess.Popen, cwd: Path) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=RUN_DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"the run did not end within {RUN_DEADLINE:g} s") from None
    return code, (cwd / "stderr.txt").read_text(errors="replace")


def sink_lines(path: Path) -> list[tuple[str, int]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = [line.split() for line in text.splitlines()]
    different = [line for line in lines if line[2] != "same"]
    assert not different, f"the sink got wrong payloads or values: {different[:5]}"
    return [(tag, int(index)) for tag, index, _ in lines]


def committed(journal: Path) -> set[int]:
    """Indexes with a final row committed to the journal, read without batchpool (none
    while the run has not created its table yet)."""
    with closing(sqlite3.connect(f"{journal.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone():
            return set()
        return {r[0] for r in conn.execute("SELECT idx FROM jobs WHERE status IS NOT NULL")}


def killed_mid_run(tmp_path: Path, env: dict[str, str], log: Path, journal: Path) -> None:
    """Start a run, SIGKILL its supervisor once the sink has seen a few hundred results, and
    wait until every process of it is gone."""
    args = ["run", "sinks.py", "--procs", "2", "--no-progress", "--journal", str(journal)]
    proc = start(args, tmp_path, env)
    try:
        wait_for(
            lambda: len(sink_lines(log)) >= 300 or proc.poll() is not None,
            RUN_DEADLINE,
            "the sink to see 300 results",
        )
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # the supervisor alone, mid-run
        proc.wait(timeout=RUN_DEADLINE)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wait_for(lambda: not group_alive(proc.pid), 15, "the killed run's processes to exit")


@pytest.mark.timeout(180)
def test_sigkill_then_resume_hands_each_result_to_the_sink_once(tmp_path: Path) -> None:
    n, log, journal = 2000, tmp_path / "sink.log", tmp_path / "j.sqlite"
    (tmp_path / "sinks.py").write_text(textwrap.dedent(SINK_PY))
    env = environ(SINK_N=n, SINK_LOG=log)
    killed_mid_run(tmp_path, env, log, journal)
    first = [index for _, index in sink_lines(log)]
    assert len(first) == len(set(first)), "the killed run gave the sink a result twice"
    saved = committed(journal)
    assert len(saved) < n, "the kill should strike mid-run"
    unsaved = sorted(set(first) - saved)
    assert not unsaved, f"the sink saw {len(unsaved)} results never committed: {unsaved[:10]}"

    before = len(sink_lines(log))
    args = ["run", "sinks.py", "--procs", "2", "--no-progress", "--journal", str(journal)]
    code, err = finish(start([*args, "--resume", "--output", "out.jsonl"], tmp_path, env), tmp_path)
    assert code == 0, err
    live = [index for tag, index in sink_lines(log) if tag == "L"]
    twice = sorted({i for i in live if live.count(i) > 1}) if len(live) != len(set(live)) else []
    assert not twice, f"{len(twice)} results reached the sink live twice, e.g. {twice[:10]}"
    second = sink_lines(log)[before:]
    assert not {i for tag, i in second if tag == "L"} & saved, "a committed job ran again"
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(n))
    # The resumed run's sink saw every result once: the earlier ones replayed, in index order.
    replayed = [i for tag, i in second if tag == "R"]
    assert replayed == sorted(saved), "the resume did not replay exactly what was recorded"
    assert sorted(i for _, i in second) == list(range(n))


def test_mandelbrot_interrupted_then_resumed_writes_its_image(tmp_path: Path) -> None:
    """The example's sink assembles tiles in memory: a resumed run gives it the earlier run's
    tiles back, byte for byte, so the image is written."""
    sys.path.insert(0, str(REPO / "pipelines"))
    try:
        import mandelbrot
    finally:
        sys.path.remove(str(REPO / "pipelines"))
    args = ["run", str(REPO / "pipelines" / "mandelbrot.py"), "--procs", "2", "--no-progress"]
    journal = tmp_path / ".batchpool" / "mandelbrot.sqlite"
    proc = start(args, tmp_path, environ())
    try:
        wait_for(
            lambda: (journal.exists() and len(committed(journal)) >= 3) or proc.poll() is not None,
            RUN_DEADLINE,
            "three tiles committed",
        )
        os.killpg(proc.pid, signal.SIGINT)
    finally:
        code, err = finish(proc, tmp_path)
    assert code == 130, err
    assert not (tmp_path / "mandelbrot.pgm").exists()
    earlier = committed(journal)
    assert 3 <= len(earlier) < len(mandelbrot.TILES)

    code, err = finish(start([*args, "--resume"], tmp_path, environ()), tmp_path)
    assert code == 0, err
    image = (tmp_path / "mandelbrot.pgm").read_bytes()
    header = f"P5\n{mandelbrot.WIDTH} {mandelbrot.HEIGHT}\n255\n".encode()
    assert image.startswith(header) and len(image) == len(header) + 640 * 480
    pixels = image[len(header) :]
    for index in sorted(earlier)[:2]:  # tiles of the first run, drawn from the replay
        x0, y0, tile = mandelbrot.Tile().run(mandelbrot.TILES[index])
        for row in range(mandelbrot.TILE_H):
            start_at = (y0 + row) * mandelbrot.WIDTH + x0
            assert pixels[start_at : start_at + mandelbrot.TILE_W] == tile[row * 80 : row * 80 + 80]
