"""bench/run.py's tools and its fleet, targeted and rotation workloads (issue 11, point 17): timing
a command, the naive script (server after server, or in parallel with xargs -P), cold starts (no
ControlMaster left from a previous run), a frozen server, rsync's own byte count and the log's,
and a numbered rotation. Nothing here imports bench/run.py."""

import contextlib
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from relay import sandbox  # noqa: E402

OLD = 1_700_000_000  # mtime of generated files: old enough to be due at once
# The environment variable the rsync shim reads: where rsync's client writes its own log.
RSYNC_LOG_VAR = "RELAY_BENCH_RSYNC_LOG"
_SUMMARY = re.compile(r"sent ([\d,]+) bytes\s+received ([\d,]+) bytes")

# A fresh parent per measurement: RUSAGE_CHILDREN's peak then belongs to that one command.
_MEASURE = """
import resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
wall = time.perf_counter() - started
print(f"{code} {wall} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
"""


def machine_cpu_seconds():
    """CPU time the whole machine has spent busy so far (all cores; the sshd servers included)."""
    with open("/proc/stat") as fh:
        ticks = [int(v) for v in fh.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def measure(argv, env, cwd, cpu=None):
    """(wall seconds, peak RSS MiB) of one command, which must succeed; appends the machine's CPU
    seconds during it to `cpu` if given."""
    before = machine_cpu_seconds()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *argv], env=env, cwd=cwd, capture_output=True, text=True)
    if cpu is not None:
        cpu.append(machine_cpu_seconds() - before)
    code, wall, peak = proc.stderr.strip().splitlines()[-1].split()
    if int(code) != 0:
        raise SystemExit(f"{argv[:4]}… failed with status {code}:\n{proc.stderr[-3000:]}")
    return float(wall), int(peak) / 1024


def naive_script(box, servers, out_dir):
    """The naive baseline as a shell script: rsync -rt then gzip -dk, server after server."""
    lines = ["set -e"]
    for s in servers:
        dest = f"{out_dir}/{s.name}"
        ssh = f"ssh -p {s.port} -o UserKnownHostsFile={box.known_hosts}"
        ssh += " -i " + box.client_key if s.auth == "key" else ""
        pre = "sshpass -e " if s.auth == "password" else ""
        lines += [
            f"mkdir -p {dest}",
            f"{pre}rsync -rt -e '{ssh}' {sandbox.SANDBOX_USER}@{s.address}:{s.remote_dir}/'*.gz' {dest}/",
            f"gzip -dk {dest}/*.gz",
        ]
    return "\n".join(lines) + "\n"


class Remote:
    """A server seen through one workload's subdirectory (for the naive script)."""

    def __init__(self, server, subdir):
        self.__dict__.update(server.__dict__)
        self.remote_dir = os.path.join(server.remote_dir, subdir)


def reset(*paths):
    """Remove these directory trees, if there."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def digest_tree(root):
    """{relative path: sha256} of every file under root."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(2**22):
                    h.update(chunk)
            out[str(path.relative_to(root))] = h.hexdigest()
    return out


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
            subprocess.run(
                ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "bench"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
                check=False,
            )
        shutil.rmtree(sockets, ignore_errors=True)


def _socket_dirs(state_dir):
    try:
        from relay.sshargs import control_dir
    except ImportError:  # the engine is being rebuilt: its places as of this writing
        digest = hashlib.sha256(state_dir.encode()).hexdigest()[:10]
        return [
            os.path.join(state_dir, "ssh"),
            os.path.join(tempfile.gettempdir(), f"logpipe-relay-{os.getuid()}-{digest}"),
        ]
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


class FleetWorkloads:
    """The fleet, targeted and rotation workloads, mixed into bench/run.py's Bench (whose root,
    rounds, box, env, _dirs, _ours, _generate and _contest they use)."""

    fleet_box = fleet_data = None

    def _fleet(self, spec, corpus, quick):
        """The fleet's servers and data, made once for fleet and targeted: (box, paths, plain bytes)."""
        if self.fleet_box is None:
            count, files = spec["quick"] if quick else (spec["servers"], spec["files"])
            # Sandbox puts server N on 127.0.0.(10 + N): 50 servers are 127.0.0.11 to .60.
            self.fleet_box = sandbox.Sandbox(
                str(self.root / "fleet-servers"), count=count, password_servers=(2,)
            ).start()
            self.fleet_data = self._generate("fleet", self.fleet_box.servers, corpus, files, spec["size"])
        return (self.fleet_box, *self.fleet_data)

    def fleet(self, name, spec, corpus, quick):
        """A cold run over the fleet against the naive script run `parallel` servers at once (xargs -P)."""
        box, paths, raw = self._fleet(spec, corpus, quick)
        naive_out = self.root / "naive" / name
        scripts = [naive_script(box, [Remote(s, "fleet")], naive_out) for s in box.servers]
        naive_argv = parallel_naive(self.root / "naive-fleet", scripts, spec["parallel"])
        result = self._contest(name, spec, box, box.servers, paths, raw, spec["size"], naive_argv, naive_out, cold=True)
        return {**result, "servers": len(box.servers), "parallel": spec["parallel"]}

    def targeted(self, name, spec, corpus, quick):
        """Cold `doit run extract:srv1` in the fleet's configuration with another server frozen,
        alternating with the same in a configuration of srv1 alone."""
        box, paths, _ = self._fleet(spec, corpus, quick)
        first, still = box.servers[0], box.servers[-1]
        many = self._ours(name, box.servers, box, subdir="fleet")
        alone = self._ours(f"{name}-alone", [first], box, subdir="fleet")
        keep_only(alone[1]["RELAY_CONFIG_DIR"], {first.name})
        times = {"many": [], "alone": []}
        rss = []
        for _ in range(self.rounds):
            for kind, (work, env, argv) in (("many", many), ("alone", alone)):
                reset(work / "data", work / "state", work / "tmp", work / "logs")
                with frozen(still) if kind == "many" else contextlib.nullcontext():
                    wall, peak = measure([*argv, f"extract:{first.name}"], env, str(work))
                end_masters(work / "state")
                times[kind].append(wall)
                rss.append(peak)
        outputs = [digest_tree(work / "data" / "extracted") for work, _, _ in (many, alone)]
        mine = sum(1 for p in paths if p.is_relative_to(first.remote_dir))
        many_s, alone_s = statistics.median(times["many"]), statistics.median(times["alone"])
        return {
            "workload": name,
            "files": mine,
            "servers": len(box.servers),
            "frozen": still.name,
            "ours_s": round(many_s, 3),
            "alone_s": round(alone_s, 3),
            "ours_runs_s": [round(t, 3) for t in times["many"]],
            "alone_runs_s": [round(t, 3) for t in times["alone"]],
            "ratio": round(many_s / alone_s, 3),
            "ours_peak_rss_mb": round(max(rss), 1),
            "identical_output": outputs[0] == outputs[1] and len(outputs[0]) == mine,
            "rounds": self.rounds,
            "target": spec["target"],
        }

    def rotation(self, name, spec, corpus, quick):
        """One server, `files` numbered rotated files processed, then a numbered rotation and a
        cold run: the bytes rsync moved (its own count and the log's) against the new file's size."""
        count, size = spec["quick"] if quick else (spec["files"], spec["size"])
        server = self.box.servers[0]
        pristine = self.root / "rotation-files"  # n.gz is access.log.n.gz; 0.gz the rotation's new file
        pristine.mkdir()
        for n in range(count + 1):
            corpus.write(str(pristine / f"{n}.gz"), size)
            stamp = OLD + (count - n) * 86400  # a day apart, as daily rotation leaves them
            os.utime(pristine / f"{n}.gz", (stamp, stamp))
        expected = sorted(hashlib.sha256(gzip.decompress(p.read_bytes())).hexdigest() for p in pristine.iterdir())
        work, env, argv = self._ours(name, [server])
        rsync_log, log = self.root / "rsync-rotation.log", work / "logs" / "logpipe-relay.log"
        env = dict(env, PATH=f"{rsync_shim(self.root / 'bin')}:{env['PATH']}", **{RSYNC_LOG_VAR: str(rsync_log)})
        remote = Path(server.remote_dir) / name
        walls, firsts, rss, received, sent, logged = [], [], [], [], [], []
        for _ in range(self.rounds):
            self._dirs(name, [server])
            for n in range(1, count + 1):
                shutil.copy2(pristine / f"{n}.gz", remote / f"access.log.{n}.gz")
            end_masters(work / "state")
            reset(work / "data", work / "state", work / "tmp", work / "logs")
            firsts.append(measure(argv, env, str(work))[0])  # the `count` files processed
            rotate(remote, "access.log", count, pristine / "0.gz")
            end_masters(work / "state")
            offset = log.stat().st_size
            rsync_log.unlink(missing_ok=True)
            wall, peak = measure(argv, env, str(work))
            walls.append(wall)
            rss.append(peak)
            _, out, into = rsync_bytes(rsync_log)
            sent.append(out)
            received.append(into)
            logged.append(fetch_log_bytes(log, offset))
        new_size = (pristine / "0.gz").stat().st_size
        moved = statistics.median(received)
        return {
            "workload": name,
            "files": count,
            "compressed_mb": round(new_size * count / 1e6, 1),
            "new_file_bytes": new_size,
            "rsync_received_bytes": moved,
            "rsync_sent_bytes": statistics.median(sent),
            "moved_over_new": round(moved / new_size, 3),
            "log_fetched_files": statistics.median(f for f, _ in logged),
            "log_fetched_bytes": statistics.median(b for _, b in logged),
            "first_run_s": round(statistics.median(firsts), 3),
            "ours_s": round(statistics.median(walls), 3),
            "ours_runs_s": [round(t, 3) for t in walls],
            "ours_peak_rss_mb": round(max(rss), 1),
            "identical_output": sorted(digest_tree(work / "data" / "extracted").values()) == expected,
            "rounds": self.rounds,
            "target": spec["target"],
        }
