"""The demo: three throwaway sshd servers on loopback with rotated logs (one corrupt), one real `doit run`.

Run as root: `python -m relay.demo [WORK_DIR]`. Prints where every file went, then shows that a second
run has nothing to do, and that after a numbered rotation only the new file moves. The servers stop at
the end; the data tree stays for you to look at.
"""

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from . import sandbox
from .store import Store

REPO = Path(__file__).resolve().parent.parent


def _doit(args, env, cwd):
    return subprocess.run(
        [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def report(work, servers):
    """Per server: what was fetched, extracted and parked, with paths (read from the state database)."""
    lines = []
    store = Store(str(work / "state"), readonly=True)
    try:
        for server in servers:
            records = [msgspec.to_builtins(r) for r in store.all_records(server.name)]
            extracted = [r for r in records if r["extracted_path"]]
            duplicates = [r for r in records if r["duplicate_of"]]
            parked = [r for r in records if r["status"] == "error"]
            lines.append(
                f"{server.name}: extracted {len(extracted)}, duplicates {len(duplicates)}, parked {len(parked)}"
            )
            for r in extracted:
                lines.append(f"    extracted  {r['extracted_path']}  ({r['extracted_size']} bytes)")
            for r in parked:
                lines.append(f"    PARKED     {r['source_path']}\n               reason: {r['last_error']}")
    finally:
        store.close()
    return "\n".join(lines)


def rotate(server):
    """A numbered rotation as logrotate makes it: every app.log.N.gz becomes N+1, a new app.log.1.gz."""
    remote = Path(server.remote_dir)
    numbered = sorted(
        (p for p in remote.glob("app.log.*.gz") if p.name.split(".")[2].isdigit()),
        key=lambda p: -int(p.name.split(".")[2]),
    )
    for path in numbered:
        path.rename(remote / f"app.log.{int(path.name.split('.')[2]) + 1}.gz")
    sandbox.write_gz(
        str(remote / "app.log.1.gz"), sandbox.log_lines(random.Random("rotated"), 2000), mtime=int(time.time()) - 3600
    )


def main(argv=None):
    """Start the servers, run the pipeline twice, print the outcome, stop the servers."""
    argv = sys.argv[1:] if argv is None else argv
    if os.geteuid() != 0:
        sys.exit("the demo starts sshd servers and needs root (sudo python -m relay.demo)")
    work = Path(argv[0] if argv else REPO / "demo-run").resolve()
    if work.exists():
        subprocess.run(["rm", "-rf", str(work)], check=True)
    box = sandbox.Sandbox(str(work / "servers"), count=3, password_servers=(2,)).start()
    try:
        for server in box.servers:
            sandbox.populate(server, rotations=4, lines=2000, corrupt=(server.name == "srv2"))
        conf = box.write_config(str(work / "conf"), str(work))
        env = box.environ()
        env["RELAY_CONFIG_DIR"] = conf
        print(f"servers: {', '.join(f'{s.name}={s.address}:{s.port} ({s.auth} auth)' for s in box.servers)}")
        print(f"config:  {conf}\n\n$ doit run")
        first = _doit(["run"], env, str(work))
        print(first.stdout + first.stderr)
        print(f"exit status {first.returncode} (1: a file was parked this run, as expected: srv2 has a corrupt file)\n")
        print(report(work, box.servers))
        print("\n$ doit run   # again: nothing new, nothing done")
        second = _doit(["run"], env, str(work))
        print(second.stdout + second.stderr)
        print(f"exit status {second.returncode}\n")
        rotate(box.servers[0])
        print(
            "$ doit run   # after logrotate's numbered rotation on srv1: one new file; the renamed ones are "
            "recognised on the server (sha256sum), not transferred again"
        )
        third = _doit(["run"], env, str(work))
        print(third.stdout + third.stderr)
        print(f"exit status {third.returncode}\n")
        print(report(work, box.servers[:1]))
        print(f"data tree: {work / 'data'}\nJSON log:  {work / 'logs' / 'logpipe-relay.log'}")
        return 0 if first.returncode == 1 and second.returncode == third.returncode == 0 else 1
    finally:
        box.stop()


if __name__ == "__main__":
    sys.exit(main())
