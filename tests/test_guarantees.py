"""Guarantees: kill -9 at every stage converges, one run at a time, growing files never extracted half."""

import fcntl
import gzip
import os
import random
import signal
import subprocess
import threading
import time

import pytest
from conftest import needs_root, small_filesystem

from relay import actions, engine
from relay import sandbox as sb
from relay.config import load_settings
from relay.errors import StateWriteError
from relay.records import COPIED, PROCESSED, SUPERSEDED, Record
from relay.run import Run
from relay.store import Store

pytestmark = needs_root


def seed_files(env, count=3):
    expected = {}
    for server in ("srv1", "srv2"):
        for n in range(count):
            data = sb.log_lines(random.Random(f"{server}-{n}"), 500)
            sb.write_gz(str(env.remote(server) / f"f{n}.log.gz"), data)
            expected[(server, f"f{n}.log")] = data
    return expected


def assert_converged(env, expected):
    for (server, name), data in expected.items():
        assert (env.data / "extracted" / server / name).read_bytes() == data
    extracted = sorted(
        p.relative_to(env.data / "extracted") for p in (env.data / "extracted").rglob("*") if p.is_file()
    )
    assert len(extracted) == len(expected), extracted  # exactly once each
    assert not [p for p in env.data.rglob("*") if p.name.startswith(".") or p.name.endswith(".part")]
    assert not [p for p in (env.data / "incoming").rglob("*") if p.is_file()]
    assert not list((env.work / "tmp" / "extract").rglob("*.part"))
    assert {r["status"] for r in env.records()} == {"processed"}
    assert len(env.records()) == len(expected)


@pytest.mark.parametrize("point", ["fetch", "extract", "place", "commit", "place-source"])
def test_kill_9_at_each_stage_then_next_run_converges(env, point):
    expected = seed_files(env)
    proc = env.doit("run", env=env.environ(RELAY_CRASH_AT=point))
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    env.doit("run", check=0)
    assert_converged(env, expected)
    env.doit("run", check=0)  # and stays converged
    assert_converged(env, expected)


@pytest.mark.parametrize("delete_source", [False, True])
def test_durability_order_output_then_record_then_source(env, delete_source):
    """Crash points on both sides of the record's transaction: before it, the output is in place and
    the record does not say processed; after it, the record says processed and the source has not
    moved yet (a hand-dropped source is the only copy). The next run completes either way."""
    env.configure(pipeline={"delete_source": delete_source})
    data = sb.log_lines(random.Random("order"), 300)
    drop = env.data / "incoming" / "srv1" / "dropped.log.gz"
    drop.parent.mkdir(parents=True)
    sb.write_gz(str(drop), data)
    proc = env.doit("run", "extract:srv1", env=env.environ(RELAY_CRASH_AT="place"))
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert (env.data / "extracted" / "srv1" / "dropped.log").read_bytes() == data
    assert drop.exists() and "processed" not in [r["status"] for r in env.records("srv1")]
    proc = env.doit("run", "extract:srv1", env=env.environ(RELAY_CRASH_AT="commit"))
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    [rec] = env.records("srv1")
    assert rec["status"] == "processed" and rec["extracted_path"].endswith("/dropped.log")
    assert drop.exists()  # the record first, then the source
    env.doit("run", "extract:srv1", check=0)
    assert not drop.exists()
    assert (env.data / "processed" / "srv1" / "dropped.log.gz").exists() != delete_source
    assert (env.data / "extracted" / "srv1" / "dropped.log").read_bytes() == data
    assert [r["status"] for r in env.records("srv1")] == ["processed"]
    assert sorted(os.listdir(env.data / "extracted" / "srv1")) == ["dropped.log"]


def test_a_corrupt_state_database_is_one_clear_error_never_a_silent_reset(env):
    expected = seed_files(env)
    env.doit("run", check=0)
    database = env.state / "state.db"
    damaged = b"garbage" * 4096
    database.write_bytes(damaged)
    for command in ("run", "list"):
        proc = env.doit(command)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert f"{database}: not a readable logpipe-relay state database" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert database.read_bytes() == damaged  # not reset, not rewritten
    database.unlink()  # what the message says to do (after a look at it)
    env.doit("run", check=0)
    assert_converged(env, expected)


def test_run_refuses_to_start_without_room_for_its_state(env, tmp_path):
    seed_files(env, count=1)
    with small_filesystem(tmp_path / "tiny", "4m") as tiny:
        env.configure(env={"STATE_DIR": str(tiny / "state")})
        proc = env.doit("run")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"{tiny}/state: only" in proc.stderr and "needs at least 16 MiB" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (env.data / "extracted").exists() or not any((env.data / "extracted").rglob("*.log"))


def test_state_disk_full_at_the_flush_is_a_clear_error_and_leaves_no_temp(env, tmp_path):
    with small_filesystem(tmp_path / "tiny", "256k") as tiny:
        env.configure(env={"STATE_DIR": str(tiny / "state")})
        settings = load_settings(str(env.conf), environ=env.environ())
        os.makedirs(settings.state_dir)
        store = Store(settings.state_dir)
        records = [
            Record(key=f"{i:032x}", server="srv1", origin="remote", remote_path="/l/" + "x" * 2000, status=PROCESSED)
            for i in range(200)
        ]  # about 4 KB each: more than the filesystem holds
        with pytest.raises(StateWriteError) as failure:
            store.commit(records)
        message = str(failure.value)
        assert message.startswith(f"{settings.state_dir}/state.db: could not record 200 file(s)")
        assert "the next run does those files again" in message
        assert store.all_records("srv1") == []  # one transaction: all or nothing
        store.close()


def test_real_disk_full_while_extracting_parks_the_file_and_leaves_no_partial(env, tmp_path):
    big = b"GET /index.html 200\n" * (4 * 2**20 // 20)  # 4 MiB out of a few KiB in
    (env.remote("srv1") / "big.log.gz").write_bytes(gzip.compress(big))
    os.utime(env.remote("srv1") / "big.log.gz", (1_700_000_000, 1_700_000_000))
    with small_filesystem(tmp_path / "tiny", "1m") as tiny:
        data = tiny / "data"
        # min_free_bytes 0: the disk really fills up, rather than the free-space check refusing first.
        env.configure(
            pipeline={"min_free_bytes": 0},
            env={"DATA_ROOT": str(data), "TMP_DIR": str(tiny / "tmp"), "MAX_RETRY_EXTRACT": "2"},
        )
        proc = env.doit("run")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "disk full while extracting big.log.gz" in proc.stdout + proc.stderr
        assert not list(tiny.rglob("*.part"))
        [rec] = env.records("srv1")
        assert (rec["status"], rec["error_kind"], rec["attempts"]["extract"]) == (
            "error",
            "extract",
            1,
        )  # no retry at once
        assert (data / "error" / "extract" / "srv1" / "big.log.gz").exists()
        assert not (data / "extracted" / "srv1" / "big.log").exists()
        subprocess.run(["mount", "-o", "remount,size=16m", str(tiny)], check=True)  # space is back
        env.doit("forget", "-s", "recover:extract/srv1", check=0)
        env.doit("run", check=0)
        assert (data / "extracted" / "srv1" / "big.log").read_bytes() == big


def wait_for_transfer(env, proc, server="srv1"):
    """Wait until rsync's hidden temp file exists in the landing area: the transfer is under way."""
    staging = env.work / "tmp" / "fetch" / server
    deadline = time.monotonic() + 60
    while not [p for p in staging.rglob(".*") if p.is_file()] if staging.exists() else True:
        assert proc.poll() is None and time.monotonic() < deadline, "transfer never started"
        time.sleep(0.005)


def test_kill_9_of_the_process_group_during_rsync_transfer(env):
    big = os.urandom(64 * 2**20)  # incompressible: a long transfer
    path = env.remote("srv1") / "big.log.gz"
    path.write_bytes(gzip.compress(big, compresslevel=1))
    os.utime(path, (1_700_000_000, 1_700_000_000))
    proc = env.start("run", start_new_session=True)
    wait_for_transfer(env, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    env.doit("run", check=0)
    assert (env.data / "extracted" / "srv1" / "big.log").read_bytes() == big
    assert not [p for p in (env.work / "tmp" / "fetch" / "srv1").rglob(".*") if p.is_file()]


def test_second_concurrent_run_exits_at_once_and_changes_nothing(env):
    seed_files(env, count=1)
    env.doit("run", "fetch:srv1", check=0)  # creates state dir; leaves work for later stages
    before = env.tree(), [r["status"] for r in env.records()]
    fd = os.open(env.state / "lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run in progress holds it
    try:
        started = time.monotonic()
        proc = env.doit("run")
        assert time.monotonic() - started < 10
        assert proc.returncode == 3
        assert "another logpipe-relay run holds" in proc.stderr and "Traceback" not in proc.stderr
        assert (env.tree(), [r["status"] for r in env.records()]) == before
    finally:
        os.close(fd)
    env.doit("run", check=0)


def test_file_appended_during_runs_is_never_extracted_half(env):
    env.configure(pipeline={"min_file_age_seconds": 30})
    growing = env.remote("srv1") / "growing.log.gz"
    members = []
    stop = threading.Event()

    def writer():
        rng = random.Random(7)
        while not stop.is_set():
            chunk = sb.log_lines(rng, 50)
            members.append(chunk)
            with open(growing, "ab") as fh:
                fh.write(gzip.compress(chunk))

    growing.write_bytes(b"")
    os.chmod(growing, 0o644)
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(2):
            env.doit("run", check=0)
            assert not (env.data / "extracted" / "srv1" / "growing.log").exists()
    finally:
        stop.set()
        thread.join()
    os.utime(growing, (1_700_000_000, 1_700_000_000))  # the writer is done and the file has aged
    env.doit("run", check=0)
    assert (env.data / "extracted" / "srv1" / "growing.log").read_bytes() == b"".join(members)


def in_process_run(env):
    """A Run of the test's configuration in this process, as doit's actions see it."""
    settings = load_settings(str(env.conf), environ=env.environ())
    return Run(settings, environ=env.environ()).start()


def test_file_changed_between_listing_and_fetch_is_left_for_later(env):
    """In-process: the fetched copy's size differs from the listing, so verify defers it."""
    data = sb.log_lines(random.Random(3), 200)
    sb.write_gz(str(env.remote("srv1") / "moving.gz"), data)
    run = in_process_run(env)
    try:
        [rec] = engine.list_server(run, "srv1").due
        with open(env.remote("srv1") / "moving.gz", "ab") as fh:  # appended after the listing
            fh.write(gzip.compress(b"more\n"))
        engine.fetch_server(run, "srv1")
        assert rec.status == COPIED
        actions.extract_action(run, "srv1")
        assert rec.status == SUPERSEDED and "extract" in rec.attempts
        assert not (env.data / "incoming" / "srv1" / "moving.gz").exists()
        assert not (env.data / "extracted" / "srv1" / "moving").exists()
        [new] = engine.list_server(run, "srv1").due  # the next listing: the new version, due
        assert new.key != rec.key and new.size == os.path.getsize(env.remote("srv1") / "moving.gz")
    finally:
        run.close()
    env.doit("run", check=0)
    assert (env.data / "extracted" / "srv1" / "moving").read_bytes() == data + b"more\n"


def test_file_that_became_a_directory_before_the_fetch_is_not_taken(env):
    """In-process: listed as a file, a directory by the time rsync asks for it."""
    sb.write_gz(str(env.remote("srv1") / "turned.gz"), b"x\n")
    sb.write_gz(str(env.remote("srv1") / "fine.gz"), b"fine\n")
    run = in_process_run(env)
    try:
        recs = {r.local_name: r for r in engine.list_server(run, "srv1").due}
        os.unlink(env.remote("srv1") / "turned.gz")
        os.mkdir(env.remote("srv1") / "turned.gz")
        (env.remote("srv1") / "turned.gz" / "inner").write_bytes(b"not a log")
        os.chmod(env.remote("srv1") / "turned.gz", 0o755)
        engine.fetch_server(run, "srv1")
        assert recs["turned.gz"].status == SUPERSEDED  # no file of that name to take any more
        assert not (env.data / "incoming" / "srv1" / "turned.gz").exists()
        assert recs["fine.gz"].status == COPIED
        assert (env.data / "incoming" / "srv1" / "fine.gz").is_file()
        assert list((env.work / "tmp" / "fetch" / "srv1").iterdir()) == []
    finally:
        run.close()


def test_dead_peer_during_transfer_is_caught_and_left_due_not_parked(env):
    """kill -STOP of the server side mid-transfer: keepalives and the outer deadline end the run."""
    big = os.urandom(48 * 2**20)
    path = env.remote("srv1") / "big.log.gz"
    path.write_bytes(gzip.compress(big, compresslevel=1))
    os.utime(path, (1_700_000_000, 1_700_000_000))
    env.configure(
        env={
            "SSH_DEADLINE": "6",
            "MAX_RETRY_COPY": "1",
            "SSH_SERVER_ALIVE_INTERVAL": "1",
            "SSH_SERVER_ALIVE_COUNT_MAX": "2",
        }
    )
    proc = env.start("run", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    server = env.box.servers[0]
    wait_for_transfer(env, proc)
    frozen = sb._descendants(server.proc.pid)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert time.monotonic() - started < 60
    assert proc.returncode == 1, out
    assert b"not fetched" in out and b"the next run tries again" in out
    [rec] = env.records("srv1")
    assert rec["status"] == "pending" and rec["attempts"]["fetch"] >= 1  # transient: due, never parked
    assert not (env.data / "extracted" / "srv1" / "big.log").exists()
    assert not [p for p in (env.data / "incoming").rglob("*") if p.is_file()]
    assert not (env.data / "error" / "copy" / "srv1").exists() or not os.listdir(env.data / "error" / "copy" / "srv1")
    env.doit("run", check=0)  # the peer is back: the next plain run fetches it
    assert (env.data / "extracted" / "srv1" / "big.log").read_bytes() == big
