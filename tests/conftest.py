"""Fixtures: real sshd servers on loopback (session), and per-test remote directories, config and data tree."""

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from relay import sandbox as sb
from relay.store import Store

REPO = Path(__file__).resolve().parent.parent
DODO = str(REPO / "dodo.py")

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("sshd") or not shutil.which("rsync"),
    reason="end-to-end tests need root, sshd and rsync (run: bash .ci/setup)",
)


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """Three sshd instances on 127.0.0.11-13; srv2 takes a password through sshpass."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run sshd")
    box = sb.Sandbox(str(tmp_path_factory.mktemp("servers")), count=3, password_servers=(2,)).start()
    yield box
    box.stop()


class Env:
    """One test's world: a remote subdirectory on each server, a config dir and a data tree."""

    def __init__(self, box, root, name):
        self.box = box
        self.root = Path(root)
        self.subdir = name
        self.conf = self.root / "conf"
        self.work = self.root / "work"
        self.data = self.work / "data"
        self.state = self.work / "state"
        self.extra_env = {}
        for server in box.servers:
            path = Path(server.remote_dir) / name
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o755)
        self.configure()

    def remote(self, server_name):
        """The remote directory of this test on `server_name`."""
        return Path(self.box.servers[int(server_name[3:]) - 1].remote_dir) / self.subdir

    def configure(self, pipeline=None, env=None, patterns=("*.gz",), servers=None):
        """(Re)write the three config files."""
        self.box.write_config(
            str(self.conf),
            str(self.work),
            pipeline=pipeline,
            env=env,
            patterns=patterns,
            subdir=self.subdir,
            servers=servers,
        )

    def environ(self, **extra):
        """Environment of a run: the sandbox password and this test's config dir."""
        env = self.box.environ()
        env["RELAY_CONFIG_DIR"] = str(self.conf)
        env.update(self.extra_env)
        env.update(extra)
        return env

    def start(self, *args, env=None, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen):
        """Start `doit -f dodo.py ARGS` in the background, as cron would; return the Popen."""
        return subprocess.Popen(
            [sys.executable, "-m", "doit", "-f", DODO, *args],
            cwd=str(self.root),
            env=env or self.environ(),
            stdout=stdout,
            stderr=stderr,
            **popen,
        )

    def doit(self, *args, env=None, check=None):
        """Run `doit -f dodo.py ARGS` as a user would; return the CompletedProcess."""
        proc = subprocess.run(
            [sys.executable, "-m", "doit", "-f", DODO, *args],
            cwd=str(self.root),
            env=env or self.environ(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check is not None:
            assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def records(self, server=None, superseded=False):
        """All state records (as dicts), optionally of one server; superseded versions only if asked."""
        store = Store(str(self.state), readonly=True)
        try:
            records = store.all_records(server)
        finally:
            store.close()
        return [msgspec.to_builtins(rec) for rec in records if superseded or rec.status != "superseded"]

    def tree(self):
        """Every file under the data tree, relative, with its sha256."""
        result = {}
        for path in sorted(self.data.rglob("*")):
            if path.is_file():
                result[str(path.relative_to(self.data))] = hashlib.sha256(path.read_bytes()).hexdigest()
        return result


@pytest.fixture
def env(servers, tmp_path, request):
    """A fresh world for one test on the shared servers."""
    name = request.node.name.replace("[", "_").replace("]", "").replace("/", "_")[:60]
    return Env(servers, tmp_path, name)


def sha(data):
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def small_filesystem(path, size):
    """A tmpfs of `size` (e.g. "4m") mounted on `path` for the test, to run out of space for real."""
    path.mkdir(parents=True, exist_ok=True)
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)  # -l: an ssh master may keep a socket open
