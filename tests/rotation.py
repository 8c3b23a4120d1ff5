"""Real logrotate over a served directory, and the invariant the relay must keep across rotations.

`LogRotator` writes numbered, unique lines into a live log in a directory an sshd sandbox serves and
rotates it with the real `logrotate` binary (its own config and state file per test). It remembers
every line that has ever been inside a compressed rotated file there: before each logrotate run
(which may delete the oldest file with `rotate N`) and whenever asked, it reads every `.gz` of its
log in the directory, so the union over time is "every line ever written into a compressed rotated
file".

`check_extracted` is the invariant: each of those lines is in DATA_ROOT/extracted/<server>/ exactly
once, no line is there twice, and no line is there that was never written. Lines still in files that
are not compressed yet (the live log, a `delaycompress` `.1`) need not be there yet.

`RelayLog` reads the JSON log of the runs since a mark: what the fetches moved. `assert_settled`: the
invariant on every server, nothing left in incoming/, and a follow-up run that fetches nothing.
"""

import gzip
import json
import os
import random
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"
# logrotate names a dateext file after time(2), which glibc serves from the coarse clock: up to a
# tick (4 ms here) behind time.time(). Waiting on time.time() for the next second is not enough.
COARSE_CLOCK = getattr(time, "CLOCK_REALTIME_COARSE", 5)  # 5: its Linux id (not in Python's time module)

# logrotate directives per scheme (besides `rotate N`). `dateformat -%Y%m%d-%s`: logrotate 3.21
# accepts %s, so each rotation has a name of its own as long as no two rotations fall in the same
# second (then logrotate says "destination … already exists, skipping rotation" and exits 1): the
# driver waits for logrotate's clock to pass the second of the previous rotation.
SCHEMES = {
    "numbered": ("compress",),
    "delaycompress": ("compress", "delaycompress"),
    "copytruncate": ("compress", "copytruncate"),
    "dateext": ("compress", "dateext", "dateformat -%Y%m%d-%s"),
}


def gz_lines(path):
    """The lines (str, without newline) of a gzip file; [] if it is gone."""
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read().decode().splitlines()
    except FileNotFoundError:
        return []


class LogRotator:
    """One live log `name` in `directory` (served by an sshd sandbox), rotated by the real logrotate.

    `workdir` holds the logrotate config and state file (not served). Lines look like
    `srv1 app 000123 <payload>`: the server, the log's stem and a sequence number make each unique;
    the payload's random length makes every rotated file's size differ."""

    def __init__(self, directory, workdir, server, scheme="numbered", keep=4, name="app.log", seed=0):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; one of {sorted(SCHEMES)}")
        self.directory = Path(directory)
        self.server, self.scheme, self.keep, self.name = server, scheme, keep, name
        self.stem = name.split(".")[0]
        self.log = self.directory / name
        self.rng = random.Random(f"{server}-{name}-{seed}")
        self.seq = 0
        self.written = set()  # every line ever written
        self.compressed = {}  # line -> the first compressed file it was seen in ("app.log.2.gz@r5")
        self.rotations = 0
        self._last_second = None  # the wall-clock second of the last rotation (dateext names)
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / f"{server}-{name}.logrotate.conf"
        self.statefile = workdir / f"{server}-{name}.logrotate.state"
        # `su root root`: logrotate refuses a directory that is group- or world-writable unless it
        # is told which user to rotate as; the config must be root's and not writable by others.
        directives = ["su root root", f"rotate {keep}", "missingok", "notifempty", "nomail", *SCHEMES[scheme]]
        self.conf.write_text(f'"{self.log}" {{\n' + "".join(f"    {d}\n" for d in directives) + "}\n")
        os.chmod(self.conf, 0o644)
        os.chmod(self.directory, 0o755)
        assert not self.rotated_files() and not self.log.exists(), (
            f"{self.directory} already holds {self.name} files (another test's directory?)"
        )

    def write(self, count=1):
        """Append `count` new lines to the live log (created 0644, readable by the sandbox user)."""
        lines = []
        for _ in range(count):
            self.seq += 1
            payload = "%x" % self.rng.getrandbits(self.rng.randint(8, 320))
            lines.append(f"{self.server} {self.stem} {self.seq:06d} {payload}")
        with open(self.log, "a") as fh:
            fh.write("".join(line + "\n" for line in lines))
        os.chmod(self.log, 0o644)
        self.written.update(lines)
        return lines

    def rotated_files(self):
        """Every rotated file of this log in the directory (compressed or not), by name."""
        prefix = self.name + ("-" if self.scheme == "dateext" else ".")
        return sorted(p for p in self.directory.iterdir() if p.name.startswith(prefix))

    def harvest(self):
        """Remember the lines of every compressed rotated file now there."""
        for path in self.rotated_files():
            if path.name.endswith(".gz"):
                for line in gz_lines(path):
                    self.compressed.setdefault(line, f"{path.name}@r{self.rotations}")

    def rotate(self):
        """One real `logrotate -f` run; fails the test if logrotate reports an error."""
        self.harvest()  # before `rotate N` deletes the oldest
        if self.scheme == "dateext" and self._last_second is not None:
            # Not a synchronisation: the name is made of the clock's second, which must have moved on.
            while int(time.clock_gettime(COARSE_CLOCK)) <= self._last_second:
                time.sleep(max(0.0, self._last_second + 1 - time.clock_gettime(COARSE_CLOCK)) + 0.002)
        proc = subprocess.run(
            [LOGROTATE, "-f", "-s", str(self.statefile), str(self.conf)], capture_output=True, text=True, timeout=60
        )
        self._last_second = int(time.clock_gettime(COARSE_CLOCK))
        assert proc.returncode == 0 and "error" not in proc.stderr, (
            f"logrotate ({self.scheme}) failed: exit {proc.returncode}\n{proc.stderr}\n{self.conf.read_text()}"
        )
        for path in self.rotated_files():
            os.chmod(path, 0o644)  # (logrotate keeps the log's mode; a chmod leaves the mtime alone)
        self.rotations += 1
        self.harvest()

    def expected(self):
        """line -> where it was first seen compressed: every line that must be in extracted/."""
        self.harvest()
        return dict(self.compressed)


def extracted_lines(data_root, server):
    """Counter of every line of every file under DATA_ROOT/extracted/<server>/, and line -> files."""
    counts, where = Counter(), {}
    base = Path(data_root) / "extracted" / server
    for path in sorted(base.rglob("*")) if base.is_dir() else ():
        if path.is_file():
            for line in path.read_bytes().decode(errors="replace").splitlines():
                counts[line] += 1
                where.setdefault(line, []).append(str(path.relative_to(base)))
    return counts, where


def invariant_problems(data_root, server, rotators):
    """What breaks the invariant for `server` (a list of sentences; empty when it holds)."""
    counts, where = extracted_lines(data_root, server)
    expected, written = {}, set()
    for rot in rotators:
        expected.update(rot.expected())
        written |= rot.written
    missing = sorted(line for line in expected if not counts[line])
    doubled = sorted(line for line, n in counts.items() if n > 1)
    foreign = sorted(line for line in counts if line not in written)
    problems = []
    if missing:
        problems.append(
            f"{server}: {len(missing)} of {len(expected)} compressed line(s) never extracted, e.g. "
            + "; ".join(f"{line[:30]}… (in {expected[line]})" for line in missing[:5])
        )
    if doubled:
        problems.append(
            f"{server}: {len(doubled)} line(s) extracted more than once, e.g. "
            + "; ".join(f"{line[:30]}… x{counts[line]} in {where[line]}" for line in doubled[:5])
        )
    if foreign:
        problems.append(
            f"{server}: {len(foreign)} line(s) in extracted/ that were never written, e.g. "
            + "; ".join(f"{line[:40]!r} in {where[line]}" for line in foreign[:5])
        )
    return problems


def check_extracted(data_root, server, rotators, context=""):
    """Assert the invariant for `server` over the logs of `rotators` (one LogRotator or several)."""
    rotators = [rotators] if isinstance(rotators, LogRotator) else list(rotators)
    problems = invariant_problems(data_root, server, rotators)
    assert not problems, f"{context}\n" + "\n".join(problems)


def files_under(path):
    """Relative path -> bytes of every file below `path` (nothing if it does not exist)."""
    path = Path(path)
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


class RelayLog:
    """The JSON log LOG_DIR/logpipe-relay.log read from a mark on (the runs since then).

    Bytes moved are read from the `fetch` lines: each says in `bytes` the size of the files that
    rsync delivered in that batch (the listed sizes of the files moved into incoming/). Files that a
    run recognises as renames must not be in any of them."""

    def __init__(self, log_dir):
        self.path = Path(log_dir) / "logpipe-relay.log"
        self.offset = 0

    def mark(self):
        """Read from here on; returns self."""
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        return self

    def entries(self):
        """Every JSON line written since the mark."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            return [json.loads(line) for line in fh.read().decode().splitlines() if line.strip()]

    def fetches(self):
        """The `fetch` lines since the mark that report moved bytes."""
        return [e for e in self.entries() if e.get("operation") == "fetch" and e.get("bytes")]

    def fetched_bytes(self):
        """Bytes the fetches since the mark moved."""
        return sum(e["bytes"] for e in self.fetches())


def run_ok(env, context):
    """One plain `doit run` (conftest's Env) that must exit 0."""
    proc = env.doit("run")
    assert proc.returncode == 0, f"{context}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def assert_settled(env, rotators, context):
    """Nothing is stuck: the invariant holds for each server of `rotators` ({server: [LogRotator]}),
    DATA_ROOT/incoming/ is empty, `doit list --all` shows no file's task (no work due, none parked),
    and a follow-up plain run exits 0, fetches nothing and changes nothing in extracted/."""
    for server, rots in rotators.items():
        check_extracted(env.data, server, rots, context)
    left = files_under(env.data / "incoming")
    assert not left, f"{context}: left in incoming/: {sorted(left)}"
    listed = env.doit("list", "--all")
    due = [line for line in listed.stdout.splitlines() if line.startswith("extract:") and "/" in line.split()[0]]
    assert listed.returncode == 0 and not due, f"{context}: `doit list --all` exit {listed.returncode}, due: {due}"
    extracted = files_under(env.data / "extracted")
    log = RelayLog(env.work / "logs").mark()
    run_ok(env, f"{context}; the follow-up run")
    assert log.fetched_bytes() == 0, f"{context}; the follow-up run fetched {log.fetches()}"
    assert files_under(env.data / "extracted") == extracted, f"{context}; the follow-up run changed extracted/"
