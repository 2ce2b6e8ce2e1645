"""Durability under failure injection: the real ``batchpool run`` CLI in child processes, killed
and interrupted again and again, starved of disk, fed broken or foreign journals.

The pipeline is tests/durability_pipeline.py (configured by DUR_* environment variables). Its
jobs append their payload to a side-effect file with one O_APPEND write each, so the file is a
log of every attempt that started; comparing it with what the journal held as final at each
kill shows whether a resume ever ran a finished job again.

Single SIGINT / SIGTERM / SIGKILL-then-resume cases live in test_cli.py; this module is the
stress side: many kills in a row, every process gone after each, disk full, concurrent runs.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import time
from contextlib import closing
from pathlib import Path

import psutil
import pytest
from helpers import (
    CHILD_DEADLINE,
    bp,
    cli,
    connect_ro,
    dur_env,
    dur_run,
    finish,
    integrity,
    journal_meta,
    no_traceback,
    one_line,
    output_rows,
    start_logged,
    wait_for,
)
from helpers import DURABILITY_PIPELINE as PIPELINE

pytestmark = pytest.mark.timeout(120)

GONE_DEADLINE = 5.0  # seconds the processes of a dead supervisor get to exit on their own
RUN_DEADLINE = CHILD_DEADLINE  # seconds any single CLI run may take here


# -- helpers ---------------------------------------------------------------------------------


def line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def committed(journal: Path) -> dict[int, tuple]:
    """index -> (status, value, finished_at) of every final row committed to the journal,
    read independently of batchpool (read-only SQLite). Empty if no run got that far."""
    if not journal.exists() or journal.stat().st_size == 0:
        return {}
    with closing(connect_ro(journal)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if "jobs" not in tables:
            return {}
        sql = "SELECT idx, status, value, finished_at FROM jobs WHERE status IS NOT NULL"
        return {idx: rest for idx, *rest in conn.execute(sql)}


def check_output(path: Path, n: int, pad: int = 0) -> None:
    from durability_pipeline import expected_value

    rows = output_rows(path, n)
    bad = [r for r in rows if not r["ok"] or r["value"] != expected_value(r["index"], pad)]
    assert not bad, f"{len(bad)} wrong rows, e.g. {bad[:3]}"


class Tree:
    """The processes of one CLI run, as seen while it ran: the supervisor's descendants
    (forkserver, resource tracker, workers forked by the forkserver)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[int, psutil.Process] = {}

    def look(self) -> None:
        try:
            for child in psutil.Process(self.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def kinds(self) -> tuple[set[str], int]:
        """(helpers among the supervisor's children, number of workers), read now: a process
        seen just after its fork may not have exec'd its own command line yet."""
        helpers, workers = set(), 0
        for proc in self.seen.values():
            try:
                ppid, cmd = proc.ppid(), " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if ppid != self.pid:
                workers += 1
            else:
                helpers.update(h for h in ("forkserver", "resource_tracker") if h in cmd)
        return helpers, workers

    def alive(self) -> list[str]:
        left = []
        for pid, proc in self.seen.items():
            try:
                # is_running() compares create times: a reused pid is not ours.
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
            except psutil.Error:
                pass
        return left


# -- kill loop -------------------------------------------------------------------------------

KILL_N = 800  # 800 jobs of 10-30 ms on 2 procs: ~8 s of work, more than the loop's kills allow
# How each run of the loop ends: SIGKILL of the supervisor only; SIGINT / SIGTERM to the whole
# process group (a terminal, a service manager); two SIGINTs (stop at once).
PLAN = ["KILL", "INT", "KILL", "TERM", "KILL", "INT2", "KILL", "KILL"]
EXPECTED_CODE = {"KILL": -signal.SIGKILL, "INT": 130, "TERM": 143, "INT2": 130}
SLOW_MS = 3000  # job length in the INT2 run: a drain would take this long, a hard stop not


def interrupt(proc: subprocess.Popen, how: str, cwd: Path) -> None:
    if how == "KILL":
        os.kill(proc.pid, signal.SIGKILL)  # the supervisor alone: its workers must follow
    elif how == "TERM":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
        if how == "INT2":
            # Once the run loop has acted on the first one (it says so): the drain has started,
            # and lasts as long as the slow job that just started. A second signal that comes
            # before the loop looked is test_double_sigint_before_the_loop_looks' case.
            said = cwd / "stderr.txt"
            wait_for(lambda: "finishing" in said.read_text(), RUN_DEADLINE, "the drain message")
            os.killpg(proc.pid, signal.SIGINT)


def test_kill_loop_never_reruns_a_final_job_and_ends_complete(tmp_path: Path) -> None:
    side, journal = tmp_path / "side.txt", tmp_path / "j.sqlite"
    env = dur_env(n=KILL_N, ms="10,30", side=side)
    # Same payloads, so the same source for the journal; only the jobs' duration differs.
    slow_env = dur_env(n=KILL_N, ms=f"{SLOW_MS},{SLOW_MS}", side=side)
    base = dur_run(journal)
    rng = random.Random(20240604)
    snapshots: list[tuple[int, frozenset[int]]] = []  # (side-effect lines, finals) per kill
    finals: dict[int, tuple] = {}

    for i, how in enumerate(PLAN):
        lines_before = line_count(side)
        args = base + (["--resume"] if i else [])
        proc = start_logged(*args, cwd=tmp_path, env=slow_env if how == "INT2" else env)
        tree = Tree(proc.pid)
        started = time.monotonic()
        # INT2 strikes as soon as a (slow) job has started; the others after a random while.
        delay = 0.0 if how == "INT2" else rng.uniform(0.3, 1.5)

        def due(proc=proc, tree=tree, started=started, delay=delay, before=lines_before) -> bool:
            tree.look()
            if proc.poll() is not None:
                return True
            progressed = line_count(side) > before  # workers run jobs: signals are handled
            return progressed and time.monotonic() - started >= delay

        wait_for(due, RUN_DEADLINE, f"run {i} to make progress")
        tree.look()
        if proc.poll() is not None:
            code, err = finish(proc, tmp_path)
            pytest.fail(f"run {i} ended by itself (exit {code}) before its {how}:\n{err}")
        helpers, workers = tree.kinds()
        assert "forkserver" in helpers and workers >= 2, f"run {i}: {helpers}, {workers} workers"
        struck = time.monotonic()
        interrupt(proc, how, tmp_path)
        code, err = finish(proc, tmp_path)
        assert code == EXPECTED_CODE[how], f"run {i} ({how}): exit {code}\n{err}"
        if how == "INT2":
            took = time.monotonic() - struck
            assert took < SLOW_MS / 1000 * 0.8, f"a second SIGINT should not wait ({took:.2f} s)"
        no_traceback(err)
        # Nothing of that run stays behind: workers notice the supervisor is gone, the
        # forkserver and resource tracker see their pipes close.
        wait_for(lambda tree=tree: not tree.alive(), GONE_DEADLINE, f"run {i}'s processes")
        assert integrity(journal) == "ok"
        now = committed(journal)
        lost = sorted(finals.keys() - now.keys())
        assert not lost, f"run {i} lost final rows committed earlier: {lost[:10]}"
        changed = [k for k in finals if now[k] != finals[k]]
        assert not changed, f"run {i} rewrote final rows of earlier runs: {changed[:10]}"
        finals = now
        snapshots.append((line_count(side), frozenset(finals)))

    assert 0 < len(finals) < KILL_N, f"the loop should end mid-way; {len(finals)} final"
    code, err = cli(*base, "--resume", "--output", "out.jsonl", cwd=tmp_path, env=env)
    assert code == 0, err
    check_output(tmp_path / "out.jsonl", KILL_N)
    assert integrity(journal) == "ok"
    result = bp("results", journal, cwd=tmp_path, timeout=RUN_DEADLINE)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(KILL_N))
    assert all(r["ok"] for r in rows)
    end = committed(journal)
    assert all(end[k] == v for k, v in finals.items()), "the last resume rewrote earlier finals"

    runs = [int(x) for x in side.read_text().splitlines()]  # whole lines: one write each
    assert set(runs) == set(range(KILL_N))
    for k, (count, final) in enumerate(snapshots):
        again = sorted(set(runs[count:]) & final)
        assert not again, f"jobs final when run {k} stopped ran again later: {again[:10]}"


def pending_signals(pid: int) -> set[int]:
    """Signals sent to a process and not delivered yet (/proc: its own and its threads')."""
    masks = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        masks[key] = int(value.strip(), 16) if key in ("SigPnd", "ShdPnd") else None
    bits = masks["SigPnd"] | masks["ShdPnd"]
    return {n for n in range(1, 65) if bits >> (n - 1) & 1}


def test_two_signals_before_the_loop_looks_are_not_a_complete_run(tmp_path: Path) -> None:
    """A second signal that comes before the run loop has looked at the first (it looks every
    0.1 s while it waits for results): the run must still count as interrupted (exit 130,
    journal unfinished, resumable), not as complete.

    The race is made certain instead of tried for: the supervisor is stopped (SIGSTOP), both
    signals are sent and seen pending, then it continues and meets both at once. They are a
    SIGINT and a SIGTERM because two SIGINTs pending together are one (POSIX does not queue
    them); the handler counts stop requests, whichever signal makes them."""
    side, journal = tmp_path / "side.txt", tmp_path / "j.sqlite"
    env = dur_env(n=50, ms=f"{SLOW_MS},{SLOW_MS}", side=side)
    args = dur_run(journal)
    proc = start_logged(*args, "--output", "out.jsonl", cwd=tmp_path, env=env)
    tree = Tree(proc.pid)
    supervisor = psutil.Process(proc.pid)
    try:
        # Both workers in a slow job: nothing wakes the loop early.
        wait_for(
            lambda: tree.look() or line_count(side) >= 2 or proc.poll() is not None,
            RUN_DEADLINE,
            "two jobs to start",
        )
        assert proc.poll() is None, "the run ended before the signals"
        os.kill(proc.pid, signal.SIGSTOP)
        wait_for(lambda: supervisor.status() == psutil.STATUS_STOPPED, 10, "the stop")
        os.killpg(proc.pid, signal.SIGINT)  # the whole group, as a terminal does
        os.killpg(proc.pid, signal.SIGTERM)
        wanted = {signal.SIGINT, signal.SIGTERM}
        wait_for(lambda: wanted <= pending_signals(proc.pid), 10, "both signals pending")
        os.kill(proc.pid, signal.SIGCONT)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        code, err = finish(proc, tmp_path)
    wait_for(lambda: not tree.alive(), GONE_DEADLINE, "the run's processes")
    state, rows = journal_meta(journal)["state"], len(committed(journal))
    assert (code, state) == (130, "unfinished"), (
        f"exit {code}, journal {state!r} with {rows} of 50 jobs\n{err}"
    )
    assert rows < 50
    code, err = cli(
        *args, "--resume", "--output", "out.jsonl", cwd=tmp_path, env=dur_env(n=50, side=side)
    )
    assert code == 0, err
    check_output(tmp_path / "out.jsonl", 50)


# -- full disk -------------------------------------------------------------------------------

DISK_N = 1500
DISK_PAD = 1000  # ~1 KB values: the journal grows ~1 KB a job
DISK_LIMIT = 768 * 1024  # bytes any file of the run may reach: hit after a few commits


def _small_disk() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_LIMIT, DISK_LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG, nothing is killed


def test_full_disk_stops_cleanly_and_resume_completes(tmp_path: Path) -> None:
    journal = tmp_path / "j.sqlite"
    env = dur_env(n=DISK_N, ms="2,6", pad=DISK_PAD)
    base = dur_run(journal)
    code, err = cli(*base, cwd=tmp_path, env=env, preexec_fn=_small_disk)
    assert code == 2, f"exit {code} (SPEC: a journal error exits 2)\n{err}"
    no_traceback(err)
    errors = [line for line in err.splitlines() if "cannot write" in line]
    assert len(errors) == 1 and str(journal) in errors[0], err
    assert integrity(journal) == "ok"
    kept = committed(journal)
    assert 0 < len(kept) < DISK_N, f"the limit should bite mid-run; {len(kept)} rows committed"

    code, err = cli(*base, "--resume", "--output", "out.jsonl", cwd=tmp_path, env=env)
    assert code == 0, err
    check_output(tmp_path / "out.jsonl", DISK_N, DISK_PAD)
    assert integrity(journal) == "ok"
    end = committed(journal)
    assert all(end[k] == v for k, v in kept.items()), "rows committed before the error changed"


# -- concurrent use, broken and foreign journals --------------------------------------------


def test_second_run_on_a_journal_in_use_is_refused(tmp_path: Path) -> None:
    side, journal = tmp_path / "side.txt", tmp_path / "j.sqlite"
    env = dur_env(n=300, ms="30,50", side=side)  # ~6 s: outlasts three refused runs
    base = dur_run(journal)
    first = start_logged(*base, "--output", "out.jsonl", cwd=tmp_path, env=env)
    tree = Tree(first.pid)
    try:
        wait_for(lambda: line_count(side) or first.poll() is not None, RUN_DEADLINE, "progress")
        assert first.poll() is None, "the first run ended before the second could start"
        second = tmp_path / "second"
        second.mkdir()
        for extra in ([], ["--resume"], ["--fresh"]):
            code, err = cli(*base, *extra, cwd=second, env=env)
            assert code == 2, f"{extra}: exit {code}\n{err}"
            assert "in use" in one_line(err) and f"pid {first.pid}" in err, err
        assert first.poll() is None, "the first run must outlast the refusals (test too slow?)"
        tree.look()
    finally:
        code, err = finish(first, tmp_path)
    assert code == 0, err
    check_output(tmp_path / "out.jsonl", 300)
    assert sorted(int(x) for x in side.read_text().split()) == list(range(300))
    wait_for(lambda: not tree.alive(), GONE_DEADLINE, "the first run's processes")


GARBAGE = {
    "random": random.Random(7).randbytes(8192),
    "text": b"this is not a journal\n" * 200,
    # A valid SQLite header on a body of garbage: the damage is found past the header.
    "sqlite-header": b"SQLite format 3\x00\x10\x00\x01\x01\x00\x40\x20\x20"
    + random.Random(8).randbytes(16384 - 24),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_corrupt_journal_is_refused_with_one_line(tmp_path: Path, kind: str) -> None:
    journal = tmp_path / "j.sqlite"
    journal.write_bytes(GARBAGE[kind])
    env = dur_env(n=10, ms="0,1")
    for args in (
        ["run", PIPELINE, "--journal", str(journal), "--no-progress"],
        ["run", PIPELINE, "--journal", str(journal), "--no-progress", "--resume"],
        ["run", PIPELINE, "--journal", str(journal), "--no-progress", "--fresh"],
        ["results", str(journal)],
    ):
        code, err = cli(*args, cwd=tmp_path, env=env)
        assert code == 2, f"{args}: exit {code}\n{err}"
        assert str(journal) in one_line(err), err
    assert journal.read_bytes() == GARBAGE[kind], "a refused journal must be left untouched"


def test_journal_of_another_pipeline_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "j.sqlite"
    env = dur_env(n=20, ms="0,1")
    args = ["run", f"{PIPELINE}:other", "--journal", journal, "--no-progress"]
    code, err = cli(*args, cwd=tmp_path, env=env)
    assert code == 0, err
    before = committed(journal)
    assert len(before) == 20
    for extra in ([], ["--resume"], ["--fresh"], ["--retry-failed"]):
        args = ["run", PIPELINE, "--journal", str(journal), "--no-progress", *extra]
        code, err = cli(*args, cwd=tmp_path, env=env)
        assert code == 2, f"{extra}: exit {code}\n{err}"
        assert "durability_other" in one_line(err), err
    assert committed(journal) == before
    assert integrity(journal) == "ok"


# -- a second Ctrl-C after the drain, while --output is written -------------------------------

BIG_N = 40_000  # rows already in the journal: writing --output from them takes ~0.5 s


def test_second_sigint_while_output_is_written_exits_130(tmp_path: Path) -> None:
    from batchpool.journal import Journal, fingerprint

    journal, out = tmp_path / "j.sqlite", tmp_path / "out.jsonl"
    with Journal(journal, "durability") as book:  # an interrupted run that did nearly all
        book.begin(total=None, resume=False)
        for n in range(BIG_N):
            book.add_final(
                n,
                fingerprint(n),
                ok=True,
                value=3 * n,
                error=None,
                attempts=1,
                worker=None,
                elapsed=0.0,
            )
        book.finish(complete=False)
    side = tmp_path / "side.txt"
    env = dur_env(n=BIG_N + 2, ms="300,300", side=side)  # two slow jobs left
    args = dur_run(journal)
    proc = start_logged(*args, "--resume", "--output", str(out), cwd=tmp_path, env=env)
    tree = Tree(proc.pid)
    try:
        # Both slow jobs running: a drain finishes what runs and drops what only waits.
        started = lambda: line_count(side) >= 2  # noqa: E731
        wait_for(lambda: tree.look() or started() or proc.poll() is not None, 60, "both jobs")
        os.killpg(proc.pid, signal.SIGINT)  # drain: the two slow jobs finish
        tmp = out.with_name(out.name + ".tmp")
        wait_for(lambda: tmp.exists() or proc.poll() is not None, 30, "--output being written")
        # the case of the name: the run is still writing --output when the second one comes
        assert tmp.exists() and proc.poll() is None, "the run ended before --output was written"
        os.killpg(proc.pid, signal.SIGINT)  # a second Ctrl-C: stop at once, exit 130
    finally:
        code, err = finish(proc, tmp_path)
    wait_for(lambda: not tree.alive(), GONE_DEADLINE, "the run's processes")
    assert integrity(journal) == "ok"
    if out.exists():  # never a half-written file under the final name
        check_output(out, BIG_N + 2)
    resumed, resumed_err = cli(*args, "--resume", "--output", str(out), cwd=tmp_path, env=env)
    assert resumed == 0, resumed_err
    check_output(out, BIG_N + 2)
    assert code == 130, f"exit {code}\n{err}"
    no_traceback(err)
