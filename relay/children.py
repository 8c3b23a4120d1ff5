"""The process groups one run started (ssh, rsync): registered as they start, ended together on a
stop, and given a death signal so that a `kill -9` of the run ends them too."""

import contextlib
import ctypes
import os
import signal
import threading

from .errors import RunInterrupted

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_GRACE = 2.0  # seconds from stop()'s signal to its SIGKILL of the groups still there


def _libc_prctl():
    """libc's prctl(2) as a ctypes function, or None where there is none."""
    try:
        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    prctl.restype = ctypes.c_int
    return prctl


def _signal_group(pgid, sig):
    """Send `sig` to process group `pgid`; False if there is no such group any more."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


class Children:
    """The live process groups of one run's ssh and rsync: stop() ends them and refuses new ones.

    Each command runs in a process group of its own, so a Ctrl-C at the terminal reaches only the
    run, which must end them itself: here on a stop, by the kernel's parent-death signal when the run
    is killed outright (`kill -9`)."""

    def __init__(self, death_signal=signal.SIGTERM):
        # Reentrant: stop() is called from a signal handler, maybe in a thread inside running().
        self._cond = threading.Condition(threading.RLock())
        self._groups = {}  # pgid -> ident of the thread waiting for that group
        self._stopped = False
        # TERM, not KILL: our direct child is coreutils timeout, which passes TERM on to its whole
        # process group (rsync and its ssh) and sends KILL 5 s later; a KILLed timeout would orphan them.
        self._death_signal = death_signal
        # Resolved here, in the parent, never in the forked child: a dlsym there would read the dynamic
        # loader's tables, which another thread may have been changing at fork time (glibc merely
        # resets the loader's lock in the child).
        self._prctl = _libc_prctl()

    @property
    def stopped(self):
        """Whether stop() was called."""
        return self._stopped

    def live(self):
        """The process groups running now."""
        with self._cond:
            return sorted(self._groups)

    def check(self):
        """Raise RunInterrupted once the run is stopping."""
        if self._stopped:
            raise RunInterrupted("the run is stopping: its ssh and rsync were ended, no new one starts")

    def preexec(self):
        """The function sh runs in the forked child before exec: death_signal when the forking thread ends."""
        # The kernel sends it when the *thread* that forked ends, not the process: a command must not
        # outlive the thread that started it. _run waits for its command, so that holds for the
        # engine's long-lived workers; code that left a command running and let its thread end would
        # see it killed. (ssh's background ControlMaster is a fork of ssh: the setting is not inherited.)
        prctl, sig, parent = self._prctl, self._death_signal, os.getpid()
        if prctl is None:
            return None

        def in_child():  # between fork and exec: a call already resolved and a system call, no lock
            prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
            if os.getppid() != parent:  # the run died before prctl: no signal will ever come
                os._exit(1)

        return in_child

    @contextlib.contextmanager
    def running(self, pgid):
        """Register process group `pgid` while the block waits for it; kill it if the block fails."""
        with self._cond:
            self._groups[pgid] = threading.get_ident()
        try:
            self.check()  # after registering: a stop() either saw the group or is seen here
            yield
        except BaseException:
            _signal_group(pgid, signal.SIGKILL)
            raise
        finally:
            with self._cond:
                del self._groups[pgid]
                self._cond.notify_all()

    def stop(self, sig=signal.SIGTERM, grace=STOP_GRACE):
        """Signal every live group, SIGKILL those left after `grace` s; every later command raises RunInterrupted."""
        with self._cond:
            self._stopped = True
            groups = dict(self._groups)
        for pgid in groups:
            _signal_group(pgid, sig)
        # A group the calling thread waits for cannot be seen to end while stop() runs in that thread
        # (a signal handler): not waited for here; its timeout sends KILL 5 s after the signal.
        me = threading.get_ident()
        waited = {pgid for pgid, ident in groups.items() if ident != me}
        with self._cond:
            self._cond.wait_for(lambda: not waited & self._groups.keys(), timeout=grace)
            left = waited & self._groups.keys()
        for pgid in left:
            _signal_group(pgid, signal.SIGKILL)


# --- I/O ------------------------------------------------------------------------------------
