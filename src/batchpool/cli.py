"""The ``batchpool`` command: run a pipeline file, export a journal's results.

Exit codes: 0 all jobs ok; 1 some failed (or the run stopped on an error after doing work);
2 usage, loading or journal errors; 130 after Ctrl-C; 143 after SIGTERM; 129 after SIGHUP.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from . import __version__
from .backends import BackendUnavailable
from .journal import Journal, JournalError
from .pipeline import DEFAULT_JOURNAL, Pipeline, default_name, output_line
from .progress import summary

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGNAL = {sig.name: 128 + sig for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


class LoadError(click.ClickException):
    """Could not load the pipeline: a one-line message, exit 2."""

    exit_code = EXIT_USAGE

    def format_message(self) -> str:
        return self.message


def parse_size(text: str) -> int:
    """'2GB', '512M', '1.5GiB', '1000' -> bytes (units of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (try 512MB or 2GB)")
    size = int(float(m.group(1)) * SIZE_UNITS[m.group(2)])
    if size <= 0:
        raise ValueError(f"size must be > 0: {text!r}")
    return size


class _Size(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def load_pipeline(spec: str) -> Pipeline:
    """``file.py``, ``file.py:NAME`` or ``package.module:NAME`` -> the Pipeline object."""
    target, _, attr = spec.rpartition(":") if ":" in spec else (spec, "", "")
    attr = attr or "pipeline"
    if target.endswith(".py") or "/" in target or not target:
        module, stem, preload = _load_file(target or spec)
    else:
        module, stem, preload = _load_module(target), target.rpartition(".")[2], None
    if not hasattr(module, attr):
        raise LoadError(f"{target}: no attribute {attr!r} (define `{attr} = Pipeline(...)`)")
    obj = getattr(module, attr)
    if not isinstance(obj, Pipeline):
        raise LoadError(f"{target}:{attr} is a {type(obj).__name__}, not a batchpool.Pipeline")
    if preload:
        obj.preload = [preload]
    if obj.name is None:
        obj.name = default_name(stem, attr)
    return obj


def _load_file(file: str) -> tuple[Any, str, tuple[str, str]]:
    path = Path(file)
    if not path.is_file():
        raise LoadError(f"pipeline file not found: {file}")
    path = path.resolve()
    name = "batchpool_pipeline_" + re.sub(r"\W", "_", path.stem)
    sys.path.insert(0, str(path.parent))  # as `python file.py` would: siblings import
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot load {file}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise LoadError(f"syntax error in {file}, line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:
        raise LoadError(f"error loading {file}: {type(exc).__name__}: {exc}") from None
    return module, path.stem, (name, str(path))


def _load_module(target: str) -> Any:
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise LoadError(f"cannot import {target}: {exc}") from None
    except SyntaxError as exc:
        raise LoadError(f"syntax error in {exc.filename}, line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:
        raise LoadError(f"error importing {target}: {type(exc).__name__}: {exc}") from None


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _setup_logging(verbose: int, quiet: bool) -> None:
    logger = logging.getLogger("batchpool")
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("batchpool: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    if quiet:
        logger.setLevel(logging.ERROR)
    elif verbose:
        logger.setLevel(logging.INFO if verbose == 1 else logging.DEBUG)
    else:
        logger.setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchpool")
def main() -> None:
    """Run large batches of CPU-bound work across processes, reliably.

    Failed jobs are retried with backoff, hung ones time out, crashed workers are replaced,
    and a SQLite journal lets an interrupted run resume where it stopped.
    """


@main.command()
@click.argument("pipeline")
@click.option("--procs", type=click.IntRange(min=1), help="Worker processes [default: CPU count].")
@click.option("--retries", type=click.IntRange(min=0), help="Retries per job (overrides tasks).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds per attempt; past it the worker is killed and replaced.",
)
@click.option("--backoff", type=click.FloatRange(min=0), help="Seconds before the first retry.")
@click.option(
    "--start-method",
    type=click.Choice(["fork", "forkserver", "spawn"]),
    help="How workers start [default: forkserver].",
)
@click.option("--max-memory", type=_Size(), help="Retire a worker above this RSS, e.g. 2GB.")
@click.option(
    "--backend",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where workers run: processes here, or actors of a Ray cluster (see docs/cluster.md).",
)
@click.option(
    "--address",
    metavar="ADDR",
    help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT [default: a local instance].",
)
@click.option("--journal", type=click.Path(dir_okay=False), help="Journal file to use.")
@click.option(
    "--no-journal", is_flag=True, help="Keep no journal (an interrupted run cannot resume)."
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its journal.")
@click.option("--fresh", is_flag=True, help="Discard the journal's run and start over.")
@click.option("--retry-failed", is_flag=True, help="Resume, and run failed jobs again too.")
@click.option(
    "--output", type=click.Path(dir_okay=False), help="Write one JSON line per job, by index."
)
@click.option("--report", type=click.Path(dir_okay=False), help="Write the run report as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", count=True, help="Log retries and crashes (-vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def run(pipeline: str, **opts: Any) -> None:
    """Run PIPELINE: path/to/file.py[:NAME] or package.module:NAME (default NAME: pipeline)."""
    if opts["journal"] and opts["no_journal"]:
        raise click.UsageError("--journal and --no-journal exclude each other")
    if opts["fresh"] and (opts["resume"] or opts["retry_failed"]):
        raise click.UsageError("--fresh starts over; it cannot be combined with --resume")
    if opts["no_journal"] and (opts["resume"] or opts["retry_failed"]):
        raise click.UsageError("--resume needs a journal")
    if opts["address"] and opts["backend"] != "ray":
        raise click.UsageError("--address is for --backend ray")
    if opts["backend"] == "ray" and importlib.util.find_spec("ray") is None:
        click.echo("batchpool: --backend ray needs Ray: pip install 'batchpool[ray]'", err=True)
        sys.exit(EXIT_USAGE)
    _setup_logging(opts["verbose"], opts["quiet"])
    pipe = load_pipeline(pipeline)
    journal: Any = DEFAULT_JOURNAL
    if opts["no_journal"]:
        journal = None
    elif opts["journal"]:
        journal = opts["journal"]
    pool_options = {
        k: opts[k]
        for k in ("retries", "timeout", "backoff", "start_method", "max_memory", "address")
        if opts[k] is not None
    }
    if opts["backend"] != "local":
        pool_options["backend"] = opts["backend"]
    try:
        report = pipe._execute(
            opts["procs"],
            journal=journal,
            resume=opts["resume"],
            fresh=opts["fresh"],
            retry_failed=opts["retry_failed"],
            progress=not (opts["no_progress"] or opts["quiet"]),
            output=opts["output"],
            **pool_options,
        )
    except JournalError as exc:
        click.echo(f"batchpool: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except (ValueError, TypeError) as exc:  # settings refused when the pool is built
        click.echo(f"batchpool: invalid settings: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except (BackendUnavailable, ConnectionError) as exc:  # a backend missing or unreachable
        click.echo(f"batchpool: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    if report.error:
        click.echo(f"batchpool: run stopped ({report.stopped_by}):\n{report.error}", err=True)
    if not opts["quiet"]:
        click.echo(summary(report), err=True)
    if opts["report"]:
        Path(opts["report"]).write_text(json.dumps(report.to_dict(), indent=2, default=repr))
    if report.stopped_by in EXIT_SIGNAL:
        sys.exit(EXIT_SIGNAL[report.stopped_by])
    if report.stopped_by == "journal":  # disk full, journal deleted: a journal error
        sys.exit(EXIT_USAGE)
    sys.exit(EXIT_FAILED if report.failed or report.error else 0)


@main.command()
@click.argument("journal", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl")
@click.option("--failed", is_flag=True, help="Only the jobs that failed.")
def results(journal: str, fmt: str, failed: bool) -> None:
    """Export the results a JOURNAL holds (also while its run is unfinished)."""
    try:
        book = Journal.open_readonly(journal)
    except JournalError as exc:
        click.echo(f"batchpool: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    try:
        with book:
            _export(book, fmt, failed)
    except JournalError as exc:  # a page damaged after the open-time check
        click.echo(f"batchpool: {exc}", err=True)
        sys.exit(EXIT_USAGE)


def _export(book: Journal, fmt: str, failed: bool) -> None:
    out = click.get_text_stream("stdout")
    if fmt == "jsonl":
        for row in book.rows(failed_only=failed):
            out.write(output_line(row))
        return
    writer = csv.writer(out)
    writer.writerow(["index", "ok", "value", "error_kind", "error_type", "error", "attempts"])
    for row in book.rows(failed_only=failed):
        err = row["error"] or {}
        writer.writerow(
            [
                row["index"],
                row["ok"],
                json.dumps(row["value"], default=repr),
                err.get("kind", ""),
                err.get("type", ""),
                err.get("message", ""),
                row["attempts"],
            ]
        )
