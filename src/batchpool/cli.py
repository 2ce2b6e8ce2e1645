"""The ``batchpool`` command: run a pipeline file, export a journal's results.

Exit codes: 0 all jobs ok; 1 some failed (or the run stopped on an error after doing work);
2 usage, loading or journal errors; 124 when --deadline stopped the run (as timeout(1) exits);
130 after Ctrl-C; 143 after SIGTERM; 129 after SIGHUP.
Every message of the command starts with ``batchpool:``, click's own usage errors included.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import io
import os
import re
import shlex
import signal
import sys
import sysconfig
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from . import __version__, logs
from .backends import BackendUnavailable
from .durations import parse_duration
from .execution import output_line
from .formatting import csv_cell, to_json
from .journal import JournalError, JournalReader
from .pipeline import DEFAULT_JOURNAL, JournalOption, Pipeline, default_name
from .progress import summary
from .rates import parse_rate
from .report import RunReport
from .serve import INSTALL_HINT
from .serve import missing as missing_extra
from .serve.target import Target
from .stopping import DEADLINE
from .task import Task

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGNAL = {sig.name: 128 + sig for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
EXIT_DEADLINE = 124
SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
MIN_MEMORY = 1024**2  # no Python worker runs in less: a smaller limit is a typo for MB


class LoadError(click.ClickException):
    """Could not load the pipeline: a one-line message, exit 2."""

    exit_code = EXIT_USAGE

    def format_message(self) -> str:
        return self.message


def parse_size(text: str, minimum: int = MIN_MEMORY) -> int:
    """'2GB', '512M', '1.5GiB' -> bytes (units of 1024); at least 1 MB by default, as a
    worker's RSS limit under that is always a mistake ('--max-memory 10' meant 10MB, not 10
    bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (try 512MB or 2GB)")
    size = int(float(m.group(1)) * SIZE_UNITS[m.group(2)])
    if size < minimum:
        if minimum == MIN_MEMORY:
            raise ValueError(f"{text!r} is {size} bytes, below 1 MB; did you mean {m.group(1)}MB?")
        raise ValueError(f"{text!r} is {size} bytes, below the least allowed, {minimum}")
    return size


if TYPE_CHECKING:
    from .serve.metrics import Exporter

if TYPE_CHECKING:  # click >= 8.4 types a parameter type by what it converts to
    _AnyType = click.ParamType[Any]
else:
    _AnyType = click.ParamType


class _Parsed(_AnyType):
    """A value of the text a parser of batchpool's reads (a size, a duration, a rate): its
    ValueError becomes click's one-line usage error."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self.parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # a default, converted already
        try:
            return self.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


_SIZE = _Parsed("SIZE", parse_size)
_DURATION = _Parsed("DURATION", parse_duration)
_RATE = _Parsed("RATE", parse_rate)


Procs = int | tuple[int, int]

if TYPE_CHECKING:
    _ProcsType = click.ParamType[Procs]
else:
    _ProcsType = click.ParamType


class _Procs(_ProcsType):
    """N workers, or MIN:MAX for a pool that scales between them."""

    name = "N|MIN:MAX"

    def convert(
        self, value: str | Procs, param: click.Parameter | None, ctx: click.Context | None
    ) -> Procs:
        if not isinstance(value, str):
            return value
        low, colon, high = value.partition(":")
        try:
            bounds = (int(low), int(high)) if colon else (int(low), int(low))
        except ValueError:
            self.fail(f"{value!r} is not a number of workers N or a range MIN:MAX", param, ctx)
        if bounds[0] < 1 or bounds[1] < bounds[0]:
            self.fail(f"{value!r}: workers must be at least 1, and MIN <= MAX", param, ctx)
        return bounds if colon else bounds[0]


def load_pipeline(spec: str) -> Pipeline:
    """``file.py``, ``file.py:NAME`` or ``package.module:NAME`` -> the Pipeline object."""
    obj, where, attr, stem, preload = _load_object(spec)
    if not isinstance(obj, Pipeline):
        raise LoadError(f"{where} is a {type(obj).__name__}, not a batchpool.Pipeline")
    if preload:
        obj.preload = [preload]
    if obj.name is None:
        obj.name = default_name(stem, attr)
    return obj


def _load_object(spec: str) -> tuple[Any, str, str, str, tuple[str, str] | None]:
    """The attribute a spec names (default ``pipeline``): (it, ``target:attr``, attr, the
    file's or module's stem, the (module name, file) workers import first for a file)."""
    target, _, attr = spec.rpartition(":") if ":" in spec else (spec, "", "")
    attr = attr or "pipeline"
    if target.endswith(".py") or "/" in target or not target:
        module, stem, preload = _load_file(target or spec)
    else:
        module, stem, preload = _load_module(target), target.rpartition(".")[2], None
    if not hasattr(module, attr):
        raise LoadError(f"{target}: no attribute {attr!r} (define `{attr} = Pipeline(...)`)")
    return getattr(module, attr), f"{target}:{attr}", attr, stem, preload


def _load_file(file: str) -> tuple[ModuleType, str, tuple[str, str]]:
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
        raise LoadError(f"error loading {_where(exc, path)}: {_one_line(exc)}") from None
    return module, path.stem, (name, str(path))


def _where(exc: BaseException, file: Path | None = None) -> str:
    """``file.py:LINE`` of the failing statement in ``file`` (else in the innermost code of
    the user's), plus where the user's code raised, when that is elsewhere."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if (file is not None and Path(f.filename) == file) or _is_users(f.filename)
    ]
    if not frames:
        return str(file) if file else "?"
    mine = [f for f in frames if file is not None and Path(f.filename) == file]
    top, innermost = (mine or frames)[-1], frames[-1]
    where = f"{_short(top.filename)}:{top.lineno}"
    if innermost is not top:
        where += f" (raised at {_short(innermost.filename)}:{innermost.lineno})"
    return where


_NOT_USERS = tuple(
    {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    | {str(Path(__file__).resolve().parent)}
)


def _is_users(filename: str) -> bool:
    """Code of the user's: not Python's, an installed package's, batchpool's, importlib's."""
    return not filename.startswith("<") and not filename.startswith(_NOT_USERS)


def _short(filename: str) -> str:
    """A path relative to the current directory where it lies below it, else as it is."""
    try:
        return str(Path(filename).relative_to(Path.cwd()))
    except ValueError:
        return filename


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load_module(target: str) -> ModuleType:
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise LoadError(f"cannot import {target}: {exc}") from None
    except SyntaxError as exc:
        raise LoadError(f"syntax error in {exc.filename}, line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:
        raise LoadError(f"error importing {target} at {_where(exc)}: {_one_line(exc)}") from None


_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class _Command(click.Group):
    """Click's group, with click's own errors (bad options, bad values) printed like the
    command's: one ``batchpool: ...`` line, not click's usage block and ``Error:``."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except _NO_ARGS as exc:  # plain `batchpool`: the help, as click prints it
            click.echo(exc.format_message(), err=True)
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            _fail(exc.format_message() + where, exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail("aborted", EXIT_FAILED)
        sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"batchpool: {message}", err=True)
    sys.exit(code)


F = TypeVar("F", bound=Callable[..., Any])


def _job_options(command: F) -> F:
    """The options ``run`` and ``serve`` share: how jobs are retried, timed, paced, started."""
    options = [
        click.option(
            "--retries", type=click.IntRange(min=0), help="Retries per job (overrides tasks)."
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0, min_open=True),
            help="Seconds per attempt; past it the worker is killed and replaced.",
        ),
        click.option(
            "--backoff", type=click.FloatRange(min=0), help="Seconds before the first retry."
        ),
        click.option(
            "--rate-limit",
            type=_RATE,
            help="Attempt starts per stage, across all workers: 100/s, 30/m, 1000/h or a number "
            "per second (overrides tasks).",
        ),
        click.option(
            "--start-method",
            type=click.Choice(["fork", "forkserver", "spawn"]),
            help="How workers start [default: forkserver].",
        ),
        click.option(
            "--max-memory",
            type=_SIZE,
            help="Retire a worker above this RSS, e.g. 2GB (at least 1MB).",
        ),
    ]
    for option in reversed(options):  # as if stacked in this order above the function
        command = option(command)
    return command


@click.group(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchpool")
def main() -> None:
    """Run large batches of CPU-bound work across processes, reliably.

    Failed jobs are retried with backoff, hung ones time out, crashed workers are replaced,
    and a SQLite journal lets an interrupted run resume where it stopped.
    """
    _workers_skip_the_script()


def _workers_skip_the_script() -> None:
    """Name the ``batchpool`` script's module as ``python -m batchpool`` would.

    A forkserver or spawn worker runs the parent's main script again before its first job
    (multiprocessing does, for what the script defines), unless the main module is named
    ``*.__main__``. The ``batchpool`` script defines nothing a worker needs (the pipeline file
    is loaded on its own), and running it again would import click, the journal, the progress
    bar and the supervisor into every worker: tens of ms of its start-up, and memory."""
    script = sys.modules.get("__main__")
    if script is not None and getattr(script, "__spec__", None) is None:
        script.__spec__ = importlib.util.find_spec("batchpool.__main__")


@main.command()
@click.argument("pipeline")
@click.option(
    "--procs",
    type=_Procs(),
    help="Worker processes [default: CPU count]; MIN:MAX scales between them with the backlog.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="With --procs MIN:MAX: seconds before an idle worker retires [default: 10].",
)
@_job_options
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
@click.option(
    "--deadline",
    type=_DURATION,
    help="Stop intake after this long (90, 1.5s, 30m, 2h), finish the running jobs, exit 124; "
    "--resume continues.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Log retries, crashes and each failed job; -vv also each result and the pool's state.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False),
    help="Append timestamped log lines at INFO (retries, crashes, scaling...), even with -q.",
)
@click.option(
    "--metrics-port",
    metavar="[HOST:]PORT",
    help="Serve Prometheus metrics on http://HOST:PORT/metrics while the run lasts "
    "(HOST: 127.0.0.1 unless given; PORT 0: any free one). Needs the serve extra.",
)
def run(pipeline: str, **opts: Any) -> None:
    """Run PIPELINE: path/to/file.py[:NAME] or package.module:NAME (default NAME: pipeline)."""
    _check_run_options(opts)
    metrics_at = _address(opts["metrics_port"]) if opts["metrics_port"] else None
    if metrics_at and missing_extra(("prometheus_client",)):
        _fail(f"--metrics-port needs prometheus_client, which is not installed: {INSTALL_HINT}")
    try:
        logs.setup(opts["verbose"], opts["quiet"], opts["log_file"])
    except OSError as exc:
        _fail(f"cannot write --log-file {opts['log_file']}: {exc.strerror or exc}")
    pipe = load_pipeline(pipeline)
    exporter = _exporter(metrics_at, pipe, opts["quiet"]) if metrics_at else None
    try:
        report = pipe._execute(
            opts["procs"],
            journal=_journal_option(opts),
            resume=opts["resume"],
            fresh=opts["fresh"],
            retry_failed=opts["retry_failed"],
            progress=not (opts["no_progress"] or opts["quiet"]),
            output=opts["output"],
            deadline=opts["deadline"],
            on_pool=exporter.attach if exporter else None,
            **_pool_options(opts),
        )
    except JournalError as exc:
        _fail(str(exc))
    except (ValueError, TypeError) as exc:  # settings refused when the pool is built
        _fail(f"invalid settings: {exc}")
    except (BackendUnavailable, ConnectionError) as exc:  # a backend missing or unreachable
        _fail(str(exc))
    finally:
        if exporter:
            exporter.close()
    if report.error:
        click.echo(f"batchpool: run stopped ({report.stopped_by}):\n{report.error}", err=True)
    if not opts["quiet"]:
        click.echo(summary(report), err=True)
        for line in _next_steps(report, pipeline, opts["journal"]):
            click.echo(line, err=True)
    code = _exit_code(report)
    if opts["report"]:
        try:
            _write_atomically(Path(opts["report"]), to_json(report.to_dict(), indent=2) + "\n")
        except OSError as exc:  # checked before the run: the disk filled or the folder went
            click.echo(f"batchpool: cannot write --report {opts['report']}: {exc}", err=True)
            code = code or EXIT_USAGE
    sys.exit(code)


def _check_run_options(opts: dict[str, Any]) -> None:
    """Options that exclude or need each other: a usage error before anything starts."""
    if opts["quiet"] and opts["verbose"]:
        raise click.UsageError("-q and -v exclude each other")
    if opts["journal"] and opts["no_journal"]:
        raise click.UsageError("--journal and --no-journal exclude each other")
    if opts["fresh"] and (opts["resume"] or opts["retry_failed"]):
        raise click.UsageError("--fresh starts over; it cannot be combined with --resume")
    if opts["no_journal"] and (opts["resume"] or opts["retry_failed"]):
        raise click.UsageError("--resume needs a journal")
    if opts["address"] and opts["backend"] != "ray":
        raise click.UsageError("--address is for --backend ray")
    if opts["backend"] == "ray" and importlib.util.find_spec("ray") is None:
        _fail(
            "--backend ray needs Ray: pip install 'ray>=2.9' (in a checkout: pip install '.[ray]')"
        )
    for option in ("output", "report"):
        if opts[option]:
            _check_writable(opts[option], f"--{option}")
    if opts["idle_timeout"] is not None and not isinstance(opts["procs"], tuple):
        raise click.UsageError("--idle-timeout is for --procs MIN:MAX")


def _journal_option(opts: dict[str, Any]) -> JournalOption:
    if opts["no_journal"]:
        return None
    return opts["journal"] or DEFAULT_JOURNAL


POOL_OPTIONS = (
    "retries",
    "timeout",
    "backoff",
    "rate_limit",
    "start_method",
    "max_memory",
    "address",
    "idle_timeout",
)


def _pool_options(opts: dict[str, Any]) -> dict[str, Any]:
    """The pool's settings the command line gave; the rest keep the task's or Pool()'s."""
    options = {k: opts[k] for k in POOL_OPTIONS if opts[k] is not None}
    if opts["backend"] != "local":
        options["backend"] = opts["backend"]
    return options


def _exit_code(report: RunReport) -> int:
    """SPEC's exit codes: a signal's, the deadline's, a journal error's, failed jobs'."""
    if report.stopped_by in EXIT_SIGNAL:
        return EXIT_SIGNAL[report.stopped_by]
    if report.stopped_by == DEADLINE:
        return EXIT_DEADLINE
    if report.stopped_by == "journal":  # disk full, journal deleted: a journal error
        return EXIT_USAGE
    return EXIT_FAILED if report.failed or report.error else 0


def _address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); the host defaults to the loopback address."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"not a port: {text!r} (try 9100 or 0.0.0.0:9100)")
    return host.strip("[]") or "127.0.0.1", int(port)


def _exporter(address: tuple[str, int], pipe: Pipeline, quiet: bool) -> Exporter:
    """The metrics server of ``run --metrics-port``, listening before any job runs."""
    from .serve.metrics import Exporter

    host, port = address
    try:
        names = [type(stage).__name__ for stage in pipe.stages]
        exporter = Exporter(host, port, pipe.name or "pipeline", names)
    except OSError as exc:
        _fail(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}")
    if not quiet:
        where = f"[{host}]" if ":" in host else host
        click.echo(f"batchpool: metrics on http://{where}:{exporter.port}/metrics", err=True)
    return exporter


def _check_writable(path: str, option: str) -> None:
    """Refuse, before any job runs, an output file the end of the run could not write."""
    folder = Path(path).parent
    if not folder.is_dir():
        reason = "is not a directory" if folder.exists() else "does not exist"
        _fail(f"{option} {path}: {folder} {reason}")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".batchpool-probe-")
    except OSError as exc:
        _fail(f"{option} {path}: cannot write in {folder} ({exc.strerror or exc})")
    os.close(fd)
    os.unlink(probe)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _next_steps(report: RunReport, spec: str, journal_option: str | None) -> list[str]:
    """The command that continues a stopped run, and the one that lists the failures."""
    if report.journal is None:  # --no-journal: nothing to resume or to list
        return []
    lines = []
    if report.interrupted:
        again = ["batchpool", "run", spec]
        if journal_option:
            again += ["--journal", journal_option]
        lines.append(f"continue with: {shlex.join([*again, '--resume'])}")
    if report.failed:
        lines.append(
            f"failed jobs: {shlex.join(['batchpool', 'results', report.journal, '--failed'])}"
        )
    return lines


@main.command()
@click.argument("journal", type=click.Path(dir_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv"]),
    default="jsonl",
    show_default=True,
    help="jsonl: one JSON object per job, as --output writes. csv: a header, then index, ok "
    "(true/false), value (as JSON; empty when none), error_kind, error_type, error, attempts.",
)
@click.option("--failed", is_flag=True, help="Only the jobs that failed.")
def results(journal: str, fmt: str, failed: bool) -> None:
    """Export the results a JOURNAL holds (also while its run is unfinished)."""
    try:
        book = JournalReader(journal)
    except JournalError as exc:
        _fail(str(exc))
    # Text that UTF-8 cannot hold (a lone surrogate in an error message) is escaped, not fatal.
    out = io.TextIOWrapper(
        sys.stdout.buffer, encoding="utf-8", errors="backslashreplace", newline=""
    )
    try:
        with book:
            _export(book, fmt, failed, out)
    except JournalError as exc:  # a page damaged after the open-time check
        _fail(str(exc))
    finally:
        out.flush()
        out.detach()


def _export(book: JournalReader, fmt: str, failed: bool, out: io.TextIOBase) -> None:
    if fmt == "jsonl":
        for row in book.rows(failed_only=failed):
            out.write(output_line(row))
        return
    writer = csv.writer(out)
    writer.writerow(["index", "ok", "value", "error_kind", "error_type", "error", "attempts"])
    for row in book.rows(failed_only=failed):
        err = row["error"] or {}
        value = None if row["value"] is None else to_json(row["value"])
        cells = [row["index"], row["ok"], value]
        cells += [err.get("kind"), err.get("type"), err.get("message"), row["attempts"]]
        writer.writerow([csv_cell(c) for c in cells])


def load_target(spec: str) -> Target:
    """A pipeline (as for ``run``), a Task class (built with no arguments) or a Task."""
    obj, where, attr, stem, preload = _load_object(spec)
    if isinstance(obj, Pipeline):
        name = obj.name or default_name(stem, attr)
        return Target(name, list(obj.stages), [preload] if preload else list(obj.preload))
    if isinstance(obj, type) and issubclass(obj, Task):
        try:
            obj = obj()
        except Exception as exc:
            raise LoadError(f"cannot build {where}() with no arguments: {_one_line(exc)}") from None
    if not isinstance(obj, Task):
        raise LoadError(f"{where} is a {type(obj).__name__}, not a batchpool.Pipeline or Task")
    return Target(attr, [obj], [preload] if preload else [])


@main.command()
@click.argument("target")
@click.option(
    "--procs",
    type=_Procs(),
    help="Worker processes [default: CPU count]; MIN:MAX scales between them with the backlog.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on (0: any free one; the first line says which).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Jobs queued or running at most; a job past it is refused with 429.",
)
@click.option(
    "--max-body",
    type=_Parsed("SIZE", lambda text: parse_size(text, minimum=1)),
    default="1MB",
    show_default=True,
    help="Largest payload accepted; a larger one is refused with 413.",
)
@click.option(
    "--journal",
    type=click.Path(dir_okay=False),
    help="Record accepted jobs and their results; a server restarted on it runs the unfinished.",
)
@_job_options
@click.option("-v", "--verbose", count=True, help="Log retries and crashes; -vv also each request.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False),
    help="Append timestamped log lines at INFO (retries, crashes, scaling...), even with -q.",
)
def serve(target: str, **opts: Any) -> None:
    """Serve TARGET over HTTP: a pipeline (as for run; its stages serve each request) or a
    Task (path/to/file.py:ClassName, built with no arguments). See the README's "Serve"."""
    if opts["quiet"] and opts["verbose"]:
        raise click.UsageError("-q and -v exclude each other")
    gone = missing_extra()
    if gone:
        _fail(f"serve needs {', '.join(gone)}, which are not installed: {INSTALL_HINT}")
    from .serve.command import CannotListen, Settings
    from .serve.command import serve as run_server

    try:
        logs.setup(opts["verbose"], opts["quiet"], opts["log_file"])
    except OSError as exc:
        _fail(f"cannot write --log-file {opts['log_file']}: {exc.strerror or exc}")
    loaded = load_target(target)
    pool_options = {
        k: opts[k]
        for k in ("retries", "timeout", "backoff", "rate_limit", "start_method", "max_memory")
        if opts[k] is not None
    }
    settings = Settings(
        host=opts["host"],
        port=opts["port"],
        procs=opts["procs"],
        max_queue=opts["max_queue"],
        max_body=opts["max_body"],
        journal=opts["journal"],
        verbose=opts["verbose"],
        quiet=opts["quiet"],
        pool_options=pool_options,
    )
    try:
        code = run_server(loaded, settings)
    except (JournalError, CannotListen) as exc:
        _fail(str(exc))
    except (ValueError, TypeError) as exc:  # settings refused when the pool is built
        _fail(f"invalid settings: {exc}")
    sys.exit(code)


if __name__ == "__main__":  # python -m batchpool.cli
    main(prog_name="batchpool")
