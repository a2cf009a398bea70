"""Backoff between attempts: exponential, capped, with jitter so retrying workers do not stampede."""

from __future__ import annotations

import random

from . import config


def backoff_delay(failed_attempts: int, *, rng: random.Random | None = None) -> float:
    """Seconds to wait after ``failed_attempts`` transient failures ("equal jitter").

    The n-th wait is uniform in [d/2, d] with d = min(ETL_RETRY_MAX_SECONDS, base * 2**(n-1)).

    Example::

        >>> 0.25 <= backoff_delay(1) <= 0.5
        True
    """
    base = config.get_float("ETL_RETRY_BASE_SECONDS")
    cap = config.get_float("ETL_RETRY_MAX_SECONDS")
    delay = min(cap, base * 2 ** max(0, failed_attempts - 1))
    return float(delay / 2 + (rng or random).uniform(0, delay / 2))
