"""Structured logging: JSON lines (or text) in LOG_DIR/logpipe-relay.log within a second, warnings also on stderr."""

import atexit
import collections
import logging
import logging.handlers
import os
import threading
import time

import msgspec

from .records import label

LOGGER_NAME = "logpipe_relay"
FIELDS = ("server", "file", "operation", "bytes", "duration_ms", "attempt", "error", "delay_s")
_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    """One JSON object a line with UTC timestamps ending in Z."""

    _second, _stamp = None, ""  # the last second formatted (a run logs thousands of lines in one)

    def format(self, record):
        seconds = int(record.created)
        if seconds != self._second:
            self._second, self._stamp = seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        doc = {
            "timestamp": f"{self._stamp}.{min(999_999, int((record.created - seconds) * 1_000_000)):06d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": printable(record.getMessage()),
        }
        fields = record.__dict__
        for field in FIELDS:
            value = fields.get(field)
            if value is not None:
                doc[field] = printable(value) if isinstance(value, str) else value
        return _encoder.encode(doc).decode("utf-8")


class TextFormatter(logging.Formatter):
    """`time level message key=value…` for humans."""

    def format(self, record):
        extras = " ".join(f"{f}={getattr(record, f)!r}" for f in FIELDS if getattr(record, f, None) is not None)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        return printable(f"{stamp} {record.levelname} {record.getMessage()} {extras}".rstrip())


class _LogFile(logging.handlers.WatchedFileHandler):
    """The log file, reopened if logrotate moved it, fed through a queue that a writer thread empties.

    A line is queued (no lock: a deque append is atomic); the writer writes what is queued at most
    `linger` seconds after it woke for the first of those lines, in one write and one flush (a flush
    a line costs more than a small file's own work). A warning, a full queue and `shutdown()` write
    at once, in the calling thread. The writer starts with the first queued line, not in `setup`:
    relay.helpers forks only while the process has a single thread."""

    linger = 0.25  # seconds; well inside the promise that a line is in the file within one second
    capacity = 256  # queued lines that the logging thread writes itself rather than hold on to

    def __init__(self, filename):
        super().__init__(filename, encoding="utf-8", errors="backslashreplace")
        self._reset_queue()

    def _reset_queue(self):
        self._queue: collections.deque = collections.deque()
        self._queued = threading.Event()  # lines wait for the writer
        self._stopped = threading.Event()  # shutdown: no writer, every line is written when logged
        self._writer = None

    def _at_fork_reinit(self):
        # logging calls this in a forked child: no writer thread came along, the queued lines are the parent's.
        super()._at_fork_reinit()  # type: ignore[misc]  # logging's own hook, not in the stubs
        self._reset_queue()

    def handle(self, record):
        """Queue `record` unless a filter drops it (without the handler lock that Handler.handle takes)."""
        passed = self.filter(record)
        if passed:
            self.emit(passed if isinstance(passed, logging.LogRecord) else record)  # 3.12: a filter may replace it
        return passed

    def emit(self, record):
        """Queue `record`; write the queue now if it is a warning, the queue is full or the writer is stopped."""
        if record.args:  # formatted later: take the message now, its arguments may still change
            record.msg, record.args = record.getMessage(), None
        queue = self._queue
        queue.append(record)
        if record.levelno >= logging.WARNING or len(queue) >= self.capacity or self._stopped.is_set():
            self.flush()
        elif not self._queued.is_set():  # set() takes a lock and notifies: once for a batch, not a line
            if self._writer is None:
                self._start_writer()
            self._queued.set()

    def _start_writer(self):
        with self._held():
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_behind, name="logpipe-relay log writer", daemon=True)
                self._writer.start()

    def _held(self):
        """The handler's lock (made by logging.Handler.createLock, so never None here)."""
        assert self.lock is not None
        return self.lock

    def _write_behind(self):
        stopped = self._stopped
        while not stopped.is_set():
            self._queued.wait()
            stopped.wait(self.linger)  # the lines of the next moments join these: one write for all
            self._queued.clear()
            self.flush()

    def flush(self):
        """Write every queued line: one rotation check, one write and one flush for all of them."""
        queue = self._queue
        with self._held():
            if not queue:
                return
            batch = [queue.popleft() for _ in range(len(queue))]
            try:
                self.reopenIfNeeded()
                if self.stream is None:
                    self.stream = self._open()
                    self._statstream()
                self.stream.write("".join([self.format(r) + self.terminator for r in batch]))
                self.stream.flush()
            except Exception:  # noqa: BLE001 - logging must never break the run (as Handler.emit does)
                self.handleError(batch[-1])
            except BaseException:
                # A signal handler raised (SIGTERM, Ctrl-C) in this thread: shutdown() writes them.
                queue.extendleft(reversed(batch))
                raise

    def shutdown(self):
        """Write what is queued now, and every later line as it is logged (the writer thread ends)."""
        self._stopped.set()
        self._queued.set()  # wakes the writer, which then ends
        self.flush()

    def close(self):
        """Write what is queued, then close the file."""
        self.shutdown()
        super().close()


class _Line:
    """What our formatters read of a LogRecord, made without the rest of one."""

    args = None

    def __init__(self, levelno, message, fields):
        self.__dict__ = fields
        self.levelno, self.levelname, self.name, self.msg = levelno, logging.getLevelName(levelno), LOGGER_NAME, message
        self.created = time.time()

    def getMessage(self):
        return self.msg


def note(logger, level, message, fields):
    """Log `message` with `fields` (a dict of FIELDS, taken over); lines below WARNING go straight to
    the queue of a logger `setup` made, without a LogRecord and the handler chain (a run logs one
    line a file: they cost more than a small file's own Python)."""
    log_file = getattr(logger, "_relay_file", None)
    if level >= logging.WARNING or log_file is None or log_file not in logger.handlers:
        logger.log(level, message, extra=fields)
    elif logger.isEnabledFor(level):
        log_file.handle(_Line(level, message, fields))


def printable(text):
    """`text` with undecodable file-name bytes shown as \\xNN, safe to print and to encode."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def setup(log_dir, log_format="json", level="INFO"):
    """Attach the file handler (and a stderr handler for warnings) once per process."""
    # Our lines carry no caller, thread or process fields: skip collecting them for every record
    # (the logging HOWTO's "Optimization" section; this process is ours, so the switch is too).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logger = logging.getLogger(LOGGER_NAME)
    if getattr(logger, "_relay_configured", None) == (log_dir, log_format, level):
        return logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    os.makedirs(log_dir, exist_ok=True)
    file_handler = _LogFile(os.path.join(log_dir, "logpipe-relay.log"))
    file_handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(TextFormatter())
    logger.addHandler(file_handler)
    logger.addHandler(console)
    logger.setLevel(level)
    logger.propagate = False
    # Kept on the logger, not in module variables: the logging module owns that state already.
    logger._relay_configured = log_dir, log_format, level  # type: ignore[attr-defined]
    logger._relay_file = file_handler  # type: ignore[attr-defined]
    # A normal exit writes what is still queued; the engine calls shutdown() itself on SIGTERM.
    atexit.unregister(shutdown)
    atexit.register(shutdown)
    return logger


def shutdown():
    """Write every queued line to the log file now, and later lines as they are logged."""
    for handler in list(get().handlers):
        if isinstance(handler, _LogFile):
            handler.shutdown()


def get():
    """The package logger."""
    return logging.getLogger(LOGGER_NAME)


def about(logger, level, message, rec=None, **fields):
    """Log one structured event (about record `rec`, if given: its server and file name)."""
    if rec is not None:
        fields.setdefault("server", rec.server)
        fields.setdefault("file", label(rec.remote_path or rec.local_name))
    note(logger, level, message, fields)
