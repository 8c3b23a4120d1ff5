"""Benchmark logpipe-relay against the naive script users would otherwise write, in one run.

The naive script, per server in turn: `rsync -rt` of the remote `*.gz` over ssh into a local directory,
then `gzip -dk` of what came. Both run on the same generated data, served by three sshd servers on
loopback (the dedicated user `logpipe-test`, as in the tests), alternating over several rounds; the
work area is on tmpfs (/dev/shm). Prints per workload the median wall time of each, the ratio
ours/naive, our peak RSS and throughput, the CPU time the machine spent on each, and checks that both
extracted byte-identical files.

Run as root:  python bench/run.py [--quick] [--json] [--rounds N] [--only large,small,...]
"""

import argparse
import compileall
import gzip
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

from isal import igzip

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fleet import OLD, FleetWorkloads, Remote, digest_tree, end_masters, measure, naive_script, reset  # noqa: E402

from relay import sandbox  # noqa: E402

# Issue 11, point 17: a cold run over many servers (about 200 KB compressed a file) against the
# naive script run `parallel` servers at once; quick: (servers, files per server).
FLEET = {"servers": 50, "files": 5, "size": 2_900_000, "quick": (10, 3), "parallel": 8}

# name: (files per server, uncompressed bytes per file, full-mode target)
WORKLOADS = {
    "large": {"files": 7, "size": 50 * 2**20, "quick": (2, 8 * 2**20), "target": "ratio <= 0.5"},
    "small": {"files": 700, "size": 20 * 2**10, "quick": (100, 20 * 2**10), "target": "ratio <= 1.0"},
    "noop-10k": {"total": 10_000, "quick": 2_000, "target": "wall <= 0.8 s, RSS <= 150 MB"},
    "noop-50k": {"total": 50_000, "quick": None, "target": "wall <= 2.0 s, RSS <= 200 MB"},
    "big": {"files": 1, "size": 2 * 2**30, "quick": (1, 256 * 2**20), "target": "RSS <= 100 MB", "servers": 1},
    # A server back after a long outage: thousands of files in one batch (no target of the issue's).
    "backlog": {
        "files": 10_000,
        "size": 20 * 2**10,
        "quick": (1_000, 20 * 2**10),
        "target": "none (scaling)",
        "servers": 1,
    },
    "fleet": {**FLEET, "target": "ratio <= 1.0"},
    # extract:srv1 in the fleet's configuration (the same servers and data) with another server
    # frozen, against srv1 alone.
    "targeted": {**FLEET, "target": "ratio <= 1.5"},
    # One server's numbered rotation after 20 files were processed: only the new file should move.
    "rotation": {"files": 20, "size": 14_500_000, "quick": (20, 2_900_000), "target": "none (bytes moved)"},
}

# bench/bare.py inflates each file in memory: it only takes part in workloads of files up to this size.
BARE_MAX_BYTES = 64 * 2**20

# --- data ----------------------------------------------------------------------------------


class Corpus:
    """Realistic access-log lines from a seed; each file is a run of consecutive lines of them, as a
    rotated log is, starting at a line no other file starts at (so every file is unique)."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.lines = sandbox.log_lines(self.rng, 60_000).splitlines(keepends=True)
        self.mean = sum(map(len, self.lines)) / len(self.lines)
        self.starts = set()

    def block(self, nbytes):
        count = min(len(self.lines), max(1, int(nbytes / self.mean)))
        start = self.rng.randrange(len(self.lines))
        while start in self.starts:
            start = self.rng.randrange(len(self.lines))
        self.starts.add(start)
        return b"".join(self.lines[start : start + count] + self.lines[: max(0, start + count - len(self.lines))])

    def write(self, path, nbytes):
        """A gzip file of about `nbytes` uncompressed log text, compressed as logrotate does (gzip -6),
        written in bounded pieces."""
        written = 0
        with gzip.open(path, "wb", compresslevel=6) as out:
            while written < nbytes:
                piece = self.block(min(8 * 2**20, nbytes - written))
                out.write(piece)
                written += len(piece)
        os.chmod(path, 0o644)
        os.utime(path, (OLD, OLD))
        return written


# --- the two contenders ----------------------------------------------------------------------


def bare_spec(box, servers, work, out_dir):
    """The JSON spec of bench/bare.py for these servers."""
    return json.dumps(
        {
            "work": str(work),
            "out": str(out_dir),
            "known_hosts": box.known_hosts,
            "client_key": box.client_key,
            "password": box.password,
            "servers": [
                {
                    "name": s.name,
                    "address": s.address,
                    "port": s.port,
                    "user": sandbox.SANDBOX_USER,
                    "auth": s.auth,
                    "remote_dir": s.remote_dir,
                }
                for s in servers
            ],
        }
    )


class Bench(FleetWorkloads):
    """One work area on tmpfs with three sshd servers, reused by every workload, and the fleet's
    servers, started by the first workload that needs them."""

    def __init__(self, rounds, bare=False):
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.root = Path(tempfile.mkdtemp(prefix="relay-bench-", dir=base))
        self.rounds = rounds
        self.bare = bare  # also time bench/bare.py, the floor of a plain Python pipeline
        self.box = sandbox.Sandbox(str(self.root / "servers"), count=3, password_servers=(2,)).start()
        self.fleet_box = self.fleet_data = None
        self.env = self.box.environ()
        self.env["SSHPASS"] = self.box.password  # for the naive script's `sshpass -e`
        # Byte-code, as an installed copy has: else a PYTHONDONTWRITEBYTECODE environment would have
        # every run of ours compile the project's sources again (about 50 ms).
        compileall.compile_dir(str(REPO / "relay"), quiet=1)
        compileall.compile_file(str(REPO / "dodo.py"), quiet=1)

    def close(self):
        """Stop every server and remove the work area."""
        for box in (self.fleet_box, self.box):
            if box is not None:
                box.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _dirs(self, name, servers):
        for s in servers:
            path = Path(s.remote_dir) / name
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            os.chmod(path, 0o755)

    def _ours(self, name, servers, box=None, subdir=None):
        box = box or self.box
        work = self.root / "ours" / name
        conf = box.write_config(
            str(work / "conf"),
            str(work),
            subdir=subdir or name,
            pipeline={"max_workers": 2, "min_free_bytes": 0, "max_extracted_bytes": 8 * 2**30},
            servers=[{} if s in servers else {"enabled": False} for s in box.servers],
        )
        env = dict(self.env, RELAY_CONFIG_DIR=conf)
        argv = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "run"]
        return work, env, argv

    def _generate(self, name, servers, corpus, count, size):
        """`count` files of about `size` plain bytes on each server, under `name`; (paths, plain bytes)."""
        self._dirs(name, servers)
        paths, raw = [], 0
        for s in servers:
            for i in range(count):
                path = Path(s.remote_dir) / name / f"access.log.{i + 1}.gz"
                raw += corpus.write(str(path), size)
                paths.append(path)
        return paths, raw

    def compare(self, name, spec, corpus, quick):
        """Alternate ours and the naive script (server after server) on one generated data set."""
        count, size = spec["quick"] if quick else (spec["files"], spec["size"])
        servers = self.box.servers[: spec.get("servers", 3)]
        paths, raw = self._generate(name, servers, corpus, count, size)
        naive_out = self.root / "naive" / name
        script = self.root / f"naive-{name}.sh"
        script.write_text(naive_script(self.box, [Remote(s, name) for s in servers], naive_out))
        return self._contest(name, spec, self.box, servers, paths, raw, size, ["bash", str(script)], naive_out)

    def _contest(self, name, spec, box, servers, paths, raw, size, naive_argv, naive_out, cold=False):
        """Alternate ours, the naive script and, with --bare, bench/bare.py over the rounds; `cold`:
        no ControlMaster of ours outlives its run (the naive script has none)."""
        ratio = raw / sum(p.stat().st_size for p in paths)
        work, env, argv = self._ours(name, servers, box)
        bare_work, bare_out = self.root / "bare" / name, self.root / "bare-out" / name
        bare_file = self.root / f"bare-{name}.json"
        bare_file.write_text(bare_spec(box, [Remote(s, name) for s in servers], bare_work, bare_out))
        ours_t, naive_t, bare_t, rss, ours_cpu, naive_cpu = [], [], [], [], [], []
        with_bare = self.bare and size <= BARE_MAX_BYTES
        for _ in range(self.rounds):
            reset(work / "data", work / "state", work / "tmp", work / "logs")
            wall, peak = measure(argv, env, str(work), ours_cpu)
            if cold:
                end_masters(work / "state")
            ours_t.append(wall)
            rss.append(peak)
            reset(naive_out)
            naive_t.append(measure(naive_argv, self.env, str(self.root), naive_cpu)[0])
            if with_bare:
                reset(bare_work, bare_out)
                bare_t.append(
                    measure(
                        [sys.executable, str(REPO / "bench" / "bare.py"), str(bare_file)], self.env, str(self.root)
                    )[0]
                )
        ours_files = digest_tree(work / "data" / "extracted")
        naive_files = {k: v for k, v in digest_tree(naive_out).items() if not k.endswith(".gz")}
        identical = ours_files == naive_files and len(ours_files) == len(paths)
        if with_bare:
            identical = identical and digest_tree(bare_out) == naive_files
        out_bytes = sum(os.path.getsize(p) for p in (work / "data" / "extracted").rglob("*") if p.is_file())
        ours_med, naive_med = statistics.median(ours_t), statistics.median(naive_t)
        bare = (
            {
                "bare_s": round(statistics.median(bare_t), 3),
                "bare_ratio": round(statistics.median(bare_t) / naive_med, 3),
            }
            if bare_t
            else {}
        )
        return {
            **bare,
            "workload": name,
            "files": len(paths),
            "compressed_mb": round(sum(p.stat().st_size for p in paths) / 1e6, 1),
            "extracted_mb": round(out_bytes / 1e6, 1),
            "compression_ratio": round(ratio, 1),
            "ours_s": round(ours_med, 3),
            "naive_s": round(naive_med, 3),
            "ratio": round(ours_med / naive_med, 3),
            # Each round's times, in order: on a shared host the spread says how far to trust the medians.
            "ours_runs_s": [round(t, 3) for t in ours_t],
            "naive_runs_s": [round(t, 3) for t in naive_t],
            "ours_peak_rss_mb": round(max(rss), 1),
            "ours_machine_cpu_s": round(statistics.median(ours_cpu), 2),
            "naive_machine_cpu_s": round(statistics.median(naive_cpu), 2),
            "ours_mb_per_s": round(out_bytes / 1e6 / ours_med, 1),
            "ours_files_per_s": round(len(paths) / ours_med, 1),
            "identical_output": identical,
            "rounds": self.rounds,
            "target": spec["target"],
        }

    def noop(self, name, spec, quick):
        """N processed files over three servers, nothing new: the rerun's wall time and peak RSS."""
        total = spec["quick"] if quick else spec["total"]
        if not total:
            return None
        self._dirs(name, self.box.servers)
        for i in range(total):
            s = self.box.servers[i % 3]
            path = Path(s.remote_dir) / name / f"log-{i:06d}.gz"
            path.write_bytes(igzip.compress(f"line {i}\n".encode()))
            os.utime(path, (OLD, OLD))
        work, env, argv = self._ours(name, self.box.servers)
        first, _ = measure(argv, env, str(work))
        walls, rss = [], []
        for _ in range(self.rounds):
            wall, peak = measure(argv, env, str(work))
            walls.append(wall)
            rss.append(peak)
        return {
            "workload": name,
            "files": total,
            "first_run_s": round(first, 2),
            "ours_s": round(statistics.median(walls), 3),
            "ours_peak_rss_mb": round(max(rss), 1),
            "rounds": self.rounds,
            "target": spec["target"],
        }


def table(results):
    head = (
        f"{'workload':<10} {'files':>6} {'out MB':>8} {'gz x':>5} {'ours s':>8} {'naive s':>8} {'ratio':>6} "
        f"{'RSS MB':>7} {'MB/s':>7} {'files/s':>8} {'same':>5}  target"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r['workload']:<10} {r['files']:>6} {r.get('extracted_mb', ''):>8} "
            f"{r.get('compression_ratio', ''):>5} {r['ours_s']:>8} {r.get('naive_s', r.get('alone_s', '')):>8} "
            f"{r.get('ratio', ''):>6} {r['ours_peak_rss_mb']:>7} {r.get('ours_mb_per_s', ''):>7} "
            f"{r.get('ours_files_per_s', ''):>8} {str(r.get('identical_output', '')):>5}  {r['target']}"
        )
    return "\n".join(rows)


def notes(r):
    """The lines printed under the table about one result."""
    lines = []
    if "ours_machine_cpu_s" in r:
        lines.append(
            f"{r['workload']}: CPU the machine spent (all cores, servers included): ours "
            f"{r['ours_machine_cpu_s']} s, naive {r['naive_machine_cpu_s']} s"
        )
    if "bare_s" in r:
        lines.append(f"{r['workload']}: bare pipeline (bench/bare.py) {r['bare_s']} s = {r['bare_ratio']} x naive")
    if r["workload"] == "fleet":
        lines.append(f"fleet: {r['servers']} servers, cold; the naive script runs {r['parallel']} servers at once")
    if r["workload"] == "targeted":
        lines.append(
            f"targeted: extract:srv1 among {r['servers']} servers ({r['frozen']} frozen) {r['ours_s']} s, "
            f"srv1 alone {r['alone_s']} s (the 'naive s' column): ratio {r['ratio']}"
        )
    if r["workload"] == "rotation":
        lines.append(
            f"rotation: after the rotation rsync received {r['rsync_received_bytes']} bytes (sent "
            f"{r['rsync_sent_bytes']}) for a new file of {r['new_file_bytes']} bytes: "
            f"{r['moved_over_new']} x; the log says {r['log_fetched_files']} file(s), "
            f"{r['log_fetched_bytes']} bytes fetched; the first run ({r['files']} files) took "
            f"{r['first_run_s']} s"
        )
    return lines


def parse_args():
    """The command line, checked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small data, one round each: about a minute")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per workload (default 3, quick 1)")
    parser.add_argument("--only", default="", help="comma-separated workloads: " + ",".join(WORKLOADS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--bare",
        action="store_true",
        help="also time bench/bare.py (workloads of files up to 64 MB): a plain Python pipeline with "
        "no doit, sh, state, logs or durability, the floor for any tool on this machine",
    )
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(WORKLOADS) - {""}
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}; known: {', '.join(WORKLOADS)}")
    return args


def main():
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmark starts sshd servers and needs root")
    chosen = [w for w in WORKLOADS if not args.only or w in args.only.split(",")]
    # A SIGTERM then unwinds like Ctrl-C: a frozen server is resumed and every server stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench(args.rounds or (1 if args.quick else 3), bare=args.bare)
    runners = {"fleet": bench.fleet, "targeted": bench.targeted, "rotation": bench.rotation}
    results = []
    try:
        corpus = Corpus(args.seed)
        for name in chosen:
            spec = WORKLOADS[name]
            result = (
                bench.noop(name, spec, args.quick)
                if name.startswith("noop")
                else runners.get(name, bench.compare)(name, spec, corpus, args.quick)
            )
            if result:
                results.append(result)
                if not args.json:
                    print(table(results[-1:]).splitlines()[-1] if len(results) > 1 else table(results), flush=True)
    finally:
        bench.close()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(line for r in results for line in notes(r)))
    bad = [r["workload"] for r in results if r.get("identical_output") is False]
    if bad:
        sys.exit(f"extracted output differs from the naive script's for: {', '.join(bad)}")


if __name__ == "__main__":
    main()
