"""One run's context and its thread and process machinery: the lock, the start-up sweep, the worker
pool, the SSH connections and their children, and the stop on Ctrl-C / SIGTERM.

A Run is made when dodo.py is imported and does nothing until the first task action calls `start`:
`doit list`, `info`, `forget` and `help` never take the lock, contact a server or write a file."""

import atexit
import concurrent.futures
import fcntl
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from typing import Any

from . import durable, logs
from .errors import ConfigError, LockHeld, RunInterrupted, StateCorrupt, StateWriteError
from .inflater import Inflater
from .layout import Layout
from .ledger import Ledger
from .remote import Children, Connection
from .store import Store

# Free space a run wants on STATE_DIR's filesystem before it starts: its database and doit's.
STATE_MIN_FREE = 16 * 2**20
# On Ctrl-C or SIGTERM, how long from the signal the files being worked on get to finish (the
# children's end included) before what finished is recorded and the process ends.
STOP_GRACE = 3.0


class Run:
    """Everything one invocation shares; started by the first task action."""

    def __init__(self, settings, environ=None, take_drops=None):
        self.settings = settings
        self.environ = environ
        self.take_drops = settings.process_incoming if take_drops is None else take_drops
        self.layout = Layout(settings)
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.plans = {}  # server -> Plan, made by its list task
        self.problems = {}  # server -> messages that make its run fail (listing, transfers left due)
        self.stopping = threading.Event()
        self.log = logs.get()
        self._start_lock = threading.Lock()
        self._lock_fd = None
        self.started_at = None
        # Made by start(); Any-typed until then (every use comes after it).
        self.store: Any = None
        self.ledger: Any = None
        self.pool: Any = None
        self.inflater: Any = None  # the helper process for small files, when there are cores for it
        self.children: Any = None
        self.connections = {}
        self._server_slots = {}

    # --- start -------------------------------------------------------------------------------

    def start(self):
        """Take the lock, open the log and the store, make the tree and sweep; once per run."""
        with self._start_lock:
            if self.started_at is not None:
                return self
            if self.stopping.is_set():
                raise RunInterrupted("the run was stopped before it started")
            settings = self.settings
            try:
                make_directories(settings)
                self._acquire_lock()
                check_state_space(settings.state_dir)
                logs.setup(settings.log_dir, settings.log_format, settings.log_level)
                self.store = Store(settings.state_dir)
            except (ConfigError, LockHeld, StateWriteError, StateCorrupt) as exc:
                # Nothing was begun by anyone (no other action can start without the lock): end the
                # process now with doit's user-error status, as a configuration error does, rather
                # than one failed task per server and doit's "unmet dependency" errors after them.
                self.release_lock()
                sys.stderr.write(f"ERROR: {logs.printable(str(exc))}\n")
                sys.stderr.flush()
                os._exit(3)
            imported = self.store.import_legacy(settings.state_dir)
            if imported:
                self.log.info(
                    f"imported {imported} record(s) from {settings.state_dir}/records/ into the "
                    "state database (that directory is no longer read)",
                    extra={"operation": "state"},
                )
            self.ledger = Ledger(self.store, self.run_id, settings.data_root, settings.delete_source)
            self.layout.make_tree(s.name for s in settings.enabled_servers)
            if self.store.meta("clean") == "no":
                sweep_unowned(self)  # the last run was killed: outputs it never recorded are redone
            self.store.set_meta("clean", "no")
            self.children = Children()
            self.connections = {
                s.name: Connection(settings, s, self.environ, children=self.children) for s in settings.servers
            }
            self._server_slots = {s.name: threading.BoundedSemaphore(settings.max_per_server) for s in settings.servers}
            self.pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=settings.max_workers, thread_name_prefix="extract"
            )
            if min(settings.max_workers, settings.max_per_server) > 1 and len(os.sched_getaffinity(0)) > 1:
                self.inflater = Inflater(on_exit=self._helper_ended)
            sweep(self)
            self.started_at = time.monotonic()
            atexit.register(self.close)  # doit ends the process after its last task: flush, sync, unlock
            return self

    def _acquire_lock(self):
        path = os.path.join(self.settings.state_dir, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(
                f"another logpipe-relay run holds {path} ({holder}); this run changed nothing. "
                "Wait for it to finish, or check that it is still alive"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(), 0)
        self._lock_fd = fd

    def emit(self, level, message, rec=None, **fields):
        """Log one structured event of the run (about record `rec`, if given)."""
        logs.about(self.log, level, message, rec, **fields)

    def _helper_ended(self, code):
        self.log.warning(
            f"the helper process that inflates small files ended (status {code}); the run goes on without it",
            extra={"operation": "extract"},
        )

    def slot(self, server):
        """The per-server cap on files worked on at once."""
        return self._server_slots[server]

    def elapsed_ms(self):
        """Milliseconds since the run started."""
        return round((time.monotonic() - (self.started_at or time.monotonic())) * 1000, 1)

    def check_stop(self):
        """Raise RunInterrupted once a stop was asked for."""
        if self.stopping.is_set():
            raise RunInterrupted("stopped by a signal")

    # --- end -----------------------------------------------------------------------------------

    def close(self):
        """Flush what finished, sync the data tree, release the lock (the end of a run, or a test's)."""
        if self.started_at is None or self.store is None:
            return
        try:
            self.ledger.flush()
            durable.syncfs(self.settings.data_root)  # the last sources moved after the last commit
            if not self.stopping.is_set():
                self.store.set_meta("clean", "yes")
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            if self.inflater is not None:
                self.inflater.close()
            self.store.close()
            self.store = None
            self.release_lock()
            logs.shutdown()

    def release_lock(self):
        """Let another run start."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def interrupt(self, signum):
        """Stop on Ctrl-C or SIGTERM: end the children, record what finished, exit 128+signum."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self.started_at is None:
            os._exit(128 + signum)  # nothing begun, nothing to record
        deadline = time.monotonic() + STOP_GRACE  # from the signal: ending the children counts in it
        self.children.stop()
        threading.Thread(target=self._finish_stop, args=(signum, deadline), name="stop", daemon=True).start()

    def _finish_stop(self, signum, deadline):
        try:
            if self.inflater is not None:
                self.inflater.close()  # what it was given is not placed: the threads see the stop
            self.ledger.wait_idle(max(0.0, deadline - time.monotonic()))
            self.ledger.flush()
            self.log.warning(
                f"stopped by signal {signum}; what finished is recorded, the rest is done by the next run",
                extra={"operation": "summary"},
            )
        except Exception as exc:  # noqa: BLE001 - the process ends either way; the next run redoes it
            self.log.error(
                f"stopped by signal {signum}; could not record the last batch: {exc}",
                extra={"operation": "state", "error": str(exc)},
            )
        finally:
            self.release_lock()
            logs.shutdown()
            os._exit(128 + signum)


def make_directories(settings):
    """Create STATE_DIR, LOG_DIR and TMP_DIR if missing; a ConfigError naming the key if one cannot be."""
    for key, path in (("STATE_DIR", settings.state_dir), ("LOG_DIR", settings.log_dir), ("TMP_DIR", settings.tmp_dir)):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{settings.config_dir}/.env: {key}: {path}: cannot create it ({exc.strerror}); "
                f"create it, or point {key} somewhere writable"
            ) from None


def install_signals(run):
    """Route SIGINT and SIGTERM to `run.interrupt` (from the main thread, where Python runs handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, _frame: run.interrupt(number))


def check_state_space(state_dir, minimum=STATE_MIN_FREE):
    """Refuse to start a run that could not record its work: too little space for STATE_DIR."""
    st = os.statvfs(state_dir)
    free = st.f_bavail * st.f_frsize
    if free < minimum:
        raise StateWriteError(
            f"{state_dir}: only {free // 1024} KiB free; a run needs at least "
            f"{minimum // 2**20} MiB there for its state and doit's database. "
            "Free some space on that filesystem, then rerun; this run changed nothing"
        )


def _ignore_vanished(_function, _path, exc_info):
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def sweep(run):
    """Remove what a killed run left: rsync landing directories, extraction and publication temps.

    Files may vanish under us (a killed run's rsync still writing, until its death signal lands)."""
    settings = run.settings
    removed = 0
    fetch_root = os.path.join(settings.tmp_dir, "fetch")
    for dirpath, dirnames, files in os.walk(fetch_root):
        if dirpath != fetch_root:  # TMP_DIR/fetch/<server>/: its batch-* landing directories, whole
            for name in dirnames:
                landing = os.path.join(dirpath, name)
                removed += sum(len(names) for _, _, names in os.walk(landing))
                shutil.rmtree(landing, onerror=_ignore_vanished)
            removed += sum(_unlink(os.path.join(dirpath, f)) for f in files)
            dirnames[:] = []
    for root, stale in (
        (os.path.join(settings.tmp_dir, "extract"), lambda n: n.endswith(".part")),
        (os.path.join(settings.data_root, "error"), lambda n: n.startswith(".tmp-")),
    ):
        for dirpath, _, files in os.walk(root):
            removed += sum(_unlink(os.path.join(dirpath, f)) for f in files if stale(f))
    if removed:
        run.log.info(f"swept {removed} temp file(s) left by an interrupted run", extra={"operation": "sweep"})


def sweep_unowned(run):
    """Remove files under extracted/ and processed/ that no record owns: outputs a killed run made
    before its transaction. Their records were not committed, so the files are done again; left
    there, one could double lines once its content is recorded under another name (a rename)."""
    removed = 0
    for server in run.settings.enabled_servers:
        owned = {path for path, _ in run.store.owners(server.name)}  # one query, not one a file
        for directory in (run.layout.extracted(server.name), run.layout.processed(server.name)):
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.is_file(follow_symlinks=False) and entry.path not in owned:
                    removed += _unlink(entry.path)
    if removed:
        run.log.info(
            f"removed {removed} output file(s) an interrupted run made but never recorded; they are done again",
            extra={"operation": "sweep"},
        )


def _unlink(path):
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0
