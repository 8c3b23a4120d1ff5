"""The durable truth: one msgspec record per remote file under STATE_DIR, written atomically (alone or in a
batch file), plus a rebuildable index."""

import hashlib
import os
import time

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
    raw: dict[str, bytes] = {}  # field -> exact bytes, for values that are not valid UTF-8 (odd file names)
    rev: int = 0  # order of writes among the server's records: a key's highest is its latest

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


class _HeldIn(msgspec.Struct, array_like=True):
    """A records file as the index saw it."""

    name: str
    mtime_ns: int
    size: int


class _IndexEntry(msgspec.Struct, array_like=True):
    file: int  # position in _Index.files of the file holding this (latest) record
    record: _PackedRecord


# The index is a cache for speed only, so it uses the faster MessagePack encoding.
_index_encoder = msgspec.msgpack.Encoder()
class _Index(msgspec.Struct):
    dir_mtime_ns: int  # of the records directory when the index was written: every record write
    count: int         # renames a file into it, so an unchanged mtime means unchanged records
    files: list[_HeldIn]
    entries: dict[str, _IndexEntry]
    batches: list[str] = []  # every batch file in the directory, for compaction


_index_decoder = msgspec.msgpack.Decoder(_Index)
_batch_decoder = msgspec.json.Decoder(list[Record])

BATCH_PREFIX = "batch-"
# More batch files than this in a server's directory, and the next index write merges them into one.
COMPACT_BATCHES = 16


def _encode_batch(records):
    return b"[" + b",\n".join(map(encode, records)) + b"]"


def is_batch(name):
    """True for the name of a batch file (many records in one JSON array)."""
    return name.startswith(BATCH_PREFIX)


class _Scan:
    """What one server's records directory holds: the latest record of each key and where it lives."""

    def __init__(self):
        self.records = {}  # key -> latest Record
        self.holders = {}  # key -> name of the file holding it
        self.stats = {}  # file name -> (mtime_ns, size)
        self.batches = set()  # names of every batch file, holding a latest record or not
        self.damaged = []  # records files that could not be decoded (torn by a crash, edited by hand)
        self.rev = 0  # the highest rev seen

    def take(self, record, name):
        current = self.records.get(record.key)
        if current is None or record.rev > current.rev:
            self.records[record.key] = record
            self.holders[record.key] = name
        if record.rev > self.rev:
            self.rev = record.rev


class Store:
    """Per-server records under `records/<server>/`: a file per record (`<key>.json`, rare transitions)
    or many records per batch file (`batch-<rev>.json`, a flush); the highest `rev` of a key wins.
    An index only speeds up loading."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.records = {}  # server -> key -> latest Record known to this process
        self._index_stale = set()  # servers whose index misses a record change
        self._made = set()  # servers whose records directory exists
        self._scans = {}  # server -> _Scan of its directory, kept up to date by every write

    def _dir(self, server):
        return os.path.join(self.state_dir, "records", server)

    def _index_path(self, server):
        return os.path.join(self.state_dir, "index", f"{server}.msgpack")

    def path(self, record):
        """Where `record` lives on disk when written on its own."""
        return os.path.join(self._dir(record.server), f"{record.key}.json")

    def _scan(self, server):
        if server not in self._scans:  # a write to a server this store never loaded
            scan = self._scans[server] = self._read_dir(server, sweep=True)
            known = self.records.setdefault(server, {})
            for key, record in scan.records.items():
                known.setdefault(key, record)
        return self._scans[server]

    def _stamp(self, record, run_id, scan):
        record.updated_at = time.time()
        record.created_at = record.created_at or record.updated_at
        if run_id is not None:
            record.run_id = run_id
        scan.rev += 1
        record.rev = scan.rev

    def _ensure_dir(self, server):
        if server not in self._made:
            os.makedirs(self._dir(server), exist_ok=True)
            self._made.add(server)

    def _held(self, scan, record, name, st):
        scan.records[record.key] = record
        scan.holders[record.key] = name
        scan.stats[name] = (st.st_mtime_ns, st.st_size)
        self.records.setdefault(record.server, {})[record.key] = record
        self._index_stale.add(record.server)

    def save(self, record, run_id=None):
        """Write `record` on its own, atomically and durably (fsync)."""
        scan = self._scan(record.server)
        self._stamp(record, run_id, scan)
        self._ensure_dir(record.server)
        st = durable.write_atomic(self.path(record), encode(record))
        self._held(scan, record, f"{record.key}.json", st)

    def save_batch(self, records, run_id=None):
        """Write many records as one batch file per server (temp + rename), then make them durable
        with one syncfs; a record file of its own that a batch supersedes is removed after."""
        by_server = {}
        for record in records:
            by_server.setdefault(record.server, []).append(record)
        superseded = []
        for server, group in by_server.items():
            scan = self._scan(server)
            for record in group:
                self._stamp(record, run_id, scan)
            self._ensure_dir(server)
            name = f"{BATCH_PREFIX}{group[0].rev:012d}.json"
            st = durable.replace_unsynced(os.path.join(self._dir(server), name), _encode_batch(group))
            scan.batches.add(name)
            for record in group:
                old = scan.holders.get(record.key)
                if old is not None and not is_batch(old):
                    superseded.append(os.path.join(self._dir(server), old))
                    scan.stats.pop(old, None)
                self._held(scan, record, name, st)
        if records:
            durable.syncfs(self.state_dir)
        for path in superseded:  # after the syncfs: the batch holds their newer version
            durable.unlink_quietly(path)

    def load_server(self, server):
        """All records of `server`, by key; decodes only the files changed since the index."""
        scan = self._scans[server] = self._read_dir(server, self._read_index(server), sweep=True)
        self.records[server] = scan.records
        if scan.records or scan.batches:
            self._made.add(server)
        return scan.records

    def _read_dir(self, server, index=None, sweep=False):
        scan = _Scan()
        directory = self._dir(server)
        try:
            dir_mtime = os.stat(directory).st_mtime_ns
        except FileNotFoundError:
            return scan
        cached = {}  # file name -> (mtime_ns, size, [records])
        if index is not None:
            files = index.files
            for key, entry in index.entries.items():
                held = files[entry.file]
                cached.setdefault(held.name, (held.mtime_ns, held.size, []))[2].append(_from_disk(entry.record))
            if index.dir_mtime_ns == dir_mtime:
                for name, (mtime_ns, size, recs) in cached.items():
                    for record in recs:
                        scan.take(record, name)
                    scan.stats[name] = (mtime_ns, size)
                scan.batches.update(index.batches)
                if len(scan.records) == index.count:
                    return scan
                scan = _Scan()
        for entry in os.scandir(directory):
            name = entry.name
            if name.startswith(".tmp-"):
                if sweep:
                    os.unlink(entry.path)  # an atomic write a crash interrupted
                continue
            if not name.endswith(".json"):
                continue
            st = entry.stat()
            if is_batch(name):
                scan.batches.add(name)
            hit = cached.get(name)
            if hit is not None and hit[:2] == (st.st_mtime_ns, st.st_size):
                found = hit[2]
            else:
                found = self._read_file(entry.path, name)
            if found is None:
                scan.damaged.append(self._set_aside(directory, name) if sweep else entry.path)
                scan.batches.discard(name)
                continue
            for record in found:
                scan.take(record, name)
            scan.stats[name] = (st.st_mtime_ns, st.st_size)
        self._index_stale.add(server)
        return scan

    @staticmethod
    def _read_file(path, name):
        """The records in one file, or None when it cannot be decoded."""
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return []
        try:
            if is_batch(name):
                return [_from_disk(r) for r in _batch_decoder.decode(data)]
            return [_from_disk(_record_decoder.decode(data))]
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    @staticmethod
    def _set_aside(directory, name):
        """Move an undecodable records file to `damaged/` beside it (kept for a look, out of the way)."""
        os.makedirs(os.path.join(directory, "damaged"), exist_ok=True)
        target = os.path.join(directory, "damaged", f"{name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        durable.move_durably(os.path.join(directory, name), target)
        return target

    def damaged(self, server):
        """Records files of `server` that the last load could not decode, as moved aside."""
        scan = self._scans.get(server)
        return list(scan.damaged) if scan is not None else []

    def _read_index(self, server):
        try:
            with open(self._index_path(server), "rb") as fh:
                return _index_decoder.decode(fh.read())
        except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    def _compact(self, server, scan):
        """Merge the server's batch files into one (durably) and remove the others."""
        held = [r for k, r in scan.records.items() if is_batch(scan.holders.get(k, ""))]
        old = set(scan.batches)
        if held:
            name = f"{BATCH_PREFIX}{max(r.rev for r in held):012d}-merged.json"
            self._ensure_dir(server)
            st = durable.write_atomic(os.path.join(self._dir(server), name), _encode_batch(held))
            for record in held:
                scan.holders[record.key] = name
            scan.stats[name] = (st.st_mtime_ns, st.st_size)
            old.discard(name)
            scan.batches = {name}
        else:
            scan.batches = set()
        for name in old:
            durable.unlink_quietly(os.path.join(self._dir(server), name))
            scan.stats.pop(name, None)

    def write_index(self, server):
        """Rewrite the load-speed index of `server` from the records this process knows, if it changed;
        merge the batch files first when there are many. Call it after the server's last write.

        Both are housekeeping: on an OSError (a full disk) they are left for a later run, which then
        reads the records files themselves; the error is returned, not raised."""
        if server not in self._index_stale:
            return None
        try:
            self._write_index(server)
        except OSError as exc:
            return exc
        self._index_stale.discard(server)
        return None

    def _write_index(self, server):
        scan = self._scans.get(server)
        if scan is None:
            return
        if len(scan.batches) > COMPACT_BATCHES:
            self._compact(server, scan)
        try:
            dir_mtime = os.stat(self._dir(server)).st_mtime_ns
        except FileNotFoundError:
            return
        records = self.records.get(server, {})  # callers flush first: these are the records on disk

        def build(packed):
            files, numbers, entries = [], {}, {}
            for key, record in records.items():
                name = scan.holders.get(key)
                if name is None or name not in scan.stats:
                    continue
                if name not in numbers:
                    numbers[name] = len(files)
                    files.append(_HeldIn(name, *scan.stats[name]))
                entries[key] = _IndexEntry(numbers[name], packed(record))
            return _index_encoder.encode(_Index(dir_mtime, len(entries), files, entries, sorted(scan.batches)))

        try:  # most records hold only valid UTF-8: convert them as they are
            data = build(lambda r: r if type(r) is _PackedRecord else _PackedRecord(**msgspec.structs.asdict(r)))
        except UnicodeEncodeError:
            data = build(lambda r: _PackedRecord(**msgspec.structs.asdict(_to_disk(r))))
        os.makedirs(os.path.dirname(self._index_path(server)), exist_ok=True)
        # The index is only a cache of the records, so a plain rename (no fsync) is enough.
        durable.replace_unsynced(self._index_path(server), data)


def read_records(state_dir, server):
    """The latest record of each file of `server`, by key, read from disk without changing it."""
    return Store(state_dir)._read_dir(server).records
