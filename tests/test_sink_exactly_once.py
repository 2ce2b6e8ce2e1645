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
import sys
from pathlib import Path

import pytest
from helpers import (
    PIPELINES_DIR,
    child_env,
    cli,
    final_rows,
    finish,
    group_alive,
    start_logged,
    wait_for,
    write,
)

pytestmark = pytest.mark.timeout(120)

RUN_DEADLINE = 90.0
SINK_RUN = ["run", "sinks.py", "--procs", "2", "--no-progress"]

SINK_PY = """
import os
import time

from faults import append_line

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
    append_line(os.environ["SINK_LOG"], f"{tag} {n} {'same' if same else 'DIFFERENT'}")


pipeline = Pipeline(list(range(N)), Tick(), name="sinkonce", sink=sink)
"""


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
    """Indexes with a final row committed to the journal (none before it has one)."""
    return set(final_rows(journal))


def killed_mid_run(tmp_path: Path, env: dict[str, str], log: Path, journal: Path) -> None:
    """Start a run, SIGKILL its supervisor once the sink has seen a few hundred results, and
    wait until every process of it is gone."""
    with start_logged(*SINK_RUN, "--journal", journal, cwd=tmp_path, env=env) as proc:
        wait_for(
            lambda: len(sink_lines(log)) >= 300 or proc.poll() is not None,
            RUN_DEADLINE,
            "the sink to see 300 results",
        )
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # the supervisor alone, mid-run
        proc.wait(timeout=RUN_DEADLINE)
    wait_for(lambda: not group_alive(proc.pid), 15, "the killed run's processes to exit")


@pytest.mark.timeout(180)
def test_sigkill_then_resume_hands_each_result_to_the_sink_once(tmp_path: Path) -> None:
    n, log, journal = 2000, tmp_path / "sink.log", tmp_path / "j.sqlite"
    write(tmp_path / "sinks.py", SINK_PY)
    env = child_env(SINK_N=n, SINK_LOG=log)
    killed_mid_run(tmp_path, env, log, journal)
    first = [index for _, index in sink_lines(log)]
    assert len(first) == len(set(first)), "the killed run gave the sink a result twice"
    saved = committed(journal)
    assert len(saved) < n, "the kill should strike mid-run"
    unsaved = sorted(set(first) - saved)
    assert not unsaved, f"the sink saw {len(unsaved)} results never committed: {unsaved[:10]}"

    before = len(sink_lines(log))
    args = [*SINK_RUN, "--journal", journal, "--resume", "--output", "out.jsonl"]
    code, err = cli(*args, cwd=tmp_path, env=env, timeout=RUN_DEADLINE)
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
    sys.path.insert(0, str(PIPELINES_DIR))
    try:
        import mandelbrot
    finally:
        sys.path.remove(str(PIPELINES_DIR))
    args = ["run", PIPELINES_DIR / "mandelbrot.py", "--procs", "2", "--no-progress"]
    journal = tmp_path / ".batchpool" / "mandelbrot.sqlite"
    proc = start_logged(*args, cwd=tmp_path)
    try:
        wait_for(
            lambda: (journal.exists() and len(committed(journal)) >= 3) or proc.poll() is not None,
            RUN_DEADLINE,
            "three tiles committed",
        )
        os.killpg(proc.pid, signal.SIGINT)
    finally:
        code, err = finish(proc, tmp_path, RUN_DEADLINE)
    assert code == 130, err
    assert not (tmp_path / "mandelbrot.pgm").exists()
    earlier = committed(journal)
    assert 3 <= len(earlier) < len(mandelbrot.TILES)

    code, err = cli(*args, "--resume", cwd=tmp_path, timeout=RUN_DEADLINE)
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
