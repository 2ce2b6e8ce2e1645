"""Where the command's log lines go: the terminal at its verbosity, and ``--log-file`` at INFO.

Both are handlers of the "batchpool" logger, each with its own level: the logger passes what
the most verbose of them wants, and each handler drops what is below its own, so ``-q`` keeps
the terminal quiet while the file still gets every retry, crash and scaling event.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

from .results import Metrics

FILE_FORMAT = "%(asctime)s batchpool[%(process)d] %(levelname)s %(message)s"


class TqdmHandler(logging.Handler):
    """Log lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def terminal_level(verbose: int, quiet: bool) -> int:
    if quiet:
        return logging.ERROR
    if verbose:
        return logging.INFO if verbose == 1 else logging.DEBUG
    return logging.WARNING


def setup(verbose: int, quiet: bool, log_file: str | None = None) -> None:
    """Route the "batchpool" logger to the terminal and, if given, to ``log_file`` (appended;
    OSError if it cannot be opened for writing)."""
    logger = logging.getLogger("batchpool")
    terminal = TqdmHandler()
    terminal.setFormatter(logging.Formatter("batchpool: %(message)s"))
    terminal.setLevel(terminal_level(verbose, quiet))
    handlers: list[logging.Handler] = [terminal]
    if log_file is not None:
        file = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        file.setFormatter(logging.Formatter(FILE_FORMAT))
        file.setLevel(logging.INFO)
        handlers.append(file)
    for handler in handlers:
        logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(min(handler.level for handler in handlers))


def incidents(m: Metrics) -> str:
    """What befell the workers, for the last log line of a run or a server."""
    return (
        f"{m.retried} retries, {m.timed_out} timeouts, {m.crashed} crashes, "
        f"{m.worker_restarts} worker restarts, scaled up {m.scaled_up} and down {m.scaled_down}"
    )
