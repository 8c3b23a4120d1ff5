"""Recovery and crash cases found in review: nothing lost, nothing doubled."""

import gzip
import os
import random
import signal

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
