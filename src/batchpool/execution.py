"""One Pipeline.run(): the journal opened (or refused), a run.Run executed, ``--output``
written from the journal.

Apart from pipeline.py, which only describes a pipeline: every worker imports the pipeline's
file, and with it pipeline.py, before its first job, and must not pay for the journal, the
progress bar and the pool that only the supervisor's process uses (~100 ms of imports).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .durations import seconds_setting
from .formatting import to_json
from .journal import JournalError, JournalWriter, Outcome, fingerprint
from .mainguard import check_main_script
from .pipeline import DEFAULT_JOURNAL, POLICY_OVERRIDES, JournalOption
from .pool import Pool
from .report import RunReport
from .run import Run
from .stopping import Signals
from .task import Task, resolve_policy

if TYPE_CHECKING:
    from .pipeline import Pipeline


class UnfinishedRunError(JournalError):
    """The journal holds a run that did not finish; resume it or start fresh."""


class StagesChangedError(JournalError):
    """The stages differ from those that wrote the journal: their outcomes would not mix."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"the stages changed since journal {path} was written (other tasks, or tasks with "
            "other attributes): their results would not mix (start over with --fresh)"
        )


def execute(
    pipeline: Pipeline,
    procs: int | tuple[int, int] | None,
    *,
    journal: JournalOption,
    resume: bool,
    fresh: bool,
    retry_failed: bool,
    progress: bool,
    output: str | os.PathLike[str] | None,
    deadline: float | None = None,
    on_pool: Callable[[Pool], None] | None = None,
    **pool_options: Any,
) -> RunReport:
    """run() without the KeyboardInterrupt: the CLI reports an interrupted run itself.
    ``on_pool`` is shown the run's pool once it exists (``--metrics-port`` reads it)."""
    deadline = _check(pipeline, deadline, pool_options)
    name = pipeline._name()
    journal, tmp = _journal_path(journal, name, output)
    signals = Signals()
    # Until run() returns: a Ctrl-C while --output is written must not escape as
    # KeyboardInterrupt and leave a half-written file.
    restore = signals.install()
    try:
        stages = stages_fingerprint(pipeline.stages)
        book = _open_journal(journal, name, stages, resume, fresh, retry_failed)
        run = partial(
            Run,
            pipeline,
            book,
            procs=procs,
            pool_options=pool_options,
            resume=resume or retry_failed,
            retry_failed=retry_failed,
            progress=progress,
            signals=signals,
            stages=stages,
            deadline=deadline,
        )
        report = _run_journaled(run, book, output, on_pool)
        if tmp is not None:  # deleted below: the report must not name it
            report.journal = None
        return report
    finally:
        restore()
        if tmp is not None:
            tmp.cleanup()


def _check(
    pipeline: Pipeline, deadline: float | None, pool_options: dict[str, Any]
) -> float | None:
    """Settings that would fail the run: refused before a journal is made. Returns the
    deadline in seconds."""
    if deadline is not None:
        deadline = seconds_setting("deadline", deadline)
    check_main_script(pipeline.stages, pool_options)
    overrides = {k: v for k, v in pool_options.items() if k in POLICY_OVERRIDES}
    for stage in pipeline.stages:
        resolve_policy(stage, **overrides)
    return deadline


def _run_journaled(
    run: Callable[[], Run],
    book: JournalWriter | None,
    output: str | os.PathLike[str] | None,
    on_pool: Callable[[Pool], None] | None,
) -> RunReport:
    """Build the run and execute it; then close the journal, marked with how it ended."""
    try:
        started = run()
        if on_pool is not None:
            on_pool(started.pool)
        report = started.execute()
    except BaseException:  # a refusal too: what ran before it is committed
        if book is not None:
            book.close(flush=False)
        raise
    if book is not None:
        _close_journal(book, report, output)
    return report


def _journal_path(
    journal: JournalOption, name: str, output: str | os.PathLike[str] | None
) -> tuple[str | os.PathLike[str] | None, tempfile.TemporaryDirectory[str] | None]:
    """The journal's path, and the temporary directory holding it where the caller asked for
    none but for ``--output``, which is written from a journal."""
    if journal is DEFAULT_JOURNAL:
        return Path(".batchpool") / f"{name}.sqlite", None
    if journal is None and output is not None:
        tmp = tempfile.TemporaryDirectory(prefix="batchpool-")
        return Path(tmp.name) / "results.sqlite", tmp
    return journal, None


def _open_journal(
    path: str | os.PathLike[str] | None,
    name: str,
    stages: str,
    resume: bool,
    fresh: bool,
    retry_failed: bool,
) -> JournalWriter | None:
    if path is None:
        return None
    book = JournalWriter(path, name, fresh=fresh)
    if book.state == "unfinished" and not (resume or retry_failed or fresh):
        book.close()
        raise UnfinishedRunError(
            f"journal {book.path} holds an unfinished run of {name!r}: "
            "continue it with --resume, or start over with --fresh"
        )
    if (resume or retry_failed) and book.state != "empty" and book.stages not in (None, stages):
        book.close()
        raise StagesChangedError(book.path)
    return book


# Task settings left out of the stages' fingerprint: how hard, how soon or how fast a job is
# tried is not what it computes, and `--resume --retries 5` is how one tries harder.
POLICY_SETTINGS = frozenset(
    {"retries", "backoff", "max_backoff", "jitter", "timeout", "retry_on"}
    | {"priority", "rate_limit"}
)


def stages_fingerprint(stages: Sequence[Task]) -> str:
    """What the stages compute, stable across processes: each task's class name and instance
    attributes (each fingerprinted alone, so one that cannot be pickled counts by its type)."""
    parts = []
    for task in stages:
        attrs = getattr(task, "__dict__", {})
        kept = sorted((k, fingerprint(v)) for k, v in attrs.items() if k not in POLICY_SETTINGS)
        parts.append((type(task).__qualname__, kept))
    return fingerprint(parts)


def output_line(row: Outcome) -> str:
    """The --output / ``results`` JSON line of a journal row."""
    line = {
        "index": row["index"],
        "ok": row["ok"],
        "value": row["value"],
        "error": row["error"],
        "attempts": row["attempts"],
    }
    return to_json(line) + "\n"


def write_jsonl(book: JournalWriter, path: Path) -> None:
    """One JSON object per job, ordered by index (the journal is the source of truth)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in book.rows():
            f.write(output_line(row))
    os.replace(tmp, path)


def _close_journal(
    book: JournalWriter, report: RunReport, output: str | os.PathLike[str] | None
) -> None:
    """Write ``--output`` from the journal, and close it. The work is done: if that fails,
    what is committed stays, and the report says the run was interrupted by the journal."""
    try:
        if output is not None:
            write_jsonl(book, Path(output))
        book.close()
    except JournalError as exc:
        report.stopped_by = report.stopped_by or "journal"
        report.error = report.error or str(exc)
        report.interrupted = True
        book.close(flush=False)
