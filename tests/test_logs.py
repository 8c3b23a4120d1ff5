"""Logs: every line in the file within a second and all of them after SIGTERM; retries logged with their delay."""

import contextlib
import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relay import logs, retry

REPO = Path(__file__).resolve().parent.parent
WRITER = "logpipe-relay log writer"


@contextlib.contextmanager
def opened(log_dir):
    """The package logger set up in `log_dir`: (logger, log file path); its handlers closed after."""
    logger = logs.setup(str(log_dir))
    try:
        yield logger, log_dir / "logpipe-relay.log"
    finally:
        for handler in list(logger.handlers):  # no handler on a deleted directory for later tests
            logger.removeHandler(handler)
            handler.close()
        logger._relay_configured = None


@pytest.fixture
def log(tmp_path):
    """The package logger set up in a fresh LOG_DIR: (logger, log file path)."""
    with opened(tmp_path / "logs") as opened_log:
        yield opened_log


def lines_of(path):
    """The complete JSON lines of `path` (a line the writer is still writing is left out)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1]]


def wait_for(path, count, within=1.0):
    """The lines of `path` as soon as there are `count` of them, or those there are after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        found = lines_of(path)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.01)  # polling interval, not synchronisation: the deadline decides


class CountingStream:
    """A file object that counts the writes and flushes that reach it."""

    def __init__(self, stream):
        self.stream, self.writes, self.flushes = stream, 0, 0

    def write(self, text):
        self.writes += 1
        return self.stream.write(text)

    def flush(self):
        self.flushes += 1
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def test_an_info_line_is_in_the_file_within_a_second_while_the_process_runs(log):
    logger, path = log
    started = time.monotonic()
    logger.info("listed 3 path(s)", extra={"server": "srv1", "operation": "list"})
    logs.note(logger, logging.INFO, "processed", {"server": "srv1", "file": "a.gz", "operation": "extract"})
    found = wait_for(path, 2)
    assert time.monotonic() - started < 1.0
    assert [d["message"] for d in found] == ["listed 3 path(s)", "processed"]


def test_a_burst_of_lines_costs_a_few_writes_not_one_a_line(log):
    logger, path = log
    counting = logger._relay_file.stream = CountingStream(logger._relay_file.stream)
    for i in range(1000):
        logs.note(logger, logging.INFO, f"line {i}", {"server": "s", "bytes": i})
    found = wait_for(path, 1000)
    assert [d["message"] for d in found] == [f"line {i}" for i in range(1000)]
    assert counting.writes <= 6 and counting.flushes <= 6  # 1000 / 256 full queues, then the rest


def test_the_writer_thread_starts_with_the_first_line_and_ends_at_shutdown(tmp_path):
    # relay.helpers forks only while the process has one thread: setup must not start one.
    before = set(threading.enumerate())  # writers of earlier tests' handlers may still be ending
    with opened(tmp_path) as (logger, path):
        assert set(threading.enumerate()) - before == set()
        logger.info("one")
        (writer,) = set(threading.enumerate()) - before
        assert writer.name == WRITER
        logs.shutdown()
        writer.join(timeout=5)
        assert not writer.is_alive()
        logger.info("after shutdown")  # no writer any more: written at once
        assert [d["message"] for d in lines_of(path)] == ["one", "after shutdown"]


SIGTERM_SCRIPT = r"""
import logging, os, signal, sys
from relay import logs, retry
log = logs.setup(sys.argv[1])
log._relay_file.linger = 3600  # the writer would hold the last lines for an hour: only shutdown() writes them
call_shutdown = sys.argv[2] == "yes"
signal.signal(signal.SIGTERM, lambda *_: (logs.shutdown() if call_shutdown else None, os._exit(0)))
for i in range(1000):
    logs.note(log, logging.INFO, f"line {i}", {"server": "s"})
print("logged", flush=True)
while True:
    signal.pause()
"""


@pytest.mark.parametrize("call_shutdown", ["yes", "no"])
def test_sigterm_whose_handler_calls_shutdown_loses_no_line(tmp_path, call_shutdown):
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(tmp_path), call_shutdown],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "logged\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.stdout.close()
    found = [d["message"] for d in lines_of(tmp_path / "logpipe-relay.log")]
    if call_shutdown == "yes":
        assert found == [f"line {i}" for i in range(1000)]
    else:  # the control: without shutdown() the queued tail is lost, so it is shutdown() that wrote it
        assert len(found) < 1000


def test_a_normal_exit_writes_every_queued_line(tmp_path):
    script = (
        "import sys; from relay import logs; log = logs.setup(sys.argv[1]); "
        "log._relay_file.linger = 3600; [log.info(f'line {i}') for i in range(10)]"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, check=True, timeout=30)
    assert [d["message"] for d in lines_of(tmp_path / "logpipe-relay.log")] == [f"line {i}" for i in range(10)]


def test_json_fields_of_a_line(log):
    logger, path = log
    fields = {
        "server": "srv1",
        "file": "app.log.1.gz",
        "operation": "fetch",
        "bytes": 2048,
        "duration_ms": 12.5,
        "attempt": 2,
        "error": "refused",
        "delay_s": 1.5,
    }
    logs.note(logger, logging.INFO, "fetched 2 file(s)", dict(fields))  # note() takes the dict over
    logger.info("bare")
    full, bare = wait_for(path, 2)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", full["timestamp"])
    assert {k: v for k, v in full.items() if k != "timestamp"} == {
        "level": "INFO",
        "logger": "logpipe_relay",
        "message": "fetched 2 file(s)",
        **fields,
    }
    assert set(bare) == {"timestamp", "level", "logger", "message"}  # absent fields are left out


def test_a_warning_is_in_the_file_and_on_stderr_at_once(tmp_path, capsys):
    with opened(tmp_path) as (logger, path):  # here, not in a fixture: stderr is the test's capture then
        logs.note(logger, logging.INFO, "before", {})
        logs.note(logger, logging.DEBUG, "not at INFO", {})
        logger.warning("host key not accepted", extra={"server": "srv1"})
        assert [(d["level"], d["message"]) for d in lines_of(path)] == [
            ("INFO", "before"),
            ("WARNING", "host key not accepted"),
        ]
        err = capsys.readouterr().err
        assert "WARNING host key not accepted server='srv1'" in err and "before" not in err


def test_the_file_is_reopened_when_logrotate_moves_it(log):
    logger, path = log
    logger.info("old")
    assert [d["message"] for d in wait_for(path, 1)] == ["old"]
    path.rename(path.with_name("logpipe-relay.log.1"))
    logger.info("new")
    assert [d["message"] for d in wait_for(path, 1)] == ["new"]
    assert [d["message"] for d in lines_of(path.with_name("logpipe-relay.log.1"))] == ["old"]


# --- retries: each one logged with its attempt and delay; a stop ends the wait ----------------------


class Refused(Exception):
    """A transient fault, for the retry tests."""


def refused_then(result, failures):
    """A function that raises Refused `failures` times, then returns `result`; `.calls` counts its calls."""

    def fn():
        fn.calls += 1
        if fn.calls <= failures:
            raise Refused(f"refused ({fn.calls})")
        return result

    fn.calls = 0
    return fn


def test_every_retry_is_logged_at_warning_with_its_attempt_and_delay(log):
    _, path = log
    slept, failed, retried = [], [], []
    fn = refused_then("ok", 2)
    assert (
        retry.call_with_retry(
            fn,
            attempts=3,
            base=2,
            cap=100,
            is_transient=lambda e: isinstance(e, Refused),
            rng=lambda: 0.5,
            sleep=slept.append,
            on_failure=lambda exc, n: failed.append(n),
            on_retry=lambda exc, n, delay: retried.append((str(exc), n, delay)),
            fields={"server": "srv1", "operation": "fetch"},
        )
        == "ok"
    )
    assert slept == [1.0, 2.0]  # rng 0.5 of min(cap, base * 2 ** (n - 1))
    assert failed == [1, 2] and retried == [("refused (1)", 1, 1.0), ("refused (2)", 2, 2.0)]
    assert [
        (d["level"], d["message"], d["attempt"], d["delay_s"], d["server"], d["operation"], d["error"])
        for d in lines_of(path)
    ] == [
        (
            "WARNING",
            "fetch attempt 1 of 3 failed: refused (1); retrying in 1.0 s",
            1,
            1.0,
            "srv1",
            "fetch",
            "refused (1)",
        ),
        (
            "WARNING",
            "fetch attempt 2 of 3 failed: refused (2); retrying in 2.0 s",
            2,
            2.0,
            "srv1",
            "fetch",
            "refused (2)",
        ),
    ]


def test_no_retry_line_when_there_is_no_retry(log):
    logger, path = log
    with pytest.raises(Refused):  # the last attempt: raised, not retried
        retry.call_with_retry(
            refused_then("ok", 5),
            attempts=2,
            base=1,
            cap=1,
            rng=lambda: 1.0,
            is_transient=lambda e: True,
            sleep=lambda s: None,
        )
    fn = refused_then("ok", 1)
    with pytest.raises(Refused):  # not transient: raised at once, no wait
        retry.call_with_retry(fn, attempts=5, base=1, cap=1, is_transient=lambda e: False, sleep=pytest.fail)
    assert fn.calls == 1
    logger.warning("end")
    assert [d["message"] for d in lines_of(path)] == ["attempt 1 of 2 failed: refused (1); retrying in 1.0 s", "end"]


class SetEvent:
    """An Event already set: records the timeouts it was waited with."""

    def __init__(self):
        self.waited = []

    def wait(self, timeout=None):
        self.waited.append(timeout)
        return True


def backoff_60s(fn, **kwargs):
    """call_with_retry with a 60 s backoff between up to 5 attempts of `fn`, every error transient."""
    return retry.call_with_retry(
        fn, attempts=5, base=60, cap=60, rng=lambda: 1.0, is_transient=lambda e: True, **kwargs
    )


def test_an_interrupted_backoff_raises_the_last_error_or_the_one_given(log):
    event, fn = SetEvent(), refused_then("ok", 3)
    with pytest.raises(Refused, match=r"refused \(1\)"):
        backoff_60s(fn, sleep=pytest.fail, interrupted=event)
    assert event.waited == [60.0] and fn.calls == 1  # Event.wait(delay), never sleep; no second attempt
    with pytest.raises(KeyboardInterrupt) as info:
        backoff_60s(
            refused_then("ok", 3),
            sleep=pytest.fail,
            interrupted=SetEvent(),
            interrupt_error=KeyboardInterrupt("stopped by SIGTERM"),
        )
    assert isinstance(info.value.__cause__, Refused)


def test_a_stop_ends_a_60_second_backoff_within_5_seconds(log):
    stop = threading.Event()
    # The stop comes from another thread while the backoff waits, as a signal handler's would.
    on_retry = lambda *_: threading.Timer(0.2, stop.set).start()  # noqa: E731
    started = time.monotonic()
    with pytest.raises(Refused):
        backoff_60s(refused_then("ok", 3), sleep=pytest.fail, on_retry=on_retry, interrupted=stop)
    assert time.monotonic() - started < 5


def test_a_stop_callable_is_looked_at_during_the_wait(log):
    naps = []

    def stopping():
        return len(naps) >= 3

    with pytest.raises(Refused):
        backoff_60s(refused_then("ok", 3), sleep=naps.append, interrupted=stopping)
    assert len(naps) == 3 and all(0 < nap <= 0.5 for nap in naps)  # < 1 s between looks
