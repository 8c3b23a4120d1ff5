"""Structured logging: JSON lines (or text) in LOG_DIR/logpipe-relay.log, warnings also on stderr."""

import logging
import logging.handlers
import os
import time

import msgspec

LOGGER_NAME = "logpipe_relay"
FIELDS = ("server", "file", "operation", "bytes", "duration_ms", "attempt", "error")
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
    """The log file, reopened if logrotate moved it; a batch of lines goes out in one write."""

    def emit_batch(self, records):
        """Format `records` and append them with one rotation check and one write."""
        if not records:
            return
        self.acquire()
        try:
            self.reopenIfNeeded()
            if self.stream is None:
                self.stream = self._open()
            self.stream.write("".join(self.format(r) + self.terminator for r in records))
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the run (as Handler.emit does)
            self.handleError(records[-1])
        finally:
            self.release()


class _Batches(logging.handlers.MemoryHandler):
    """Holds lines until 256 are waiting, a warning comes, or the process ends; then one write."""

    def flush(self):
        self.acquire()
        try:
            if self.target is not None and self.buffer:
                self.target.emit_batch([r for r in self.buffer
                                        if r.levelno >= self.target.level and self.target.filter(r)])
                self.buffer.clear()
        finally:
            self.release()


class _Line:
    """What our formatters read of a LogRecord, made without the rest of one."""

    def __init__(self, levelno, message, fields):
        self.__dict__ = fields
        self.levelno, self.levelname, self.name, self.msg = levelno, logging.getLevelName(levelno), LOGGER_NAME, message
        self.created = time.time()

    def getMessage(self):
        return self.msg


def note(logger, level, message, fields):
    """Log `message` with `fields` (a dict of FIELDS, taken over); lines below WARNING go straight to
    the batch of a logger `setup` made, without a LogRecord and the handler chain (a run logs one
    line a file: they cost more than a small file's own Python)."""
    batches = getattr(logger, "_relay_batches", None)
    if level >= logging.WARNING or batches not in logger.handlers:
        logger.log(level, message, extra=fields)
    else:
        batches.handle(_Line(level, message, fields))


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
    file_handler = _LogFile(os.path.join(log_dir, "logpipe-relay.log"), encoding="utf-8",
                            errors="backslashreplace")
    file_handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    # Lines are written in batches (a flush per line costs more than the work it describes);
    # a warning or an error flushes at once, and so does the end of the process.
    buffered = _Batches(capacity=256, flushLevel=logging.WARNING, target=file_handler)
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(TextFormatter())
    logger.addHandler(buffered)
    logger.addHandler(console)
    logger.setLevel(level)
    logger.propagate = False
    logger._relay_configured = (log_dir, log_format, level)
    logger._relay_batches = buffered
    return logger


def get():
    """The package logger."""
    return logging.getLogger(LOGGER_NAME)
