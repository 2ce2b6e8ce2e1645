"""A log-analysis ETL in two streamed stages, over 40 generated web-server access logs.

The source generates the logs on first use (deterministic, seeded: each file is the same on
every machine) into ``.batchpool/logs-demo/`` under the current directory, reuses them when they
are already there, and yields their paths. Then, per file:

1. ``Parse`` reads the file into counts per status code and per endpoint, latency sums, and a
   latency histogram (a few hundred bytes, whatever the size of the file);
2. ``Derive`` turns those counts into rates: error rate (5xx), client-error rate (4xx), mean
   latency per endpoint, and p50/p95 latency estimated from the histogram.

Stage 2 starts on the first parsed file while stage 1 still parses the others. The sink, in the
supervisor, merges every file's numbers into one global summary; when the last file is in, it
writes ``logs_summary.json`` into the current directory and prints a few lines of it.

    batchpool run pipelines/logs_etl.py --procs 2
    python pipelines/logs_etl.py                    # the same run from the Python API

``LOGS_FILES`` and ``LOGS_LINES`` (40 and 5,000) set the number and size of the generated
logs, for a quick try; files already generated are reused as they are.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from batchpool import PermanentError, Pipeline, Task

FILES = int(os.environ.get("LOGS_FILES", "40"))
LINES_PER_FILE = int(os.environ.get("LOGS_LINES", "5000"))
LOG_DIR = Path(".batchpool") / "logs-demo"
SUMMARY = "logs_summary.json"
ENDPOINTS = ["/", "/login", "/search", "/api/items", "/api/orders", "/static/app.js"]
# Histogram bucket upper bounds in milliseconds; the last bucket is open-ended.
BUCKETS = [5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
LINE = re.compile(
    r'^(?P<ip>\S+) - - \[(?P<ts>[^\]]+)\] "(?P<method>[A-Z]+) (?P<path>\S+) HTTP/1\.1" '
    r"(?P<status>\d{3}) (?P<size>\d+) (?P<ms>\d+)ms$"
)


def _write_log(path: Path, seed: int) -> None:
    """One synthetic access log; the file's seed alone decides its content."""
    rng = random.Random(seed)
    slow = rng.choice(ENDPOINTS)  # each file has one endpoint having a bad day
    error_rate = rng.uniform(0.002, 0.05)
    lines = []
    for n in range(LINES_PER_FILE):
        endpoint = rng.choice(ENDPOINTS)
        ms = int(rng.lognormvariate(3.0, 0.8) * (4 if endpoint == slow else 1))
        roll = rng.random()
        if roll < error_rate:
            status = rng.choice([500, 502, 503])
        elif roll < error_rate + 0.03:
            status = rng.choice([400, 401, 404])
        else:
            status = 200 if endpoint != "/login" or rng.random() < 0.8 else 302
        method = "POST" if endpoint in ("/login", "/api/orders") else "GET"
        ip = f"10.{seed % 256}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        minute, second = divmod(n * 3600 // LINES_PER_FILE, 60)
        ts = f"01/Mar/2024:{seed % 24:02d}:{minute:02d}:{second:02d} +0000"
        size = rng.randrange(200, 20_000)
        lines.append(f'{ip} - - [{ts}] "{method} {endpoint} HTTP/1.1" {status} {size} {ms}ms\n')
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="ascii")
    tmp.replace(path)  # a run interrupted while generating never leaves half a file behind


def log_files() -> Iterator[str]:
    """The source: makes each demo log if missing and yields its absolute path, in a stable
    order. A generator: the run reads it lazily, a bounded window ahead of the workers."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    for i in range(FILES):
        path = LOG_DIR / f"access-{i:03d}.log"
        if not path.exists():
            _write_log(path, seed=1000 + i)
        yield str(path.resolve())


def _bucket(ms: int) -> int:
    for i, bound in enumerate(BUCKETS):
        if ms <= bound:
            return i
    return len(BUCKETS)


class Parse(Task):
    """Stage 1: a log file -> counts and latency sums (plain dicts and lists: JSON-friendly)."""

    retries = 2
    backoff = 0.1

    def run(self, path: str) -> dict:
        status: Counter[str] = Counter()
        requests: Counter[str] = Counter()
        latency_ms: Counter[str] = Counter()
        histogram = [0] * (len(BUCKETS) + 1)
        bad = 0
        try:
            with open(path, encoding="ascii") as f:
                for line in f:
                    m = LINE.match(line.rstrip("\n"))
                    if m is None:
                        bad += 1
                        continue
                    ms = int(m["ms"])
                    status[m["status"]] += 1
                    requests[m["path"]] += 1
                    latency_ms[m["path"]] += ms
                    histogram[_bucket(ms)] += 1
        except FileNotFoundError as exc:
            raise PermanentError(f"no such log file: {path}") from exc
        return {
            "file": Path(path).name,
            "status": dict(status),
            "requests": dict(requests),
            "latency_ms": dict(latency_ms),
            "histogram": histogram,
            "unparsed": bad,
        }


def _quantile_from_histogram(histogram: list[int], q: float) -> int | None:
    """The upper bound (ms) of the bucket holding the q-quantile: an estimate, by design."""
    total = sum(histogram)
    if not total:
        return None
    seen = 0
    for i, count in enumerate(histogram):
        seen += count
        if seen >= q * total:
            return BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1] * 2
    return BUCKETS[-1] * 2


class Derive(Task):
    """Stage 2: counts -> rates and latency estimates, keeping the counts for the merge."""

    def run(self, counts: dict) -> dict:
        total = sum(counts["status"].values())
        errors = sum(n for code, n in counts["status"].items() if code.startswith("5"))
        client = sum(n for code, n in counts["status"].items() if code.startswith("4"))
        mean = {
            endpoint: round(counts["latency_ms"][endpoint] / n, 1)
            for endpoint, n in counts["requests"].items()
        }
        return {
            **counts,
            "total": total,
            "error_rate": errors / total if total else 0.0,
            "client_error_rate": client / total if total else 0.0,
            "mean_latency_ms": mean,
            "slowest_endpoint": max(mean, key=mean.__getitem__) if mean else None,
            "p50_ms": _quantile_from_histogram(counts["histogram"], 0.50),
            "p95_ms": _quantile_from_histogram(counts["histogram"], 0.95),
        }


class Summary:
    """The sink: merges per-file results; writes the global summary when the last file is in."""

    def __init__(self, path: str = SUMMARY) -> None:
        self.path = path
        self.files: dict[str, dict] = {}
        self.failed: list[int] = []

    def __call__(self, result) -> None:
        if not result.ok:
            self.failed.append(result.index)
        else:
            self.files[result.value["file"]] = result.value
        if len(self.files) + len(self.failed) == FILES:
            self.write()

    def merged(self) -> dict:
        status: Counter[str] = Counter()
        requests: Counter[str] = Counter()
        latency_ms: Counter[str] = Counter()
        histogram = [0] * (len(BUCKETS) + 1)
        for value in self.files.values():
            status.update(value["status"])
            requests.update(value["requests"])
            latency_ms.update(value["latency_ms"])
            histogram = [a + b for a, b in zip(histogram, value["histogram"], strict=True)]
        total = sum(status.values())
        errors = sum(n for code, n in status.items() if code.startswith("5"))
        worst = max(self.files.values(), key=lambda v: v["error_rate"], default=None)
        return {
            "files": len(self.files),
            "failed_files": sorted(self.failed),
            "requests": total,
            "error_rate": round(errors / total, 5) if total else 0.0,
            "p50_ms": _quantile_from_histogram(histogram, 0.50),
            "p95_ms": _quantile_from_histogram(histogram, 0.95),
            "status": dict(sorted(status.items())),
            "requests_per_endpoint": dict(sorted(requests.items())),
            "mean_latency_ms": {
                endpoint: round(latency_ms[endpoint] / n, 1)
                for endpoint, n in sorted(requests.items())
            },
            "worst_file": worst and {"file": worst["file"], "error_rate": worst["error_rate"]},
        }

    def write(self) -> None:
        summary = self.merged()
        Path(self.path).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(
            f"{summary['files']} log files, {summary['requests']} requests: "
            f"error rate {summary['error_rate']:.2%}, p50 <= {summary['p50_ms']} ms, "
            f"p95 <= {summary['p95_ms']} ms; summary in {self.path}"
        )


summary = Summary()
# total: the source is a generator, so the progress bar learns its length from here.
pipeline = Pipeline(log_files, Parse(), Derive(), name="logs_etl", sink=summary, total=FILES)

if __name__ == "__main__":  # required: workers import this file again to find the tasks
    report = pipeline.run()
    sys.exit(1 if report.failed or report.error else 0)
