"""Helpers of bench/run.py's fleet, targeted and rotation workloads: the naive script run in
parallel, cold starts (no ControlMaster left from a previous run), a frozen server, rsync's own
byte count, the log's, and a numbered rotation. Nothing here depends on bench/run.py."""

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The environment variable the rsync shim reads: where rsync's client writes its own log.
RSYNC_LOG_VAR = "RELAY_BENCH_RSYNC_LOG"
_SUMMARY = re.compile(r"sent ([\d,]+) bytes\s+received ([\d,]+) bytes")


def parallel_naive(directory, scripts, parallel):
    """Write one naive script a server into `directory` and the argv that runs them, `parallel` at
    once, with `xargs -P` (it fails if any of them fails)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for index, text in enumerate(scripts):
        path = directory / f"server-{index:03d}.sh"
        path.write_text(text)
        names.append(str(path))
    listing = directory / "scripts"
    listing.write_text("".join(n + "\n" for n in names))
    return ["sh", "-c", f"xargs -P{parallel} -n1 bash < {listing}"]


def end_masters(state_dir):
    """Ask every ssh ControlMaster of the runs that used `state_dir` to exit, and remove their
    sockets: the next run then starts cold, as after SSH_CONTROL_PERSIST idle seconds."""
    for sockets in _socket_dirs(str(state_dir)):
        for sock in glob.glob(os.path.join(sockets, "*")):
            # The host argument is not used: with -O the ssh client only talks to the socket.
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "bench"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, check=False)
        shutil.rmtree(sockets, ignore_errors=True)


def _socket_dirs(state_dir):
    try:
        from relay.sshargs import control_dir
    except ImportError:  # the engine is being rebuilt: its places as of this writing
        digest = hashlib.sha256(state_dir.encode()).hexdigest()[:10]
        return [os.path.join(state_dir, "ssh"),
                os.path.join(tempfile.gettempdir(), f"logpipe-relay-{os.getuid()}-{digest}")]
    return [control_dir(state_dir)]


@contextlib.contextmanager
def frozen(server):
    """Freeze a sandbox server's sshd (SIGSTOP: it accepts no login) for the block, and resume it
    whatever happens in it."""
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        _wait_state(server.proc.pid, "T")  # stopped for sure before the run starts
        yield server
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def _wait_state(pid, state, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == state:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} did not reach state {state}")
        time.sleep(0.005)


def keep_only(conf_dir, names):
    """Rewrite a sandbox configuration's sources.conf with only the servers `names`."""
    path = os.path.join(conf_dir, "sources.conf")
    with open(path) as fh:
        sources = json.load(fh)
    sources["servers"] = [s for s in sources["servers"] if s["name"] in names]
    with open(path, "w") as fh:
        json.dump(sources, fh, indent=2)


def rsync_shim(bin_dir):
    """An `rsync` for the front of PATH that runs the real one with --log-file=$RELAY_BENCH_RSYNC_LOG:
    rsync's client then logs its own `sent … received …` count of every transfer, and its output,
    which logpipe-relay parses, is unchanged. Returns bin_dir."""
    real = shutil.which("rsync")
    os.makedirs(bin_dir, exist_ok=True)
    shim = os.path.join(bin_dir, "rsync")
    with open(shim, "w") as fh:
        fh.write(f'#!/bin/sh\nexec {real} --log-file="${RSYNC_LOG_VAR}" "$@"\n')
    os.chmod(shim, 0o755)
    return bin_dir


def rsync_bytes(log_path):
    """(transfers, bytes sent, bytes received) that rsync's client logged in `log_path`."""
    transfers = sent = received = 0
    try:
        with open(log_path, errors="replace") as fh:
            for line in fh:
                found = _SUMMARY.search(line)
                if found:
                    transfers += 1
                    sent += int(found.group(1).replace(",", ""))
                    received += int(found.group(2).replace(",", ""))
    except FileNotFoundError:
        pass
    return transfers, sent, received


def fetch_log_bytes(log_path, offset=0):
    """(files, bytes) of the `fetched N file(s)` lines of logpipe-relay's JSON log after `offset`."""
    files = nbytes = 0
    with open(log_path, "rb") as fh:
        fh.seek(offset)
        for raw in fh:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("operation") == "fetch" and line.get("message", "").startswith("fetched"):
                files += int(line["message"].split()[1])
                nbytes += line.get("bytes", 0)
    return files, nbytes


def rotate(directory, stem, count, new_file):
    """A numbered rotation as logrotate does it: the oldest (`stem.<count>.gz`) dropped, each
    `stem.N.gz` renamed to `stem.N+1.gz` (mtime kept), and `new_file` copied in as `stem.1.gz`."""
    directory = Path(directory)
    (directory / f"{stem}.{count}.gz").unlink()
    for n in range(count - 1, 0, -1):
        os.rename(directory / f"{stem}.{n}.gz", directory / f"{stem}.{n + 1}.gz")
    shutil.copy2(new_file, directory / f"{stem}.1.gz")
