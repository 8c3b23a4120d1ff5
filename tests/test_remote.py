"""relay.remote against real ssh, rsync and sshd on loopback: the shared connection's identity, the
server's sha256sum, the run's children (stopped, or killed with the run) and starting commands
from many threads."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import msgspec
import pytest
from conftest import REPO, needs_root

from relay import config, remote
from relay import sandbox as sb
from relay.config import Server
from relay.errors import AuthFailed, RemoteError, RemoteFileMissing, RemoteUnreachable, RunInterrupted


def load(tmp_path, servers, **env):
    """Settings read from a config directory written under `tmp_path` (no server is contacted)."""
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    values = {key: str(tmp_path / key.lower()) for key in config.DIRECTORY_KEYS}
    values.update(SSH_KNOWN_HOSTS="/k/known_hosts", **env)
    (conf / ".env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    (conf / "sources.conf").write_text(json.dumps({"servers": servers}))
    (conf / "pipeline.conf").write_text("{}")
    return config.load_settings(str(conf), {})


def env_settings(env):
    """The settings of an `env` fixture's config, as a run would load them."""
    return config.load_settings(str(env.conf), env.environ())


LOCAL = Server(name="local", host="127.0.0.1", user="u", remote_paths=("/x/*.gz",))  # for local commands


def wait_until(predicate, timeout, what):
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        pause.wait(0.02)


def _started(pid):
    """The start time of live process `pid` (None once it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in "ZX" else fields[19]


def tree(pid):
    """`pid` and its descendants now, each with its start time (a reused pid is another process)."""
    return {p: _started(p) for p in [pid, *sb._descendants(pid)] if _started(p)}


def still_running(procs):
    """Which of `procs` (from tree()) still run."""
    return sorted(p for p, started in procs.items() if _started(p) == started)


def names(procs):
    """The command names of `procs`."""
    found = set()
    for pid in procs:
        try:
            with open(f"/proc/{pid}/comm") as fh:
                found.add(fh.read().strip())
        except FileNotFoundError:
            pass
    return found


def slow_command(settings, name):
    """A minute-long command, run here (`local`) or on server `name` through its shared connection."""
    if name == "local":
        return ["sleep", "60"]
    server = settings.server(name)
    return remote.with_password(
        server,
        [
            "ssh",
            *remote.ssh_options(settings, server, remote.control_dir(settings.state_dir)),
            "-o",
            "ControlMaster=no",
            "--",
            server.host,
            "sleep 60",
        ],
    )


# --- the ControlMaster socket is named by the whole connection -------------------------------


def test_the_control_socket_changes_with_every_field_that_defines_the_connection(tmp_path):
    settings = load(tmp_path, [{"name": "srv1", "host": "h1", "user": "u", "remote_path": "/x/*.gz"}])
    server = settings.server("srv1")
    base = remote.control_socket(settings, server, "/sock")
    assert base == remote.control_socket(settings, server, "/sock")  # same inputs, same socket
    assert re.fullmatch(r"/sock/[0-9a-f]{16}", base)
    opts = remote.ssh_options(settings, server, "/sock")
    assert f"ControlPath={base}" in opts
    replace = msgspec.structs.replace
    variants = {
        "host": (settings, replace(server, host="h2")),
        "port": (settings, replace(server, port=2222)),
        "user": (settings, replace(server, user="other")),
        "server identity file": (settings, replace(server, identity_file="/id_other")),
        "identity file": (replace(settings, ssh_identity_file="/id"), server),
        "known_hosts": (replace(settings, ssh_known_hosts="/k/other"), server),
        "auth mode": (settings, replace(server, auth="password")),
        "password variable": (settings, replace(server, auth="password", password_env="OTHER")),
        "host key policy": (replace(settings, ssh_strict_host_key_checking="accept-new"), server),
        "server name": (settings, replace(server, name="srv9")),
    }
    paths = {what: remote.control_socket(s, srv, "/sock") for what, (s, srv) in variants.items()}
    assert base not in paths.values(), paths
    assert len(set(paths.values())) == len(paths), paths
    longest = remote.control_socket(settings, server, remote.control_dir("/" + "x" * 200))
    assert len(longest) + len(".0123456789abcdef") < 104  # ssh's temporary name beside it still fits


@needs_root
@pytest.mark.parametrize("name", ["srv1", "srv2"])  # a key server and the password server
def test_a_changed_user_is_refused_not_served_by_the_old_master(env, name):
    settings = env_settings(env)
    conn = remote.Connection(settings, settings.server(name), env.environ())
    try:
        assert conn.list_files() == []  # this listing's ssh stays on as the shared connection
        assert conn._master_alive()
        env.configure(servers=[{"user": "nosuchuser"}] * 3)
        changed = env_settings(env)
        other = remote.Connection(changed, changed.server(name), env.environ())
        with pytest.raises(AuthFailed, match="authentication refused"):
            other.list_files()
        assert conn._master_alive()  # the old master was there all along, and not used
    finally:
        conn.close()


# --- the server's own sha256sum -------------------------------------------------------------

HOSTILE = [
    b"plain.gz",
    b"with space.gz",
    b"-dash.gz",
    b"--help",
    b"-",
    b"q'uo\"te.gz",
    b"$(touch pwned).gz",
    b"`touch pwned2`;x",
    b"new\nline.gz",
    b"trailing-newline\n",
    b"back\\slash.gz",
    b"\\n",
    b"tab\tgz",
    b" lead space",
    b"latin-\xe9.gz",
    b"\xff\xfe",
    b"star*?[x]",
    b"x  y",
]


def write_remote(directory, names):
    """Write a small distinct file for each of `names` (bytes) into `directory`; {path str: sha256}."""
    hashes = {}
    for index, name in enumerate(names):
        path = os.path.join(os.fsencode(str(directory)), name)
        data = f"content {index} ".encode() * (index + 1)
        with open(path, "wb") as fh:
            fh.write(data)
        os.chmod(path, 0o644)
        hashes[os.fsdecode(path)] = hashlib.sha256(data).hexdigest()
    return hashes


def test_sha256_names_go_nul_terminated_and_a_relative_one_never_as_a_bare_dash():
    assert remote.sha256_input(["-", "/a b\n", "x/-y"]) == b"./-\0/a b\n\0./x/-y\0"
    digest = "ab" * 32
    out = f"{digest}  ./-\0{digest} */a b\n\0{'0' * 64}  /not asked\0".encode()
    assert remote.parse_sha256(out, ["-", "/a b\n"]) == {"-": digest, "/a b\n": digest}


@needs_root
@pytest.mark.parametrize("name", ["srv1", "srv2"])
def test_remote_sha256_of_hostile_names_equals_hashlib_and_leaves_out_what_is_not_there(env, name):
    settings = env_settings(env)
    where = env.remote(name)
    expected = write_remote(where, HOSTILE)
    (where / "a-directory").mkdir()
    unreadable = where / "unreadable.gz"
    unreadable.write_bytes(b"secret")
    os.chmod(unreadable, 0o600)  # root's: the login user cannot read it
    relative = {str(where / "-")[1:]: expected[str(where / "-")]}  # from /, where the command runs
    asked = [*expected, *relative, str(where / "vanished.gz"), str(where / "a-directory"), str(unreadable)]
    conn = remote.Connection(settings, settings.server(name), env.environ())
    try:
        assert conn.remote_sha256(asked) == {**expected, **relative}
        assert conn.remote_sha256([str(where / "vanished.gz")]) == {}
        assert conn.remote_sha256([]) == {}
        assert not any(os.path.exists(p) for p in ("/pwned", "/pwned2", where / "pwned", where / "pwned2"))
    finally:
        conn.close()


@needs_root
def test_remote_sha256_of_more_names_than_one_command_line_takes(env):
    settings = env_settings(env)
    names = [f"{n:04d}-{'x' * 200}.gz".encode() for n in range(1500)]  # about 300 kB of names: xargs splits
    expected = write_remote(env.remote("srv1"), names)
    conn = remote.Connection(settings, settings.server("srv1"), env.environ())
    try:
        assert conn.remote_sha256(list(expected)) == expected
    finally:
        conn.close()


@needs_root
def test_remote_sha256_is_none_without_a_usable_sha256sum_on_the_server(env):
    settings = env_settings(env)
    where = env.remote("srv1")
    expected = write_remote(where, [b"a.gz"])
    only_xargs = where / "only-xargs"
    only_xargs.mkdir()
    os.symlink(
        subprocess.run(["sh", "-c", "command -v xargs"], capture_output=True, text=True).stdout.strip(),
        only_xargs / "xargs",
    )
    old = where / "old-sha256sum"  # a sha256sum from before -z, as coreutils 8.30 is
    old.mkdir()
    os.symlink(only_xargs / "xargs", old / "xargs")
    (old / "sha256sum").write_text("#!/bin/sh\necho \"sha256sum: invalid option -- 'z'\" >&2\nexit 1\n")
    os.chmod(old / "sha256sum", 0o755)
    conn = remote.Connection(settings, settings.server("srv1"), env.environ())
    try:
        assert conn.remote_sha256(list(expected), search_path=str(only_xargs)) is None  # xargs: 127
        assert conn.remote_sha256(list(expected), search_path="/nonexistent") is None  # the shell: 127
        assert conn.remote_sha256(list(expected), search_path=str(old)) is None
        assert conn.remote_sha256(list(expected)) == expected  # the same connection, the login's PATH
    finally:
        conn.close()


@needs_root
def test_remote_sha256_raises_the_classified_error_when_the_server_cannot_be_used(env):
    settings = env_settings(env)
    paths = list(write_remote(env.remote("srv1"), [b"a.gz"]))
    server = settings.server("srv1")
    refused = remote.Connection(settings, msgspec.structs.replace(server, user="nosuchuser"), env.environ())
    with pytest.raises(AuthFailed):
        refused.remote_sha256(paths)
    closed = remote.Connection(settings, msgspec.structs.replace(server, port=sb._free_port(server.host)))
    with pytest.raises(RemoteUnreachable):
        closed.remote_sha256(paths)


# --- local failures ------------------------------------------------------------------------


def test_a_missing_local_tool_is_said_as_such_not_taken_for_a_missing_remote_file():
    with pytest.raises(RemoteError, match="no-such-tool is not installed") as caught:
        remote._run(LOCAL, ["no-such-tool"], deadline=5, children=remote.Children())
    assert not isinstance(caught.value, RemoteFileMissing)


def test_a_command_killed_by_a_signal_is_a_transient_remote_failure():
    with pytest.raises(RemoteUnreachable, match="killed by signal 9"):
        remote._run(LOCAL, ["sh", "-c", "kill -KILL $$"], deadline=5, children=remote.Children())


# --- the run's children ---------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("name", ["local", "srv1", "srv2"])
def test_stop_ends_a_running_command_within_5s_and_every_later_one_at_once(env, name):
    settings = env_settings(env)
    children = remote.Children()
    conn = remote.Connection(settings, settings.server("srv1" if name == "local" else name), env.environ(), children)
    conn.open()
    outcome = []

    def work():  # a worker thread, as the engine's
        try:
            outcome.append(conn._run(slow_command(settings, name), 120))
        except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
            outcome.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    try:
        wait_until(children.live, 10, "the command registered")
        wait_until(
            lambda: {"sleep" if name == "local" else "ssh"} <= names(tree(children.live()[0])),
            10,
            "the command started",
        )
        procs = tree(children.live()[0])
        began = time.monotonic()
        children.stop()
        worker.join(5)
        assert not worker.is_alive() and time.monotonic() - began < 5
        assert len(outcome) == 1 and isinstance(outcome[0], RunInterrupted), outcome
        assert still_running(procs) == [] and children.live() == []
        began = time.monotonic()
        with pytest.raises(RunInterrupted):
            conn._run(["true"], 10)
        with pytest.raises(RunInterrupted):
            conn.list_files()
        assert time.monotonic() - began < 0.5  # at once: nothing was started
    finally:
        worker.join(10)
        remote.Connection(settings, conn.server).close()


HELPER = """
import json, os, sys, threading
from relay import config, remote
settings = config.load_settings(sys.argv[1], os.environ)
children = remote.Children()
conn = remote.Connection(settings, settings.server(sys.argv[2]), children=children)
conn.open()
worker = threading.Thread(target=conn._run, args=(json.loads(sys.argv[3]), 120))
worker.start()  # forked from a worker thread, which lives as long as its command, as in the engine
pause = threading.Event()
while not children.live():
    pause.wait(0.01)
print(children.live()[0], flush=True)
worker.join()
"""


@needs_root
@pytest.mark.parametrize("name", ["local", "srv1", "srv2"])
def test_a_killed_run_takes_its_ssh_and_rsync_with_it(env, name):
    settings = env_settings(env)
    server = "srv2" if name == "local" else name
    helper = subprocess.Popen(
        [sys.executable, "-c", HELPER, str(env.conf), server, json.dumps(slow_command(settings, name))],
        cwd=str(REPO),
        env=env.environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = helper.stdout.readline()
        assert line, f"the helper ended before its command started: {helper.stderr.read()[-2000:]}"
        group = int(line)
        leaf = "sleep" if name == "local" else "ssh"
        wait_until(lambda: {"timeout", leaf} <= names(tree(group)), 10, f"timeout and {leaf} running")
        procs = tree(group)
        helper.send_signal(signal.SIGKILL)
        helper.wait(10)
        wait_until(lambda: still_running(procs) == [], 10, f"the children of the killed run ended: {procs}")
    finally:
        helper.kill()
        helper.wait(10)
        remote.Connection(settings, settings.server(server), env.environ()).close()


# --- starting commands from many threads ------------------------------------------------------

STRESS = """
import ctypes, faulthandler, importlib, logging, os, sys, threading, time
from relay import remote
from relay.config import Server
server = Server(name="local", host="127.0.0.1", user="u", remote_paths=("/x/*.gz",))
children = remote.Children()
# DEBUG: sh logs every command too, through the same handler and its lock
logging.basicConfig(filename=sys.argv[1], level=logging.DEBUG, format="%(threadName)s %(message)s")
quiet = threading.Event()
failures = []

def commands(n):
    for i in range(30):
        argv = ["echo", f"{n} {i}"] if i % 2 else ["true"]
        code, out, _ = remote._run(server, argv, deadline=30, children=children)
        if code != 0 or out != (f"{n} {i}\\n".encode() if i % 2 else b""):
            failures.append((n, i, code, out))

def noise(n):
    log, junk = logging.getLogger(f"noise{n}"), []
    while not quiet.is_set():
        log.info("noise %d %s", n, "x" * 300)
        junk.append([{"k": str(j), "v": b"y" * j} for j in range(300)])
        del junk[:-20]
        if n == 0:  # the import lock and the dynamic loader's lock, taken and given back all the time
            sys.modules.pop("colorsys", None)
            importlib.import_module("colorsys")
            ctypes.CDLL("libm.so.6")

workers = [threading.Thread(target=commands, args=(n,), name=f"commands{n}") for n in range(8)]
others = [threading.Thread(target=noise, args=(n,), name=f"noise{n}") for n in range(4)]
for thread in others + workers:
    thread.start()
deadline = time.monotonic() + float(sys.argv[2])
for thread in workers:
    thread.join(max(0.0, deadline - time.monotonic()))
quiet.set()
for thread in others:
    thread.join(10)
if any(t.is_alive() for t in workers + others):
    print("STUCK", flush=True)
    faulthandler.dump_traceback()
    os._exit(3)  # not sys.exit: it would wait for the stuck threads
print("done", len(failures), failures[:3], children.live(), flush=True)
"""


def test_many_threads_start_commands_while_others_log_allocate_and_import(tmp_path):
    # In a process of its own with a timeout: a deadlock fails the test instead of hanging it.
    proc = subprocess.run(
        [sys.executable, "-c", STRESS, str(tmp_path / "log"), "90"],
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0 and proc.stdout == "done 0 [] []\n", (proc.stdout, proc.stderr[-3000:])
    assert (tmp_path / "log").read_text().count("noise") > 100  # the others did run meanwhile
