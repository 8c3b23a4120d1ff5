"""Recovery and crash cases found in review: nothing lost, nothing doubled."""

import gzip
import json
import os
import random
import shutil
import signal
from pathlib import Path

from conftest import needs_root

from relay import sandbox as sb

pytestmark = needs_root


def put(env, name, seed, mtime=1_700_000_000):
    data = sb.log_lines(random.Random(seed), 300)
    sb.write_gz(str(env.remote("srv1") / name), data, mtime=mtime)
    return data


def extracted_lines(env):
    lines = []
    for path in (env.data / "extracted" / "srv1").iterdir():
        lines += path.read_bytes().splitlines()
    return lines


def test_a_file_parked_for_a_full_disk_is_kept_when_its_name_gets_a_new_version(env):
    env.configure(pipeline={"min_free_bytes": 2**62})
    old = put(env, "app.log.1.gz", "old")
    assert env.doit("run", "extract:srv1").returncode == 1  # parked in error/extract: the only copy
    env.configure()  # space freed
    new = put(env, "app.log.1.gz", "new", mtime=1_700_086_400)  # logrotate's next app.log.1.gz (rotate 1)
    env.doit("run", "extract:srv1", check=0)
    assert (env.data / "error" / "extract" / "srv1" / "app.log.1.gz").exists()  # not superseded
    env.doit("forget", "-s", "recover:extract/srv1", check=0)
    env.doit("run", "extract:srv1", check=0)
    assert sorted(extracted_lines(env)) == sorted(old.splitlines() + new.splitlines())


def test_a_quarantined_copy_is_extracted_again_when_the_server_no_longer_has_it(env):
    env.configure(pipeline={"max_extracted_bytes": 1000})
    data = put(env, "big.log.gz", "big")
    assert env.doit("run", "extract:srv1").returncode == 1  # a "bomb" for that cap: quarantined
    os.unlink(env.remote("srv1") / "big.log.gz")  # rotated away on the server meanwhile
    env.configure()  # the operator raises the cap
    env.doit("forget", "-s", "recover:quarantine/srv1", check=0)
    env.doit("run", "extract:srv1", check=0)
    assert (env.data / "extracted" / "srv1" / "big.log").read_bytes() == data
    assert not (env.data / "error" / "quarantine" / "srv1" / "big.log.gz").exists()


def test_a_run_killed_after_placing_an_output_then_a_rename_doubles_nothing(env):
    env.configure(pipeline={"max_workers": 1})  # the renamed file is then extracted before the killed one
    data = put(env, "a.log.gz", "first")
    proc = env.doit("run", "extract:srv1", env=env.environ(RELAY_CRASH_AT="place"))
    assert proc.returncode == -signal.SIGKILL
    assert (env.data / "extracted" / "srv1" / "a.log").exists()  # placed, never recorded
    os.rename(env.remote("srv1") / "a.log.gz", env.remote("srv1") / "b.log.gz")  # renamed on the server
    env.doit("run", "extract:srv1", check=0)
    assert sorted(extracted_lines(env)) == sorted(data.splitlines()), "a line lost or doubled"
    env.doit("run", "extract:srv1", check=0)
    assert sorted(extracted_lines(env)) == sorted(data.splitlines())


def test_a_new_version_under_a_taken_incoming_name_is_named_after_its_content(env):
    drop = env.data / "incoming" / "srv1" / "app.log.1.gz"
    drop.parent.mkdir(parents=True)
    drop.write_bytes(gzip.compress(b"dropped by hand\n"))
    os.utime(drop, (1_700_000_000, 1_700_000_000))
    put(env, "app.log.1.gz", "remote")
    env.doit("run", "extract:srv1", check=0)
    names = sorted(p.name for p in (env.data / "extracted" / "srv1").iterdir())
    assert len(names) == 2 and all(
        n.startswith("app.log.1") and "~" not in n and not n.endswith(".out") for n in names
    ), names


def test_without_sha256sum_on_the_server_renames_are_fetched_and_compared_here(env, tmp_path):
    tools = tmp_path / "bin"  # the server's PATH: what the listing and rsync need, no sha256sum
    tools.mkdir()
    for tool in ("sh", "find", "xargs", "rsync", "cat"):
        os.symlink(shutil.which(tool), tools / tool)
    server = sb.SshServer(str(tmp_path / "bare"), "srv1", "127.0.0.14", "key", extra_config=[f"SetEnv PATH={tools}"])
    server.start(os.path.join(env.box.root, "authorized_keys"))
    try:
        remote = Path(server.remote_dir)
        os.chmod(tmp_path, 0o755)
        os.chmod(remote, 0o755)
        known = tmp_path / "known_hosts"
        known.write_text(server.known_hosts_line())
        env.configure(
            env={"SSH_KNOWN_HOSTS": str(known)},
            servers=[
                {"host": server.address, "port": server.port, "remote_path": str(remote / "*.gz")},
                {"enabled": False},
                {"enabled": False},
            ],
        )
        written = []
        for n in (3, 2, 1):
            data = sb.log_lines(random.Random(f"bare{n}"), 200)
            sb.write_gz(str(remote / f"app.log.{n}.gz"), data, mtime=1_700_000_000 + 86400 * (3 - n))
            written.append(data)
        env.doit("run", "extract:srv1", check=0)
        for n in (3, 2, 1):  # a numbered rotation
            os.rename(remote / f"app.log.{n}.gz", remote / f"app.log.{n + 1}.gz")
        new = sb.log_lines(random.Random("bare-new"), 200)
        sb.write_gz(str(remote / "app.log.1.gz"), new, mtime=1_700_000_000 + 86400 * 3)
        env.doit("run", "extract:srv1", check=0)
        lines = extracted_lines(env)
        assert sorted(lines) == sorted(b"".join(written + [new]).splitlines()), "a line lost or doubled"
        log = (env.work / "logs" / "logpipe-relay.log").read_text()
        assert "the server has no sha256sum" in log
        fetched = [json.loads(line)["message"] for line in log.splitlines() if '"fetched ' in line]
        assert fetched == ["fetched 3 file(s)", "fetched 4 file(s)"]  # the renamed ones too, then compared
    finally:
        server.stop()
