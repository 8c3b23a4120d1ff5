"""The SQLite state store: round trips, odd names, content memory, legacy import, corruption."""

import json
import os

import msgspec
import pytest

from relay.errors import StateCorrupt
from relay.records import ERROR, PENDING, PROCESSED, Record, version_key
from relay.store import Store


def rec(path, status=PENDING, size=10, mtime="1.0", **kw):
    return Record(
        key=version_key("a", "remote", path, size, mtime),
        server="a",
        origin="remote",
        remote_path=path,
        local_name=os.path.basename(path),
        size=size,
        mtime=mtime,
        status=status,
        **kw,
    )


def test_records_round_trip_with_any_byte_in_their_names(tmp_path):
    odd = os.fsdecode(b"/l/caf\xe9 $(x)\nname.gz")
    store = Store(str(tmp_path))
    r = rec(odd, status=ERROR, last_error="x", extracted_path=odd + ".out")
    store.commit([r, rec("/l/b.gz")])
    store.close()
    again = Store(str(tmp_path), readonly=True)
    got = {x.key: x for x in again.all_records()}
    assert got[r.key].remote_path == odd and got[r.key].extracted_path == odd + ".out"
    assert [x.key for x in again.parked("a")] == [r.key]
    assert {x.key for x in again.unfinished("a")} == {r.key, rec("/l/b.gz").key}


def test_a_record_written_with_a_field_since_dropped_still_reads(tmp_path):
    """Records of earlier versions carry extracted_sha256 (no longer computed): they decode as before."""
    store = Store(str(tmp_path))
    r = rec("/l/old.gz", status=PROCESSED, extracted_size=5)
    store.commit([r])
    old = msgspec.msgpack.encode({**msgspec.structs.asdict(r), "extracted_sha256": "ab" * 32})
    store._db.execute("UPDATE records SET body = ? WHERE key = ?", (old, r.key))  # autocommit
    store.close()
    [again] = Store(str(tmp_path), readonly=True).all_records()
    assert again.key == r.key and again.status == PROCESSED and again.extracted_size == 5


def test_content_once_processed_stays_known(tmp_path):
    store = Store(str(tmp_path))
    first = rec("/l/x.1.gz", status=PROCESSED, sha256="f" * 64)
    store.commit([first], contents=[("a", "f" * 64, first.key)])
    later = rec("/l/x.1.gz", status=PROCESSED, size=99, sha256="e" * 64)
    store.commit([later], contents=[("a", "e" * 64, later.key), ("a", "f" * 64, later.key)])
    assert store.content_owner("a", "f" * 64) == first.key  # never taken over
    assert store.content_owner("b", "f" * 64) is None


def test_a_readonly_store_that_does_not_exist_reads_empty_and_creates_nothing(tmp_path):
    store = Store(str(tmp_path / "none"), readonly=True)
    assert store.unfinished("a") == [] and store.known("a") == {}
    assert not (tmp_path / "none").exists()


def test_a_corrupt_database_is_one_clear_error_never_a_reset(tmp_path):
    (tmp_path / "state.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateCorrupt) as err:
        Store(str(tmp_path))
    assert "state.db" in str(err.value) and "\n" not in str(err.value) and "backup" in str(err.value)
    assert (tmp_path / "state.db").read_bytes() == b"this is not sqlite" * 100


def test_the_old_records_tree_is_imported_once(tmp_path):
    base = tmp_path / "records" / "srv1"
    base.mkdir(parents=True)
    old = {
        "key": "0" * 32,
        "server": "srv1",
        "origin": "remote",
        "remote_path": "/l/a.gz",
        "local_name": "a.gz",
        "size": 5,
        "mtime": "1.0",
        "generation": 0,
        "status": "processed",
        "sha256": "d" * 64,
        "rev": 1,
        "extracted_path": "/d/extracted/srv1/a",
        "raw": {},
    }
    (base / "batch-000000000001.json").write_text(json.dumps([old, {**old, "rev": 0, "status": "pending"}]))
    store = Store(str(tmp_path))
    assert store.import_legacy(str(tmp_path)) == 1
    assert store.import_legacy(str(tmp_path)) == 0
    [got] = store.all_records("srv1")
    assert got.key == version_key("srv1", "remote", "/l/a.gz", 5, "1.0") and got.status == PROCESSED
    assert store.content_owner("srv1", "d" * 64) == got.key
    assert store.path_owner("srv1", "/d/extracted/srv1/a") == got.key
