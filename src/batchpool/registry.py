"""The pools alive in this process, and the exit hook that terminates them (both backends)."""

from __future__ import annotations

import atexit
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .supervisor import Supervisor

LIVE: set[Supervisor] = set()  # running supervisors, strongly held: a dropped Pool's included


@atexit.register
def terminate_all_at_exit() -> None:
    """A pool still open at interpreter exit is terminated: exit never waits on a worker."""
    for supervisor in list(LIVE):
        supervisor.post(("terminate",))
    for supervisor in list(LIVE):
        supervisor.done.wait(10)
