"""What a server runs for each request (no dependency of the extra: the CLI builds it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..task import Task


@dataclass
class Target:
    """A pipeline's stages (its source is not read), or one Task as a one-stage pipeline."""

    name: str  # the ``pipeline`` label of the metrics, and the owner of the journal
    stages: list[Task]
    preload: list[tuple[str, str]] = field(default_factory=list)  # as Pipeline.preload
