"""The state store in-process: batch files, precedence by rev, the index, crash leftovers, compaction."""

import os

import msgspec

from relay import state


def rec(server, name, **fields):
    """A remote record of `server` for /logs/<name>."""
    path = f"/logs/{name}"
    return state.Record(key=state.record_key(server, "remote", path), server=server, origin="remote",
                        remote_path=path, local_name=os.path.basename(name), size=10, mtime="1.0", **fields)


def files(tmp_path, server):
    return sorted(p.name for p in (tmp_path / "records" / server).iterdir())


def snapshot(records):
    return {k: msgspec.to_builtins(msgspec.structs.asdict(r)) for k, r in records.items()}


def test_a_batch_is_one_file_per_server_and_supersedes_single_records(tmp_path):
    store = state.Store(str(tmp_path))
    store.load_server("a")
    store.load_server("b")
    parked = rec("a", "x.gz", status=state.ERROR, error_kind="extract")
    store.save(parked, run_id="r1")
    assert files(tmp_path, "a") == [f"{parked.key}.json"]
    batch = [rec("a", "x.gz", status=state.PROCESSED), rec("a", "y.gz", status=state.PROCESSED),
             rec("b", "z.gz", status=state.PROCESSED)]
    store.save_batch(batch, run_id="r2")
    # The single file of x.gz is gone: the batch holds its newer version.
    [name_a] = files(tmp_path, "a")
    assert state.is_batch(name_a) and state.is_batch(files(tmp_path, "b")[0])
    got = state.read_records(str(tmp_path), "a")
    assert {r.local_name: r.status for r in got.values()} == {"x.gz": "processed", "y.gz": "processed"}
    assert got[parked.key].rev > parked.rev == 1 and got[parked.key].run_id == "r2"


def test_the_highest_rev_wins_whatever_the_file(tmp_path):
    store = state.Store(str(tmp_path))
    store.load_server("a")
    first = rec("a", "x.gz", status=state.PROCESSED, sha256="1" * 64)
    store.save_batch([first])
    later = rec("a", "x.gz", status=state.ERROR, error_kind="quarantine")
    store.save(later)  # a single file after the batch: newer
    assert state.read_records(str(tmp_path), "a")[first.key].status == state.ERROR
    # A crash between a batch and the removal of the single file it supersedes leaves both: the
    # batch's higher rev still wins.
    stale = (tmp_path / "records" / "a" / f"{first.key}.json").read_bytes()
    store.save_batch([rec("a", "x.gz", status=state.PROCESSED, sha256="2" * 64)])
    (tmp_path / "records" / "a" / f"{first.key}.json").write_bytes(stale)
    for fresh in (state.read_records(str(tmp_path), "a"), state.Store(str(tmp_path)).load_server("a")):
        assert (fresh[first.key].status, fresh[first.key].sha256) == (state.PROCESSED, "2" * 64)


def test_new_writes_continue_the_revs_found_on_disk(tmp_path):
    state.Store(str(tmp_path)).save_batch([rec("a", f"{i}.gz") for i in range(3)])
    store = state.Store(str(tmp_path))
    records = store.load_server("a")
    assert sorted(r.rev for r in records.values()) == [1, 2, 3]
    again = records[rec("a", "0.gz").key]
    store.save(again, run_id="r9")
    assert again.rev == 4
    assert state.read_records(str(tmp_path), "a")[again.key].run_id == "r9"


def test_the_index_gives_what_the_files_give_and_notices_a_changed_file(tmp_path):
    store = state.Store(str(tmp_path))
    store.load_server("a")
    store.save_batch([rec("a", f"{i}.gz", status=state.PROCESSED) for i in range(5)])
    store.save(rec("a", "p.gz", status=state.ERROR, error_kind="copy"))
    store.write_index("a")
    from_files = snapshot(state.read_records(str(tmp_path), "a"))
    assert snapshot(state.Store(str(tmp_path)).load_server("a")) == from_files
    # Someone edits the batch (another size): its records are decoded again, not taken from the index.
    [batch] = [n for n in files(tmp_path, "a") if state.is_batch(n)]
    path = tmp_path / "records" / "a" / batch
    path.write_bytes(path.read_bytes().replace(b'"processed"', b'"processed" '))
    reloaded = state.Store(str(tmp_path)).load_server("a")
    assert snapshot(reloaded) == from_files
    os.utime(path.parent, ns=(1, 1))  # even if the directory looks unchanged, the count must match
    path.unlink()
    assert {r.local_name for r in state.Store(str(tmp_path)).load_server("a").values()} == {"p.gz"}


def test_load_sweeps_temp_files_and_reading_does_not(tmp_path):
    store = state.Store(str(tmp_path))
    store.load_server("a")
    store.save_batch([rec("a", "x.gz")])
    leftover = tmp_path / "records" / "a" / ".tmp-batch-000000000009.json"
    leftover.write_bytes(b"[{")
    assert len(state.read_records(str(tmp_path), "a")) == 1 and leftover.exists()
    assert len(state.Store(str(tmp_path)).load_server("a")) == 1 and not leftover.exists()


def test_compaction_merges_batch_files_and_keeps_every_latest_record(tmp_path):
    store = state.Store(str(tmp_path))
    store.load_server("a")
    for run in range(state.COMPACT_BATCHES + 2):
        # Each run rewrites x.gz and adds a file of its own.
        store.save_batch([rec("a", "x.gz", status=state.PROCESSED, sha256=f"{run:064d}"),
                          rec("a", f"{run}.gz", status=state.PROCESSED)])
    single = rec("a", "parked.gz", status=state.ERROR, error_kind="extract")
    store.save(single)
    before = snapshot(state.read_records(str(tmp_path), "a"))
    store.write_index("a")
    names = files(tmp_path, "a")
    assert sum(state.is_batch(n) for n in names) == 1 and f"{single.key}.json" in names
    assert snapshot(state.read_records(str(tmp_path), "a")) == before
    assert snapshot(state.Store(str(tmp_path)).load_server("a")) == before
    assert before[rec("a", "x.gz").key]["sha256"] == f"{state.COMPACT_BATCHES + 1:064d}"


def test_records_of_an_older_version_and_odd_names_load(tmp_path):
    directory = tmp_path / "records" / "a"
    directory.mkdir(parents=True)
    old = rec("a", "old.gz", status=state.PROCESSED)
    legacy = msgspec.json.decode(state.encode(old))
    del legacy["rev"]  # written before records had a rev
    (directory / f"{old.key}.json").write_bytes(msgspec.json.encode(legacy))
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "a.msgpack").write_bytes(b"\x93\x01\x02")  # an index of another format
    store = state.Store(str(tmp_path))
    assert store.load_server("a")[old.key].rev == 0
    odd = rec("a", os.fsdecode(b"caf\xe9.gz"))
    store.save_batch([odd])
    store.write_index("a")
    for fresh in (state.read_records(str(tmp_path), "a"), state.Store(str(tmp_path)).load_server("a")):
        assert fresh[odd.key].local_name == os.fsdecode(b"caf\xe9.gz")
        assert fresh[old.key].status == state.PROCESSED


def test_an_undecodable_file_is_set_aside_and_the_rest_loads(tmp_path):
    store = state.Store(str(tmp_path))
    store.load_server("a")
    store.save_batch([rec("a", "x.gz")])
    store.save(rec("a", "y.gz"))
    [batch] = [n for n in files(tmp_path, "a") if state.is_batch(n)]
    (tmp_path / "records" / "a" / batch).write_bytes(b'[{"key": "torn')
    assert list(state.read_records(str(tmp_path), "a")) == [rec("a", "y.gz").key]  # reading moves nothing
    assert batch in files(tmp_path, "a")
    fresh = state.Store(str(tmp_path))
    assert list(fresh.load_server("a")) == [rec("a", "y.gz").key]
    [moved] = fresh.damaged("a")
    assert moved.startswith(str(tmp_path / "records" / "a" / "damaged" / batch))
    assert open(moved, "rb").read() == b'[{"key": "torn' and batch not in files(tmp_path, "a")
