"""A helper process that inflates small files while the run's thread does the Python around them.

A small file costs about as much CPU in `codecs.inflate` (read, hash, inflate, write: C work and
system calls) as in the Python around it (checks, renames, record, log line), and Python runs on one
core at a time. A `doit run` forks one helper while it loads, before any thread exists (a fork then
copies no lock that another thread holds). The small-file lane sends a file to the helper, does the
Python of the file before it meanwhile, then takes the answer: two cores share the work. The helper
only writes the temp file it is given; every rename and record stays with the run. If the helper is
gone (killed, crashed), the run inflates in-process from then on.
"""

import atexit
import gc
import os
import struct
import threading

import msgspec

from . import codecs
from .errors import ArchiveError, CorruptArchive, SourceChanged, SourceGone

_HEAD = struct.Struct(">I")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()
_helper = None  # the Helper of this process, once forked
# Reply kinds: the inflate result, or the exception the caller raises in its place.
_OK, _CORRUPT, _ARCHIVE, _GONE, _CHANGED, _OTHER = range(6)


class HelperGone(Exception):
    """The helper did not answer (killed, crashed) or failed unexpectedly: inflate in-process instead."""


def _frame(value):
    data = _encoder.encode(value)
    return _HEAD.pack(len(data)) + data


class _Frames:
    """Frames read off a pipe: one read takes whatever is there (often a whole frame, or several)."""

    def __init__(self, fd):
        self.fd = fd
        self.buffer = b""

    def next(self):
        """The next decoded frame, or None at the end of the pipe."""
        while True:
            if len(self.buffer) >= _HEAD.size:
                end = _HEAD.size + _HEAD.unpack_from(self.buffer)[0]
                if len(self.buffer) >= end:
                    body, self.buffer = self.buffer[_HEAD.size:end], self.buffer[end:]
                    return _decoder.decode(body)
            piece = os.read(self.fd, 1 << 16)
            if not piece:
                return None
            self.buffer += piece


def _text(exc):
    # Messages may hold undecodable file-name bytes (surrogate escapes): they travel as bytes.
    return str(exc).encode("utf-8", "surrogateescape")


def _serve(requests, replies):
    """The helper's whole life: inflate what it is asked, answer, return when the run closes the pipe."""
    frames = _Frames(requests)
    while True:
        request = frames.next()
        if request is None:
            return
        src, tmp, max_bytes, min_free, expect = request
        try:
            got = codecs.inflate(os.fsdecode(src), os.fsdecode(tmp), max_bytes=max_bytes, min_free=min_free,
                                 expect=expect)
            reply = [_OK, got.sha256, got.format, got.size, got.out_sha256]
        except CorruptArchive as exc:
            reply = [_CORRUPT, _text(exc)]
        except ArchiveError as exc:
            reply = [_ARCHIVE, _text(exc)]
        except SourceGone as exc:
            reply = [_GONE, _text(exc)]
        except SourceChanged as exc:
            reply = [_CHANGED, _text(exc), exc.size]
        except Exception as exc:  # noqa: BLE001 - the run redoes the file in-process, where it shows
            reply = [_OTHER, _text(exc)]
        os.write(replies, _frame(reply))


class Helper:
    """The run's end of the helper: send a file, then (after other work) take its outcome."""

    def __init__(self, pid, requests, replies):
        self.pid, self.requests, self.replies = pid, requests, replies
        self._replies = _Frames(replies)

    def send(self, src, dst_tmp, *, max_bytes, min_free, expect=None):
        """Ask for `codecs.inflate(src, dst_tmp, …)`; answers come back in the order asked."""
        try:
            os.write(self.requests, _frame([os.fsencode(src), os.fsencode(dst_tmp), max_bytes, min_free, expect]))
        except OSError as exc:
            raise HelperGone(f"inflate helper {self.pid} is gone ({exc.strerror})") from None

    def receive(self):
        """The outcome of the oldest request: an Inflated, or the error inflate raised (to raise in its place)."""
        try:
            reply = self._replies.next()
        except OSError:
            reply = None
        if reply is None:
            raise HelperGone(f"inflate helper {self.pid} is gone")
        if reply[0] == _OK:
            return codecs.Inflated(*reply[1:])
        message = reply[1].decode("utf-8", "surrogateescape")
        if reply[0] == _CORRUPT:
            return CorruptArchive(message)
        if reply[0] == _ARCHIVE:
            return ArchiveError(message)
        if reply[0] == _GONE:
            return SourceGone(message)
        if reply[0] == _CHANGED:
            return SourceChanged(message, reply[2])
        raise HelperGone(f"inflate helper {self.pid} failed: {message}")


def _close_all_but(*keep):
    """Close every file descriptor above stdio but `keep`: nothing of the run, above all not its lock."""
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: every number up to a sane bound (SC_OPEN_MAX may be 2**30)
        open_fds = range(3, min(os.sysconf("SC_OPEN_MAX"), 65536))
    for fd in open_fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # e.g. the descriptor listdir used, closed already


def _fork():
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the helper
        try:
            _close_all_but(requests_r, replies_w)
            gc.freeze()  # the run's objects, copied by the fork: no collection walks (and copies) their pages
            _serve(requests_r, replies_w)
        finally:
            os._exit(0)
    os.close(requests_r)
    os.close(replies_w)
    return Helper(pid, requests_w, replies_r)


def start():
    """Fork the helper, unless there is one or this process already runs threads (a fork is unsafe then)."""
    global _helper
    if _helper is None and threading.active_count() == 1 and hasattr(os, "fork"):
        _helper = _fork()
        atexit.register(stop)
    return _helper


def get():
    """The helper, or None."""
    return _helper


def stop():
    """Close the pipes (the helper then exits) and reap it."""
    global _helper
    helper, _helper = _helper, None
    if helper is None:
        return
    for fd in (helper.requests, helper.replies):
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.waitpid(helper.pid, 0)
    except ChildProcessError:
        pass
