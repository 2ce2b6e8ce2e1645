"""Two stages for tests/test_stages.py, importable under every start method."""

from __future__ import annotations

from typing import Any

from faults import Base, record_attempt


class FailFirstOfFives(Base):
    """Payloads divisible by 5 fail their first attempt (recorded in ``marker_dir``)."""

    def __init__(self, marker_dir: str, **policy: Any) -> None:
        super().__init__(**policy)
        self.marker_dir = str(marker_dir)

    def run(self, payload: Any) -> Any:
        if record_attempt(self.marker_dir, payload) == 1 and payload % 5 == 0:
            raise ValueError(f"first attempt of {payload}")
        return payload + 1


class Double(Base):
    def run(self, payload: Any) -> Any:
        if payload == 8:  # the source's 7, after stage 1
            raise ValueError("stage 2 refuses 8")
        return payload * 2
