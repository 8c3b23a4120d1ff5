"""The helper process that inflates small files: what it returns is what codecs.inflate returns;
whatever it cannot do, the run's thread does the usual way; it ends with its run."""

import gzip
import os
import random
import signal
import subprocess
import sys

import pytest
from conftest import DODO, needs_root
from test_doit import _cmdline, _state, descendants, wait_for
from test_guarantees import in_process_run

from relay import actions, codecs, engine
from relay import sandbox as sb
from relay.inflater import Inflater, Job
from relay.records import ERROR, PROCESSED, SUPERSEDED


def test_the_helper_returns_what_inflate_returns_and_leaves_nothing_of_a_failure(tmp_path):
    good = gzip.compress(b"one\n") + gzip.compress(b"two\n")
    (tmp_path / "good.gz").write_bytes(good)
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    (tmp_path / "cut.gz").write_bytes(good[:-6])
    expected = codecs.inflate(str(tmp_path / "good.gz"), str(tmp_path / "ref.part"), max_bytes=10**6, min_free=0)

    def job(name, size=None):
        src = tmp_path / name
        out = tmp_path / (f"{name}.part" if size is None else f"{name}.{size}.part")
        return Job(str(src), str(out), 10**6, 0, os.path.getsize(src) if size is None else size, None)

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


@needs_root
def test_files_the_helper_fails_on_are_handled_the_usual_way(env):
    files = {f"f{i:02d}.log.gz": put(env, f"f{i:02d}.log.gz", i) for i in range(40)}
    (env.remote("srv1") / "f05.log.gz").write_bytes(b"corrupt, not gzip")
    os.utime(env.remote("srv1") / "f05.log.gz", (1_700_000_000, 1_700_000_000))
    run = in_process_run(env)
    try:
        engine.list_server(run, "srv1")
        engine.fetch_server(run, "srv1")
        with open(env.data / "incoming" / "srv1" / "f07.log.gz", "ab") as fh:  # changed after its fetch
            fh.write(gzip.compress(b"late\n"))
        sent = spy_on(run.inflater)
        actions.extract_action(run, "srv1")
        records = {os.path.basename(r.remote_path): r for r in run.ledger.changed_in_run("srv1")}
    finally:
        run.close()
    handed = {os.path.basename(j.src) for jobs in sent for j in jobs}
    assert {"f05.log.gz", "f07.log.gz"} <= handed  # they went through the helper first
    assert records["f05.log.gz"].status == ERROR and records["f05.log.gz"].error_kind == "quarantine"
    assert (env.data / "error" / "quarantine" / "srv1" / "f05.log.gz").read_bytes() == b"corrupt, not gzip"
    assert records["f07.log.gz"].status == SUPERSEDED
    assert not (env.data / "extracted" / "srv1" / "f07.log").exists()
    for name, data in files.items():
        if name not in ("f05.log.gz", "f07.log.gz"):
            assert records[name].status == PROCESSED
            assert (env.data / "extracted" / "srv1" / name[:-3]).read_bytes() == data
    assert not list((env.work / "tmp" / "extract" / "srv1").iterdir())


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


@needs_root
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_the_helper_ends_with_its_run(env, signum):
    for i in range(40):
        put(env, f"f{i:02d}.log.gz", i)
    env.configure(env={"SSH_CONNECT_TIMEOUT": "120", "SSH_DEADLINE": "600", "SSH_CONTROL_PERSIST": "1"})
    sshd = env.box.servers[1].proc.pid
    os.kill(sshd, signal.SIGSTOP)  # srv2 never answers: the run stays up after srv1's work
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "doit", "-f", DODO, "run"],
            env=env.environ(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=str(env.root),
        )
        [helper] = wait_for(
            lambda: [p for p in descendants(proc.pid) if "relay.inflater" in _cmdline(p)], 60, "the helper started"
        )
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == (-signal.SIGKILL if signum == signal.SIGKILL else 143)
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
    env.configure(pipeline={"max_per_server": 1})
    run = in_process_run(env)
    try:
        assert run.inflater is None
    finally:
        run.close()
