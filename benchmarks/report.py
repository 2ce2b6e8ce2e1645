"""Turn raw timings into the printed tables, the JSON file and the bar chart.

Medians summarise (robust to the odd disturbed run on a shared machine); min and max show how
much the repeats disagreed, which is the first thing to look at before believing a ratio.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contenders import CONTENDERS, REFERENCES

MB = 1_000_000


def human_count(n: int) -> str:
    """1000000 -> "1M", 20000 -> "20k": short enough for a row label."""
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= size and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


def human_rate(rate: float) -> str:
    if rate >= 1e6:
        return f"{rate / 1e6:.2f}M"
    if rate >= 1e3:
        return f"{rate / 1e3:.1f}k"
    return f"{rate:.1f}"


def label(workload: str, n: int, multi_size: bool) -> str:
    return f"{workload}@{human_count(n)}" if multi_size else workload


@dataclass
class Row:
    """The summary of one (workload, size, contender) over all its repeats."""

    label: str
    workload: str
    kind: str
    n: int
    contender: str
    method: str
    runs: int
    errors: int
    error: str | None = None
    wall_median: float | None = None
    wall_min: float | None = None
    wall_max: float | None = None
    rate_median: float | None = None
    rate_min: float | None = None
    rate_max: float | None = None
    # This row's speed / the reference's (batchpool.map), as in the JSON. The printed tables
    # show its inverse, the reference's speed over this row's, like every ratio they show.
    vs_reference: float | None = None
    efficiency: float | None = None  # serial time / (wall * procs), median over repeats
    supervisor_cpu: float | None = None  # parent CPU seconds / wall, median
    mb_per_s: float | None = None
    rss_peak_mb: float | None = None
    rss_growth_mb: float | None = None

    @property
    def ok(self) -> bool:
        return self.wall_median is not None

    def speed(self) -> float | None:
        """Higher is better for every kind: jobs/s, or 1/s for a start-up."""
        if self.wall_median is None:
            return None
        return self.n / self.wall_median if self.kind != "startup" else 1.0 / self.wall_median


def _median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def summarise_one(
    key: tuple[str, str, int, str],
    runs: Sequence[dict[str, Any]],
    method: str,
    procs: int,
    bytes_per_job: int,
    multi_size: bool,
) -> Row:
    workload, kind, n, contender = key
    good = [r for r in runs if r["ok"]]
    bad = [r for r in runs if not r["ok"]]
    row = Row(
        label=label(workload, n, multi_size),
        workload=workload,
        kind=kind,
        n=n,
        contender=contender,
        method=method,
        runs=len(runs),
        errors=len(bad),
        error=bad[0]["error"] if bad else None,
    )
    if not good:
        return row
    walls = [r["wall"] for r in good]
    row.wall_median, row.wall_min, row.wall_max = _median(walls), min(walls), max(walls)
    if kind != "startup":
        row.rate_median, row.rate_min, row.rate_max = (
            n / row.wall_median,
            n / max(walls),
            n / min(walls),
        )
        row.supervisor_cpu = _median(r["supervisor_cpu"] / r["wall"] for r in good)
        row.efficiency = _median(
            r["serial_s"] / (r["wall"] * procs) for r in good if r.get("serial_s") is not None
        )
    if bytes_per_job:
        row.mb_per_s = n * bytes_per_job / row.wall_median / MB
    if kind == "stream":
        row.rss_peak_mb = _median(r["rss_peak"] / MB for r in good)
        row.rss_growth_mb = _median((r["rss_peak"] - r["rss_before"]) / MB for r in good)
    return row


def reference_name(rows: Sequence[Row]) -> str | None:
    """batchpool.map, or batchpool.imap when only that one ran, or None."""
    present = {r.contender for r in rows}
    return next((name for name in REFERENCES if name in present), None)


def add_reference_ratios(rows: list[Row]) -> None:
    """Fill vs_reference: each row's speed over the reference's speed on the same cell."""
    name = reference_name(rows)
    reference = {r.label: r.speed() for r in rows if r.contender == name}
    for row in rows:
        mine, theirs = row.speed(), reference.get(row.label)
        if mine is not None and theirs:
            row.vs_reference = mine / theirs


def format_table(headers: Sequence[str], body: Sequence[Sequence[str]], right: set[int]) -> str:
    """Plain fixed-width text: columns sized to their content, numbers right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *body, strict=False)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(b) for b in body)])


def _value_cells(row: Row) -> tuple[str, str, str]:
    """(median, min-max, +/- %) in the row's natural unit: jobs/s, or ms for a start-up."""
    if row.kind == "startup":
        med, lo, hi = (1000 * x for x in (row.wall_median, row.wall_min, row.wall_max))
        spread = (hi - lo) / med
        return f"{med:.0f} ms", f"{lo:.0f}-{hi:.0f} ms", f"±{50 * spread:.0f}%"
    med, lo, hi = row.rate_median, row.rate_min, row.rate_max
    spread = (hi - lo) / med
    return f"{human_rate(med)}/s", f"{human_rate(lo)}-{human_rate(hi)}", f"±{50 * spread:.0f}%"


def _notes(row: Row) -> str:
    notes = []
    if row.mb_per_s is not None:
        notes.append(f"{row.mb_per_s:,.0f} MB/s")
    if row.rss_peak_mb is not None:
        notes.append(f"peak RSS {row.rss_peak_mb:.0f} MB (+{row.rss_growth_mb:.0f} MB)")
    if row.errors:
        notes.append(f"{row.errors}/{row.runs} runs failed: {row.error}")
    return "; ".join(notes)


def _percent(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1%}" if x < 0.1 else f"{x:.0%}"


def main_table(rows: Sequence[Row]) -> str:
    """One line per cell. Its ratio, like versus_table's, is batchpool's speed over the row's:
    above 1 means batchpool is faster."""
    ref = reference_name(rows)
    ratio_header = f"{CONTENDERS[ref].alias}/this" if ref else "bp/this"
    headers = ["workload", "contender", "start", "median", "min-max", "spread", ratio_header]
    headers += ["par.eff", "sup.cpu", "notes"]
    body = []
    for row in rows:
        if not row.ok:
            cells = ["ERROR", "", "", "", "", "", _notes(row)]
        else:
            ratio = f"{1 / row.vs_reference:.2f}" if row.vs_reference else "-"
            cells = [*_value_cells(row), ratio, _percent(row.efficiency)]
            cells += [_percent(row.supervisor_cpu), _notes(row)]
        body.append([row.label, row.contender, row.method, *cells])
    return format_table(headers, body, right={3, 4, 5, 6, 7, 8})


def versus_table(rows: Sequence[Row], batchpool_name: str) -> str | None:
    """batchpool's speed over each peer's, per workload: above 1 means batchpool is faster."""
    peers = [c for c in CONTENDERS.values() if not c.is_batchpool]
    present = {r.contender for r in rows}
    peers = [p for p in peers if p.name in present]
    mine = {r.label: r.speed() for r in rows if r.contender == batchpool_name}
    if not peers or not any(mine.values()):
        return None
    speeds = {(r.label, r.contender): r.speed() for r in rows}
    labels = list(dict.fromkeys(r.label for r in rows if r.kind != "stream"))
    body = []
    for lab in labels:
        cells = [lab]
        for peer in peers:
            theirs, ours = speeds.get((lab, peer.name)), mine.get(lab)
            cells.append(f"{ours / theirs:.2f}" if ours and theirs else "-")
        body.append(cells)
    headers = ["workload", *(p.alias for p in peers)]
    return format_table(headers, body, right=set(range(1, len(headers))))


def legend() -> str:
    return "  ".join(f"{c.alias}={c.name}" for c in CONTENDERS.values() if not c.is_batchpool)


def write_json(path: Path, document: dict[str, Any], rows: Sequence[Row]) -> None:
    document = {**document, "summary": [asdict(r) for r in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


def bar_positions(rows: Sequence[Row], labels: Sequence[str]) -> dict[tuple[str, str], float]:
    """x of each (label, contender) bar: centred within its group, whatever its group holds
    (stream1m has batchpool.imap alone)."""
    width = 0.8 / max(Counter(r.label for r in rows).values())
    xs = {}
    for j, lab in enumerate(labels):
        group = [r.contender for r in rows if r.label == lab]
        for i, name in enumerate(group):
            xs[(lab, name)] = j + (i - (len(group) - 1) / 2) * width
    return xs


def write_plot(path: Path, rows: Sequence[Row], title: str) -> str:
    """Grouped bars of median jobs/s per workload and contender, log scale. Returns a message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--plot skipped: matplotlib is not installed (pip install matplotlib); no {path}"
    rated = [r for r in rows if r.rate_median]
    if not rated:
        return "--plot skipped: no successful throughput measurements"
    labels = list(dict.fromkeys(r.label for r in rated))
    names = list(dict.fromkeys(r.contender for r in rated))
    xs = bar_positions(rated, labels)
    width = 0.8 / max(Counter(r.label for r in rated).values())
    colours = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(max(9.0, 1.7 * len(labels)), 6.0))
    for i, name in enumerate(names):
        mine = [r for r in rated if r.contender == name]
        ax.bar(
            [xs[(r.label, name)] for r in mine],
            [r.rate_median for r in mine],
            width,
            label=name,
            color=colours[i % len(colours)],
            edgecolor="black" if name.startswith("batchpool") else "none",
            hatch="//" if name.startswith("batchpool") else None,
        )
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("jobs/s (median of repeats, log scale)")
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"
