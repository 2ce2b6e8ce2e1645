"""batchpool: run large batches of CPU-bound work across processes, reliably and fast.

The public names load on first use: a worker process imports ``batchpool.worker`` (and with it
this package) before its first job, and should not pay for the pipeline, journal and progress
bar machinery (SQLite, tqdm) that only the supervisor's process uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import JobFailed, PermanentError, PoolBroken, PoolClosed
    from .pipeline import Pipeline
    from .pool import Pool
    from .report import RunReport
    from .results import JobError, JobResult, Metrics
    from .task import Task

__version__ = "0.1.0"

_HOMES = {
    "JobError": "results",
    "JobFailed": "errors",
    "JobResult": "results",
    "Metrics": "results",
    "PermanentError": "errors",
    "Pipeline": "pipeline",
    "Pool": "pool",
    "PoolBroken": "errors",
    "PoolClosed": "errors",
    "RunReport": "report",
    "Task": "task",
}

__all__ = [
    "JobError",
    "JobFailed",
    "JobResult",
    "Metrics",
    "PermanentError",
    "Pipeline",
    "Pool",
    "PoolBroken",
    "PoolClosed",
    "RunReport",
    "Task",
    "__version__",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'batchpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
