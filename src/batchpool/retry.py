"""Retry policy as pure functions, so it can be tested without processes or clocks."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(
    retry_number: int,
    backoff: float,
    max_backoff: float,
    jitter: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry ``retry_number`` (1 for the first retry).

    ``min(max_backoff, backoff * 2**(n-1))`` scaled by a factor in ``[1 - jitter, 1]``: jitter
    only shortens delays, so ``max_backoff`` stays a hard cap and retries of jobs that failed
    together spread out instead of stampeding.
    """
    if retry_number < 1:
        raise ValueError("retry_number starts at 1")
    # Cap the exponent: 2**1100 overflows a float long before any sane max_backoff matters.
    base = min(max_backoff, backoff * 2.0 ** min(retry_number - 1, 1000))
    return base * (1.0 - jitter * rand())


def should_retry(attempts: int, retries: int, retryable: bool) -> bool:
    """Whether a job that failed its ``attempts``-th attempt gets another one."""
    return retryable and attempts <= retries
