"""batchpool: run large batches of CPU-bound work across processes, reliably and fast."""

from .errors import JobFailed, PermanentError
from .pipeline import Pipeline, RunReport
from .pool import Pool
from .results import JobError, JobResult, Metrics
from .task import Task

__version__ = "0.1.0"

__all__ = [
    "JobError",
    "JobFailed",
    "JobResult",
    "Metrics",
    "PermanentError",
    "Pipeline",
    "Pool",
    "RunReport",
    "Task",
    "__version__",
]
