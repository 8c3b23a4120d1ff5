"""The user's scripts (bin/run, bin/collect, bin/extract, bin/recover) and their doit equivalents from the README."""

import gzip
import json
import random
import shutil

from conftest import needs_root

from relay import sandbox as sb

pytestmark = needs_root


def data(seed):
    return sb.log_lines(random.Random(seed), 200)


def put(env, server, name, seed):
    sb.write_gz(str(env.remote(server) / name), data(seed))


def test_run_with_config_dir_variable_and_sequential(env, tmp_path):
    """bin/run --config-dir DIR --sequential  ==  doit run config=DIR sequential=yes"""
    put(env, "srv1", "a.gz", "a")
    moved = tmp_path / "other-conf"
    shutil.copytree(env.conf, moved)
    environ = env.environ()
    environ.pop("RELAY_CONFIG_DIR")
    put(env, "srv3", "c.gz", "c")
    env.doit("run", f"config={moved}", "sequential=yes", env=environ, check=0)
    assert (env.data / "extracted" / "srv1" / "a").read_bytes() == data("a")
    assert (env.data / "extracted" / "srv3" / "c").read_bytes() == data("c")


def test_collect_one_file(env):
    """bin/collect SERVER FILE  ==  doit run fetch:SERVER --only FILE"""
    put(env, "srv1", "one.gz", "1")
    put(env, "srv1", "two.gz", "2")
    env.doit("run", "fetch:srv1", "--only", "one.gz", check=0)
    assert (env.data / "incoming" / "srv1" / "one.gz").exists()
    assert not (env.data / "incoming" / "srv1" / "two.gz").exists()
    assert {r["local_name"]: r["status"] for r in env.records("srv1")} == {"one.gz": "copied", "two.gz": "pending"}
    assert env.doit("run", "fetch:srv1", "--only", "nope.gz").returncode == 1
    assert not (env.data / "extracted" / "srv1" / "one").exists()
    env.doit("run", check=0)
    assert (env.data / "extracted" / "srv1" / "one").read_bytes() == data("1")
    assert (env.data / "extracted" / "srv1" / "two").read_bytes() == data("2")
    # one.gz was not transferred a second time: each run fetched exactly one file.
    log = (env.work / "logs" / "logpipe-relay.log").read_text()
    fetched = [
        json.loads(line)["message"]
        for line in log.splitlines()
        if '"operation":"fetch"' in line and '"server":"srv1"' in line
    ]
    assert fetched == ["fetched 1 file(s)", "fetched 1 file(s)"]


def test_extract_one_local_file(env, tmp_path):
    """bin/extract FILE SERVER  ==  cp FILE DATA_ROOT/incoming/SERVER/ && doit run extract:SERVER/NAME"""
    local = tmp_path / "manual.log.gz"
    local.write_bytes(gzip.compress(b"by hand\n"))
    put(env, "srv1", "remote.gz", "r")
    (env.data / "incoming" / "srv1").mkdir(parents=True)
    shutil.copy(local, env.data / "incoming" / "srv1" / "manual.log.gz")
    env.configure(pipeline={"min_file_age_seconds": 0})
    proc = env.doit("run", "extract:srv1/manual.log.gz", check=0)
    assert "remote.gz" not in proc.stdout
    assert (env.data / "extracted" / "srv1" / "manual.log").read_bytes() == b"by hand\n"
    assert not (env.data / "extracted" / "srv1" / "remote").exists()
    [rec] = env.records("srv1")  # made durable by the task itself: no group ran
    assert (rec["origin"], rec["status"], rec["local_name"]) == ("local", "processed", "manual.log.gz")


def test_one_file_task_fails_when_it_parks_the_file_and_reruns_it(env):
    """`doit run extract:srv1/FILE` exits 1 if FILE is parked; the same command tries it again."""
    (env.remote("srv1") / "bad.gz").write_bytes(b"not gzip at all")
    env.configure(pipeline={"min_file_age_seconds": 0})
    env.doit("run", "plan:srv1", check=0)  # listed: doit now has a task for it
    proc = env.doit("run", "extract:srv1/bad.gz")
    assert proc.returncode == 1 and "parked in error/quarantine/srv1" in proc.stdout
    [rec] = env.records("srv1")
    assert rec["status"] == "error" and rec["attempts"]["fetch"] == 1
    put(env, "srv1", "bad.gz", "fixed")  # the operator replaces it on the server
    env.doit("run", "extract:srv1/bad.gz", check=0)  # the same command: its new version this time
    assert (env.data / "extracted" / "srv1" / "bad").read_bytes() == data("fixed")
    assert [r["status"] for r in env.records("srv1")] == ["processed"]  # the bad version is superseded


def test_recover_extract_errors_and_all(env):
    """bin/recover --error-type extract  ==  doit forget -s recover:extract && doit run; bin/recover == recover:all"""
    put(env, "srv1", "a.gz", "a")
    put(env, "srv3", "c.gz", "c")
    env.configure(pipeline={"min_free_bytes": 2**62}, env={"MAX_RETRY_EXTRACT": "2"})
    proc = env.doit("run")
    assert proc.returncode == 1
    assert "recover:extract/srv1" in proc.stdout
    [rec] = env.records("srv1")
    assert rec["error_kind"] == "extract" and rec["attempts"]["extract"] == 1  # a full disk: no retry at once
    assert (env.data / "error" / "extract" / "srv1" / "a.gz").exists()
    env.doit("run", check=0)  # parked earlier: not retried, no failure
    assert env.records("srv1")[0]["attempts"]["extract"] == 1
    env.configure()  # the operator frees space
    env.doit("forget", "-s", "recover:extract", check=0)
    env.doit("run", check=0)
    assert (env.data / "extracted" / "srv1" / "a").read_bytes() == data("a")
    assert (env.data / "extracted" / "srv3" / "c").read_bytes() == data("c")
    assert not list((env.data / "error").rglob("*.gz"))


def test_recover_one_server_only(env):
    """bin/recover --server srv1  ==  doit forget -s recover:srv1 && doit run"""
    for server in ("srv1", "srv3"):
        put(env, server, "x.gz", server)
    env.configure(pipeline={"min_free_bytes": 2**62}, env={"MAX_RETRY_EXTRACT": "1"})
    env.doit("run")
    env.configure()
    env.doit("forget", "-s", "recover:srv1", check=0)
    env.doit("run", check=0)
    assert (env.data / "extracted" / "srv1" / "x").read_bytes() == data("srv1")
    assert not (env.data / "extracted" / "srv3" / "x").exists()
    assert (env.data / "error" / "extract" / "srv3" / "x.gz").exists()
