"""What the forkserver imports once for all workers: the parent's main module, pipeline files.

multiprocessing asks the forkserver to preload ``__main__``, but before CPython 3.13.8 and
3.14 it never gave the server the main module's path (gh-126631): every worker forked from it
ran the parent's script again before its first job, and imported the pipeline files itself.
Their imports (batchpool's supervisor, numpy, ...) cost tens of ms of every worker's start, and
memory that forked workers would otherwise share.

So the parent names both in an environment variable while it starts the server
(``announced``), and the server imports this module among its preloads: the main module the
way a fixed CPython does (the parent's ``sys.argv`` in place, run as ``__mp_main__`` with
process starts refused, output flushed before any fork), the files under the names the
workers would give them (workercore.import_files). What cannot be imported there is left to
the workers, which then fail or succeed as they always did.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator, Sequence

ENV = "BATCHPOOL_FORKSERVER_PRELOAD"
LIMIT = 32 * 1024  # characters: Linux refuses to exec with one variable over 128 KiB
_announcing = threading.Lock()  # one plan in the environment at a time (pools in threads)


@contextlib.contextmanager
def announced(files: Sequence[tuple[str, str]]) -> Iterator[None]:
    """Name this process's main module and ``files`` ((module name, path) pairs) to a
    forkserver started inside the block (if it is running already, nothing changes)."""
    from multiprocessing import spawn

    data = spawn.get_preparation_data("batchpool")
    main = data.get("init_main_from_path")
    plan = {"main": main, "argv": sys.argv, "files": [list(f) for f in files]}
    text = json.dumps(plan)
    if len(text) > LIMIT:  # a huge command line: the workers run the script as they used to
        text = json.dumps({"files": plan["files"]})
    if len(text) > LIMIT:
        yield
        return
    with _announcing:
        os.environ[ENV] = text
        try:
            yield
        finally:
            os.environ.pop(ENV, None)


def _import_main(path: str, argv: list[str]) -> None:
    from multiprocessing import process, spawn

    if getattr(sys.modules.get("__main__"), "__file__", None) == path:
        return  # a fixed CPython did it already
    own_argv, sys.argv = sys.argv, argv
    process.current_process()._inheriting = True  # type: ignore[attr-defined]
    try:
        spawn.import_main_path(path)
    finally:
        del process.current_process()._inheriting  # type: ignore[attr-defined]
        sys.argv = own_argv


def _preload(plan: dict[str, object]) -> None:
    from .workercore import import_files

    main, argv, files = plan.get("main"), plan.get("argv"), plan.get("files")
    if isinstance(main, str) and isinstance(argv, list):
        try:
            _import_main(main, argv)
        except BaseException:  # left to the workers (see the module's docstring)
            pass
    for name, path in files if isinstance(files, list) else ():
        try:
            import_files([(name, path)])
        except BaseException:
            sys.modules.pop(name, None)
    for stream in (sys.stdout, sys.stderr):  # or each fork would print it again
        with contextlib.suppress(Exception):
            stream.flush()


if ENV in os.environ and sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules:
    # imported as the forkserver's preload
    _preload(json.loads(os.environ.pop(ENV)))
