"""Two script mistakes that the spawn and forkserver start methods punish, caught up front.

Under those methods each worker imports the script that started the run (``__main__``) again,
without running its ``if __name__ == "__main__":`` block. So a script that starts a run
outside that block would start it again in every worker (multiprocessing then prints its
"bootstrapping phase" error for each worker it tries), and a task class defined inside the
block does not exist in the workers (every job fails with "Can't get attribute ... on
<module '__mp_main__'>"). Both are found here by reading the script, before any process
starts, and end the program with one line that says what to change (exit code 2).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from .settings import default_start_method

EXIT_USAGE = 2


def check_main_script(tasks: Iterable[object], pool_options: Mapping[str, Any]) -> None:
    """Exit with a one-line fix if the running script has one of the two mistakes."""
    backend = pool_options.get("backend", "local")
    method = pool_options.get("start_method") or default_start_method()
    if backend == "local" and method == "fork":
        return  # forked workers inherit the script's state: both work
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path or not str(path).endswith(".py"):
        return  # python -c, a REPL, a notebook: no script to import again
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return
    guards = _main_guards(tree)
    how = f"workers started by {method}" if backend == "local" else f"{backend} workers"
    where = _short(str(path))
    for task in tasks:
        cls = type(task)
        if cls.__module__ != "__main__":
            continue
        line = _guarded_class(tree, cls.__qualname__, guards)
        if line is not None:
            _refuse(
                f"{where}:{line}: task class {cls.__qualname__} is defined under "
                f'`if __name__ == "__main__":`, which {how} do not run: '
                "define task classes at module level"
            )
    frame = _main_frame(main)
    if frame is not None and not any(_inside(frame.f_lineno, g) for g in _name_tests(tree)):
        _refuse(
            f"{where}:{frame.f_lineno}: the run starts when {where} is imported, and {how} "
            f'import it again: start it under `if __name__ == "__main__":`'
        )


def _refuse(message: str) -> None:
    print(f"batchpool: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _short(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"``, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return False
    if not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    consts = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and consts == ["__main__"]


def _mentions_name(test: ast.expr) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "__name__" for n in ast.walk(test))


def _main_guards(tree: ast.Module) -> list[tuple[int, int]]:
    """Line ranges of the bodies of ``if __name__ == "__main__":`` blocks."""
    return [
        (node.body[0].lineno, node.body[-1].end_lineno or node.body[-1].lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_main_test(node.test)
    ]


def _name_tests(tree: ast.Module) -> list[tuple[int, int]]:
    """Line ranges of every ``if`` that tests ``__name__`` somehow (any guard counts)."""
    return [
        (node.lineno, node.end_lineno or node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _mentions_name(node.test)
    ]


def _inside(line: int, span: tuple[int, int]) -> bool:
    return span[0] <= line <= span[1]


def _guarded_class(tree: ast.Module, qualname: str, guards: list[tuple[int, int]]) -> int | None:
    """The line of the class ``qualname`` when every definition of it lies in a main guard
    (none outside one: a class defined at module level too is importable)."""
    if "." in qualname:
        return None
    lines = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.name == qualname
    ]
    if lines and all(any(_inside(n, g) for g in guards) for n in lines):
        return lines[0]
    return None


def _main_frame(main: ModuleType) -> FrameType | None:
    """The frame running the script's top-level code, if this call comes from there."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>":
            return frame
        frame = frame.f_back
    return None
