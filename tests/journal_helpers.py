"""Child-process side of tests/test_journal.py: ``python journal_helpers.py MODE PATH``.

Modes:
  hold      open the journal, print "ready", then sleep until killed
  open      try to open the journal; print "ok" or "error: MESSAGE"
  fill      write big rows, flushing every 20, printing "committed N" after each flush, until a
            flush fails: print "error: MESSAGE" and _exit(3) (run under RLIMIT_FSIZE)
  loop      write and flush forever, printing "committed N" after each flush (to be SIGKILLed)
"""

from __future__ import annotations

import os
import sys
import time

from batchpool.journal import Journal, JournalError

PIPELINE = "helper"


def _add(journal: Journal, index: int, size: int) -> None:
    journal.add_final(
        index,
        f"fp{index}",
        ok=True,
        value={"n": index, "pad": "x" * size},
        error=None,
        attempts=1,
        worker=None,
        elapsed=0.0,
    )


def hold(path: str) -> None:
    Journal(path, PIPELINE)
    print("ready", flush=True)
    while True:
        time.sleep(1)


def try_open(path: str) -> None:
    try:
        with Journal(path, PIPELINE):
            print("ok", flush=True)
    except JournalError as exc:
        print(f"error: {exc}", flush=True)


def fill(path: str) -> None:
    journal = Journal(path, PIPELINE)
    journal.begin(total=None, resume=False)
    index = 0
    while True:
        for _ in range(20):
            _add(journal, index, 2000)
            index += 1
        try:
            journal.flush()
        except JournalError as exc:
            print(f"error: {exc}", flush=True)
            os._exit(3)  # no clean close: the parent must recover from the WAL as left
        print(f"committed {index}", flush=True)


def loop(path: str) -> None:
    journal = Journal(path, PIPELINE)
    journal.begin(total=None, resume=False)
    index = 0
    while True:
        for _ in range(50):
            _add(journal, index, 100)
            index += 1
        journal.flush()
        print(f"committed {index}", flush=True)


if __name__ == "__main__":
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "hold":
        hold(target)
    elif mode == "open":
        try_open(target)
    elif mode == "fill":
        fill(target)
    elif mode == "loop":
        loop(target)
    else:
        sys.exit(f"unknown mode {mode}")
