"""Running the ``batchpool`` command and scripts for real: child processes, optionally with
stderr on a pseudo-terminal of a given width, as in an interactive shell."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines"
# The console script's entry point, run by this interpreter: works in any virtual environment.
CLI = [sys.executable, "-c", "from batchpool.cli import main; main(prog_name='batchpool')"]
# Variables that the examples and test pipelines read: none leaks in from the caller.
KNOBS = ("BP_", "PRIMES_", "MANDELBROT_", "LOGS_")


def environ(**extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(KNOBS)}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def run(
    argv: list[Any], cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=env or environ(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bp(*args: Any, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60):
    """``batchpool ARGS...``"""
    return run([*CLI, *args], cwd, env, timeout)


def one_line(stderr: str) -> str:
    """The whole of a refusal: exactly one non-empty line on stderr."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    return lines[0]


def on_terminal(
    args: list[Any], cwd: Path, columns: int = 100, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """``batchpool ARGS...`` with stderr on a pseudo-terminal ``columns`` wide; (exit code,
    everything it wrote there)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [*CLI, *map(str, args)],
        cwd=cwd,
        env=env or environ(),
        stdout=subprocess.DEVNULL,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


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
