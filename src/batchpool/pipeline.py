"""Pipelines: a source of payloads streamed through one or more Task stages, journaled.

``Pipeline`` is the user's handle: it checks its arguments, names and opens the journal, and
writes ``--output`` from it. One execution is a ``run.Run``: its source is read in a thread
(``source``), its final results are recorded in the journal, then the sink (``recorder``), and
signals stop it by draining (``stopping``). What it returns is a ``report.RunReport``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Final

from .durations import seconds_setting
from .formatting import to_json
from .journal import JournalError, JournalWriter, Outcome, fingerprint
from .mainguard import check_main_script
from .pool import Pool
from .recorder import ReplayedResult
from .report import RunReport
from .results import JobResult
from .run import Run
from .source import SourceChangedError
from .stopping import Signals
from .task import Task, resolve_policy

__all__ = [
    "DEFAULT_JOURNAL",
    "Pipeline",
    "ReplayedResult",
    "RunReport",
    "SourceChangedError",
    "StagesChangedError",
    "UnfinishedRunError",
    "default_name",
    "output_line",
    "stages_fingerprint",
    "write_jsonl",
]


class _Default(Enum):
    JOURNAL = "default journal"

    def __repr__(self) -> str:
        return "<default journal>"


DEFAULT_JOURNAL: Final = _Default.JOURNAL
JournalOption = str | os.PathLike[str] | _Default | None  # a path, the default one, or none


class UnfinishedRunError(JournalError):
    """The journal holds a run that did not finish; resume it or start fresh."""


class StagesChangedError(JournalError):
    """The stages differ from those that wrote the journal: their outcomes would not mix."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"the stages changed since journal {path} was written (other tasks, or tasks with "
            "other attributes): their results would not mix (start over with --fresh)"
        )


# pool options that override a task's
POLICY_OVERRIDES = ("retries", "timeout", "backoff", "rate_limit")


class Pipeline:
    """``source`` -> stage 1 -> stage 2 -> ... -> ``sink``, streamed.

    ``total``: the number of payloads, for the progress bar's total and ETA when the source
    has no ``len()`` (a generator); a source with one (a list, a callable returning a list)
    needs none.

    The sink runs in this process and gets each final result once the journal has committed
    it, so a result never reaches it twice, whatever kills the run. A resumed run also hands
    it the results earlier runs recorded, as ReplayedResult (``replayed`` is True), in index
    order as the source reaches them: the sink ends with the same data as an uninterrupted
    run's. Once the sink has raised, or a signal has stopped the run, it is not called again
    in that run; the results the drain records meanwhile reach it as replays on ``--resume``.
    """

    def __init__(
        self,
        source: Iterable[Any] | Callable[[], Iterable[Any]],
        *stages: Task,
        name: str | None = None,
        sink: Callable[[JobResult], Any] | None = None,
        total: int | None = None,
    ) -> None:
        if not stages:
            raise ValueError("a Pipeline needs at least one Task stage")
        if total is not None and (not isinstance(total, int) or total < 0):
            raise ValueError(f"total must be a number of payloads >= 0, not {total!r}")
        for stage in stages:
            resolve_policy(stage)  # TypeError/ValueError now, not in a worker
        if sink is not None and not callable(sink):
            raise TypeError("sink must be callable")
        self.source = source
        self.stages = list(stages)
        self.name = name
        self.sink = sink
        self.total = total
        self.preload: list[tuple[str, str]] = []  # (module name, file) workers import first
        # The globals of the module that built it: its file and attribute name the journal.
        self._origin: dict[str, Any] = sys._getframe(1).f_globals

    def run(
        self,
        procs: int | tuple[int, int] | None = None,
        *,
        journal: JournalOption = DEFAULT_JOURNAL,
        resume: bool = False,
        fresh: bool = False,
        retry_failed: bool = False,
        progress: bool = True,
        output: str | os.PathLike[str] | None = None,
        deadline: float | None = None,
        **pool_options: Any,
    ) -> RunReport:
        """Run to the end (or until stopped) and report.

        ``journal``: a path, None for none, or the default ``.batchpool/<name>.sqlite`` (an
        unnamed pipeline is named after its file and attribute: see default_name()).
        Called from a script that spawned or forkserver workers could not follow (the run
        started outside its main guard, a task class defined inside it), it prints the fix
        and exits with code 2 before any process starts (see ``mainguard``).

        A Ctrl-C drains the attempts in flight into the journal, then raises KeyboardInterrupt
        (a second one stops at once); ``resume=True`` continues from there. SIGTERM and SIGHUP
        drain too and return a report with ``interrupted`` set, and so does ``deadline``
        (seconds from the start) when it passes: ``stopped_by == "deadline"``.
        """
        report = self._execute(
            procs,
            journal=journal,
            resume=resume,
            fresh=fresh,
            retry_failed=retry_failed,
            progress=progress,
            output=output,
            deadline=deadline,
            **pool_options,
        )
        if report.stopped_by == "SIGINT":
            raise KeyboardInterrupt
        return report

    def _execute(
        self,
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
        if deadline is not None:
            deadline = seconds_setting("deadline", deadline)
        check_main_script(self.stages, pool_options)
        overrides = {k: v for k, v in pool_options.items() if k in POLICY_OVERRIDES}
        for stage in self.stages:  # bad settings fail before a journal is made
            resolve_policy(stage, **overrides)
        name = self._name()
        journal, tmp = _journal_path(journal, name, output)
        signals = Signals()
        # Until run() returns: a Ctrl-C while --output is written must not escape as
        # KeyboardInterrupt and leave a half-written file.
        restore = signals.install()
        try:
            stages = stages_fingerprint(self.stages)
            book = _open_journal(journal, name, stages, resume, fresh, retry_failed)
            try:
                run = Run(
                    self,
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
                if on_pool is not None:
                    on_pool(run.pool)
                report = run.execute()
            except BaseException:  # a refusal too: what ran before it is committed
                if book is not None:
                    book.close(flush=False)
                raise
            if book is not None:
                _close_journal(book, report, output)
            if tmp is not None:  # deleted below: the report must not name it
                report.journal = None
            return report
        finally:
            restore()
            if tmp is not None:
                tmp.cleanup()

    def _name(self) -> str:
        """``name``, or one made from where the pipeline is defined, so that two unnamed
        pipelines of one file keep two journals: see default_name(). "pipeline" where neither
        file nor attribute is known (an interactive session)."""
        if self.name:
            return self.name
        attr = next((k for k, v in self._origin.items() if v is self), "pipeline")
        file = self._origin.get("__file__")
        return default_name(Path(file).stem, attr) if file else attr


def default_name(stem: str, attr: str) -> str:
    """An unnamed pipeline's name: the file's stem, and the attribute unless it is the usual
    ``pipeline`` (``jobs.py`` -> "jobs", ``jobs.py:other`` -> "jobs-other")."""
    return stem if attr == "pipeline" else f"{stem}-{attr}"


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
