"""Every ratio the benchmark report prints reads the same way: batchpool's speed over the
other's, above 1 when batchpool is faster (the main table and the per-peer table alike)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import report  # noqa: E402


def _row(contender: str, wall: float) -> report.Row:
    row = report.Row(
        label="cpu1ms", workload="cpu1ms", kind="map", n=1000, contender=contender,
        method="forkserver", runs=1, errors=0,
    )  # fmt: skip
    row.wall_median = row.wall_min = row.wall_max = wall
    row.rate_median = row.rate_min = row.rate_max = 1000 / wall
    return row


def _cell(table: str, first: str, column: str) -> str:
    lines = table.splitlines()
    headers = lines[0].split()
    row = next(line.split() for line in lines[2:] if line.split()[0] == first)
    return row[headers.index(column)]


def test_both_tables_say_batchpool_is_twice_as_fast() -> None:
    rows = [_row("batchpool.map", 1.0), _row("mp.imap_unordered(c=1)", 2.0)]
    report.add_reference_ratios(rows)
    main = report.main_table(rows)
    assert "bp.map/this" in main.splitlines()[0]
    peer_line = next(line for line in main.splitlines() if "mp.imap_unordered(c=1)" in line)
    assert " 2.00 " in peer_line and "0.50" not in peer_line
    versus = report.versus_table(rows, "batchpool.map")
    assert versus is not None
    assert _cell(versus, "cpu1ms", "mp.c1") == "2.00"
