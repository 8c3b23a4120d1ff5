"""The stage actions doit calls — fetch (batched per server), then verify → extract → place in one pass
per file — and the run context they share."""

import collections
import concurrent.futures
import os
import queue
import shutil
import stat
import tempfile
import threading
import time
import uuid

import msgspec
from doit.exceptions import TaskFailed

from . import codecs, durable, helpers, logs, planning, state
from .errors import (ArchiveError, CorruptArchive, RemoteError, RemoteFileMissing, SourceChanged, SourceGone,
                     StateWriteError)
from .faults import crashpoint
from .layout import Layout
from .remote import Connection
from .retry import call_with_retry

_encoder = msgspec.json.Encoder()

# Finished records are made durable in batches: at most this many, or this old, before a flush.
FLUSH_RECORDS = 4096
FLUSH_SECONDS = 5.0
FLUSH_BYTES = 256 * 2**20
# Compressed size from which a file counts as large for extraction (see submit_extract).
LARGE_BYTES = 256 * 2**10


class Tokens:
    """A counting semaphore on a C-level queue: taken and given back for every small file, where
    threading.Semaphore's Python-level Condition costs more than the rest of the bookkeeping."""

    def __init__(self, count):
        self.count = count
        self._free = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(None)

    def acquire(self, blocking=True):
        """Take a token (waiting for one if `blocking`); False if none is free and not `blocking`."""
        try:
            self._free.get(block=blocking)
        except queue.Empty:
            return False
        return True

    def release(self):
        """Give a token back."""
        self._free.put(None)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class Arrivals:
    """Files whose fetch is under way; `wait` blocks until `arrived` (cheap for the many nobody waits for)."""

    def __init__(self):
        self._pending = set()
        self._changed = threading.Condition(threading.Lock())
        self._waiters = 0

    def expect(self, items):
        """Mark `items` as on their way."""
        with self._changed:
            self._pending.update(items)

    def arrived(self, item):
        """`item` is in place, or given up on: wake whoever waits for it."""
        with self._changed:
            self._pending.discard(item)
            if self._waiters:
                self._changed.notify_all()

    def wait(self, item):
        """Block while `item` is on its way."""
        with self._changed:
            self._waiters += 1
            try:
                while item in self._pending:
                    self._changed.wait()
            finally:
                self._waiters -= 1


class Runtime:
    """Everything one run shares: settings, state store, connections, plans and outcomes."""

    def __init__(self, settings, store=None, environ=None):
        self.settings = settings
        self.layout = Layout(settings)
        self.store = store or state.Store(settings.state_dir)
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.started = time.monotonic()
        self.log = logs.get()
        self.connections = {s.name: Connection(settings, s, environ) for s in settings.servers}
        self.plans = {}  # server -> Plan
        self.listing_errors = {}  # server -> message
        self.planned = {}  # (server, key) -> Record not yet on disk
        self.listed = {}  # (server, key) -> (size, mtime) listed now, for parked records
        self.fetched = set()  # (server, key) whose fetch this run already started
        self.submitted = set()  # (server, key) handed to the extraction workers
        self.arrivals = Arrivals()  # of (server, key): in incoming/ (or given up)
        self.fetch_pool = None
        self.fetch_futures = collections.defaultdict(list)
        self.small_lane = None  # extraction of small files (see submit_extract)
        self.large_lane = None  # extraction of large files
        self.awaited = set()  # servers whose extract:<server> group runs this invocation and waits
        self.named_tasks = set()  # extract:<server>/<file> tasks named on the command line
        self.prepare = None  # one-off work before the first action (set by relay.tasks.load)
        self._locks = collections.defaultdict(threading.Lock)
        # Made up front: creating them on first use from several threads could make two for one server.
        self._slots = {s.name: Tokens(settings.max_per_server) for s in settings.servers}
        self.workers = Tokens(settings.max_workers)  # the global cap on extraction
        self._sha_owner = {}  # server -> sha256 -> key
        self._owners = {}  # server -> path under the data tree -> key
        self._pending = []  # records finished in memory, waiting for the next batch flush
        self._pending_bytes = 0
        self._last_flush = time.monotonic()

    # --- records ------------------------------------------------------------------------

    def record(self, server, key):
        """The latest record known for `key`: saved this run, loaded at start, or only planned."""
        rec = self.store.records.get(server, {}).get(key)
        return rec if rec is not None else self.planned.get((server, key))

    def _apply(self, rec, changes):
        for name, value in changes.items():
            setattr(rec, name, value)
        owners = self._path_owners(rec.server)
        for path in (rec.extracted_path, rec.source_path):
            if path:
                owners[path] = rec.key

    def save(self, rec, **changes):
        """Apply `changes` and write the record durably now (rare transitions)."""
        self._apply(rec, changes)
        try:
            self.store.save(rec, run_id=self.run_id)
        except OSError as exc:
            raise self._state_error(exc, 1) from None
        return rec

    def _state_error(self, exc, count):
        return StateWriteError(
            f"{self.settings.state_dir}: could not write the state records of {count} file(s) "
            f"({exc.strerror or exc}); nothing is lost: the next run does those files again, to the same "
            "paths. Free space on that filesystem (or fix the error), then rerun")

    def defer(self, rec, nbytes=0, **changes):
        """Apply `changes` now; the record reaches disk with the next batch flush, after the files it names."""
        self._apply(rec, changes)
        rec.run_id = self.run_id
        self.store.records.setdefault(rec.server, {})[rec.key] = rec
        with self._locks["flush"]:
            self._pending.append(rec)
            self._pending_bytes += nbytes
            due = (len(self._pending) >= FLUSH_RECORDS or self._pending_bytes >= FLUSH_BYTES
                   or time.monotonic() - self._last_flush >= FLUSH_SECONDS)
        if due:
            self.flush()
        return rec

    def flush(self):
        """Make the batch durable: first the data files (one syncfs), then the records that name them."""
        with self._locks["flush"]:
            batch, self._pending, self._pending_bytes = self._pending, [], 0
            self._last_flush = time.monotonic()
            if not batch:
                return
            try:
                durable.syncfs(self.settings.data_root)
                self.store.save_batch(batch, run_id=self.run_id)
            except OSError as exc:
                raise self._state_error(exc, len(batch)) from None

    def _path_owners(self, server):
        if server not in self._owners:
            self._owners[server] = {
                path: r.key for r in self.store.records.get(server, {}).values()
                for path in (r.extracted_path, r.source_path) if path}
        return self._owners[server]

    def unique_path(self, server, directory, name, key):
        """`directory/name`, or a key-suffixed variant when another record owns that path."""
        path = f"{directory}/{name}"
        if self._path_owners(server).get(path, key) == key:
            return path
        return f"{directory}/{name}~{key[:8]}"

    def emit(self, level, message, rec=None, **fields):
        """Log one structured event about `rec`."""
        if not self.log.isEnabledFor(level):
            return
        if rec is not None:  # `fields` is this call's own dict
            fields.setdefault("server", rec.server)
            fields.setdefault("file", planning.label(rec.remote_path or rec.local_name))
        logs.note(self.log, level, message, fields)

    def slot(self, server):
        """The per-server concurrency cap."""
        return self._slots[server]

    def claim_sha(self, server, sha, key):
        """Claim content `sha` for `key`; return the key that already owns it, or None."""
        with self._locks[("sha", server)]:
            if server not in self._sha_owner:
                self._sha_owner[server] = {
                    r.sha256: r.key for r in self.store.records.get(server, {}).values()
                    if r.sha256 and not r.duplicate_of
                    and r.status in (state.VERIFIED, state.EXTRACTED, state.PROCESSED)}
            owners = self._sha_owner[server]
            owner = owners.setdefault(sha, key)
            return None if owner == key else owner


RUNTIME = None  # set by relay.tasks when the dodo file loads, or by tests


def _rt():
    """The run's Runtime, its data tree made and stale temps swept before any work starts.

    Done on first use (the first action, or a doit run starting its work while it loads), never for
    `doit list`, `info` or `forget`, which write nothing."""
    rt = RUNTIME
    if rt is None:
        raise RuntimeError("relay.stages.RUNTIME is not set")
    with rt._locks["prepare"]:
        if rt.prepare is not None:
            rt.prepare, prepare = None, rt.prepare
            prepare()
    return rt


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
        rec.size, rec.mtime = rt.listed.get((rec.server, rec.key), (rec.size, rec.mtime))
        if source.endswith(".error.json"):
            durable.unlink_durably(source)
            source = ""
    elif os.path.exists(source):
        durable.move_durably(source, os.path.join(rt.layout.incoming(rec.server), rec.local_name))
        source = ""
    rt.emit(20, f"recovering from error/{rec.error_kind}", rec, operation="recover")
    return rt.save(rec, status=status, error_kind="", last_error="", source_path=source, attempts=attempts)


def _count(rec, stage):
    rec.attempts = {**rec.attempts, stage: rec.attempts.get(stage, 0) + 1}
    return rec.attempts[stage]


# --- fetch -------------------------------------------------------------------------------

def fetch_server(server, only=""):
    """doit action of `fetch:<server>`: fetch every due file of the server (or only the one labelled `only`)."""
    rt = _rt()
    plan = rt.plans.get(server)
    keys = [w.key for w in plan.due if w.first == "fetch"] if plan else []
    if only:
        labels = {planning.label(rt.record(server, k).local_name): k for k in keys}
        if only not in labels:
            return TaskFailed(f"{server}: no file called {only!r} is due for fetching "
                              f"(due: {', '.join(sorted(labels)) or 'none'}); see `doit list --all`")
        keys = [labels[only]]
    if server in rt.awaited and not only:
        start_server(server)  # started while doit loaded; this adds nothing then
        return True
    start_fetch(rt, server, keys)
    for future in list(rt.fetch_futures.get(server, ())):
        future.result()
    return True


def start_server(server):
    """Start all of a server's due work in the background: its batch fetch (each arrival goes on to
    extraction) and the extraction of files already in incoming/. `settle:<server>` waits for it."""
    rt = _rt()
    plan = rt.plans.get(server)
    if plan is None:
        return
    start_fetch(rt, server, [w.key for w in plan.due if w.first == "fetch"])
    for work in plan.due:
        if work.first != "fetch":  # a local drop, or a copy an earlier run fetched
            submit_extract(rt, server, work.key)


def start_fetch(rt, server, keys):
    """Start, in the background, one batch fetch of those `keys` that are pending and not yet tried this run.

    Each file's arrival is signalled on its own, so extraction starts while the batch goes on."""
    with rt._locks[("fetch", server)]:
        batch = [rt.record(server, k) for k in dict.fromkeys(keys) if (server, k) not in rt.fetched]
        batch = [rec for rec in batch if rec is not None and rec.status == state.PENDING]
        if not batch:
            return
        rt.fetched.update((server, rec.key) for rec in batch)
        rt.arrivals.expect([(server, rec.key) for rec in batch])
        with rt._locks["pool"]:
            if rt.fetch_pool is None:
                # One transfer per server at once; a sequential run (max_workers 1) takes servers in turn.
                servers = 1 if rt.settings.max_workers == 1 else len(rt.settings.enabled_servers)
                rt.fetch_pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=max(1, servers), thread_name_prefix="fetch")
        rt.fetch_futures[server].append(rt.fetch_pool.submit(_fetch_batch, rt, server, batch))


def wait_fetched(rt, server, key):
    """Block until the batch that carries `key` has delivered or given up on it."""
    rt.arrivals.wait((server, key))


def _fetch_batch(rt, server, batch):
    by_dir = collections.defaultdict(list)
    for rec in batch:
        by_dir[os.path.dirname(rec.remote_path)].append(rec)
    try:
        with rt.slot(server):
            for remote_dir, group in by_dir.items():
                _fetch_dir(rt, server, remote_dir, group)
    finally:
        for rec in batch:  # whatever happened, nobody waits forever
            rt.arrivals.arrived((server, rec.key))


def _fetch_dir(rt, server, remote_dir, group):
    area = rt.layout.fetch_area(server)
    os.makedirs(area, exist_ok=True)
    staging = tempfile.mkdtemp(prefix="batch-", dir=area)  # 0700, this batch's alone
    try:
        _fetch_into(rt, server, remote_dir, group, staging)
    finally:
        _clear_staging(rt, server, staging, {os.path.basename(r.remote_path) for r in group})


def _clear_staging(rt, server, staging, asked):
    """Remove a batch's landing directory; say so if the server sent files nobody asked for."""
    try:
        unasked = sorted(n for n in os.listdir(staging) if n not in asked and not n.startswith("."))
    except OSError:
        unasked = []
    if unasked:
        shown = ", ".join(planning.label(n) for n in unasked[:3]) + (", …" if len(unasked) > 3 else "")
        rt.emit(30, f"the server sent {len(unasked)} file(s) that were not asked for ({shown}); "
                "removed, not processed", None, server=server, operation="fetch")
    shutil.rmtree(staging, ignore_errors=True)  # what stays (an I/O error) goes at the next run's sweep


def _fetch_into(rt, server, remote_dir, group, staging):
    settings = rt.settings
    incoming = rt.layout.incoming(server)
    conn = rt.connections[server]
    waiting = {os.path.basename(r.remote_path): r for r in group}
    started = time.monotonic()
    arrived = []

    def land(name, reported=True):
        """Move a completed file from rsync's landing area into incoming/ and wake its extractor.

        `reported`: rsync reported it (a directory it would report with a trailing slash); else,
        at the sweep after rsync exits, it must be a regular file (not a name that became a
        directory on the server since the listing)."""
        rec = waiting.get(name)
        if rec is None:
            return
        try:
            if not reported and not stat.S_ISREG(os.lstat(f"{staging}/{name}").st_mode):
                return  # left in the landing directory, removed with it; the file is parked below
            os.replace(f"{staging}/{name}", f"{incoming}/{rec.local_name}")
        except FileNotFoundError:
            return  # not renamed into place yet: the sweep after rsync exits takes it
        del waiting[name]
        crashpoint("fetch")
        if rec.source_path:  # a quarantined copy, superseded by this fresh fetch
            durable.unlink_durably(rec.source_path)
        # No record written: the next run's planner finds the copy in incoming/ by name, size and mtime.
        rt._apply(rec, {"status": state.COPIED, "source_path": ""})
        arrived.append(rec)
        rt.arrivals.arrived((server, rec.key))
        if server in rt.awaited:
            submit_extract(rt, server, rec.key)

    reported_before = []  # reported by rsync, not landed yet

    def reported(name):
        # rsync logs a file just before renaming it into place, and handles files one after the
        # other: when it reports a file, the ones it reported before are surely in place.
        for earlier in reported_before:
            land(earlier)
        reported_before[:] = [n for n in reported_before if n in waiting]
        reported_before.append(name)

    def attempt():
        for rec in waiting.values():
            _count(rec, "fetch")
        try:
            conn.fetch(remote_dir, sorted(waiting), staging, on_file=reported)
        finally:
            # rsync may fail for some files and still deliver the others: keep what arrived.
            for name in list(waiting):
                land(name, reported=False)

    def on_failure(exc, number):
        rt.emit(30, f"fetch attempt {number} failed: {exc}", None, server=server, operation="fetch",
                attempt=number, error=str(exc))

    try:
        call_with_retry(attempt, attempts=settings.max_retry_copy, base=settings.retry_delay_base,
                        cap=settings.retry_delay_max, is_transient=lambda e: getattr(e, "transient", False),
                        on_failure=on_failure)
    except RemoteError as exc:
        for rec in waiting.values():
            park(rt, rec, "copy", exc)
        waiting.clear()
    for rec in waiting.values():  # rsync succeeded but the file was not there
        park(rt, rec, "copy", RemoteFileMissing(
            f"{server}:{planning.label(rec.remote_path)}: vanished, or is no longer a regular file, between "
            "listing and fetch"))
    if arrived:
        rt.emit(20, f"fetched {len(arrived)} file(s)", None, server=server, operation="fetch",
                bytes=sum(r.size for r in arrived), duration_ms=round((time.monotonic() - started) * 1000, 1))


# --- verify, extract, place: one read of each file ---------------------------------------

def process_file(server, key):
    """doit action of `extract:<server>/<file>`: bring one file through whatever stages remain.

    When this run's `extract:<server>` group waits for the server, the file joins its background
    work and the group reports the outcome; the task returns {"ran": True}, which doit keeps and
    `recorded_run` reads back to leave a parked file alone until `doit forget` drops it. Otherwise
    the file is done here and now, and the task fails if the file had to be parked.
    """
    rt = _rt()
    rec = rt.record(server, key)
    if rec is None:
        return {"ran": True}
    if rec.parked:
        if rec.run_id == rt.run_id:
            return {"ran": True}  # parked by this very run: it waits for an explicit recovery
        rec = unpark(rt, rec)
    if server in rt.awaited:
        if rec.status == state.PENDING:
            start_fetch(rt, server, [key])  # its arrival hands it to the background work
        else:
            submit_extract(rt, server, key)
        return {"ran": True}
    try:
        _advance(rt, server, key)
        rt.flush()  # no group runs after this task to make it durable
    except StateWriteError as exc:
        return TaskFailed(logs.printable(f"{server}: {exc}"))
    rec = rt.record(server, key)
    if rec.parked and rec.run_id == rt.run_id:
        # Failed, so doit does not remember it: running this task again is what retries the file.
        return TaskFailed(logs.printable(f"{server}: {_parked_line(rec)}\n  fix it, then run this task "
                                         f"again ({RECOVER_HINT[rec.error_kind]})"))
    return {"ran": True}


def submit_extract(rt, server, key):
    """Queue verify → extract → place of one fetched file on the background workers (once per run)."""
    with rt._locks["pool"]:
        if (server, key) in rt.submitted:
            return
        rt.submitted.add((server, key))
        if rt.small_lane is None:
            # Large files: their work is in C (isal, hashing, I/O) and runs on every core at once.
            # Small ones: half Python, which runs on one core at a time, so one thread takes them in
            # turn (measured: a second one only fights the first for the GIL); with the helper
            # process of a doit run, their inflating runs there, beside that thread's Python.
            helper = helpers.get()
            rt.large_lane = Lane("large", threads=rt.settings.max_workers)
            rt.small_lane = Lane("small", work=(lambda lane: _work_with_helper(lane, helper)) if helper else None)
        rec = rt.record(server, key)
        lane = rt.large_lane if rec is not None and rec.size >= LARGE_BYTES else rt.small_lane
        lane.submit(server, _advance, rt, server, key)


def _advance(rt, server, key):
    rec = _ready(rt, server, key)
    with rt.workers, rt.slot(server):
        if rec.status in (state.COPIED, state.VERIFIED):
            _extract(rt, rec)
        _finish(rt, rec)


def _ready(rt, server, key, before_fetch=None):
    """The file's record once its copy is in incoming/, fetching it first if need be (after calling
    `before_fetch`)."""
    rec = rt.record(server, key)
    if (rec.origin == "remote" and rec.status in (state.COPIED, state.VERIFIED) and (server, key) not in rt.fetched
            and not os.path.exists(f"{rt.layout.incoming(server)}/{rec.local_name}")):
        # An interrupted run moved or lost the fetched copy before recording it: fetch it again now.
        rt.save(rec, status=state.PENDING)
        rt.emit(30, "fetched copy missing from incoming/; fetching it again", rec, operation="verify")
    if rec.status == state.PENDING:
        if before_fetch is not None:
            before_fetch()
        start_fetch(rt, server, [key])
        wait_fetched(rt, server, key)
        rec = rt.record(server, key)
    return rec


def _finish(rt, rec):
    """File an extracted file's source and record it as processed (durable at the next flush)."""
    if rec.status == state.EXTRACTED:
        _place(rt, rec)
        rt.defer(rec, nbytes=rec.extracted_size, status=state.PROCESSED)
        rt.emit(20, "processed", rec, operation="extract", bytes=rec.extracted_size)


def _take_caps(rt, server, blocking):
    """Take the global and the per-server cap for one file; False if `blocking` is off and one is full."""
    if not rt.workers.acquire(blocking):
        return False
    if not rt.slot(server).acquire(blocking):
        rt.workers.release()
        return False
    return True


def _release_caps(rt, server):
    rt.slot(server).release()
    rt.workers.release()


def _work_with_helper(lane, helper):
    """The small-file lane with the helper process: while the helper inflates one file, this thread
    does the checks before the next one and the filing after the previous one.

    At most two files are in flight, each holding its caps; a cap that is full while a file is in
    flight is waited for only after that file is done (waiting first could wait on ourselves)."""
    in_flight = collections.deque()  # (server, rt, rec, (src, tmp, started, expect))

    def end_oldest():
        nonlocal helper
        server, rt, rec, begun = in_flight.popleft()
        error = None
        try:
            outcome = None
            if helper is not None:
                try:
                    outcome = helper.receive()
                except helpers.HelperGone as exc:
                    helper = _helper_gone(rt, exc)
            _extract_end(rt, rec, *begun, first=outcome)  # with no outcome: inflates in-process
            _finish(rt, rec)
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits for the server
            error = exc
        finally:
            _release_caps(rt, server)
            lane.finished(server, error)

    def end_all():
        while in_flight:
            end_oldest()

    while True:
        job = lane.take(block=not in_flight) if len(in_flight) < 2 else None
        if job is None:
            end_oldest()
            continue
        server, _, (rt, _, key) = job
        error = None
        try:
            # A fetch takes a per-server cap: hold none while waiting for one.
            rec = _ready(rt, server, key, before_fetch=end_all)
            while not _take_caps(rt, server, blocking=not in_flight):
                end_oldest()
        except Exception as exc:  # noqa: BLE001
            lane.finished(server, exc)
            continue
        try:
            begun = _extract_begin(rt, rec) if rec.status in (state.COPIED, state.VERIFIED) else None
            if begun is not None and helper is not None:
                try:
                    helper.send(begun[0], begun[1], max_bytes=rt.settings.max_extracted_bytes,
                                min_free=rt.settings.min_free_bytes, expect=begun[3])
                    in_flight.append((server, rt, rec, begun))
                    continue  # its caps stay taken until end_oldest
                except helpers.HelperGone as exc:
                    helper = _helper_gone(rt, exc)
            if begun is not None:
                _extract_end(rt, rec, *begun)
            _finish(rt, rec)
        except Exception as exc:  # noqa: BLE001
            error = exc
        _release_caps(rt, server)
        lane.finished(server, error)


def _helper_gone(rt, exc):
    rt.emit(30, f"{exc}; small files are extracted in-process from now on", None, operation="extract",
            error=str(exc))
    return None


def recorded_run(task, values):
    """doit uptodate check of a parked file's task: True while doit remembers running it."""
    return values.get("ran") is True


def _extract(rt, rec):
    _extract_end(rt, rec, *_extract_begin(rt, rec))


def _extract_begin(rt, rec):
    """What inflating `rec` takes: (src, tmp, started, expect), `expect` being the size and mtime its
    copy in incoming/ must still have (a dropped file: its size), checked by codecs.inflate."""
    expect = (rec.size, int(float(rec.mtime)) if rec.origin == "remote" else None)
    return (f"{rt.layout.incoming(rec.server)}/{rec.local_name}", f"{rt.layout.extract_tmp(rec.server)}/{rec.key}.part",
            time.monotonic(), expect)


def _source_moved(rt, rec, src, exc):
    """The copy in incoming/ is gone (SourceGone) or not the file listed (SourceChanged)."""
    if isinstance(exc, SourceGone):
        if rec.origin == "remote":
            rt.save(rec, status=state.PENDING)
            rt.emit(30, "source missing from incoming/; it will be fetched again", rec, operation="verify")
        else:
            rt.emit(30, "dropped file disappeared before it was extracted", rec, operation="verify")
        return
    # The file changed between the listing and the transfer: leave it for a later, stable run.
    if rec.origin == "remote":
        durable.unlink_durably(src)
        rt.save(rec, status=state.PENDING)
    rt.emit(30, f"changed during the run (listed {rec.size} bytes, got {exc.size}); left for a "
            "later run", rec, operation="verify")


def _extract_end(rt, rec, src, tmp, started, expect, first=None):
    """Inflate with retries (`first`: the outcome of a first attempt the helper made), then place the output."""
    settings = rt.settings
    if isinstance(first, codecs.Inflated):  # the helper's attempt succeeded: nothing to retry
        _count(rec, "extract")
        _place_extracted(rt, rec, tmp, first, started)
        return
    if isinstance(first, (SourceGone, SourceChanged)):
        _source_moved(rt, rec, src, first)
        return
    helper_error = [first] if first is not None else []  # the helper's failed attempt counts as the first

    def attempt():
        if helper_error:
            raise helper_error.pop()
        return codecs.inflate(src, tmp, max_bytes=settings.max_extracted_bytes,
                              min_free=settings.min_free_bytes, expect=expect)

    def on_failure(exc, number):
        if not isinstance(exc, (SourceGone, SourceChanged)):  # those extracted nothing: not an attempt
            _count(rec, "extract")
        if isinstance(exc, ArchiveError):
            rt.emit(30, f"extract attempt {number} failed: {exc}", rec, operation="extract",
                    attempt=number, error=str(exc))

    try:
        result = call_with_retry(attempt, attempts=settings.max_retry_extract,
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
    except (SourceGone, SourceChanged) as exc:
        _source_moved(rt, rec, src, exc)
        return
    _count(rec, "extract")
    _place_extracted(rt, rec, tmp, result, started)


def _place_extracted(rt, rec, tmp, result, started):
    """Rename a verified extraction into extracted/, or drop it if the content was processed already."""
    rec.sha256, rec.format = result.sha256, result.format
    owner = rt.claim_sha(rec.server, result.sha256, rec.key)
    if owner is not None:
        os.unlink(tmp)
        _place(rt, rec)
        rt.defer(rec, status=state.PROCESSED, duplicate_of=owner)
        rt.emit(20, f"duplicate of an already processed file ({owner}); not extracted again", rec,
                operation="verify")
        return
    name = codecs.output_name(planning.versioned(rec.local_name, rec.generation, rec.sha256), rec.format)
    target = rt.unique_path(rec.server, rt.layout.extracted(rec.server), name, rec.key)
    os.replace(tmp, target)
    crashpoint("place")
    rt._apply(rec, {"status": state.EXTRACTED, "extracted_path": target, "extracted_size": result.size,
                    "extracted_sha256": result.out_sha256})
    rt.emit(10, "extracted", rec, operation="extract", bytes=result.size,
            duration_ms=round((time.monotonic() - started) * 1000, 1))


def _still_changing(rt, rec):
    """Ask the server whether the file's size or mtime moved since the listing (one round trip)."""
    try:
        entry = rt.connections[rec.server].stat_path(rec.remote_path)
    except (RemoteError, UnicodeError):
        return False
    return entry is not None and (entry.size, entry.mtime) != (rec.size, rec.mtime)


def _place(rt, rec):
    """Keep the compressed source under processed/ or delete it, per delete_source (durable at the flush)."""
    path = f"{rt.layout.incoming(rec.server)}/{rec.local_name}"
    if rt.settings.delete_source:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        rec.source_path = ""
    else:
        name = planning.versioned(rec.local_name, rec.generation, rec.sha256)
        target = rt.unique_path(rec.server, rt.layout.processed(rec.server), name, rec.key)
        try:
            os.replace(path, target)
        except FileNotFoundError:
            pass  # moved already, by a run that stopped before recording it
        rec.source_path = target
    crashpoint("place-source")


# --- per-server summary ------------------------------------------------------------------

RECOVER_HINT = {
    "copy": "check the path and permissions on the server",
    "extract": "free disk space or fix the local problem",
    "quarantine": "replace the file on the server if it is really corrupt",
}


def _wait_all(rt, server, raise_errors=True):
    """Wait for all the server's background fetches and extractions (fetches add extractions as files
    land, and an extraction may start a fetch again), then re-raise the first error one of them raised."""
    errors = []
    while True:
        fetches = list(rt.fetch_futures.get(server, ()))
        concurrent.futures.wait(fetches)
        for lane in (rt.small_lane, rt.large_lane):
            if lane is not None:
                try:
                    lane.wait(server)
                except Exception as exc:  # noqa: BLE001 - raised below, after everything has finished
                    errors.append(exc)
        if len(rt.fetch_futures.get(server, ())) == len(fetches):
            break
    failed = [f.exception() for f in rt.fetch_futures.get(server, ())]
    errors[:0] = [exc for exc in failed if exc is not None]
    if errors and raise_errors:
        raise errors[0]


def _parked_now(rt, server, plan):
    """The due files of `server` that this run parked."""
    parked = []
    for work in plan.due:
        rec = rt.record(server, work.key)
        if rec is not None and rec.parked and rec.run_id == rt.run_id:
            parked.append(work)
    return parked


def due_needing_tasks(server, plan):
    """The due files of `server` that get a doit task of their own.

    In a run of the whole server, its work (started at load) is waited for first; then only the files
    it parked get one (doit runs it, to remember the file until `doit forget`), and those the command
    line names. A finished file needs no task: thousands of them cost more than the work. Otherwise
    (`doit list`, `doit run extract:srv1/FILE`, …) every due file has one."""
    rt = RUNTIME
    if rt is None or server not in rt.awaited:
        return plan.due
    _wait_all(rt, server, raise_errors=False)  # an error is reported by the extract:<server> group
    parked = {w.key for w in _parked_now(rt, server, plan)}
    return [w for w in plan.due if w.key in parked or f"extract:{server}/{plan.labels[w.key]}" in rt.named_tasks]


class Lane:
    """Background threads taking jobs in order, with a count of each server's jobs not yet done.

    Files come by thousands: a future per file (an executor) costs more than a small file's extraction.
    `work(lane)`, if given, replaces the plain loop: it takes jobs and reports each one finished."""

    def __init__(self, name, threads=1, work=None):
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()  # counts change per file: a plain lock; waiters use the Condition
        self._done = threading.Condition(self._lock)
        self._pending = collections.Counter()  # server -> jobs queued or running
        self._errors = collections.defaultdict(list)  # server -> exceptions raised by its jobs
        # Daemons: a run that stops early (a doit error) must not hang on them; what they finished by
        # then is recorded at exit, what they had not is done again next run.
        target = self._work if work is None else (lambda: work(self))
        for number in range(threads):
            threading.Thread(target=target, name=f"{name}-{number}", daemon=True).start()

    def submit(self, server, fn, *args):
        """Queue fn(*args) as a job of `server`."""
        with self._lock:
            self._pending[server] += 1
        self._jobs.put((server, fn, args))

    def take(self, block=True):
        """The next job (server, fn, args), or None if `block` is off and there is none."""
        try:
            return self._jobs.get(block=block)
        except queue.Empty:
            return None

    def finished(self, server, error=None):
        """Count one job of `server` done (with the exception it raised, if any)."""
        with self._lock:
            if error is not None:
                self._errors[server].append(error)
            self._pending[server] -= 1
            if not self._pending[server]:
                self._done.notify_all()

    def _work(self):
        while True:
            server, fn, args = self._jobs.get()
            error = None
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - handed to whoever waits for the server
                error = exc
            self.finished(server, error)

    def wait(self, server):
        """Block until every job of `server` is done; re-raise the first error one of them raised."""
        with self._done:
            self._done.wait_for(lambda: not self._pending[server])
        if self._errors[server]:
            raise self._errors[server][0]


def settle_server(server):
    """doit action of `settle:<server>`: wait for the server's work, then name the tasks of the files it parked."""
    rt = _rt()
    try:
        _wait_all(rt, server)
    except StateWriteError:
        return {"task_dep": []}  # extract:<server> reports it
    plan = rt.plans.get(server)
    if plan is None:
        return {"task_dep": []}
    return {"task_dep": [f"extract:{server}/{plan.labels[w.key]}" for w in _parked_now(rt, server, plan)]}


def _parked_line(rec):
    return (f"{planning.label(rec.remote_path or rec.local_name)} parked in "
            f"error/{rec.error_kind}/{rec.server}: {rec.last_error}")


def finish_server(server):
    """doit action of the `extract:<server>` group: flush, then fail if this run parked a file or could not list."""
    rt = _rt()
    try:
        _wait_all(rt, server)
        rt.flush()
    except StateWriteError as exc:
        rt.emit(40, str(exc), None, server=server, operation="state", error=str(exc))
        return TaskFailed(logs.printable(f"{server}: {exc}"))
    failed = rt.store.write_index(server)
    if failed is not None:
        rt.emit(30, f"the state index was not rewritten ({failed.strerror or failed}); the next run reads "
                "the records files instead, which is slower", None, server=server, operation="state",
                error=str(failed))
    listing = [f"listing failed: {rt.listing_errors[server]}"] if server in rt.listing_errors else []
    parked, kinds = [], set()
    processed = duplicates = extracted_bytes = 0
    for rec in rt.store.records.get(server, {}).values():
        if rec.run_id != rt.run_id:
            continue
        if rec.parked:
            kinds.add(rec.error_kind)
            parked.append(_parked_line(rec))
        elif rec.status == state.PROCESSED and rec.duplicate_of:
            duplicates += 1
        elif rec.status == state.PROCESSED:
            processed += 1
            extracted_bytes += rec.extracted_size
    problems = listing + parked
    rt.emit(30 if problems else 20, f"run summary: {processed} file(s) processed, {duplicates} duplicate(s), "
            f"{len(parked)} parked{', listing failed' if listing else ''}", None,
            server=server, operation="summary", bytes=extracted_bytes,
            duration_ms=round((time.monotonic() - rt.started) * 1000, 1))
    if not problems:
        return True
    hints = [f"then recover with: doit forget -s recover:{kind}/{server} && doit run  ({RECOVER_HINT[kind]})"
             for kind in sorted(kinds)]
    return TaskFailed(logs.printable("\n  ".join([f"{server}: {len(problems)} problem(s):", *problems, *hints])))
