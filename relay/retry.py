"""Exponential backoff with full jitter, for transient faults only."""

import logging
import random
import time

from . import logs


def backoff_delay(attempt, base, cap, rng=random.random):
    """Seconds to wait after failed attempt number `attempt` (1-based): uniform in [0, min(cap, base*2^(attempt-1))]."""
    return rng() * min(cap, base * (2 ** (attempt - 1)))


def _wait(delay, interrupted, sleep):
    """Wait `delay` seconds; True if `interrupted` ended the wait early."""
    if interrupted is None:
        sleep(delay)
        return False
    if hasattr(interrupted, "wait"):  # a threading.Event: wakes the moment it is set
        return interrupted.wait(delay)
    # A plain callable cannot wake us: look at it at least twice a second, so a stop takes < 1 s.
    deadline = time.monotonic() + delay
    while not interrupted():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sleep(min(left, 0.5))
    return True


def call_with_retry(
    fn,
    *,
    attempts,
    base,
    cap,
    is_transient,
    on_failure=None,
    on_retry=None,
    sleep=time.sleep,
    interrupted=None,
    interrupt_error=None,
    rng=random.random,
    fields=None,
):
    """Call `fn()` up to `attempts` times, waiting between transient failures; re-raise the last error.

    Every failure calls `on_failure(exc, number)` (number: the 1-based attempt that failed). Every
    retry is logged at WARNING (fields `attempt`, `delay_s`, `error`, plus the caller's `fields`,
    e.g. server and operation), then calls `on_retry(exc, number, delay)` if given, then waits
    `delay` seconds (`rng` picks it). `interrupted` (a threading.Event, or a callable returning
    True once the run must stop) ends that wait early: then `interrupt_error` is raised (from the
    last error) if given, else the last error itself. With an Event the wait is `Event.wait(delay)`,
    not `sleep`."""
    fields = fields or {}
    for number in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if on_failure is not None:
                on_failure(exc, number)
            if not is_transient(exc) or number == attempts:
                raise
            delay = backoff_delay(number, base, cap, rng)
            what = f"{fields['operation']} attempt" if "operation" in fields else "attempt"
            logs.note(
                logs.get(),
                logging.WARNING,
                f"{what} {number} of {attempts} failed: {exc}; retrying in {delay:.1f} s",
                {**fields, "attempt": number, "delay_s": round(delay, 3), "error": str(exc)},
            )
            if on_retry is not None:
                on_retry(exc, number, delay)
            if _wait(delay, interrupted, sleep):
                if interrupt_error is not None:
                    raise interrupt_error from exc
                raise
    raise AssertionError("unreachable")
