"""Everything that goes wrong in a batch, in one small run: 24 jobs, each with a planned fate.

- most payloads just work;
- payloads 2, 5, 8, 14, 17, 20, 23 fail randomly-but-deterministically on their first attempts
  (1 or 2 failures, decided by a hash of the payload) and then succeed on a retry;
- payloads 7 and 19 raise ``PermanentError``: they fail at once, without retries;
- payload 13 raises ``ValueError`` on every attempt: it fails after ``retries + 1`` attempts;
- payload 11 hangs (``time.sleep(60)``) on its first attempt: past ``Task.timeout`` (1 s) its
  worker is killed and replaced, and the retry succeeds;
- payload 16 kills its worker process (``os._exit(1)``) on its first attempt: a "crash"; the
  worker is replaced and the retry succeeds.

Attempts are counted in marker files under ``.batchpool/flaky-markers/`` (one byte appended per
attempt), which work across processes and under every start method; the source wipes them at
the start of each run so every run shows the same story. Backoff is 0.05 s, so the whole run
takes a few seconds.

    batchpool run pipelines/flaky.py --procs 2 -v
    python pipelines/flaky.py                       # the same run from the Python API

**It ends with exit code 1** (3 of the 24 jobs fail for good: 7, 13 and 19), which is the point:
the sink prints which, and ``batchpool results .batchpool/flaky.sqlite --failed`` lists them
with their errors.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import zlib
from pathlib import Path

from batchpool import PermanentError, Pipeline, Task

JOBS = 24
MARKERS = Path(".batchpool") / "flaky-markers"
PERMANENT = {7, 19}
ALWAYS_FAILS = 13
HANGS = 11
CRASHES = 16
TRANSIENT = {2, 5, 8, 14, 17, 20, 23}


def payloads():
    """The source: wipe the attempt markers of an earlier run, then 0 .. JOBS-1."""
    shutil.rmtree(MARKERS, ignore_errors=True)
    MARKERS.mkdir(parents=True, exist_ok=True)
    yield from range(JOBS)


def attempt_number(payload: int) -> int:
    """1 for the first attempt at this payload, 2 for the second, ... (across processes)."""
    fd = os.open(MARKERS / f"{payload}.attempts", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, b".")
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


class Flaky(Task):
    retries = 3
    backoff = 0.05
    timeout = 1.0

    def run(self, n: int) -> int:
        attempt = attempt_number(n)
        if n in PERMANENT:
            raise PermanentError(f"payload {n} is invalid input: retrying cannot help")
        if n == ALWAYS_FAILS:
            raise ValueError(f"payload {n} fails on every attempt (this was attempt {attempt})")
        if n == HANGS and attempt == 1:
            time.sleep(60)  # stuck: the timeout kills this worker after 1 s
        if n == CRASHES and attempt == 1:
            os._exit(1)  # the worker dies mid-job, as on a segfault or an OOM kill
        if n in TRANSIENT and attempt <= 1 + zlib.crc32(b"flaky-%d" % n) % 2:
            raise ConnectionError(f"transient failure of payload {n} on attempt {attempt}")
        time.sleep(0.02)  # a little work
        return n * n


class Tally:
    """The sink: in the supervisor, once per job; says how the story ended after the last."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed: list[int] = []

    def __call__(self, result) -> None:
        if result.ok:
            self.ok += 1
        else:
            self.failed.append(result.index)
        if self.ok + len(self.failed) == JOBS:
            failed = ", ".join(map(str, sorted(self.failed))) or "none"
            print(f"{self.ok} of {JOBS} jobs ok, retries included; failed for good: {failed}")


# total: the source is a generator, so the progress bar learns its length from here.
pipeline = Pipeline(payloads, Flaky(), name="flaky", sink=Tally(), total=JOBS)

if __name__ == "__main__":  # required: workers import this file again to find Flaky
    report = pipeline.run()
    sys.exit(1 if report.failed or report.error else 0)
