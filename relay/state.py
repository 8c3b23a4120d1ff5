"""The durable truth: one msgspec record per file under STATE_DIR, written atomically, plus a rebuildable index."""

import hashlib
import os
import time
from typing import Optional

import msgspec

from . import durable

PENDING, COPIED, VERIFIED, EXTRACTED, PROCESSED, ERROR = (
    "pending", "copied", "verified", "extracted", "processed", "error")

# The stage that failed decides where a parked file waits and which task recovers it.
ERROR_STAGE = {"copy": "fetch", "extract": "extract", "quarantine": "extract"}


class Record(msgspec.Struct, kw_only=True):
    """Everything known about one remote (or locally dropped) file."""

    key: str
    server: str
    origin: str  # "remote" or "local"
    remote_path: str = ""  # surrogate-escaped, as os.fsdecode gives it
    local_name: str = ""
    size: int = -1  # at listing
    mtime: str = ""  # at listing, as the remote `find` printed it
    generation: int = 0
    status: str = PENDING
    sha256: str = ""
    format: str = ""
    duplicate_of: str = ""
    error_kind: str = ""  # copy | extract | quarantine
    last_error: str = ""
    attempts: dict = {}
    extracted_path: str = ""
    extracted_size: int = -1
    extracted_sha256: str = ""
    source_path: str = ""  # where the compressed source ended: processed/, error/…, or "" if deleted
    run_id: str = ""  # the run that last changed status
    created_at: float = 0.0
    updated_at: float = 0.0
    raw: dict = {}  # field -> bytes, for values that are not valid UTF-8 (odd file names)

    @property
    def parked(self):
        """True when the file waits in error/ for a recovery."""
        return self.status == ERROR


def record_key(server, origin, path):
    """Stable, filesystem-safe key for a file of `server` (any bytes in `path`)."""
    raw = b"\0".join([server.encode(), origin.encode(), os.fsencode(path)])
    return hashlib.sha256(raw).hexdigest()[:32]


_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(Record)


def _to_disk(record):
    """A copy safe for JSON: non-UTF-8 strings shown escaped, their exact bytes kept in `raw`."""
    if type(record) is not Record:  # a record loaded from the index: written out as a plain object
        record = Record(**msgspec.structs.asdict(record))
    raw, changes = {}, {}
    for name in record.__struct_fields__:
        value = getattr(record, name)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raw[name] = os.fsencode(value)
                changes[name] = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return msgspec.structs.replace(record, raw=raw, **changes) if raw else record


def encode(record):
    """The record's JSON bytes (odd file names go through `_to_disk`; the common case needs no copy)."""
    if type(record) is Record:
        try:
            return _encoder.encode(record)
        except UnicodeEncodeError:
            pass
    return _encoder.encode(_to_disk(record))


def _from_disk(record):
    if record.raw:
        for name, value in record.raw.items():
            setattr(record, name, os.fsdecode(value))
        record.raw = {}
    return record


class _PackedRecord(Record, array_like=True):
    """A Record stored as an array in the index: the same fields, about twice as fast to decode."""


class _IndexEntry(msgspec.Struct, array_like=True):
    mtime_ns: int
    size: int
    record: _PackedRecord


# The index is a cache for speed only, so it uses the faster MessagePack encoding.
_index_encoder = msgspec.msgpack.Encoder()
class _Index(msgspec.Struct):
    dir_mtime_ns: int  # of the records directory when the index was written: every record write
    count: int         # renames a file into it, so an unchanged mtime means unchanged records
    entries: dict[str, _IndexEntry]


_index_decoder = msgspec.msgpack.Decoder(_Index)


class Store:
    """Per-server record files `records/<server>/<key>.json` and an index that only speeds up loading."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.records = {}  # server -> key -> latest Record known to this process
        self._index_stale = set()  # servers whose index misses a record change
        self._made = set()  # servers whose records directory exists
        self._stats = {}  # server -> key -> (mtime_ns, size) of its record file, as the index keeps them

    def _dir(self, server):
        return os.path.join(self.state_dir, "records", server)

    def _index_path(self, server):
        return os.path.join(self.state_dir, "index", f"{server}.msgpack")

    def path(self, record):
        """Where `record` lives on disk."""
        return os.path.join(self._dir(record.server), f"{record.key}.json")

    def _write(self, record, run_id, writer):
        record.updated_at = time.time()
        record.created_at = record.created_at or record.updated_at
        if run_id is not None:
            record.run_id = run_id
        if record.server not in self._made:
            os.makedirs(self._dir(record.server), exist_ok=True)
            self._made.add(record.server)
        st = writer(self.path(record), encode(record))
        self._stats.setdefault(record.server, {})[record.key] = (st.st_mtime_ns, st.st_size)
        self.records.setdefault(record.server, {})[record.key] = record
        self._index_stale.add(record.server)

    def save(self, record, run_id=None):
        """Write `record` atomically and durably (fsync)."""
        self._write(record, run_id, durable.write_atomic)

    def save_batch(self, records, run_id=None):
        """Write many records (temp + rename each), then make them all durable with one syncfs."""
        for record in records:
            self._write(record, run_id, durable.replace_unsynced)
        if records:
            durable.syncfs(self.state_dir)

    def get(self, server, key) -> Optional[Record]:
        """Read one record fresh from disk, or None."""
        try:
            with open(os.path.join(self._dir(server), f"{key}.json"), "rb") as fh:
                return _from_disk(_record_decoder.decode(fh.read()))
        except FileNotFoundError:
            return None

    def load_server(self, server):
        """All records of `server`, by key; decodes only the record files changed since the index."""
        index = self._read_index(server)
        records = self.records[server] = {}
        stats = self._stats[server] = {}
        directory = self._dir(server)
        try:
            dir_mtime = os.stat(directory).st_mtime_ns
        except FileNotFoundError:
            return records
        if index is not None and index.dir_mtime_ns == dir_mtime:
            for key, cached in index.entries.items():
                records[key] = _from_disk(cached.record)
                stats[key] = (cached.mtime_ns, cached.size)
            if len(records) == index.count:
                return records
            records.clear()
            stats.clear()
        cached_entries = index.entries if index is not None else {}
        for entry in os.scandir(directory):
            if entry.name.startswith(".tmp-"):
                os.unlink(entry.path)  # an atomic write a crash interrupted
                continue
            if not entry.name.endswith(".json"):
                continue
            key = entry.name[:-5]
            st = entry.stat()
            cached = cached_entries.get(key)
            if cached is not None and (cached.mtime_ns, cached.size) == (st.st_mtime_ns, st.st_size):
                records[key] = _from_disk(cached.record)
            else:
                record = self.get(server, key)
                if record is None:
                    continue
                records[key] = record
            stats[key] = (st.st_mtime_ns, st.st_size)
        self._index_stale.add(server)
        return records

    def _read_index(self, server):
        try:
            with open(self._index_path(server), "rb") as fh:
                return _index_decoder.decode(fh.read())
        except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    def write_index(self, server):
        """Rewrite the load-speed index of `server` from the records this process knows, if it changed."""
        if server not in self._index_stale:
            return
        self._index_stale.discard(server)
        try:
            dir_mtime = os.stat(self._dir(server)).st_mtime_ns
        except FileNotFoundError:
            return
        stats = self._stats.get(server, {})
        records = self.records.get(server, {})

        def build(packed):
            entries = {}
            for key, record in records.items():
                if key in stats:
                    mtime_ns, size = stats[key]
                else:
                    try:
                        st = os.stat(self.path(record))
                    except FileNotFoundError:
                        continue
                    mtime_ns, size = st.st_mtime_ns, st.st_size
                entries[key] = _IndexEntry(mtime_ns, size, packed(record))
            return _index_encoder.encode(_Index(dir_mtime, len(entries), entries))

        try:  # most records hold only valid UTF-8: convert them as they are
            data = build(lambda r: r if type(r) is _PackedRecord else _PackedRecord(**msgspec.structs.asdict(r)))
        except UnicodeEncodeError:
            data = build(lambda r: _PackedRecord(**msgspec.structs.asdict(_to_disk(r))))
        os.makedirs(os.path.dirname(self._index_path(server)), exist_ok=True)
        # The index is only a cache of the records, so a plain rename (no fsync) is enough.
        durable.replace_unsynced(self._index_path(server), data)
