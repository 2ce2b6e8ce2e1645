"""Rate limits (batchpool.rates): what a setting means, and the admission's bound -- in any
window of T seconds at most rate * T + 1 admissions -- over random sequences of ``now``, with
the admissions as frequent as the rate lets them be (pure logic); then the workers' gate, with
real files, locks and time: starts an interval apart whoever takes them, and a holder killed
with the lock does not wedge the others."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpool.rates import Admission, GateFiles, open_gates, parse_rate

EPS = 1e-9


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("100/s", 100.0),
        ("30/m", 0.5),
        ("1000/h", 1000 / 3600),
        ("2.5/s", 2.5),
        (" 12 / m ", 0.2),
        ("7", 7.0),
        (0.25, 0.25),
        (3, 3.0),
        (None, None),
    ],
)
def test_rates_parse_to_attempts_per_second(text: object, per_second: float | None) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize(
    "bad",
    ["fast", "-1/s", "10/x", "0", "0/s", "", "/s", "1e3/s", 0, -5, 0.0, float("inf"), True, [1]],
)
def test_bad_rates_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="rate_limit"):
        parse_rate(bad)


@given(st.floats(0.001, 1e6), st.sampled_from([("s", 1), ("m", 60), ("h", 3600)]))
def test_a_unit_divides_by_its_seconds(n: float, unit: tuple[str, int]) -> None:
    assert parse_rate(f"{n!r}/{unit[0]}") == pytest.approx(n / unit[1])


@settings(max_examples=300, deadline=None)
@given(
    st.floats(0.1, 5000),
    st.lists(st.floats(0, 0.02), min_size=1, max_size=200),
)
def test_admissions_never_exceed_rate_times_window_plus_one(
    rate: float, steps: list[float]
) -> None:
    """Callers ask at random times (never going back) and take every admission offered."""
    gate = Admission(rate)
    now = 0.0
    admitted: list[float] = []
    for step in steps:
        now += step
        if gate.ready(now):
            gate.admit(now)
            admitted.append(now)
    for i in range(len(admitted)):
        for j in range(i + 1, len(admitted)):
            window = admitted[j] - admitted[i]
            assert j - i + 1 <= rate * window + 1 + EPS


@settings(max_examples=200, deadline=None)
@given(st.floats(0.1, 1000), st.floats(0, 100))
def test_the_first_goes_at_once_and_the_next_one_interval_later(rate: float, t: float) -> None:
    gate = Admission(rate)
    assert gate.ready(t)
    gate.admit(t)
    assert not gate.ready(t + 0.999 / rate)
    assert gate.ready(t + 1 / rate)


# -- the workers' gate: real files, real locks, real time ------------------------------------------


def test_starts_taken_at_a_gate_are_an_interval_apart_whoever_takes_them() -> None:
    """Three threads, each with the gate open on its own descriptor as each worker has it,
    take 4 starts each as fast as they can: every two starts are at least an interval apart."""
    interval = 0.05
    files = GateFiles([None, 1 / interval])
    try:
        times: list[float] = []
        lock = threading.Lock()

        def worker() -> None:
            gate = open_gates(files.specs)[1]
            try:
                for _ in range(4):
                    taken = gate.wait()  # read under the gate's lock: a thread descheduled
                    with lock:  # after it must not make two starts look closer
                        times.append(taken)
            finally:
                os.close(gate.fd)

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        times.sort()
        assert len(times) == 12
        assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= interval - 1e-6
    finally:
        files.remove()
    assert not Path(files.specs[0][1]).exists()
    assert open_gates(files.specs) == {}  # removed with its pool: admission alone


@pytest.mark.timeout(30)
def test_a_worker_killed_holding_the_gate_does_not_block_the_others() -> None:
    files = GateFiles([2.0])
    ((_, path, _),) = files.specs
    script = (
        "import fcntl, os, time\n"
        f"fd = os.open({path!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    try:
        with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) as holder:
            assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
            holder.kill()
        gate = open_gates(files.specs)[0]
        try:
            gate.wait()  # the kernel dropped the dead holder's lock
            gate.wait()  # and the next start comes an interval (0.5 s) later, not never
        finally:
            os.close(gate.fd)
    finally:
        files.remove()


def test_no_rate_limit_makes_no_gate() -> None:
    files = GateFiles([None, None])
    assert files.specs == ()
    files.remove()
