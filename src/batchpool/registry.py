"""The pools alive in this process, and the exit hook that terminates them (both backends)."""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  # its exit hook joins workers: ours must run first
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .supervisor import Supervisor

LIVE: set[Supervisor] = set()  # running supervisors, strongly held: a dropped Pool's included

# A forked child has none of them running (threads do not survive fork): its exit must not
# wait for supervisors that exist only in its parent.
os.register_at_fork(after_in_child=LIVE.clear)


@atexit.register  # after multiprocessing.util's (imported above), so it runs before it
def terminate_all_at_exit() -> None:
    """A pool still open at interpreter exit is terminated: exit never waits on a worker."""
    for supervisor in list(LIVE):
        supervisor.post(("terminate",))
    for supervisor in list(LIVE):
        supervisor.done.wait(10)
