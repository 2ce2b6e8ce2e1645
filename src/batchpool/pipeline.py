"""Pipelines: a source of payloads streamed through one or more Task stages, journaled.

``Pipeline`` is the user's handle: it checks its arguments, names and opens the journal, and
writes ``--output`` from it. One execution is a ``run.Run``: its source is read in a thread
(``source``), its final results are recorded in the journal, then the sink (``recorder``), and
signals stop it by draining (``stopping``). What it returns is a ``report.RunReport``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .task import Task, resolve_policy

if TYPE_CHECKING:
    from .execution import (
        StagesChangedError,
        UnfinishedRunError,
        output_line,
        stages_fingerprint,
        write_jsonl,
    )
    from .pool import Pool
    from .recorder import ReplayedResult
    from .report import RunReport
    from .results import JobResult
    from .source import SourceChangedError

# Names of the run machinery, importable from here as before; loaded on first use (see
# execution.py for why).
_LAZY = {
    "ReplayedResult": "recorder",
    "RunReport": "report",
    "SourceChangedError": "source",
    "StagesChangedError": "execution",
    "UnfinishedRunError": "execution",
    "output_line": "execution",
    "stages_fingerprint": "execution",
    "write_jsonl": "execution",
}

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
        on_pool: Callable[[Pool], None] | None = None,
        **options: Any,
    ) -> RunReport:
        """run() without the KeyboardInterrupt: the CLI reports an interrupted run itself.
        ``on_pool`` is shown the run's pool once it exists (``--metrics-port`` reads it)."""
        from .execution import execute

        return execute(self, procs, on_pool=on_pool, **options)

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


def __getattr__(name: str) -> Any:
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __package__), name)
