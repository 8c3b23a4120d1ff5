"""doit as doit: loading does nothing but read; list/info/help/forget never lock or contact a server;
`doit run extract:srv1` contacts srv1 only; Ctrl-C, SIGTERM and kill -9 end the run and its children."""

import fcntl
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import DODO, needs_root

from relay import sandbox as sb

pytestmark = needs_root


def put(env, server, name, seed):
    data = sb.log_lines(random.Random(seed), 200)
    sb.write_gz(str(env.remote(server) / name), data)
    return data


def dead_port():
    """A loopback port where nothing listens (connections are refused at once)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children_of(pid):
    """Pids whose parent is `pid`, read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def descendants(pid):
    result, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        result += kids
        todo += kids
    return result


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_list_info_help_forget_touch_no_server_take_no_lock_and_work_during_a_run(env):
    put(env, "srv1", "a.gz", "a")
    (env.remote("srv1") / "bad.gz").write_bytes(b"not gzip")
    os.utime(env.remote("srv1") / "bad.gz", (1_700_000_000, 1_700_000_000))
    env.doit("run", check=1)  # bad.gz parked
    tree, state = env.tree(), (env.state / "state.db").read_bytes()
    env.configure(env={"SSH_CONNECT_TIMEOUT": "120", "SSH_CONTROL_PERSIST": "1"})
    state_files = sorted(os.listdir(env.state))
    sshds = [server.proc.pid for server in env.box.servers]
    for pid in sshds:  # a command that contacted a server now would hang
        os.kill(pid, signal.SIGSTOP)
    lock = os.open(env.state / "lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run going on holds it
    try:
        listed = quick(env, "list", "--all")
        assert "extract:srv1/bad.gz" in listed.stdout and "parked in error/quarantine" in listed.stdout
        info = quick(env, "info", "extract:srv1/bad.gz", ok=(0, 1))  # doit: 1 = the task would run
        assert "parked in error/quarantine" in info.stdout
        quick(env, "help", "run")
        quick(env, "forget", "extract:srv1/bad.gz")
        busy = env.doit("run")
        assert busy.returncode == 3 and "another logpipe-relay run holds" in busy.stderr
    finally:
        os.close(lock)
        for pid in sshds:
            os.kill(pid, signal.SIGCONT)
    assert env.tree() == tree and (env.state / "state.db").read_bytes() == state
    assert sorted(os.listdir(env.state)) == state_files  # not even SQLite's -wal/-shm files


def quick(env, *args, ok=(0,)):
    """A doit command that must succeed within 30 s (contacting a stopped server would hang it)."""
    proc = subprocess.run(
        [sys.executable, "-m", "doit", "-f", DODO, *args],
        cwd=str(env.root),
        env=env.environ(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode in ok, proc.stdout + proc.stderr
    return proc


def test_importing_the_dodo_file_does_no_ssh_takes_no_lock_and_writes_nothing(env, tmp_path):
    code = f"import sys, runpy; sys.argv = ['doit']; runpy.run_path({DODO!r}); print('loaded')"
    env.configure(servers=[{"host": "127.0.0.1", "port": dead_port()}] * 3)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env.environ(), capture_output=True, text=True, cwd=str(tmp_path), timeout=60
    )
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr
    # Only the directory doit's own database lives in is made; nothing else at all.
    assert sorted(os.listdir(env.work)) == ["state"] and os.listdir(env.state) == []


def test_one_server_run_contacts_that_server_only(env):
    data = put(env, "srv1", "one.gz", "one")
    put(env, "srv2", "two.gz", "two")
    env.configure(servers=[{}, {"host": "127.0.0.1", "port": dead_port()}, {"host": "127.0.0.1", "port": dead_port()}])
    proc = env.doit("run", "extract:srv1", check=0)
    assert (env.data / "extracted" / "srv1" / "one").read_bytes() == data
    log = (env.work / "logs" / "logpipe-relay.log").read_text()
    assert '"server":"srv2"' not in log and '"server":"srv3"' not in log, proc.stdout
    assert not (env.data / "extracted" / "srv2").exists() or not os.listdir(env.data / "extracted" / "srv2")


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_stop_a_hung_run_within_5s_with_its_children(env, signum, status):
    done = put(env, "srv1", "done.gz", "done")
    env.doit("run", "extract:srv1", check=0)
    put(env, "srv3", "later.gz", "later")
    env.configure(env={"SSH_CONNECT_TIMEOUT": "120", "SSH_DEADLINE": "600", "SSH_CONTROL_PERSIST": "1"})
    sshd = env.box.servers[2].proc.pid
    os.kill(sshd, signal.SIGSTOP)  # srv3 accepts connections and never answers
    try:
        proc = env.start("run", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(
            lambda: any(_program(p) == "ssh" and "127.0.0.13" in _cmdline(p) for p in descendants(proc.pid)),
            60,
            "the ssh to srv3 started",
        )
        kids = descendants(proc.pid)
        sent = time.monotonic()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        os.kill(sshd, signal.SIGCONT)
    assert proc.returncode == status, out + err
    assert took < 5, f"took {took:.1f}s"
    wait_for(
        lambda: not [k for k in kids if os.path.exists(f"/proc/{k}") and _state(k) != "Z"],
        5,
        "the run's rsync/ssh children ended",
    )
    assert (env.data / "extracted" / "srv1" / "done").read_bytes() == done
    with open(env.state / "lock", "rb+") as fh:  # released: another run may start at once
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    log = (env.work / "logs" / "logpipe-relay.log").read_text()
    assert f"stopped by signal {int(signum)}" in log


def test_kill_9_of_a_run_takes_its_children_with_it(env):
    put(env, "srv3", "later.gz", "later")
    env.configure(env={"SSH_CONNECT_TIMEOUT": "120", "SSH_DEADLINE": "600", "SSH_CONTROL_PERSIST": "1"})
    sshd = env.box.servers[2].proc.pid
    os.kill(sshd, signal.SIGSTOP)
    try:
        proc = env.start("run", "extract:srv3")
        wait_for(lambda: any(_program(p) == "ssh" for p in descendants(proc.pid)), 60, "the ssh to srv3 started")
        kids = descendants(proc.pid)
        proc.kill()
        proc.wait(timeout=10)
        wait_for(
            lambda: not [k for k in kids if os.path.exists(f"/proc/{k}") and _state(k) != "Z"],
            5,
            "the killed run's children ended",
        )
    finally:
        os.kill(sshd, signal.SIGCONT)


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _program(pid):
    return os.path.basename(_cmdline(pid).split(" ", 1)[0])


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
