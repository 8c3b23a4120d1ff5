"""A helper process that inflates small files beside the run's threads, on another core.

A small file's extraction is half inflating and hashing, half the run's own Python (records, names,
log lines), and the interpreter lock keeps all of that on one core. The helper does the first half
for batches of files sent down a pipe; the run's thread places the results. The helper only writes
the `.part` files it is given and answers with what `codecs.inflate` returned. Anything it cannot do
comes back as "not done", and the run's thread then does that file itself, the usual way, with its
retries and error handling.

It ends with the run: killed by `close()` (the run's end, or its stop on a signal), by the
parent-death signal when the run is killed outright, or at the end of its input. A `.part` file it
was writing then is removed by the next run's start-up sweep; its names are its own (`.helper.part`),
so the run's threads never write to a file it may still write to.
"""

import collections
import concurrent.futures
import ctypes
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import msgspec

from . import codecs

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_HEADER = struct.Struct("<I")  # each message: its length, then msgpack
CLOSE_WAIT = 1.0  # seconds close() waits for the killed helper to be gone (else its thread reaps it)
MAX_ANSWER = 64 * 2**20  # bytes; a longer answer's length is taken as garbage


class Job(msgspec.Struct, array_like=True):
    """One file to inflate: `codecs.inflate`'s arguments (paths as bytes: a name need not be UTF-8)."""

    src: bytes
    tmp: bytes
    max_bytes: int
    min_free: int
    size: int
    mtime: int | None  # whole seconds the file must still have; None: not checked


class Outcome(msgspec.Struct, array_like=True):
    """What became of a Job: done (with inflate's result and its seconds) or not (the run's thread does it)."""

    done: bool
    sha256: str = ""
    format: str = ""
    size: int = 0
    seconds: float = 0.0


# --- in the helper process -------------------------------------------------------------------


def _inflate(job):
    started = time.monotonic()
    try:
        result = codecs.inflate(
            os.fsdecode(job.src),
            os.fsdecode(job.tmp),
            max_bytes=job.max_bytes,
            min_free=job.min_free,
            expect=(job.size, job.mtime),
        )
    except Exception:  # noqa: BLE001 - whatever it is, the run's thread meets it again and handles it
        return Outcome(False)
    return Outcome(True, result.sha256, result.format, result.size, time.monotonic() - started)


def _read_exact(stream, count):
    data = stream.read(count)
    return data if data is not None and len(data) == count else None


def serve(parent_pid):
    """The helper's loop: inflate each batch read from stdin, answer on stdout, until end of input."""
    prctl = ctypes.CDLL(None).prctl
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        return  # the run died before the death signal was set
    # The run decides when this ends (it kills it on its stop): a SIGTERM sent to the whole group of
    # processes (systemd stopping the unit) must not end it first, as a failure the run would report.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    decode, encode = msgspec.msgpack.Decoder(list[Job]).decode, msgspec.msgpack.Encoder().encode
    while (header := _read_exact(source, _HEADER.size)) is not None:
        body = _read_exact(source, _HEADER.unpack(header)[0])
        if body is None:
            return
        answer = encode([_inflate(job) for job in decode(body)])
        sink.write(_HEADER.pack(len(answer)) + answer)
        sink.flush()


# --- in the run -------------------------------------------------------------------------------


class Inflater:
    """The run's side: start the helper on first use, send batches, hand back their outcomes."""

    def __init__(self, on_exit=None):
        self._on_exit = on_exit  # called once with the helper's exit status if it ends unasked
        self._lock = threading.Lock()  # the state below; never held while blocked on the pipe
        self._write_lock = threading.Lock()  # one message at a time, in the order of _waiting
        self._proc: subprocess.Popen | None = None
        self._waiting: collections.deque[concurrent.futures.Future] = collections.deque()  # batches sent, in order
        self._closed = False  # no more batches are sent
        self._closing = False  # close() was called
        self._encode = msgspec.msgpack.Encoder().encode

    def warm(self):
        """Start the helper now (it takes a tenth of a second), so that it is ready when files are."""
        with self._lock:
            if self._proc is None and not self._closed:
                self._start()

    def submit(self, jobs):
        """Send `jobs` to the helper; a Future of their Outcomes (None for each if it ended first), or
        None if there is no helper (any more)."""
        with self._lock:
            if self._closed or (self._proc is None and not self._start()):
                return None
            stdin = self._proc.stdin if self._proc is not None else None
        assert stdin is not None  # started with a pipe
        message = self._encode(jobs)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._write_lock:
            with self._lock:
                if self._closed:
                    return None
                self._waiting.append(future)  # before the write: the reader may answer at once
            try:
                stdin.write(_HEADER.pack(len(message)) + message)
                stdin.flush()
            except (OSError, ValueError):  # it ended (or must): the reader gives every waiting future None
                with self._lock:
                    self._closed = True
                self._kill()
        return future

    def _kill(self):
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def _start(self):
        """Start the helper from a thread of its own (called under the lock); False if it cannot be."""
        # That thread lives as long as the helper (it reads its answers): the parent-death signal
        # follows the thread that forked, and a doit worker thread may end before the run does.
        started = threading.Event()
        try:
            threading.Thread(target=self._run_helper, args=(started,), name="inflater", daemon=True).start()
        except RuntimeError:  # no thread to be had: the run goes on without a helper
            self._closed = True
            return False
        started.wait()
        return self._proc is not None

    def _run_helper(self, started):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = f"import sys; sys.path.insert(0, {root!r}); from relay.inflater import serve; serve({os.getpid()})"
        env = dict(os.environ, RELAY_CRASH_AT="")  # crash tests kill the run itself, never the helper
        try:
            # Popen forks and execs in C (no Python in the child), so starting it here is thread-safe.
            self._proc = proc = subprocess.Popen(
                [sys.executable, "-c", code],  # the run's own interpreter and environment
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C at the terminal is the run's to handle
                env=env,
            )
        except Exception:  # noqa: BLE001 - no helper (it could not start): the run goes on without one
            self._closed = True
            return
        finally:
            started.set()
        self._read(proc)

    def _read(self, proc):
        decode = msgspec.msgpack.Decoder(list[Outcome]).decode
        try:
            while (header := _read_exact(proc.stdout, _HEADER.size)) is not None:
                length = _HEADER.unpack(header)[0]
                body = _read_exact(proc.stdout, length) if length <= MAX_ANSWER else None
                if body is None:
                    break
                outcomes = decode(body)  # before the future leaves _waiting: if this fails, it is drained
                self._waiting.popleft().set_result(outcomes)
        except Exception:  # noqa: BLE001 - an answer that cannot be read ends the helper, not the run
            pass
        finally:
            with self._lock:
                self._closed = True
            self._kill()
            code = proc.wait()
            try:
                if not self._closing and self._on_exit is not None:
                    self._on_exit(code)  # said before the batches it had are given back
            except Exception:  # noqa: BLE001 - a warning that cannot be logged must not hold up the files
                pass
            finally:
                while self._waiting:
                    self._waiting.popleft().set_result(None)  # not done: the run's threads do them

    def close(self):
        """End the helper; wait at most CLOSE_WAIT s for it (what it was doing is left: its `.part`
        files are swept at the next start)."""
        with self._lock:
            self._closed = self._closing = True
        self._kill()  # a writer blocked on the full pipe then gets EPIPE
        if self._proc is not None:
            try:
                self._proc.wait(timeout=CLOSE_WAIT)
            except subprocess.TimeoutExpired:
                pass  # in uninterruptible I/O: its thread reaps it when it is gone
