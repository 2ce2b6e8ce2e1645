"""The supervisor's wakeup (``wakeup.Commands``): no interleaving of a post() and a pass of the
loop may leave a later command without its wakeup byte."""

from __future__ import annotations

import os
import select
import threading

import pytest

import batchpool.wakeup as wakeup
from batchpool.wakeup import Commands


@pytest.mark.timeout(30)
def test_a_post_overtaken_by_the_loop_leaves_the_next_post_its_wakeup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop may wake on post(A)'s byte and reach its next sleep while post(A) is still
    inside its write (os.write lets other threads run). post(A) then must not mark a wakeup
    pending that the loop has already consumed: post(B) would write none, and the loop would
    sleep until its next timer (1 s: the latency spikes seen behind an event loop)."""
    commands: Commands[str] = Commands()
    real_write = os.write
    reached_sleep = threading.Event()
    passes: list[threading.Thread] = []

    def loop_pass() -> None:  # the supervisor thread, woken by A's byte
        commands.woken()
        assert commands.pop() == "A"
        reached_sleep.set()
        commands.sleep_allowed()

    def write_then_loop(fd: int, data: bytes) -> int:
        written = real_write(fd, data)
        passes.append(threading.Thread(target=loop_pass))
        passes[0].start()
        assert reached_sleep.wait(10)
        passes[0].join(0.2)  # it may finish here only if post() does not exclude it
        return written

    monkeypatch.setattr(wakeup.os, "write", write_then_loop)
    commands.post("A")
    monkeypatch.setattr(wakeup.os, "write", real_write)
    passes[0].join(10)
    assert not passes[0].is_alive()
    commands.post("B")
    assert select.select([commands.fileno()], [], [], 0)[0], "B was posted without a wakeup"
    assert commands.pop() == "B"
    commands.close()


def _readable(commands: Commands[str]) -> bool:
    return bool(select.select([commands.fileno()], [], [], 0)[0])


@pytest.mark.timeout(30)
def test_a_quiet_loop_is_woken_by_urgent_commands_only() -> None:
    """While the loop says a pass comes anyway (quiet), a command that may wait (a server's
    submit) is queued without a byte; an urgent one (cancel, close) still wakes the loop, and
    once the loop is not quiet any more, every post wakes it again."""
    commands: Commands[str] = Commands()
    commands.set_quiet(True)
    assert commands.sleep_allowed()
    commands.post("submit", urgent=False)
    assert not _readable(commands) and commands.pop() == "submit"
    commands.post("cancel")
    assert _readable(commands)
    commands.woken()
    assert commands.pop() == "cancel"
    commands.set_quiet(False)
    assert commands.sleep_allowed()
    commands.post("submit", urgent=False)
    assert _readable(commands) and commands.pop() == "submit"
    commands.close()
