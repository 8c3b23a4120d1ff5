"""The one owner of a run's records: every change of a record goes through it, under one lock, and
reaches the store in one transaction per batch, in durability order (see `flush`)."""

import os
import threading
import time

from . import durable
from .faults import crashpoint
from .records import EXTRACTED, PROCESSED

# A batch is flushed when it holds this many files or bytes, or is this old.
FLUSH_RECORDS = 4096
FLUSH_BYTES = 256 * 2**20
FLUSH_SECONDS = 5.0


class Ledger:
    """The run's records by key, the content and path claims of this run, and the pending batch."""

    def __init__(self, store, run_id, data_root, delete_source):
        self.store = store
        self.run_id = run_id
        self.data_root = data_root
        self.delete_source = delete_source
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._records = {}  # key -> Record: the plan's records, the ones the run executes
        self._dirty = {}  # key -> Record changed since the last flush
        self._contents = {}  # (server, sha256) -> key claimed in this run
        self._paths = {}  # (server, path) -> key claimed in this run
        self._working = set()  # keys a thread is working on
        self._loaded = set()  # servers whose content and path owners were read from the store
        self._bytes = 0
        self._last_flush = time.monotonic()

    # --- reads ---------------------------------------------------------------------------

    def adopt(self, records):
        """Make the plan's records the run's own. A record this run already changed or works on stays
        the one in use; one only read from the store gives way to the plan's (its newer decision)."""
        with self._lock:
            adopted = []
            for rec in records:
                held = self._records.get(rec.key)
                if held is None or held is rec or (held.run_id != self.run_id and rec.key not in self._working):
                    self._records[rec.key] = held = rec
                adopted.append(held)
            return adopted

    def record(self, key):
        """The run's record of `key`: adopted by a plan, else read from the store once and adopted."""
        with self._lock:
            rec = self._records.get(key)
            if rec is None:
                rec = self.store.get(key)
                if rec is not None:
                    self._records[key] = rec
            return rec

    def changed_in_run(self, server):
        """Records of `server` this run changed."""
        with self._lock:
            return [r for r in self._records.values() if r.server == server and r.run_id == self.run_id]

    # --- work and claims -------------------------------------------------------------------

    def begin(self, key):
        """Take `key` to work on; False if another thread has it."""
        with self._lock:
            if key in self._working:
                return False
            self._working.add(key)
            return True

    def end(self, key):
        """Give `key` back."""
        with self._lock:
            self._working.discard(key)
            if not self._working:
                self._idle.notify_all()

    def wait_idle(self, timeout):
        """Wait up to `timeout` seconds until no thread works on a file."""
        with self._lock:
            self._idle.wait_for(lambda: not self._working, timeout)

    def _known(self, server):
        """The server's content and path owners, read from the store once (then kept up to date here)."""
        if server not in self._loaded:
            self._loaded.add(server)
            for sha256, key in self.store.contents(server):
                self._contents.setdefault((server, sha256), key)
            for path, key in self.store.owners(server):
                self._paths.setdefault((server, path), key)

    def claim_content(self, rec, sha256):
        """Claim content `sha256` of `rec`'s server for it; return the key that owns it already, or None."""
        with self._lock:
            self._known(rec.server)
            owner = self._contents.setdefault((rec.server, sha256), rec.key)
            return owner if owner != rec.key else None

    def content_owner(self, server, sha256):
        """The key owning content `sha256` of `server`, in this run or before, or None."""
        with self._lock:
            self._known(server)
            return self._contents.get((server, sha256))

    def path_taken(self, rec, path):
        """Whether another record owns `path` (in this run or before)."""
        # A file nobody owns there is what a run killed before its transaction left: ours to replace.
        with self._lock:
            self._known(rec.server)
            owner = self._paths.get((rec.server, path))
            return owner is not None and owner != rec.key

    def reserve(self, rec, choose):
        """Call `choose(taken)` and claim the paths it returns for `rec`, all under the lock, so two
        workers never pick one name; `taken(path)` says whether another record owns a path."""
        with self._lock:
            paths = choose(lambda path: self.path_taken(rec, path))
            self.claim_paths(rec, *paths)
            return paths

    def claim_paths(self, rec, *paths):
        """Claim `paths` under the data tree for `rec`."""
        with self._lock:
            for path in paths:
                if path:
                    self._paths[(rec.server, path)] = rec.key

    # --- changes -------------------------------------------------------------------------------

    def change(self, rec, nbytes=0, **changes):
        """Apply `changes` to `rec`; it reaches the store with the next flush. Returns whether one is due."""
        with self._lock:
            for name, value in changes.items():
                setattr(rec, name, value)
            rec.run_id = self.run_id
            self._records.setdefault(rec.key, rec)
            self._dirty[rec.key] = rec
            self._bytes += nbytes
            return (
                len(self._dirty) >= FLUSH_RECORDS
                or self._bytes >= FLUSH_BYTES
                or time.monotonic() - self._last_flush >= FLUSH_SECONDS
            )

    def attempt(self, rec, stage):
        """Count one attempt of `stage` on `rec`; return the count."""
        with self._lock:
            count = rec.attempts.get(stage, 0) + 1
            self.change(rec, attempts={**rec.attempts, stage: count})
            return count

    def flush(self):
        """Make the batch durable, in this order: the data tree (one syncfs), then the records in one
        transaction (an extracted file's record says `processed`), then the sources are moved to
        processed/ or deleted. A crash before the transaction leaves the files to be done again, to
        the same paths; a crash after it leaves sources in incoming/, whose move the next run finishes."""
        with self._lock:
            batch, self._dirty, self._bytes = list(self._dirty.values()), {}, 0
            self._last_flush = time.monotonic()
            if not batch:
                return
            try:
                durable.syncfs(self.data_root)
            except BaseException:
                self._dirty.update({r.key: r for r in batch})
                raise
            finished = [r for r in batch if r.status == EXTRACTED]
            sources = {r.key: r.source_path for r in finished}
            for rec in finished:
                rec.status = PROCESSED
            contents = [(r.server, r.sha256, r.key) for r in finished if r.sha256 and not r.duplicate_of]
            owners = [(r.server, p, r.key) for r in batch for p in (r.extracted_path, r.source_path) if p]
            try:
                self.store.commit(batch, contents, owners)
            except BaseException:
                for rec in finished:
                    rec.status = EXTRACTED
                self._dirty.update({r.key: r for r in batch})
                raise
            if finished:
                crashpoint("commit")
            for rec in finished:
                move_source(rec, sources[rec.key], self.data_root)
            if finished:
                crashpoint("place-source")


def incoming_path(data_root, rec):
    """Where the copy of `rec` waits in incoming/."""
    return f"{data_root.rstrip('/')}/incoming/{rec.server}/{rec.local_name}"  # asked for several times a file


def move_source(rec, target, data_root):
    """File a processed record's source: rename it to `target` under processed/, or delete it."""
    src = incoming_path(data_root, rec)
    try:
        if target:
            os.replace(src, target)
        else:
            os.unlink(src)
    except FileNotFoundError:
        pass  # moved already, by a run that stopped before saying so
