"""The stage actions (fetch → verify → extract → place) that doit tasks call, and the run context they share."""

import collections
import os
import threading
import time
import uuid

import msgspec
from doit.exceptions import TaskFailed

from . import codecs, durable, logs, planning, state
from .faults import crashpoint
from .errors import ArchiveError, CorruptArchive, RemoteError, RemoteFileMissing
from .layout import Layout
from .remote import Connection
from .retry import call_with_retry

_encoder = msgspec.json.Encoder()


class Runtime:
    """Everything one run shares: settings, state store, connections, plans and outcomes."""

    def __init__(self, settings, store=None):
        self.settings = settings
        self.layout = Layout(settings)
        self.store = store or state.Store(settings.state_dir)
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.log = logs.get()
        self.connections = {s.name: Connection(settings, s) for s in settings.servers}
        self.plans = {}  # server -> Plan
        self.listing_errors = {}  # server -> message
        self.planned = {}  # (server, key) -> Record not yet on disk
        self.listed = {}  # (server, key) -> (size, mtime) listed now, for parked records
        self.fetched = {}  # (server, key) -> outcome of this run's batch fetch
        self._server_locks = collections.defaultdict(threading.Lock)
        self._slots = collections.defaultdict(lambda: threading.BoundedSemaphore(settings.max_per_server))
        self._sha_owner = {}  # server -> sha256 -> key
        self._owners = {}  # server -> path under the data tree -> key

    # --- records ------------------------------------------------------------------------

    def record(self, server, key):
        """The latest record known for `key`: saved this run, loaded at start, or only planned."""
        rec = self.store.records.get(server, {}).get(key)
        return rec if rec is not None else self.planned.get((server, key))

    def save(self, rec, **changes):
        """Apply `changes` and write the record durably, stamped with this run."""
        for name, value in changes.items():
            setattr(rec, name, value)
        self.store.save(rec, run_id=self.run_id)
        owners = self._path_owners(rec.server)
        for path in (rec.extracted_path, rec.source_path):
            if path:
                owners[path] = rec.key
        return rec

    def _path_owners(self, server):
        if server not in self._owners:
            self._owners[server] = {
                path: r.key for r in self.store.records.get(server, {}).values()
                for path in (r.extracted_path, r.source_path) if path}
        return self._owners[server]

    def taken(self, server, path, key):
        """True when `path` belongs to another record of `server`."""
        return self._path_owners(server).get(path, key) != key

    def unique_path(self, server, directory, name, key):
        """`directory/name`, or a key-suffixed variant when another record owns that path."""
        path = os.path.join(directory, name)
        return path if not self.taken(server, path, key) else os.path.join(directory, f"{name}~{key[:8]}")

    def emit(self, level, message, rec=None, **fields):
        """Log one structured event about `rec`."""
        extra = dict(fields)
        if rec is not None:
            extra.setdefault("server", rec.server)
            extra.setdefault("file", planning.label(rec.remote_path or rec.local_name))
        self.log.log(level, message, extra=extra)

    def slot(self, server):
        """The per-server concurrency cap."""
        return self._slots[server]

    def sha_owner(self, server):
        """sha256 → key of every file of `server` already extracted or on its way (not duplicates)."""
        if server not in self._sha_owner:
            self._sha_owner[server] = {
                r.sha256: r.key for r in self.store.records.get(server, {}).values()
                if r.sha256 and not r.duplicate_of
                and r.status in (state.VERIFIED, state.EXTRACTED, state.PROCESSED)}
        return self._sha_owner[server]


RUNTIME = None  # set by relay.tasks when the dodo file loads, or by tests


def _rt():
    if RUNTIME is None:
        raise RuntimeError("relay.stages.RUNTIME is not set")
    return RUNTIME


# --- parking -----------------------------------------------------------------------------

def park(rt, rec, kind, error):
    """Move a failed file to error/<kind>/<server>/ and record why; it waits there for a recovery."""
    message = str(error)
    directory = rt.layout.error(kind, rec.server)
    os.makedirs(directory, exist_ok=True)
    incoming = os.path.join(rt.layout.incoming(rec.server), rec.local_name)
    target = rt.unique_path(rec.server, directory, rec.local_name, rec.key)
    if kind == "copy" or not os.path.exists(incoming):
        target = target + ".error.json"
        durable.write_atomic(target, _encoder.encode({"server": rec.server, "file": planning.label(
            rec.remote_path or rec.local_name), "error": message, "run_id": rt.run_id}))
    else:
        durable.move_durably(incoming, target)
    rt.save(rec, status=state.ERROR, error_kind=kind, last_error=message, source_path=target)
    rt.emit(40, f"parked in error/{kind}: {message}", rec, operation="park", error=message)


def unpark(rt, rec):
    """Bring a parked file back to the stage that failed, with fresh attempt counters."""
    stage = state.ERROR_STAGE.get(rec.error_kind, "extract")
    attempts = {k: v for k, v in rec.attempts.items() if k != stage}
    source, status = rec.source_path, state.COPIED
    if rec.origin == "remote" and rec.error_kind in ("copy", "quarantine"):
        # Fetch afresh: the fault may have been in transit, or fixed on the server since.
        status = state.PENDING
        size, mtime = rt.listed.get((rec.server, rec.key), (rec.size, rec.mtime))
        rec.size, rec.mtime = size, mtime
        if source.endswith(".error.json"):
            durable.unlink_durably(source)
            source = ""
    elif os.path.exists(source):
        durable.move_durably(source, os.path.join(rt.layout.incoming(rec.server), rec.local_name))
        source = ""
        if rec.sha256 and rec.error_kind == "extract":
            status = state.VERIFIED
    rt.emit(20, f"recovering from error/{rec.error_kind}", rec, operation="recover")
    return rt.save(rec, status=status, error_kind="", last_error="", source_path=source, attempts=attempts)


def _count(rec, stage):
    rec.attempts = {**rec.attempts, stage: rec.attempts.get(stage, 0) + 1}
    return rec.attempts[stage]


# --- fetch -------------------------------------------------------------------------------

def fetch_file(server, key):
    """doit action: make sure `key` is fetched (one batched rsync per server and remote directory)."""
    rt = _rt()
    rec = rt.record(server, key)
    if rec is None or rec.status != state.PENDING:
        return True
    with rt._server_locks[server]:
        if (server, key) not in rt.fetched:
            wanted = [w.key for w in rt.plans[server].due if w.first == "fetch"] if server in rt.plans else []
            batch = [k for k in dict.fromkeys(wanted + [key]) if (server, k) not in rt.fetched
                     and getattr(rt.record(server, k), "status", None) == state.PENDING]
            with rt.slot(server):
                fetch_batch(rt, server, [rt.record(server, k) for k in batch])
    return True


def fetch_batch(rt, server, records):
    """Fetch `records` with one rsync per remote directory, retrying transient faults, parking the rest."""
    by_dir = collections.defaultdict(list)
    for rec in records:
        by_dir[os.path.dirname(rec.remote_path)].append(rec)
    for remote_dir, group in by_dir.items():
        _fetch_dir(rt, server, remote_dir, group)


def _fetch_dir(rt, server, remote_dir, group):
    settings = rt.settings
    staging = rt.layout.staging(server, remote_dir)
    conn = rt.connections[server]
    waiting = {os.path.basename(r.remote_path): r for r in group}
    started = time.monotonic()

    def attempt():
        for rec in waiting.values():
            _count(rec, "fetch")
        try:
            conn.fetch(remote_dir, sorted(waiting), staging)
        finally:
            # rsync may fail for some files and still deliver the others: keep what arrived.
            for name in list(waiting):
                staged = os.path.join(staging, name)
                if os.path.exists(staged):
                    _publish_fetched(rt, waiting.pop(name), staged, started)

    def on_failure(exc, number):
        rt.emit(30, f"fetch attempt {number} failed: {exc}", None, server=server, operation="fetch",
                attempt=number, error=str(exc))

    try:
        call_with_retry(attempt, attempts=settings.max_retry_copy, base=settings.retry_delay_base,
                        cap=settings.retry_delay_max, is_transient=lambda e: getattr(e, "transient", False),
                        on_failure=on_failure)
    except RemoteError as exc:
        for rec in waiting.values():
            rt.fetched[(server, rec.key)] = "error"
            park(rt, rec, "copy", exc)
        waiting.clear()
    for rec in waiting.values():  # rsync succeeded but the file was not there
        rt.fetched[(server, rec.key)] = "missing"
        park(rt, rec, "copy", RemoteFileMissing(
            f"{server}:{planning.label(rec.remote_path)}: vanished between listing and fetch"))


def _publish_fetched(rt, rec, staged, started):
    target = os.path.join(rt.layout.incoming(rec.server), rec.local_name)
    durable.fsync_file(staged)
    durable.move_durably(staged, target)
    crashpoint("fetch")
    rt.fetched[(rec.server, rec.key)] = "copied"
    superseded = rec.source_path  # a quarantined copy, replaced by this fresh one
    rt.save(rec, status=state.COPIED, source_path="")
    if superseded:
        durable.unlink_durably(superseded)
    rt.emit(20, "fetched", rec, operation="fetch", bytes=os.path.getsize(target),
            duration_ms=round((time.monotonic() - started) * 1000, 1))


# --- verify ------------------------------------------------------------------------------

def verify_file(server, key):
    """doit action: hash, detect the format, check size and mtime against the listing, spot duplicates."""
    rt = _rt()
    rec = rt.record(server, key)
    if rec is not None and rec.status == state.COPIED:
        with rt.slot(server):
            _verify(rt, rec)
    return True


def _verify(rt, rec):
    path = os.path.join(rt.layout.incoming(rec.server), rec.local_name)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if rec.origin == "local":
            rt.emit(30, "dropped file disappeared before it was verified", rec, operation="verify")
            return
        rt.save(rec, status=state.PENDING)
        rt.emit(30, "fetched copy missing from incoming/; it will be fetched again", rec, operation="verify")
        return
    listed_mtime = int(float(rec.mtime))
    if rec.origin == "remote" and (st.st_size, int(st.st_mtime)) != (rec.size, listed_mtime):
        # The file changed between the listing and the transfer: leave it for a later, stable run.
        durable.unlink_durably(path)
        rt.save(rec, status=state.PENDING)
        rt.emit(30, f"changed during the run (listed {rec.size} bytes, got {st.st_size}); left for a "
                "later run", rec, operation="verify")
        return
    if rec.origin == "local" and st.st_size != rec.size:
        rt.emit(30, "dropped file is still changing; left for a later run", rec, operation="verify")
        return
    sha, fmt = codecs.hash_and_detect(path)
    rec.sha256, rec.format = sha, fmt
    if fmt not in codecs.SUPPORTED:
        park(rt, rec, "quarantine", CorruptArchive(
            f"{rec.local_name}: unknown format (magic bytes match none of {', '.join(codecs.SUPPORTED)})"))
        return
    owners = rt.sha_owner(rec.server)
    with rt._server_locks[("sha", rec.server)]:
        owner = owners.get(sha)
        if owner is None or owner == rec.key:
            owners[sha] = rec.key
            owner = None
    if owner is not None:
        _place_source(rt, rec, path)
        rt.save(rec, status=state.PROCESSED, duplicate_of=owner)
        rt.emit(20, f"duplicate of an already processed file ({owner}); not extracted again", rec,
                operation="verify")
        return
    rt.save(rec, status=state.VERIFIED)
    rt.emit(20, "verified", rec, operation="verify", bytes=st.st_size)


# --- extract and place -------------------------------------------------------------------

def extract_file(server, key):
    """doit action: bring one file through whatever stages remain, up to placed and processed.

    Returns `{"parked": bool}`: doit keeps it, and `recorded_parked` reads it back to leave a parked
    file alone until `doit forget` drops that value.
    """
    rt = _rt()
    rec = rt.record(server, key)
    if rec is None:
        return {"parked": False}
    if rec.parked:
        if rec.run_id == rt.run_id:
            return {"parked": True}  # parked by this very run: it waits for an explicit recovery
        rec = unpark(rt, rec)
    if rec.status == state.PENDING:
        fetch_file(server, key)
        rec = rt.record(server, key)
    with rt.slot(server):
        if rec.status == state.COPIED:
            _verify(rt, rec)
        if rec.status == state.VERIFIED:
            _extract(rt, rec)
        if rec.status == state.EXTRACTED:
            _place(rt, rec)
    return {"parked": rec.parked}


def recorded_parked(task, values):
    """doit uptodate check: True while doit remembers that this file's task left it parked."""
    return values.get("parked") is True


def _extract(rt, rec):
    settings = rt.settings
    src = os.path.join(rt.layout.incoming(rec.server), rec.local_name)
    if not os.path.exists(src):
        rt.save(rec, status=state.PENDING if rec.origin == "remote" else rec.status)
        rt.emit(30, "source missing from incoming/; it will be fetched again", rec, operation="extract")
        return
    name = codecs.output_name(planning.versioned(rec.local_name, rec.generation, rec.sha256), rec.format)
    target = rt.unique_path(rec.server, rt.layout.extracted(rec.server), name, rec.key)
    tmp = os.path.join(rt.layout.extract_tmp(rec.server), f"{rec.key}.part")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    started = time.monotonic()

    def attempt():
        _count(rec, "extract")
        return codecs.extract(src, tmp, rec.format, max_bytes=settings.max_extracted_bytes,
                              min_free=settings.min_free_bytes)

    def on_failure(exc, number):
        if isinstance(exc, ArchiveError):
            rt.emit(30, f"extract attempt {number} failed: {exc}", rec, operation="extract",
                    attempt=number, error=str(exc))

    try:
        size, sha = call_with_retry(attempt, attempts=settings.max_retry_extract,
                                    base=settings.retry_delay_base, cap=settings.retry_delay_max,
                                    is_transient=lambda e: isinstance(e, ArchiveError), on_failure=on_failure)
    except CorruptArchive as exc:
        if rec.origin == "remote" and _still_changing(rt, rec):
            durable.unlink_durably(src)
            rt.save(rec, status=state.PENDING)
            rt.emit(30, "truncated and still changing on the server; it will be fetched again", rec,
                    operation="extract", error=str(exc))
            return
        park(rt, rec, "quarantine", exc)
        return
    except ArchiveError as exc:
        park(rt, rec, "extract", exc)
        return
    durable.move_durably(tmp, target)
    crashpoint("place")
    rt.save(rec, status=state.EXTRACTED, extracted_path=target, extracted_size=size, extracted_sha256=sha)
    rt.emit(20, "extracted", rec, operation="extract", bytes=size,
            duration_ms=round((time.monotonic() - started) * 1000, 1))


def _still_changing(rt, rec):
    """Ask the server whether the file's size or mtime moved since the listing (one round trip)."""
    try:
        entry = rt.connections[rec.server].stat_path(rec.remote_path)
    except (RemoteError, UnicodeError):
        return False
    return entry is not None and (entry.size, entry.mtime) != (rec.size, rec.mtime)


def _place_source(rt, rec, path):
    """Keep the compressed source under processed/ or delete it, per delete_source."""
    if rt.settings.delete_source:
        durable.unlink_durably(path)
        rec.source_path = ""
        return
    name = planning.versioned(rec.local_name, rec.generation, rec.sha256)
    target = rt.unique_path(rec.server, rt.layout.processed(rec.server), name, rec.key)
    if os.path.exists(path):
        durable.move_durably(path, target)
    rec.source_path = target


def _place(rt, rec):
    path = os.path.join(rt.layout.incoming(rec.server), rec.local_name)
    if os.path.exists(path):
        _place_source(rt, rec, path)
    crashpoint("place-source")
    rt.save(rec, status=state.PROCESSED)
    rt.emit(20, "processed", rec, operation="place")


# --- per-server summary ------------------------------------------------------------------

RECOVER_HINT = {
    "copy": "check the path and permissions on the server",
    "extract": "free disk space or fix the local problem",
    "quarantine": "replace the file on the server if it is really corrupt",
}


def server_summary(server):
    """doit action of the per-server group: fail when this run parked a file or could not list the server."""
    rt = _rt()
    problems, kinds = [], set()
    if server in rt.listing_errors:
        problems.append(f"listing failed: {rt.listing_errors[server]}")
    for rec in rt.store.records.get(server, {}).values():
        if rec.parked and rec.run_id == rt.run_id:
            kinds.add(rec.error_kind)
            problems.append(f"{planning.label(rec.remote_path or rec.local_name)} parked in "
                            f"error/{rec.error_kind}/{server}: {rec.last_error}")
    rt.store.write_index(server)
    if not problems:
        return True
    hints = [f"then recover with: doit forget -s recover:{kind}/{server} && doit run  ({RECOVER_HINT[kind]})"
             for kind in sorted(kinds)]
    return TaskFailed(logs.printable("\n  ".join([f"{server}: {len(problems)} problem(s):", *problems, *hints])))
