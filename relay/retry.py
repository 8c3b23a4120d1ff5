"""Exponential backoff with full jitter, for transient faults only."""

import random
import time


def backoff_delay(attempt, base, cap, rng=random.random):
    """Seconds to wait after failed attempt number `attempt` (1-based): uniform in [0, min(cap, base*2^(attempt-1))]."""
    return rng() * min(cap, base * (2 ** (attempt - 1)))


def call_with_retry(fn, *, attempts, base, cap, is_transient, on_failure=None, sleep=time.sleep):
    """Call `fn()` up to `attempts` times, sleeping between transient failures; re-raise the last error."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if on_failure is not None:
                on_failure(exc, attempt)
            if not is_transient(exc) or attempt == attempts:
                raise
            sleep(backoff_delay(attempt, base, cap))
    raise AssertionError("unreachable")
