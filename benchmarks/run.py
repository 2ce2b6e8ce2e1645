"""batchpool benchmark suite: batchpool against the usual process pools, on the same workloads.

    python benchmarks/run.py [--quick] [--only WORKLOAD[,..]] [--contenders NAME[,..]]
                             [--procs N] [--repeat R] [--start-method M] [--timeout S]
                             [--json OUT.json] [--plot OUT.png]

Method, and why:
- Each contender runs in its own harness process (harness.py), so a hang or crash is killed
  with its process group and reported as an error row, and no library's global state (loky's
  reusable executor, forkserver processes) touches another's measurements.
- Cells are interleaved: for each repeat, for each workload, every contender in a freshly
  shuffled order. Drift in machine load then spreads over all contenders instead of
  penalising whoever happened to run during a busy minute.
- Throughput is measured on a warm pool (created and warmed up untimed); start-up is its own
  workload, measured in freshly started harnesses at the beginning of every repeat.
- Results are verified (count and checksum) before a timing is accepted.
- Serial time for parallel efficiency comes from timing the workload's function in this
  process on a probe sample, scaled by a cost model (loops or jobs) to the whole batch, and
  re-measured before every workload of every repeat, since core speed drifts on shared hosts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # workers import `workloads` by name, under every start method

import report  # noqa: E402
from contenders import CONTENDERS, Contender, resolve  # noqa: E402
from workloads import WORKLOADS, Calibration, Workload, calibrate  # noqa: E402

HARNESS = HERE / "harness.py"
BOOT_TIMEOUT_S = 60.0
GIVE_UP = 2  # consecutive hangs or deaths after which a contender's remaining cells are skipped


class HarnessFailure(Exception):
    """The harness process hung past its deadline or died; the cell becomes an error row."""


class Harness:
    """A contender's measuring process, in its own session so its whole tree can be killed."""

    def __init__(self, contender: Contender, log_path: Path) -> None:
        self.contender = contender
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HARNESS), contender.name],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )

    def receive(self, timeout: float) -> dict[str, Any]:
        """One reply line, or HarnessFailure at the deadline or when the process is gone."""
        deadline = time.monotonic() + timeout
        stdout = self.proc.stdout
        assert stdout is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HarnessFailure(f"no result within the {timeout:g} s per-run timeout")
            ready, _, _ = select.select([stdout], [], [], min(0.25, remaining))
            if ready:
                line = stdout.readline()
                if line:
                    return json.loads(line)
                raise HarnessFailure(f"harness exited ({self.exit_text()}); see {self.log_path}")
            if self.proc.poll() is not None and not select.select([stdout], [], [], 0)[0]:
                raise HarnessFailure(f"harness exited ({self.exit_text()}); see {self.log_path}")

    def request(self, cell: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cell).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise HarnessFailure(f"harness exited ({self.exit_text()})") from exc
        return self.receive(timeout)

    def exit_text(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def kill(self) -> None:
        """SIGKILL the harness's process group: the harness, its pool, its workers, helpers."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def quit(self) -> None:
        """Ask politely, then make sure nothing of its group is left behind."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b'{"op": "quit"}\n')
            self.proc.stdin.flush()
            self.proc.wait(timeout=10)
        except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
            pass
        self.kill()


@dataclass
class Settings:
    quick: bool
    procs: int
    repeat: int
    start_method: str
    timeout: float
    seed: int


@dataclass
class Suite:
    """The harnesses of all contenders, restarted as the method requires, and their findings."""

    contenders: list[Contender]
    settings: Settings
    log_dir: Path
    harnesses: dict[str, Harness] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # consecutive hangs or deaths
    boots: int = 0

    @property
    def active(self) -> list[Contender]:
        return [c for c in self.contenders if c.name not in self.skipped]

    def boot(self, contenders: Sequence[Contender]) -> None:
        """Start harnesses together, then wait for each hello: they import their library in
        parallel, and the measuring only starts once all of them sit idle."""
        started = []
        for c in contenders:
            self.stop(c.name)
            self.boots += 1
            log = self.log_dir / f"{self.boots:03d}-{c.alias}.log"
            started.append(Harness(c, log))
        for h in started:
            self._greet(h)

    def _greet(self, h: Harness) -> None:
        name = h.contender.name
        try:
            hello = h.receive(BOOT_TIMEOUT_S)
        except HarnessFailure as exc:
            hello = {"available": False, "reason": f"harness did not start: {exc}"}
        if not hello["available"]:
            self.skipped[name] = hello["reason"]
            print(f"skipping {name}: {hello['reason']}", file=sys.stderr, flush=True)
            h.quit()
            return
        self.versions[name] = hello["version"]
        self.harnesses[name] = h

    def stop(self, name: str, kill: bool = False) -> None:
        h = self.harnesses.pop(name, None)
        if h is not None:
            h.kill() if kill else h.quit()

    def measure(self, c: Contender, cell: dict[str, Any], fresh: bool = False) -> dict[str, Any]:
        """One cell on `c`'s harness (booted on demand, or anew if `fresh`); a hang or death
        is an error reply.

        After GIVE_UP consecutive hangs or deaths the contender's remaining cells are not run:
        a library that deadlocks would otherwise cost a full timeout on every cell.
        """
        if self.failures.get(c.name, 0) >= GIVE_UP:
            return {"ok": False, "error": f"not run: gave up after {GIVE_UP} hangs/deaths in a row"}
        if fresh or c.name not in self.harnesses:
            self.boot([c])
            if c.name not in self.harnesses:
                return {"ok": False, "error": f"harness unavailable: {self.skipped.get(c.name)}"}
        h = self.harnesses[c.name]
        try:
            reply = h.request(cell, self.settings.timeout)
        except HarnessFailure as exc:
            self.harnesses.pop(c.name)
            h.kill()
            self.failures[c.name] = self.failures.get(c.name, 0) + 1
            return {"ok": False, "error": f"{exc} (process group killed)"}
        self.failures[c.name] = 0
        return reply

    def close(self, kill: bool = False) -> None:
        for name in list(self.harnesses):
            self.stop(name, kill)


def eligible(c: Contender, w: Workload) -> bool:
    """stream1m is batchpool's imap only: it checks batchpool's own streaming promise."""
    return c.streams if w.kind == "stream" else True


def make_cell(w: Workload, n: int, cal: Calibration, s: Settings) -> dict[str, Any]:
    return {
        "op": "cell",
        "workload": w.name,
        "n": n,
        "procs": s.procs,
        "start_method": s.start_method,
        "calibration": asdict(cal),
        "scale": w.scale_for(s.quick),
    }


def progress(repeat: int, s: Settings, w: Workload, n: int, c: Contender, rec: dict) -> None:
    """One line per cell on stderr, so a long run shows it is alive and what it sees."""
    lab = report.label(w.name, n, len(w.sizes_for(s.quick)) > 1)
    if not rec["ok"]:
        value = f"ERROR {rec['error']}"
    elif w.kind == "startup":
        value = f"{1000 * rec['wall']:.0f} ms"
    else:
        value = f"{report.human_rate(n / rec['wall'])} jobs/s"
    print(f"[{repeat + 1}/{s.repeat}] {lab:<16} {c.name:<28} {value}", file=sys.stderr, flush=True)


def run_cells(suite: Suite, workloads: list[Workload], cal: Calibration) -> list[dict[str, Any]]:
    """The interleaved schedule: repeat > workload > size > contenders in a shuffled order."""
    s = suite.settings
    rng = random.Random(s.seed)
    runs: list[dict[str, Any]] = []
    suite.boot(suite.contenders)
    for repeat in range(s.repeat):
        if repeat and any(w.kind == "startup" for w in workloads):
            suite.boot(suite.active)  # start-up is measured in fresh processes every repeat
        for w in workloads:
            for n in w.sizes_for(s.quick):
                serial = None if w.kind == "startup" else serial_seconds(w, n, cal, s.quick)
                order = [c for c in suite.active if eligible(c, w)]
                rng.shuffle(order)
                for position, c in enumerate(order):
                    # stream: a fresh supervisor, so the peak RSS is the stream's own
                    rec = suite.measure(c, make_cell(w, n, cal, s), fresh=w.kind == "stream")
                    rec.update(repeat=repeat, workload=w.name, n=n, contender=c.name)
                    rec.update(position=position, serial_s=serial)
                    runs.append(rec)
                    progress(repeat, s, w, n, c, rec)
    return runs


def time_probe(w: Workload, probe: list[Any]) -> float:
    fn = w.fn
    t0 = time.perf_counter()
    for p in probe:
        fn(p)
    return time.perf_counter() - t0


def serial_seconds(w: Workload, n: int, cal: Calibration, quick: bool) -> float:
    """In-process time the batch would take: fastest of 3 short probes, scaled by its cost.

    Taken afresh before each workload of each repeat, while every harness is idle: on a shared
    machine the speed of a core drifts by tens of percent within a run, and an estimate from
    the same minute as the timings it divides keeps parallel efficiency honest.
    """
    probe = w.probe(cal)
    units = sum(w.unit_cost(p, cal) for p in probe)
    per_unit = min(time_probe(w, probe) for _ in range(3)) / units
    return per_unit * w.total_units(n, cal, w.scale_for(quick))


def summarise(
    runs: list[dict[str, Any]],
    workloads: list[Workload],
    suite: Suite,
) -> list[report.Row]:
    s = suite.settings
    grouped: dict[tuple[str, str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in runs:
        w = WORKLOADS[rec["workload"]]
        grouped[(w.name, w.kind, rec["n"], rec["contender"])].append(rec)
    rows = []
    for w in workloads:  # canonical order: workload, size, then the contenders' own order
        multi = len(w.sizes_for(s.quick)) > 1
        for n in w.sizes_for(s.quick):
            for c in suite.contenders:
                key = (w.name, w.kind, n, c.name)
                if key not in grouped:
                    continue
                rows.append(
                    report.summarise_one(
                        key,
                        grouped[key],
                        c.method(s.start_method),
                        s.procs,
                        w.bytes_per_job,
                        multi,
                    )
                )
    report.add_reference_ratios(rows)
    return rows


def serial_summary(runs: list[dict[str, Any]], workloads: list[Workload], quick: bool) -> dict:
    """Median serial-time estimate per row label, for the JSON file."""
    out = {}
    for w in workloads:
        sizes = w.sizes_for(quick)
        for n in sizes:
            values = [r["serial_s"] for r in runs if r["workload"] == w.name and r["n"] == n]
            values = [v for v in values if v is not None]
            if values:
                out[report.label(w.name, n, len(sizes) > 1)] = statistics.median(values)
    return out


def machine_info() -> dict[str, Any]:
    import psutil

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    methods = multiprocessing.get_all_start_methods()
    default_method = "forkserver" if "forkserver" in methods else "spawn"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not numbers")
    p.add_argument("--only", help=f"workloads, comma-separated, from: {', '.join(WORKLOADS)}")
    p.add_argument("--contenders", help="contender names or aliases, comma-separated")
    p.add_argument("--procs", type=int, default=2, help="worker processes per pool (default 2)")
    p.add_argument("--repeat", type=int, help="repeats per cell (default 3; 2 with --quick)")
    p.add_argument("--start-method", choices=methods, default=default_method)
    p.add_argument("--timeout", type=float, help="per-run timeout, s (default 20 quick, 900)")
    p.add_argument("--seed", type=int, default=0, help="seed of the contender order shuffle")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="write raw and summary data")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="write a bar chart (matplotlib)")
    args = p.parse_args(argv)
    if args.procs < 1:
        p.error("--procs must be >= 1")
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def select_workloads(only: str | None) -> list[Workload]:
    if not only:
        return list(WORKLOADS.values())
    wanted = [x.strip() for x in only.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in WORKLOADS]
    if unknown:
        raise SystemExit(
            f"unknown workload(s): {', '.join(unknown)}; known: {', '.join(WORKLOADS)}"
        )
    return [w for w in WORKLOADS.values() if w.name in wanted]


def header_line(info: dict[str, Any], s: Settings, cal: Calibration, elapsed: float) -> str:
    """What the numbers depend on: machine, interpreter, settings, and how busy the host was."""
    load = ""
    if info["loadavg_start"] and info["loadavg_end"]:
        load = f", load avg {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}"
    return (
        f"batchpool benchmarks{' (quick)' if s.quick else ''}: {info['cpu_count']} CPUs, "
        f"Python {info['python']} on {info['platform']}\n"
        f"procs={s.procs}, start method {s.start_method} (column 'start' says what each used), "
        f"{s.repeat} repeats, spin calibrated at {cal.loops_per_ms:,.0f} loops/ms{load}, "
        f"{elapsed:.0f} s"
    )


def print_report(rows: list[report.Row], suite: Suite, header: str) -> None:
    print(header)
    print()
    print(report.main_table(rows))
    print()
    ref = report.reference_name(rows)
    if ref:
        alias = CONTENDERS[ref].alias
        print(
            f"{alias}/this: {ref} speed / this row's speed (jobs/s, or 1/start-up time); "
            ">1: batchpool faster (every ratio here reads that way)."
        )
    print("par.eff: serial time / (wall x procs). sup.cpu: supervisor CPU time / wall.")
    for name in ("batchpool.map", "batchpool.imap"):
        table = report.versus_table(rows, name)
        if table:
            print()
            print(f"{name} speed / peer speed (>1: batchpool faster)")
            print(table)
    if any(r.contender.startswith("batchpool") for r in rows):
        print(f"\npeers: {report.legend()}")
    for name, reason in suite.skipped.items():
        print(f"skipped {name}: {reason}")


def _compile_sources() -> None:
    """Byte-compile batchpool and these benchmarks, so no timed process compiles them.

    An installed library has its .pyc files, and an editable checkout writes them on first
    import, unless PYTHONDONTWRITEBYTECODE is set (some sandboxes and containers set it):
    then every worker and every cell would compile batchpool's ~60 modules again (~80 ms of a
    ~110 ms start-up), which no peer, compiled at its install, pays. Imports read .pyc files
    whatever that variable says."""
    import compileall

    import batchpool

    for folder in (Path(batchpool.__file__).parent, Path(__file__).resolve().parent):
        compileall.compile_dir(folder, quiet=1)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        contenders = resolve(args.contenders)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    workloads = select_workloads(args.only)
    settings = Settings(
        quick=args.quick,
        procs=args.procs,
        repeat=args.repeat or (2 if args.quick else 3),
        start_method=args.start_method,
        timeout=args.timeout or (20.0 if args.quick else 900.0),
        seed=args.seed,
    )
    info = machine_info()
    began = time.perf_counter()
    _compile_sources()
    cal = calibrate()
    log_dir = Path(tempfile.mkdtemp(prefix="batchpool-bench-"))
    suite = Suite(contenders, settings, log_dir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so harnesses get killed
    try:
        runs = run_cells(suite, workloads, cal)
    except BaseException:
        suite.close(kill=True)  # Ctrl-C or SIGTERM: do not wait for cells to finish
        raise
    suite.close()
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = summarise(runs, workloads, suite)
    print_report(rows, suite, header_line(info, settings, cal, time.perf_counter() - began))
    if args.json:
        document = {
            "meta": {
                **info,
                "settings": asdict(settings),
                "versions": suite.versions,
                "skipped": suite.skipped,
                "methods": {c.name: c.method(settings.start_method) for c in contenders},
                "workloads": {w.name: w.description for w in workloads},
                "elapsed_s": time.perf_counter() - began,
            },
            "calibration": asdict(cal),
            "serial_seconds": serial_summary(runs, workloads, settings.quick),
            "runs": runs,
        }
        report.write_json(args.json, document, rows)
        print(f"JSON written to {args.json}")
    if args.plot:
        title = (
            f"batchpool benchmarks: {info['cpu_count']} cores, Python {info['python']}, "
            f"procs={settings.procs}, {settings.start_method}"
        )
        print(report.write_plot(args.plot, rows, title))
    if any(not r["ok"] for r in runs):
        print(f"harness logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
