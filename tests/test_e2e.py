"""End to end: real rsync over real ssh against three sshd servers on loopback (one with a password)."""

import gzip
import json
import os
import random

from conftest import needs_root, sha

from relay import sandbox as sb

pytestmark = needs_root


def put(env, server, name, data, mtime=1_700_000_000):
    """Write `data` gzip-compressed as `name` on `server` (old mtime: due at once)."""
    path = env.remote(server) / name
    sb.write_gz(str(path), data, mtime=mtime)
    return path


def logs(seed, lines=300):
    return sb.log_lines(random.Random(seed), lines)


def test_full_run_extracts_everything_byte_identical_and_records_state(env):
    expected = {}
    for server in ("srv1", "srv2", "srv3"):
        for n in (1, 2):
            data = logs(f"{server}{n}")
            put(env, server, f"app.log.{n}.gz", data)
            expected[(server, f"app.log.{n}")] = data
    proc = env.doit("run", check=0)
    assert "extract:srv2" in proc.stdout  # the password server took part
    for (server, name), data in expected.items():
        assert (env.data / "extracted" / server / name).read_bytes() == data
        assert (env.data / "processed" / server / f"{name}.gz").exists()
        assert not (env.data / "incoming" / server / f"{name}.gz").exists()
    records = env.records()
    assert len(records) == 6
    for rec in records:
        assert rec["status"] == "processed"
        assert rec["format"] == "gzip"
        assert rec["sha256"] == sha((env.data / "processed" / rec["server"] / rec["local_name"]).read_bytes())
        assert rec["extracted_size"] == os.path.getsize(rec["extracted_path"])
    for server in ("srv1", "srv2", "srv3"):  # each batch's private landing directory is gone with it
        assert list((env.work / "tmp" / "fetch" / server).iterdir()) == []
    log = (env.work / "logs" / "logpipe-relay.log").read_text()
    assert '"operation":"extract"' in log and env.box.password not in log
    assert "not asked for" not in log
    summaries = {d["server"]: d for d in map(json.loads, log.splitlines()) if d.get("operation") == "summary"}
    assert set(summaries) == {"srv1", "srv2", "srv3"}
    assert summaries["srv1"]["message"] == "run summary: 2 file(s) processed, 0 duplicate(s), 0 parked"
    assert summaries["srv1"]["bytes"] == len(expected[("srv1", "app.log.1")]) + len(expected[("srv1", "app.log.2")])
    assert summaries["srv1"]["level"] == "INFO"


def test_second_run_transfers_and_writes_nothing_then_only_new_file(env):
    put(env, "srv1", "a.gz", logs("a"))
    env.doit("run", check=0)
    before = {p: os.stat(p).st_mtime_ns for p in env.data.rglob("*") if p.is_file()}
    state_before = env.records(superseded=True)
    assert "srv1/a.gz" not in env.doit("list", "--all", check=0).stdout  # finished: not a task
    env.doit("run", check=0)
    after = {p: os.stat(p).st_mtime_ns for p in env.data.rglob("*") if p.is_file()}
    assert after == before
    assert env.records(superseded=True) == state_before  # no record written
    put(env, "srv1", "b.gz", logs("b"))
    assert "srv1/b.gz" not in env.doit("list", "--all", check=0).stdout  # `doit list` contacts no server
    env.doit("run", "plan:srv1", check=0)  # list srv1 and record its due work, nothing else
    listed = env.doit("list", "--all", check=0).stdout
    assert "extract:srv1/b.gz" in listed and "srv1/a.gz" not in listed
    env.doit("run", check=0)
    fetched = [
        line for line in (env.work / "logs" / "logpipe-relay.log").read_text().splitlines() if '"fetched ' in line
    ]
    assert len(fetched) == 2 and '"bytes":%d' % (env.remote("srv1") / "b.gz").stat().st_size in fetched[-1]
    assert (env.data / "extracted" / "srv1" / "b").read_bytes() == logs("b")
    assert os.stat(env.data / "extracted" / "srv1" / "a").st_mtime_ns == before[env.data / "extracted" / "srv1" / "a"]


def test_corrupt_file_is_quarantined_and_run_fails_once(env):
    raw = gzip.compress(logs("c"))
    bad = env.remote("srv3") / "bad.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    os.utime(bad, (1_700_000_000, 1_700_000_000))
    put(env, "srv3", "good.gz", logs("g"))
    proc = env.doit("run")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bad.gz parked in error/quarantine" in proc.stdout + proc.stderr
    assert (env.data / "error" / "quarantine" / "srv3" / "bad.gz").read_bytes() == raw[: len(raw) // 2]
    assert (env.data / "extracted" / "srv3" / "good").read_bytes() == logs("g")
    assert not (env.data / "extracted" / "srv3" / "bad").exists()
    [rec] = [r for r in env.records("srv3") if r["local_name"] == "bad.gz"]
    assert rec["status"] == "error" and rec["error_kind"] == "quarantine" and "corrupt" in rec["last_error"]
    # Parked in an earlier run: later plain runs neither retry it nor fail because of it.
    env.doit("run", check=0)
    env.doit("run", check=0)
    again = [r for r in env.records("srv3") if r["local_name"] == "bad.gz"][0]
    assert again == rec


def test_odd_names_come_through_intact(env):
    names = [
        "with space.gz",
        "-leading-dash.gz",
        "quo'te\".gz",
        "$(touch pwned).gz",
        "ünïcödé.gz",
        os.fsdecode(b"latin1-\xe9.gz"),
        "new\nline.gz",
    ]
    for i, name in enumerate(names):
        put(env, "srv1", name, logs(f"odd{i}"))
    env.doit("run", check=0)
    for i, name in enumerate(names):
        assert (env.data / "extracted" / "srv1" / name[:-3]).read_bytes() == logs(f"odd{i}")
    assert not any(p.name == "pwned" for p in env.remote("srv1").parent.rglob("pwned"))
    # The names read back from the state database match the listing byte for byte: nothing is
    # fetched or extracted again.
    tree, records = env.tree(), env.records()
    env.doit("run", check=0)
    assert env.tree() == tree and env.records() == records
    assert sorted(r["local_name"] for r in records) == sorted(os.path.basename(n) for n in names)


def test_non_regular_and_young_files_are_skipped_and_said(env):
    put(env, "srv1", "real.gz", logs("r"))
    os.symlink(env.remote("srv1") / "real.gz", env.remote("srv1") / "link.gz")
    (env.remote("srv1") / "dir.gz").mkdir()
    young = env.remote("srv1") / "young.gz"
    young.write_bytes(gzip.compress(b"fresh\n"))
    env.configure(pipeline={"min_file_age_seconds": 3600})
    env.doit("run", check=0)
    assert sorted(p.name for p in (env.data / "extracted" / "srv1").iterdir()) == ["real"]
    log = (env.work / "logs" / "logpipe-relay.log").read_text()
    assert "link.gz: not a regular file (type l)" in log
    assert "dir.gz: not a regular file (type d)" in log
    assert "young.gz: younger than min_file_age_seconds" in log


def test_duplicate_content_is_recorded_not_extracted_twice(env):
    data = logs("dup")
    put(env, "srv1", "one.gz", data)
    put(env, "srv1", "two.gz", data)
    env.doit("run", check=0)
    extracted = sorted(p.name for p in (env.data / "extracted" / "srv1").iterdir())
    assert len(extracted) == 1
    recs = {r["local_name"]: r for r in env.records("srv1")}
    dup = [r for r in recs.values() if r["duplicate_of"]]
    assert len(dup) == 1 and dup[0]["status"] == "processed"
    assert dup[0]["duplicate_of"] in {r["key"] for r in recs.values() if not r["duplicate_of"]}


def test_delete_source_and_one_server_only(env):
    env.configure(pipeline={"delete_source": True})
    for server in ("srv1", "srv2"):
        put(env, server, "x.gz", logs(server))
    proc = env.doit("run", "extract:srv1", check=0)
    assert "srv2" not in proc.stdout
    assert (env.data / "extracted" / "srv1" / "x").read_bytes() == logs("srv1")
    assert list((env.data / "processed" / "srv1").iterdir()) == []
    assert env.records("srv2") == []
    assert not (env.data / "extracted" / "srv2" / "x").exists()


def test_disabled_server_produces_no_work_and_incoming_drop_is_extracted(env):
    put(env, "srv3", "skip.gz", logs("s"))
    env.configure(servers=[{}, {}, {"enabled": False}])
    drop = env.data / "incoming" / "srv1"
    drop.mkdir(parents=True)
    (drop / "local.log.gz").write_bytes(gzip.compress(b"dropped by hand\n"))
    os.utime(drop / "local.log.gz", (1_700_000_000, 1_700_000_000))
    proc = env.doit("run", check=0)
    assert "srv3" not in proc.stdout
    assert not (env.data / "extracted" / "srv3").exists()
    assert (env.data / "extracted" / "srv1" / "local.log").read_bytes() == b"dropped by hand\n"
    [rec] = env.records("srv1")
    assert rec["origin"] == "local" and rec["status"] == "processed"


def test_no_incoming_switch_leaves_dropped_files(env):
    drop = env.data / "incoming" / "srv1"
    drop.mkdir(parents=True)
    (drop / "local.gz").write_bytes(gzip.compress(b"x\n"))
    os.utime(drop / "local.gz", (1_700_000_000, 1_700_000_000))
    env.doit("run", "incoming=no", check=0)
    assert (drop / "local.gz").exists()
    assert not (env.data / "extracted" / "srv1" / "local").exists()


def test_list_info_and_recovery_by_forget(env):
    good = gzip.compress(logs("q"))
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0xFF  # same size: a CRC error
    bad = env.remote("srv1") / "q.gz"
    bad.write_bytes(bytes(damaged))
    os.utime(bad, (1_700_000_000, 1_700_000_000))
    listed = env.doit("list", "--all", check=0)
    assert "extract:srv1/q.gz" not in listed.stdout  # not listed yet: `doit list` contacts no server
    assert env.records() == []  # listing the graph changes nothing
    assert not env.data.exists()
    assert env.doit("run").returncode == 1  # quarantined
    info = env.doit("info", "extract:srv1/q.gz")
    assert "quarantine" in info.stdout
    env.doit("run", check=0)  # parked earlier: left alone, no failure
    # The admin restores the file on the server (same size and mtime), then recovers srv1's quarantine.
    bad.write_bytes(good)
    os.utime(bad, (1_700_000_000, 1_700_000_000))
    env.doit("run", check=0)
    assert not (env.data / "extracted" / "srv1" / "q").exists()  # still parked: nobody asked
    env.doit("forget", "-s", "recover:quarantine/srv1", check=0)
    env.doit("run", check=0)
    assert (env.data / "extracted" / "srv1" / "q").read_bytes() == logs("q")
    [rec] = env.records("srv1")
    assert rec["status"] == "processed" and rec["attempts"]["extract"] == 1 and rec["attempts"]["fetch"] == 2
    assert not (env.data / "error" / "quarantine" / "srv1" / "q.gz").exists()


def test_a_parked_file_changed_on_the_server_is_processed_as_its_new_version(env):
    bad = env.remote("srv1") / "r.gz"
    bad.write_bytes(b"not gzip")
    os.utime(bad, (1_700_000_000, 1_700_000_000))
    assert env.doit("run").returncode == 1
    put(env, "srv1", "r.gz", logs("r"))  # fixed on the server: another version
    env.doit("run", check=0)
    assert (env.data / "extracted" / "srv1" / "r").read_bytes() == logs("r")
    assert [r["status"] for r in env.records("srv1")] == ["processed"]  # the parked version: superseded


def test_one_parked_file_is_retried_by_running_its_task(env):
    """`doit run extract:srv1/FILE` retries that file, and only it."""
    paths = {name: put(env, "srv1", name, logs(name)) for name in ("one.gz", "two.gz")}
    for path in paths.values():
        os.chmod(path, 0o000)  # unreadable: parked in error/copy, not retried
    assert env.doit("run").returncode == 1
    env.doit("run", check=0)  # parked earlier: left alone, no failure
    attempts = {r["local_name"]: r["attempts"]["fetch"] for r in env.records("srv1")}
    assert attempts == {"one.gz": 1, "two.gz": 1}
    os.chmod(paths["one.gz"], 0o644)  # the operator fixes one of them
    env.doit("run", "extract:srv1/one.gz", check=0)
    assert (env.data / "extracted" / "srv1" / "one").read_bytes() == logs("one.gz")
    after = {r["local_name"]: (r["status"], r["attempts"].get("fetch")) for r in env.records("srv1")}
    assert after == {"one.gz": ("processed", 1), "two.gz": ("error", 1)}  # fresh counters; the other left alone


def test_file_matched_by_two_patterns_is_processed_once(env):
    put(env, "srv1", "app.log.1.gz", logs("app"))
    env.configure(patterns=("*.gz", "app*.gz"))
    env.doit("run", "plan:srv1", check=0)
    listed = env.doit("list", "--all", check=0).stdout
    assert listed.count("extract:srv1/app.log.1.gz") == 1 and "~" not in listed
    env.doit("run", check=0)
    assert (env.data / "extracted" / "srv1" / "app.log.1").read_bytes() == logs("app")
    assert [r["status"] for r in env.records("srv1")] == ["processed"]


def test_missing_and_unreadable_file_parked_in_error_copy(env):
    put(env, "srv1", "ok.gz", logs("ok"))
    locked = put(env, "srv1", "locked.gz", logs("locked"))
    os.chmod(locked, 0o000)
    proc = env.doit("run")
    assert proc.returncode == 1
    assert (env.data / "extracted" / "srv1" / "ok").read_bytes() == logs("ok")
    marker = env.data / "error" / "copy" / "srv1" / "locked.gz.error.json"
    assert marker.exists()
    [rec] = [r for r in env.records("srv1") if r["local_name"] == "locked.gz"]
    assert rec["error_kind"] == "copy" and rec["attempts"]["fetch"] == 1  # not retried: permanent
    # recover --server srv1 --error-type copy, after fixing permissions
    os.chmod(locked, 0o644)
    env.doit("forget", "-s", "recover:copy/srv1", check=0)
    env.doit("run", check=0)
    assert (env.data / "extracted" / "srv1" / "locked").read_bytes() == logs("locked")
    assert not marker.exists()


def test_unreachable_server_fails_run_but_others_proceed(env):
    put(env, "srv1", "a.gz", logs("a"))
    env.configure(servers=[{}, {}, {"port": 1}], env={"MAX_RETRY_COPY": "2"})
    proc = env.doit("run")
    assert proc.returncode == 1
    assert "srv3" in proc.stdout + proc.stderr and "listing failed" in proc.stdout + proc.stderr
    assert (env.data / "extracted" / "srv1" / "a").read_bytes() == logs("a")
    log = (env.work / "logs" / "logpipe-relay.log").read_text()
    assert "unreachable" in log


def test_wrong_password_fails_at_once_without_leaking_it(env):
    put(env, "srv2", "a.gz", logs("a"))
    proc = env.doit("run", env=env.environ(SSH_PASSWORD="wrong-secret-value"))
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr + (env.work / "logs" / "logpipe-relay.log").read_text()
    assert "authentication refused" in out
    assert "wrong-secret-value" not in out


def test_host_key_mismatch_is_refused(env, tmp_path):
    put(env, "srv1", "a.gz", logs("a"))
    other = tmp_path / "known_hosts"
    lines = open(env.box.known_hosts).read().splitlines()
    # srv1's entry carries srv3's key: a changed host key.
    key3 = lines[2].split(" ", 1)[1]
    other.write_text(f"{lines[0].split(' ')[0]} {key3}\n" + "\n".join(lines[1:]) + "\n")
    env.configure(env={"SSH_KNOWN_HOSTS": str(other)})
    proc = env.doit("run")
    assert proc.returncode == 1
    assert "host key" in proc.stdout + proc.stderr
    assert not (env.data / "extracted" / "srv1" / "a").exists()


def test_parked_dot_file_survives_the_temp_sweep(env):
    bad = env.remote("srv1") / ".hidden.gz"
    bad.write_bytes(gzip.compress(logs("h"))[:100])
    os.utime(bad, (1_700_000_000, 1_700_000_000))
    assert env.doit("run").returncode == 1
    parked = env.data / "error" / "quarantine" / "srv1" / ".hidden.gz"
    assert parked.read_bytes() == bad.read_bytes()
    env.doit("run", check=0)
    assert parked.read_bytes() == bad.read_bytes()


def test_landing_directories_a_killed_run_left_are_swept_and_their_files_fetched_again(env):
    data = logs("landing")
    put(env, "srv1", "app.log.1.gz", data)
    left = env.work / "tmp" / "fetch" / "srv1" / "batch-killed"
    (left / "sub").mkdir(parents=True)
    (left / "app.log.1.gz").write_bytes(b"not what the server has")  # completed, never taken
    (left / ".app.log.1.gz.Xy12Ab").write_bytes(b"half")  # rsync's temp file
    (left / "sub" / "x").write_bytes(b"x")
    env.doit("run", check=0)
    assert not left.exists()
    assert (env.data / "extracted" / "srv1" / "app.log.1").read_bytes() == data
    log = (env.work / "logs" / "logpipe-relay.log").read_text()
    assert "swept 3 temp file(s) left by an interrupted run" in log


def test_a_glob_matching_nothing_and_a_missing_directory_are_warnings(env):
    env.configure(
        servers=[{"remote_path": [str(env.remote("srv1") / "*.gz"), str(env.remote("srv1") / "nope" / "*.gz")]}]
    )
    put(env, "srv1", "a.gz", logs("a"))
    proc = env.doit("run", "extract:srv1", check=0)  # a warning, not a failure
    assert f"remote_path {env.remote('srv1')}/nope/*.gz matched nothing" in proc.stderr
    lines = [json.loads(line) for line in (env.work / "logs" / "logpipe-relay.log").read_text().splitlines()]
    [warning] = [d for d in lines if "matched nothing" in d["message"]]
    assert warning["level"] == "WARNING" and warning["server"] == "srv1"
    assert (env.data / "extracted" / "srv1" / "a").read_bytes() == logs("a")


def test_every_summary_says_how_many_files_are_still_parked_and_where(env):
    (env.remote("srv1") / "bad.gz").write_bytes(b"not gzip")
    os.utime(env.remote("srv1") / "bad.gz", (1_700_000_000, 1_700_000_000))
    env.doit("run", "extract:srv1", check=1)
    put(env, "srv1", "good.gz", logs("good"))
    proc = env.doit("run", "extract:srv1", check=0)  # parked earlier: not this run's failure
    where = f"1 in all wait in {env.data}/error/*/srv1/"
    assert f"srv1: run summary: 1 file(s) processed, 0 duplicate(s), 0 parked ({where}" in proc.stdout
    lines = [json.loads(line) for line in (env.work / "logs" / "logpipe-relay.log").read_text().splitlines()]
    assert where in [d for d in lines if d.get("operation") == "summary"][-1]["message"]
