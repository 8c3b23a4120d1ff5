"""The helper process that inflates small files: what it returns is what codecs.inflate returns;
whatever it cannot do, the run's thread does the usual way; it ends with its run."""

import gzip
import os
import random
import signal
import subprocess
import sys
import threading
import time

import msgspec
import pytest
from conftest import needs_root
from test_doit import _cmdline, _state, descendants, wait_for
from test_guarantees import assert_converged, in_process_run, seed_files

from relay import actions, codecs, engine
from relay import sandbox as sb
from relay.inflater import Inflater, Job
from relay.records import PROCESSED, SUPERSEDED


def test_the_helper_returns_what_inflate_returns_and_leaves_nothing_of_a_failure(tmp_path):
    good = gzip.compress(b"one\n") + gzip.compress(b"two\n")
    (tmp_path / "good.gz").write_bytes(good)
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    (tmp_path / "cut.gz").write_bytes(good[:-6])
    expected = codecs.inflate(str(tmp_path / "good.gz"), str(tmp_path / "ref.part"), max_bytes=10**6, min_free=0)

    def job(name, size=None):
        src = tmp_path / name
        out = tmp_path / (f"{name}.part" if size is None else f"{name}.{size}.part")
        return Job(os.fsencode(src), os.fsencode(out), 10**6, 0, os.path.getsize(src) if size is None else size, None)

    helper = Inflater()
    try:
        outcomes = helper.submit(
            [job("good.gz"), job("bad.gz"), job("cut.gz"), job("good.gz", size=1), job("gone.gz", size=1)]
        ).result(timeout=30)
    finally:
        helper.close()
    assert [o.done for o in outcomes] == [True, False, False, False, False]
    assert (outcomes[0].sha256, outcomes[0].format, outcomes[0].size) == tuple(expected)
    assert (tmp_path / "good.gz.part").read_bytes() == b"one\ntwo\n"
    parts = {p.name for p in tmp_path.iterdir() if p.name.endswith(".part")}
    assert parts == {"good.gz.part", "ref.part"}
    assert helper.submit([job("good.gz")]) is None  # closed: the caller does its files itself


def put(env, name, seed):
    data = sb.log_lines(random.Random(seed), 40)
    sb.write_gz(str(env.remote("srv1") / name), data)
    return data


def spy_on(helper):
    """Record the jobs handed to `helper` (the real helper still does them)."""
    sent = []
    real = helper.submit

    def submit(jobs):
        sent.append(jobs)
        return real(jobs)

    helper.submit = submit
    return sent


def _failing_files(env, server):
    """40 files on `server`, four of which fail: corrupt, a bomb for a 1 MB cap, and two spoilt later."""
    for i in range(40):
        data = sb.log_lines(random.Random(i), 40)
        sb.write_gz(str(env.remote(server) / f"f{i:02d}.log.gz"), data)
    (env.remote(server) / "f05.log.gz").write_bytes(b"corrupt, not gzip")
    sb.write_gz(str(env.remote(server) / "f06.log.gz"), b"\0" * (4 * 2**20))  # 4 MB of zeros: a bomb here


def _run_failing(env, server, with_helper):
    run = in_process_run(env)
    try:
        if not with_helper:
            run.inflater.close()
            run.inflater = None  # every file is done by the server's thread
        engine.list_server(run, server)
        engine.fetch_server(run, server)
        incoming = env.data / "incoming" / server
        with open(incoming / "f07.log.gz", "ab") as fh:  # changed after its fetch
            fh.write(gzip.compress(b"late\n"))
        os.unlink(incoming / "f08.log.gz")  # gone from incoming/ after its fetch
        sent = spy_on(run.inflater) if with_helper else []
        actions.extract_action(run, server)
        records = {os.path.basename(r.remote_path): r for r in run.ledger.changed_in_run(server)}
    finally:
        run.close()
    handed = {os.fsdecode(os.path.basename(j.src)) for jobs in sent for j in jobs}
    return records, handed


@needs_root
def test_what_the_helper_fails_on_ends_as_it_does_without_a_helper(env):
    """Corrupt, bomb, changed and gone files handed to the helper end with the same status, error
    kind, message and attempt counts as when the server's thread alone does them."""
    env.configure(pipeline={"max_extracted_bytes": 2**20})
    _failing_files(env, "srv1")
    _failing_files(env, "srv2")
    helped, handed = _run_failing(env, "srv1", with_helper=True)
    alone, none = _run_failing(env, "srv2", with_helper=False)
    assert {"f05.log.gz", "f06.log.gz", "f07.log.gz"} <= handed and not none
    assert helped.keys() == alone.keys()

    def outcome(rec):
        return rec.status, rec.error_kind, rec.last_error.replace("srv2", "srv1"), rec.attempts, rec.extracted_size

    for name in helped:
        assert outcome(helped[name]) == outcome(alone[name]), name
    assert helped["f05.log.gz"].error_kind == "quarantine" and helped["f06.log.gz"].error_kind == "quarantine"
    assert helped["f07.log.gz"].status == SUPERSEDED


@needs_root
def test_a_helper_killed_mid_run_leaves_every_file_to_the_run_once(env):
    files = {f"f{i:03d}.log.gz": put(env, f"f{i:03d}.log.gz", i) for i in range(100)}
    run = in_process_run(env)
    try:
        engine.list_server(run, "srv1")
        engine.fetch_server(run, "srv1")
        helper = run.inflater
        sent = spy_on(helper)
        real = helper.submit

        def submit(jobs):
            if len(sent) == 1:
                helper._proc.kill()  # between its first and second batch
            return real(jobs)

        helper.submit = submit
        actions.extract_action(run, "srv1")
        processed = [r for r in run.ledger.changed_in_run("srv1") if r.status == PROCESSED]
    finally:
        run.close()
    assert len(sent) >= 2
    assert len(processed) == len(files)
    assert sorted(os.listdir(env.data / "extracted" / "srv1")) == sorted(n[:-3] for n in files)
    for name, data in files.items():
        assert (env.data / "extracted" / "srv1" / name[:-3]).read_bytes() == data
    assert not list((env.work / "tmp" / "extract" / "srv1").iterdir())
    log = (env.work / "logs" / "logpipe-relay.log").read_text()
    assert "the helper process that inflates small files ended" in log


def test_an_answer_that_cannot_be_read_gives_its_batch_back(tmp_path, monkeypatch):
    """The run's side cannot decode what the helper sent: the batch comes back "not done" (its
    thread does the files), never a future left waiting for ever, and the helper is gone."""
    (tmp_path / "good.gz").write_bytes(gzip.compress(b"one\n"))

    class Unreadable:
        def __init__(self, kind):
            del kind

        def decode(self, body):
            raise msgspec.DecodeError("garbage")

    monkeypatch.setattr(msgspec.msgpack, "Decoder", Unreadable)  # only this process's side of the pipe
    ended = []
    helper = Inflater(on_exit=ended.append)
    try:
        job = Job(os.fsencode(tmp_path / "good.gz"), os.fsencode(tmp_path / "good.part"), 10**6, 0, 24, None)
        future = helper.submit([job])
        assert future.result(timeout=30) is None
        assert helper.submit([job]) is None and ended  # no helper any more, and it was said
    finally:
        helper.close()


def test_a_stop_is_not_held_up_by_a_helper_that_does_not_read(tmp_path):
    """The helper stuck on one file (a FIFO nobody writes), a thread blocked sending it a message
    larger than the pipe holds: close() still ends it at once, and the blocked thread gets free."""
    os.mkfifo(tmp_path / "stuck.gz")
    job = Job(os.fsencode(tmp_path / "stuck.gz"), os.fsencode(tmp_path / "stuck.part"), 10**6, 0, 10, None)
    helper = Inflater()
    stuck = helper.submit([job])
    big = [Job(b"/" + b"x" * 200, b"/" + b"y" * 200, 1, 0, 1, None)] * 2000  # about 800 KB, the pipe 64 KB
    blocked = threading.Thread(target=helper.submit, args=(big,), daemon=True)
    blocked.start()
    wait_for(lambda: len(helper._waiting) == 2, 10, "the second message is being written")
    started = time.monotonic()
    closing = threading.Thread(target=helper.close, daemon=True)  # a hang here fails, not blocks, the test
    closing.start()
    closing.join(timeout=5)
    blocked.join(timeout=5)
    assert not closing.is_alive() and not blocked.is_alive() and time.monotonic() - started < 3
    assert stuck.result(timeout=5) is None  # not done: the run's thread would do it


def test_a_kill_9_of_the_run_ends_its_helper_even_while_it_works(tmp_path):
    """The helper is stuck opening a FIFO, so it would never see its input end: only the
    parent-death signal can end it when the run is killed."""
    os.mkfifo(tmp_path / "stuck.gz")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    job = (os.fsencode(tmp_path / "stuck.gz"), os.fsencode(tmp_path / "stuck.part"))
    script = (
        f"import sys; sys.path.insert(0, {repo!r})\n"
        "from relay.inflater import Inflater, Job\n"
        "helper = Inflater()\n"
        f"helper.submit([Job({job[0]!r}, {job[1]!r}, 10**6, 0, 10, None)])\n"
        "print(helper._proc.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    helper = int(run.stdout.readline())

    def waits_on_the_fifo():
        with open(f"/proc/{helper}/wchan") as fh:
            return fh.read() == "wait_for_partner"  # the kernel's wait in open() of a FIFO

    wait_for(waits_on_the_fifo, 30, "the helper is stuck opening the FIFO")
    run.kill()
    run.wait(timeout=10)
    wait_for(lambda: not os.path.exists(f"/proc/{helper}") or _state(helper) == "Z", 5, "the busy helper ended")


@needs_root
def test_a_name_that_is_not_utf8_goes_through_the_helper(env):
    names = [os.fsdecode(b"caf\xe9-%02d.log.gz" % i) for i in range(40)]  # Latin-1 names, as some servers have
    files = {name: put(env, name, i) for i, name in enumerate(names)}
    run = in_process_run(env)
    try:
        engine.list_server(run, "srv1")
        engine.fetch_server(run, "srv1")
        sent = spy_on(run.inflater)
        assert actions.extract_action(run, "srv1") is True
    finally:
        run.close()
    assert sum(len(jobs) for jobs in sent) >= 32  # the helper had at least one batch of them
    for name, data in files.items():
        assert (env.data / "extracted" / "srv1" / name[:-3]).read_bytes() == data


@needs_root
def test_the_helper_lives_as_long_as_a_run_of_several_servers(env):
    """It is started by one server's task thread; doit ends its threads as tasks run out, and the
    helper must not end with that thread (the parent-death signal follows the forking thread)."""
    expected = {}
    for server, count in (("srv1", 150), ("srv2", 40), ("srv3", 1)):
        for i in range(count):
            data = sb.log_lines(random.Random(f"{server}{i}"), 40)
            sb.write_gz(str(env.remote(server) / f"f{i:03d}.log.gz"), data)
            expected[(server, f"f{i:03d}.log")] = data
    env.doit("run", check=0)
    log = (env.work / "logs" / "logpipe-relay.log").read_text()
    assert "the helper process that inflates small files ended" not in log
    assert_converged(env, expected)


@needs_root
@pytest.mark.parametrize("point", ["extract", "place", "commit"])
def test_kill_9_while_the_helper_works_then_next_run_converges(env, point):
    expected = seed_files(env, count=40)
    proc = env.doit("run", env=env.environ(RELAY_CRASH_AT=point))
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    env.doit("run", check=0)
    assert_converged(env, expected)


def _ignores(pid, signum):
    """Whether process `pid` ignores `signum` (its SigIgn mask in /proc)."""
    with open(f"/proc/{pid}/status") as fh:
        mask = next(line.split()[1] for line in fh if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signum - 1)))


@needs_root
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_the_helper_ends_with_its_run(env, signum):
    for i in range(40):
        put(env, f"f{i:02d}.log.gz", i)
    env.configure(env={"SSH_CONNECT_TIMEOUT": "120", "SSH_DEADLINE": "600", "SSH_CONTROL_PERSIST": "1"})
    sshd = env.box.servers[1].proc.pid
    os.kill(sshd, signal.SIGSTOP)  # srv2 never answers: the run stays up after srv1's work
    try:
        proc = env.start("run")
        [helper] = wait_for(
            lambda: [p for p in descendants(proc.pid) if "relay.inflater" in _cmdline(p)], 60, "the helper started"
        )
        if signum == signal.SIGTERM:
            wait_for(lambda: _ignores(helper, signal.SIGTERM), 30, "the helper is up")
            os.kill(helper, signal.SIGTERM)  # as systemd does: every process of the unit at once
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == (-signal.SIGKILL if signum == signal.SIGKILL else 143)
        if signum == signal.SIGTERM:  # ended and reaped by the run itself, before it exits
            assert not os.path.exists(f"/proc/{helper}")
            log = (env.work / "logs" / "logpipe-relay.log").read_text()
            assert "stopped by signal 15" in log and "the helper process that inflates" not in log
        wait_for(lambda: not os.path.exists(f"/proc/{helper}") or _state(helper) == "Z", 5, "the helper ended")
    finally:
        os.kill(sshd, signal.SIGCONT)


@needs_root
def test_no_helper_when_the_run_is_to_work_one_file_at_a_time(env):
    run = in_process_run(env)
    try:
        assert (run.inflater is not None) == (len(os.sched_getaffinity(0)) > 1)
    finally:
        run.close()
    for pipeline in ({"max_per_server": 1}, {"max_workers": 1}):
        env.configure(pipeline=pipeline)
        run = in_process_run(env)
        try:
            assert run.inflater is None
        finally:
            run.close()
