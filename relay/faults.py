"""Crash points for the kill -9 tests: RELAY_CRASH_AT=<name> makes the process SIGKILL itself there."""

import os
import signal

_TARGET = os.environ.get("RELAY_CRASH_AT", "")


def crashpoint(name):
    """Die at once, as under `kill -9`, when the crash tests ask for this point."""
    if _TARGET == name:
        os.kill(os.getpid(), signal.SIGKILL)
