"""The run journal: a durable SQLite record of each job's final outcome, so that an interrupted
run resumes with exactly one result per job.

- ``writer``: JournalWriter, the journal of the one run writing it (locked: ``lock``), which
  buffers outcomes and commits them in batches.
- ``reader``: JournalReader, for reading without a lock, also while a run writes.
- ``file``: what both share: the checks made when a file is opened, and the paged reads.
- ``encoding``: payload fingerprints, and the JSON and pickled forms of values.
"""

from __future__ import annotations

from .encoding import fingerprint
from .file import JournalError, Outcome
from .reader import JournalReader
from .writer import JournalWriter

__all__ = ["Journal", "JournalError", "JournalReader", "JournalWriter", "Outcome", "fingerprint"]


class Journal(JournalWriter):
    """The journal under its one name: ``Journal(path, pipeline)`` opens it to write (a
    JournalWriter), ``Journal.open_readonly(path)`` to read (a JournalReader)."""

    open_readonly = staticmethod(JournalReader)
