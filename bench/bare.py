"""A bare pipeline, for `bench/run.py --bare`: how fast plain Python can do this job on this machine.

Per server at once: one ssh listing (which stays up as the shared connection), one rsync of the
listed files reporting each as it lands, and one thread that hashes, inflates and renames each
file as soon as it is reported. No doit, no sh, no config validation, no state, no logs, no
durability, no retries: it is not a tool, it is the floor any tool here stands on.

Usage: python bench/bare.py SPEC.json   (written by bench/run.py)
"""

import hashlib
import json
import os
import queue
import subprocess
import sys
import threading

from isal import isal_zlib


def ssh_argv(spec, server):
    """ssh to `server` through a shared connection (password servers through sshpass)."""
    argv = [
        "ssh",
        "-o",
        f"UserKnownHostsFile={spec['known_hosts']}",
        "-o",
        f"ControlPath={spec['work']}/ssh-{server['name']}",
        "-p",
        str(server["port"]),
        "-l",
        server["user"],
    ]
    if server["auth"] == "password":
        return ["sshpass", "-e", *argv, "-o", "PubkeyAuthentication=no"]
    return [*argv, "-i", spec["client_key"], "-o", "BatchMode=yes"]


def list_remote(spec, server, found):
    """One ssh session listing the remote *.gz; it stays up as the connection rsync then shares."""
    out = subprocess.run(
        [
            *ssh_argv(spec, server),
            "-o",
            "ControlMaster=auto",
            "-o",
            "ControlPersist=10",
            server["address"],
            f"find {server['remote_dir']} -maxdepth 1 -name '*.gz' -printf '%f\\0'",
        ],
        capture_output=True,
        check=True,
    ).stdout
    found[server["name"]] = [name for name in out.split(b"\0") if name]


def fetch(spec, server, names, arrivals):
    """One rsync of `names`; each file goes to `arrivals` once it is surely in place."""
    staging = f"{spec['work']}/staging/{server['name']}"
    incoming = f"{spec['work']}/incoming/{server['name']}"
    os.makedirs(staging)
    os.makedirs(incoming)
    rsh = " ".join(ssh_argv(spec, server) + ["-o", "ControlMaster=no"])
    proc = subprocess.Popen(
        [
            "rsync",
            "--trust-sender",
            "-s",
            "--times",
            "--from0",
            "--files-from=-",
            "--out-format=%n",
            "--outbuf=L",
            "-e",
            rsh,
            "--",
            f"{server['address']}:{server['remote_dir']}/",
            staging + "/",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    proc.stdin.write(b"".join(name + b"\0" for name in names))
    proc.stdin.close()
    previous = None
    for line in proc.stdout:  # rsync reports a file just before renaming it into place
        if previous:
            os.rename(f"{staging}/{previous}", f"{incoming}/{previous}")
            arrivals.put((server["name"], previous))
        previous = line.decode().rstrip("\n")
    if proc.wait() != 0:
        raise SystemExit(f"rsync from {server['name']} failed")
    if previous:
        os.rename(f"{staging}/{previous}", f"{incoming}/{previous}")
        arrivals.put((server["name"], previous))
    arrivals.put(None)


def extract(spec, arrivals, servers):
    """Hash, inflate (every gzip member) and rename each file as it arrives, until every fetch ended."""
    out_dir = spec["out"]
    ended = 0
    while ended < servers:
        item = arrivals.get()
        if item is None:
            ended += 1
            continue
        server, file = item
        src = f"{spec['work']}/incoming/{server}/{file}"
        fd = os.open(src, os.O_RDONLY)
        data = os.read(fd, os.fstat(fd).st_size + 1)
        os.close(fd)
        hashlib.sha256(data).hexdigest()
        inflated, rest = [], data
        while rest:  # every gzip member
            member = isal_zlib.decompressobj(31)
            inflated.append(member.decompress(rest))
            rest = member.unused_data
        output = b"".join(inflated)
        hashlib.sha256(output).hexdigest()
        tmp = f"{out_dir}/{server}/.{file}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, output)
        os.close(fd)
        os.rename(tmp, f"{out_dir}/{server}/{file[:-3]}")


def main():
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    os.environ["SSHPASS"] = spec["password"]
    os.makedirs(spec["work"], mode=0o700, exist_ok=True)  # the shared connections' sockets live here
    for server in spec["servers"]:
        os.makedirs(f"{spec['out']}/{server['name']}", exist_ok=True)
    found = {}
    listers = [threading.Thread(target=list_remote, args=(spec, s, found)) for s in spec["servers"]]
    for thread in listers:
        thread.start()
    for thread in listers:
        thread.join()
    arrivals = queue.SimpleQueue()
    fetchers = [threading.Thread(target=fetch, args=(spec, s, found[s["name"]], arrivals)) for s in spec["servers"]]
    for thread in fetchers:
        thread.start()
    extract(spec, arrivals, len(fetchers))
    for thread in fetchers:
        thread.join()


if __name__ == "__main__":
    main()
