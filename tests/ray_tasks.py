"""Tasks for tests/test_ray_backend.py that tests/faults.py does not have. Importable by Ray
actors: the backend hands them the driver's sys.path, which holds tests/ under pytest."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from faults import Base, FailsUnpickle, RefusesPickle, record_attempt

from batchpool import PermanentError


class ReturnUnpicklable(Base):
    """Payload "lock": a value pickle refuses; "refuses": one whose __reduce__ raises;
    "rebuild": one that pickles in the worker but cannot be rebuilt in the supervisor; any
    other payload comes back as it is."""

    def run(self, payload: Any) -> Any:
        if payload == "lock":
            return threading.Lock()
        if payload == "refuses":
            return RefusesPickle()
        if payload == "rebuild":
            return FailsUnpickle()
        return payload


class RaiseByPayload(Base):
    """Payload "value": ValueError (retryable); "key": KeyError (not in retry_on below);
    "permanent": PermanentError; anything else comes back as it is."""

    retry_on = (ValueError,)

    def run(self, payload: Any) -> Any:
        if payload == "value":
            raise ValueError("value refused")
        if payload == "key":
            raise KeyError("key refused")
        if payload == "permanent":
            raise PermanentError("permanently refused")
        return payload


class ExitOn(Base):
    """Payload (key, n): os._exit(13) on the first n attempts of key (counted by marker files,
    which survive the dead worker), then return key."""

    def __init__(self, marker_dir: str, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)

    def run(self, payload: Any) -> Any:
        key, n = payload
        if record_attempt(self.marker_dir, key) <= n:
            sys.stderr.flush()
            os._exit(13)
        return key
