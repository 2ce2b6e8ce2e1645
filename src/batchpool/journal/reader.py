"""A journal opened to read (``batchpool results``), also while a run writes it."""

from __future__ import annotations

import os
from os import PathLike
from typing import Any, NoReturn

from .file import JournalError, JournalFile


class JournalReader(JournalFile):
    """Takes no lock and never writes: WAL readers never block the run writing the file, and
    they see what that run has committed."""

    def __init__(self, path: str | PathLike[str]) -> None:
        super().__init__(path)
        if not self.path.is_file():
            what = "is not a file" if self.path.exists() else "does not exist"
            raise JournalError(f"journal {self.path} {what}")
        uri, wal = f"{self.path.resolve().as_uri()}?mode=ro", f"{self.path}-wal"
        if not os.access(self.path.parent, os.W_OK) and not os.path.exists(wal):
            uri += "&immutable=1"  # nobody can be writing; SQLite could not make -shm
        try:
            self._connect(uri, uri=True)
            self._meta = self._read_meta(allow_blank=False) or {}
        except BaseException:
            self._shutdown()
            raise
        self.pipeline = str(self._meta.get("pipeline"))

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        """A write through a reader is the caller's mistake: one line, like any journal error."""
        raise JournalError(f"journal {self.path} was opened read-only")

    begin = add_pending = add_final = finish = _read_only
