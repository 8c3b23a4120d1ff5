"""The durable truth: the records of every file version in SQLite (WAL) under STATE_DIR/state.db.

Three tables: `records` (one row per version, the msgspec Record in `body`), `contents` (the first
record that processed each content of a server: content once processed stays known), `owners`
(which record owns a path under the data tree). Writes come in one transaction per batch."""

import json
import os
import sqlite3
import threading
import time

import msgspec

from .errors import StateCorrupt, StateWriteError
from .records import ERROR, PROCESSED, SUPERSEDED, Record, version_key

DB_NAME = "state.db"
SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY, server TEXT NOT NULL, status TEXT NOT NULL,
    size INTEGER NOT NULL, mtime TEXT NOT NULL, sha256 TEXT NOT NULL,
    remote_path BLOB NOT NULL, local_name BLOB NOT NULL,
    extracted_path BLOB NOT NULL, source_path BLOB NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS records_by_status ON records (server, status);
CREATE INDEX IF NOT EXISTS records_by_local ON records (server, local_name);
CREATE TABLE IF NOT EXISTS contents (
    server TEXT NOT NULL, sha256 TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (server, sha256)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS owners (
    server TEXT NOT NULL, path BLOB NOT NULL, key TEXT NOT NULL, PRIMARY KEY (server, path)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Name fields live in BLOB columns as raw bytes (any byte a file name may hold); the body gets "".
_NAME_FIELDS = ("remote_path", "local_name", "extracted_path", "source_path")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)
_BODY_COLUMNS = "body, remote_path, local_name, extracted_path, source_path"


class Known(msgspec.Struct, array_like=True, frozen=True):
    """The little planning needs of a record it does not work on: status, version and content."""

    key: str
    status: str
    size: int
    mtime: str
    sha256: str
    remote_path: str


def _blob(text):
    return os.fsencode(text)


def _text(blob):
    return os.fsdecode(bytes(blob))


def _body(record):
    plain = msgspec.structs.replace(record, **{name: "" for name in _NAME_FIELDS})
    try:
        return _encoder.encode(plain)
    except UnicodeEncodeError:  # an error message quoting an odd name: keep it readable, escaped
        return _encoder.encode(
            msgspec.structs.replace(plain, last_error=plain.last_error.encode("utf-8", "backslashreplace").decode())
        )


def _record(row):
    record = _decoder.decode(row[0])
    for name, blob in zip(_NAME_FIELDS, row[1:]):
        setattr(record, name, _text(blob))
    return record


class Store:
    """One SQLite connection to STATE_DIR/state.db, used by one thread at a time (its own lock); the
    run's writes all come from relay.ledger, the one owner of its records."""

    def __init__(self, state_dir, readonly=False):
        self.path = os.path.join(state_dir, DB_NAME)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        if readonly and not os.path.exists(self.path):
            return  # nothing recorded yet: every read answers empty
        try:
            # Read-only with no run going (no -wal file): immutable, so that not even SQLite's
            # -shm/-wal files are created (`doit list` writes nothing).
            quiet = readonly and not os.path.exists(self.path + "-wal")
            uri = f"file:{self.path}?mode=ro" + ("&immutable=1" if quiet else "") if readonly else f"file:{self.path}"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30, isolation_level=None)
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
                self._db.executescript(_SCHEMA)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            self._db.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from None

    def _corrupt(self, exc):
        if isinstance(exc, sqlite3.OperationalError) and "disk" in str(exc).lower():
            return StateWriteError(f"{self.path}: {exc}; free space on that filesystem, then rerun")
        return StateCorrupt(
            f"{self.path}: not a readable logpipe-relay state database ({exc}); nothing was changed. "
            "Restore it from a backup, or move it aside to start over (every file on the servers "
            "is then fetched and checked again; content already in extracted/ is not lost)"
        )

    def close(self):
        """Close the connection (the WAL is checkpointed)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def _rows(self, sql, args=()):
        if self._db is None:
            return []
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from None

    # --- reads ---------------------------------------------------------------------------

    def known(self, server):
        """key -> Known of every record of `server` (cheap: no record is decoded)."""
        return {
            row[0]: Known(row[0], row[1], row[2], row[3], row[4], _text(row[5]))
            for row in self._rows(
                "SELECT key, status, size, mtime, sha256, remote_path FROM records WHERE server = ?", (server,)
            )
        }

    def unfinished(self, server):
        """The records of `server` that are neither processed nor superseded: due or parked."""
        return [
            _record(row)
            for row in self._rows(
                f"SELECT {_BODY_COLUMNS} FROM records WHERE server = ? AND status NOT IN (?, ?)",
                (server, PROCESSED, SUPERSEDED),
            )
        ]

    def parked(self, server):
        """The parked records of `server`."""
        return [
            _record(row)
            for row in self._rows(
                f"SELECT {_BODY_COLUMNS} FROM records WHERE server = ? AND status = ?", (server, ERROR)
            )
        ]

    def get(self, key):
        """The record of `key`, or None."""
        rows = self._rows(f"SELECT {_BODY_COLUMNS} FROM records WHERE key = ?", (key,))
        return _record(rows[0]) if rows else None

    def processed_named(self, server, local_name):
        """Processed records of `server` whose copy in incoming/ was called `local_name`."""
        return [
            _record(row)
            for row in self._rows(
                f"SELECT {_BODY_COLUMNS} FROM records WHERE server = ? AND local_name = ? AND status = ?",
                (server, _blob(local_name), PROCESSED),
            )
        ]

    def content_owner(self, server, sha256):
        """The key of the record that first processed this content on `server`, or None."""
        rows = self._rows("SELECT key FROM contents WHERE server = ? AND sha256 = ?", (server, sha256))
        return rows[0][0] if rows else None

    def path_owner(self, server, path):
        """The key of the record that owns `path` under the data tree, or None."""
        rows = self._rows("SELECT key FROM owners WHERE server = ? AND path = ?", (server, _blob(path)))
        return rows[0][0] if rows else None

    def contents(self, server):
        """(sha256, key) of every content `server` has processed."""
        return self._rows("SELECT sha256, key FROM contents WHERE server = ?", (server,))

    def owners(self, server):
        """(path, key) of every path under the data tree a record of `server` owns."""
        return [
            (_text(path), key) for path, key in self._rows("SELECT path, key FROM owners WHERE server = ?", (server,))
        ]

    def all_records(self, server=None):
        """Every record (of `server`), for tests and inspection."""
        where, args = ("WHERE server = ?", (server,)) if server else ("", ())
        return [_record(row) for row in self._rows(f"SELECT {_BODY_COLUMNS} FROM records {where} ORDER BY key", args)]

    # --- writes --------------------------------------------------------------------------

    def commit(self, records, contents=(), owners=()):
        """Write `records`, `contents` (server, sha256, key) and `owners` (server, path, key) in one transaction."""
        now = time.time()
        rows = []
        for rec in records:
            rec.updated_at = now
            rec.created_at = rec.created_at or now
            rows.append(
                (
                    rec.key,
                    rec.server,
                    rec.status,
                    rec.size,
                    rec.mtime,
                    rec.sha256,
                    *(_blob(getattr(rec, name)) for name in _NAME_FIELDS),
                    _body(rec),
                )
            )
        try:
            with self._lock:
                self._transaction(rows, contents, owners)
        except sqlite3.OperationalError as exc:
            raise StateWriteError(
                f"{self.path}: could not record {len(rows)} file(s) ({exc}); nothing is lost: the next run "
                "does those files again, to the same paths. Free space on that filesystem (or fix the "
                "error), then rerun"
            ) from None
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from None

    def _writable(self):
        if self._db is None:  # a read-only store of a state that does not exist yet
            raise StateWriteError(f"{self.path}: not opened for writing")
        return self._db

    def _transaction(self, rows, contents, owners):
        db = self._writable()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            db.executemany("INSERT OR IGNORE INTO contents VALUES (?,?,?)", list(contents))
            db.executemany("INSERT OR REPLACE INTO owners VALUES (?,?,?)", [(s, _blob(p), k) for s, p, k in owners])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def meta(self, name):
        """A value of the meta table, or None."""
        rows = self._rows("SELECT value FROM meta WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def set_meta(self, name, value):
        """Set a value of the meta table."""
        self._writable().execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def import_legacy(self, state_dir):
        """Import STATE_DIR/records/ (the JSON files of earlier versions) once; return how many records."""
        root = os.path.join(state_dir, "records")
        if self.meta("legacy_imported") or not os.path.isdir(root):
            return 0
        latest: dict[str, dict] = {}
        for server in sorted(os.listdir(root)):
            for item in _legacy_items(os.path.join(root, server)):
                old = latest.get(item["key"])
                if old is None or item.get("rev", 0) > old.get("rev", 0):
                    latest[item["key"]] = item
        records = [_from_legacy(item) for item in latest.values()]
        contents = [
            (r.server, r.sha256, r.key) for r in records if r.status == PROCESSED and r.sha256 and not r.duplicate_of
        ]
        owners = [(r.server, p, r.key) for r in records for p in (r.extracted_path, r.source_path) if p]
        self.commit(records, contents, owners)
        self.set_meta("legacy_imported", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        return len(records)


def _legacy_items(directory):
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json") or name.startswith(".tmp-"):
            continue
        try:
            with open(os.path.join(directory, name), "rb") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue  # a torn file of the old format: its files are simply checked again
        yield from (data if isinstance(data, list) else [data])


def _from_legacy(item):
    for name, value in (item.get("raw") or {}).items():
        item[name] = os.fsdecode(value.encode("latin-1") if isinstance(value, str) else bytes(value))
    fields = {k: v for k, v in item.items() if k in Record.__struct_fields__ and k != "key"}
    path = item.get("remote_path") or item.get("local_name", "")
    key = version_key(item["server"], item["origin"], path, item.get("size", -1), item.get("mtime", ""))
    record = msgspec.convert({**fields, "key": key}, Record, strict=False)
    if record.status == "verified":
        record.status = "copied"
    return record
