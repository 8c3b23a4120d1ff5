"""No-op rerun at scale: N files already processed over three servers, nothing new; how long and how big is `doit run`?

Run as root: `python bench/noop.py --files 10000`. Prints JSON: wall time of the rerun, the slowest SSH
listing inside it, the work beyond the listings, and peak RSS. Work area on /dev/shm (tmpfs) when present.
"""

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from relay import sandbox  # noqa: E402


# A fresh parent per measurement: RUSAGE_CHILDREN's peak then belongs to that one `doit run`.
_MEASURE = """
import resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:]).returncode
wall = time.perf_counter() - started
print(f"{code} {wall} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
"""


def run_doit(env, cwd, *args):
    """Run `doit run` and return (wall seconds, peak RSS MiB of that process, its stdout)."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "doit", "-f",
                           str(REPO / "dodo.py"), "run", *args], env=env, cwd=cwd, capture_output=True,
                          text=True)
    code, wall, peak_kib = proc.stderr.strip().splitlines()[-1].split()
    if int(code) != 0:
        raise SystemExit(f"doit run failed ({code}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return float(wall), int(peak_kib) / 1024, proc


def listing_ms(log_path, since):
    """Slowest per-server listing logged after byte offset `since`."""
    slowest = 0.0
    with open(log_path, "rb") as fh:
        fh.seek(since)
        for line in fh:
            doc = json.loads(line)
            if doc.get("operation") == "list" and "duration_ms" in doc:
                slowest = max(slowest, doc["duration_ms"])
    return slowest


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=10000, help="processed files in all (default 10000)")
    parser.add_argument("--rounds", type=int, default=3, help="no-op reruns to time (median reported)")
    args = parser.parse_args()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = Path(tempfile.mkdtemp(prefix="relay-noop-", dir=base))
    box = sandbox.Sandbox(str(work / "servers"), count=3, password_servers=()).start()
    try:
        # Every file has its own bytes: identical content would be recorded as duplicates.
        for index in range(args.files):
            server = box.servers[index % 3]
            path = os.path.join(server.remote_dir, f"log-{index:06d}.gz")
            with open(path, "wb") as fh:
                fh.write(gzip.compress(f"line {index}\n".encode(), mtime=0))
            os.utime(path, (1_700_000_000, 1_700_000_000))
        conf = box.write_config(str(work / "conf"), str(work / "w"), pipeline={"max_workers": 2})
        env = dict(os.environ, RELAY_CONFIG_DIR=conf)
        first, _, _ = run_doit(env, str(work))
        log = work / "w" / "logs" / "logpipe-relay.log"
        results = []
        for _ in range(args.rounds):
            offset = log.stat().st_size
            wall, rss, proc = run_doit(env, str(work))
            assert "/" not in proc.stdout.replace("extract:srv", ""), "a per-file task ran in the no-op rerun"
            slowest = listing_ms(log, offset) / 1000
            results.append({"wall_s": wall, "listing_s": slowest, "beyond_listing_s": wall - slowest,
                            "peak_rss_mib": rss})
        results.sort(key=lambda r: r["wall_s"])
        median = results[len(results) // 2]
        report = {"files": args.files, "first_run_s": round(first, 2),
                  **{k: round(v, 3) for k, v in median.items()}}
        print(json.dumps(report, indent=2))
    finally:
        box.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
