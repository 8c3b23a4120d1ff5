"""The demo: three throwaway sshd servers on loopback with rotated logs (one corrupt), one real `doit run`.

Run as root: `python -m relay.demo [WORK_DIR]`. Prints where every file went, then shows that a second
run has nothing to do. The servers stop at the end; the data tree stays for you to look at.
"""

import os
import subprocess
import sys
from pathlib import Path

import msgspec

from . import sandbox, state

REPO = Path(__file__).resolve().parent.parent


def _doit(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), *args], env=env,
                          cwd=cwd, capture_output=True, text=True)


def report(work):
    """Per server: what was fetched, extracted and parked, with paths (read from the state records)."""
    lines = []
    for server_dir in sorted((work / "state" / "records").iterdir()):
        by_key = state.read_records(str(work / "state"), server_dir.name)
        records = [msgspec.to_builtins(by_key[key]) for key in sorted(by_key)]
        fetched = [r for r in records if r["origin"] == "remote" and r["status"] != "pending"]
        extracted = [r for r in records if r["extracted_path"]]
        parked = [r for r in records if r["status"] == "error"]
        lines.append(f"{server_dir.name}: fetched {len(fetched)}, extracted {len(extracted)}, parked {len(parked)}")
        for r in extracted:
            lines.append(f"    extracted  {r['extracted_path']}  ({r['extracted_size']} bytes)")
            if r["source_path"]:
                lines.append(f"    source     {r['source_path']}")
        for r in parked:
            lines.append(f"    PARKED     {r['source_path']}\n               reason: {r['last_error']}")
    return "\n".join(lines)


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
        print(report(work))
        print("\n$ doit run   # again: nothing new, nothing done")
        second = _doit(["run"], env, str(work))
        print(second.stdout + second.stderr)
        print(f"exit status {second.returncode}\n")
        print(f"data tree: {work / 'data'}\nJSON log:  {work / 'logs' / 'logpipe-relay.log'}")
        return 0 if first.returncode == 1 and second.returncode == 0 else 1
    finally:
        box.stop()


if __name__ == "__main__":
    sys.exit(main())
