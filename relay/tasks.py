"""Load time (config, lock, state, one listing per server) and the doit task generators built from the plans."""

import atexit
import concurrent.futures
import fcntl
import gc
import os
import re
import shutil
import sys
import time

import msgspec
from doit.exceptions import InvalidDodoFile

from . import helpers, logs, planning, stages
from .config import load_settings
from .errors import ConfigError, RemoteError, StateWriteError
from .layout import ERROR_KINDS
from .retry import call_with_retry

_LOCK_FD = None
# Free space a run wants on STATE_DIR's filesystem before it starts: its records, index and doit.db.
STATE_MIN_FREE = 16 * 2**20


class RunLocked(InvalidDodoFile):
    """Another run holds the lock (a user error: doit prints it and exits 3)."""


def acquire_lock(state_dir):
    """Hold STATE_DIR/lock for the life of this process; refuse at once if another run holds it."""
    global _LOCK_FD
    if _LOCK_FD is not None:
        return
    path = os.path.join(state_dir, "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLocked(f"another logpipe-relay run holds {path} ({holder}); this run changed nothing. "
                        "Wait for it to finish, or check that it is still alive.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(), 0)
    _LOCK_FD = fd


def check_state_space(state_dir, minimum=STATE_MIN_FREE):
    """Refuse to start a run that could not record its work: too little space for STATE_DIR."""
    st = os.statvfs(state_dir)
    free = st.f_bavail * st.f_frsize
    if free < minimum:
        raise StateWriteError(f"{state_dir}: only {free // 1024} KiB free; a run needs at least "
                              f"{minimum // 2**20} MiB there for its state records and doit's database. "
                              "Free some space on that filesystem, then rerun; this run changed nothing")


def release_lock():
    """Let another run start (tests loading several runs in one process)."""
    global _LOCK_FD
    if _LOCK_FD is not None:
        os.close(_LOCK_FD)
        _LOCK_FD = None


def sweep(rt):
    """Remove temp files a killed run left behind: partial extractions, rsync temps, marker temps.

    Only names we create are touched: a parked file may itself start with a dot."""
    removed = _sweep_landings(os.path.join(rt.settings.tmp_dir, "fetch"))
    patterns = [(os.path.join(rt.settings.tmp_dir, "extract"), lambda n: n.endswith(".part")),
                (os.path.join(rt.settings.data_root, "error"), lambda n: n.startswith(".tmp-"))]
    # Record temps are swept by Store.load_server, which lists those directories anyway.
    for root, stale in patterns:
        for dirpath, _, files in os.walk(root):
            for name in files:
                if stale(name):
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
    if removed:
        rt.log.info(f"swept {removed} temp file(s) left by an interrupted run", extra={"operation": "sweep"})


def _sweep_landings(fetch_root):
    """Remove what a killed run left under TMP_DIR/fetch/<server>/: rsync's landing directories (each
    a batch's own) and their files; those files are fetched again. Returns how many files went."""
    removed = 0
    try:
        servers = [e.path for e in os.scandir(fetch_root) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return 0
    for server_dir in servers:
        for entry in os.scandir(server_dir):
            if entry.is_dir(follow_symlinks=False):
                removed += sum(len(files) for _, _, files in os.walk(entry.path))
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
                removed += 1
    return removed


def scan_incoming(rt, server, warn=True):
    """(name, size, mtime) of regular files in incoming/<server>/; other kinds are skipped (and logged if `warn`)."""
    found = []
    try:
        entries = list(os.scandir(rt.layout.incoming(server)))
    except FileNotFoundError:
        return found
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            found.append((entry.name, st.st_size, f"{st.st_mtime_ns // 10**9}.{st.st_mtime_ns % 10**9:09d}"))
        elif warn:
            rt.log.warning(f"skipped {planning.label(entry.name)} in incoming/: not a regular file",
                           extra={"server": server, "operation": "list"})
    return found


def _list_server(rt, server):
    settings = rt.settings
    started = time.monotonic()
    try:
        entries = call_with_retry(rt.connections[server.name].list_files, attempts=settings.max_retry_copy,
                                  base=settings.retry_delay_base, cap=settings.retry_delay_max,
                                  is_transient=lambda e: getattr(e, "transient", False))
        rt.log.info(f"listed {len(entries)} path(s)", extra={
            "server": server.name, "operation": "list",
            "duration_ms": round((time.monotonic() - started) * 1000, 1)})
        return entries
    except RemoteError as exc:
        rt.listing_errors[server.name] = str(exc)
        rt.log.error(f"listing failed: {exc}", extra={"server": server.name, "operation": "list",
                                                      "error": str(exc)})
        return None


def load(config_dir=None, environ=None, process_incoming=None, now=None, sequential=False, argv=None):
    """Validate config, take the lock, load state, list every enabled server and plan the run.

    `sequential`: one server and one file at a time (the user's `run --sequential`);
    `argv`: doit's command line, when this is a doit run: the servers whose `extract:<server>` group
    it runs start their transfers and extractions as soon as they are planned, while doit loads."""
    settings = load_settings(config_dir, environ)
    if sequential:
        settings = msgspec.structs.replace(settings, max_workers=1, max_per_server=1)
    for key, path in (("STATE_DIR", settings.state_dir), ("LOG_DIR", settings.log_dir),
                      ("TMP_DIR", settings.tmp_dir)):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{settings.config_dir}/.env: {key}: {path}: cannot create it ({exc.strerror}); "
                              f"create it, or point {key} somewhere writable") from None
    acquire_lock(settings.state_dir)
    if argv is not None and doit_command(argv) == "run":
        check_state_space(settings.state_dir)
    logs.setup(settings.log_dir, settings.log_format, settings.log_level)
    rt = stages.Runtime(settings, environ=environ)
    servers = settings.enabled_servers
    rt.awaited = awaited_servers(argv, [s.name for s in servers]) if argv is not None else set()
    rt.named_tasks = {a for a in argv or () if a.startswith("extract:") and "/" in a}
    if rt.awaited and settings.max_workers > 1:
        helper = helpers.start()  # now, before the listings start threads: see relay.helpers
        if helper is not None:
            rt.log.debug(f"inflate helper started (pid {helper.pid})", extra={"operation": "extract"})
    rt.prepare = lambda: (rt.layout.make_tree(s.name for s in servers), sweep(rt))
    stages.RUNTIME = rt
    if rt.awaited:
        # Work starts before doit runs a task: if doit then stops early (a bad task name), what was
        # finished still gets its records.
        atexit.register(rt.flush)
    if process_incoming is None:
        process_incoming = settings.process_incoming
    # Loading builds tens of thousands of small objects that live for the whole run: the cyclic
    # garbage collector would rescan them again and again for nothing.
    gc.disable()
    # The SSH listings (network-bound) run while this thread reads the state store.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, len(servers))))
    futures = {s.name: pool.submit(_list_server, rt, s) for s in servers}
    records = {s.name: rt.store.load_server(s.name) for s in servers}
    for srv in servers:
        for path in rt.store.damaged(srv.name):
            rt.log.error(f"state records file could not be read (torn by a crash, or edited?); moved to {path}. "
                         "The files it described are processed again, to the same paths",
                         extra={"server": srv.name, "operation": "state", "file": path})
    incoming = {s.name: scan_incoming(rt, s.name, warn=process_incoming) for s in servers}
    now = time.time() if now is None else now
    by_future = {futures[srv.name]: srv for srv in servers}
    # Each server as soon as its listing is in: its transfers start while the others still list.
    for future in concurrent.futures.as_completed(by_future):
        srv = by_future[future]
        plan = planning.plan_server(srv.name, records[srv.name], future.result(),
                                    incoming[srv.name], now, settings.min_file_age_seconds,
                                    drops=process_incoming)
        for skip in plan.skipped:
            rt.log.info(f"skipped {planning.label(skip.path)}: {skip.reason}",
                        extra={"server": srv.name, "operation": "list"})
        for work in plan.due:
            rt.planned[(srv.name, work.key)] = work.record
        rt.listed.update({(srv.name, key): listed for key, listed in plan.listed.items()})
        rt.plans[srv.name] = plan
        if srv.name in rt.awaited:
            stages.start_server(srv.name)
    rt.plans = {srv.name: rt.plans[srv.name] for srv in servers}  # tasks in configuration order
    if not any(plan.due for plan in rt.plans.values()):
        helpers.stop()  # nothing to extract: a live child only makes this process's page writes dearer
    pool.shutdown()
    gc.freeze()
    # A run's garbage is mostly acyclic (reference counting frees it): a young generation 70 times
    # Python's default means a handful of collections a run instead of dozens (10 to 15 ms for 2,100 files).
    gc.set_threshold(50_000, 10, 10)
    gc.enable()
    return rt


def _yes(value):
    return value.lower() not in ("0", "no", "false", "off", "")


def doit_config(config_dir=None):
    """Load the run (or fail as a doit user error) and return DOIT_CONFIG."""
    try:
        from doit import get_var
        incoming = get_var("incoming", None)
        sequential = get_var("sequential", None)
        config_dir = config_dir or get_var("config", None)
    except Exception:  # noqa: BLE001 - get_var is only usable under the doit command
        incoming = sequential = None
    if incoming is not None:
        incoming = _yes(incoming)
    try:
        rt = load(config_dir, process_incoming=incoming, sequential=bool(sequential and _yes(sequential)),
                  argv=sys.argv[1:])
    except (ConfigError, StateWriteError) as exc:
        raise InvalidDodoFile(str(exc)) from None
    return {
        # Every server's fetch first, so that all transfers start at once; then the per-server groups
        # (not the `extract` basename: a failed server then gives exit 1, not 2).
        "default_tasks": [f"{stage}:{s.name}" for stage in ("fetch", "extract")
                          for s in rt.settings.enabled_servers],
        "dep_file": os.path.join(rt.settings.state_dir, "doit.db"),
        "backend": "sqlite3",
        # doit dispatches sequentially (its per-task bookkeeping fights worker threads for the GIL);
        # transfers and large extractions run in our own threads, capped by max_workers.
        "num_process": 0,
        "par_type": "thread",
        "check_file_uptodate": "timestamp",
        "continue": True,  # one failing server must not stop the others
    }


DOIT_COMMANDS = {"run", "list", "info", "forget", "clean", "ignore", "dumpdb", "strace", "tabcompletion",
                 "help", "reset-dep", "auto"}


def doit_command(argv):
    """The doit command named in `argv` (doit's own default: `run`), past the options that may precede it."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-f", "--file", "-d", "--dir"):
            i += 2
        elif arg.startswith(("--file=", "--dir=")) or arg in ("-k", "--seek-file") or \
                ("=" in arg and not arg.startswith("-")):  # a doit variable such as incoming=no
            i += 1
        else:
            break
    return argv[i] if i < len(argv) and argv[i] in DOIT_COMMANDS else "run"


def awaited_servers(argv, servers):
    """Servers whose `extract:<server>` group runs in this invocation (it waits for their background work).

    doit does not tell a task what else was selected, so read the command and the task names off the
    command line: a run naming no task runs the default tasks, i.e. every server."""
    if doit_command(argv) != "run":
        return set()
    names = [a for a in argv if re.match(r"^(fetch|extract|settle|recover)(:|$)", a)]
    if not names:
        return set(servers)
    if "extract" in names:
        return set(servers)
    return {n.split(":", 1)[1] for n in names if n.startswith(("extract:", "settle:")) and "/" not in n} & set(servers)


# --- task generators (they read the plans; extract_tasks may wait for the run's work) -----------

# doit captures a Python action's output by swapping sys.stdout/sys.stderr process-wide, which races
# between worker threads (a run could end with a dead sys.stdout and exit 120). Our actions print
# nothing (they log), so capture is off for every task.
NO_CAPTURE = {"capture": False}

def fetch_tasks(plans):
    """`fetch:<server>`: one batched rsync per server for its due files (`--only FILE` for one file)."""
    for server, plan in plans.items():
        due = sum(1 for w in plan.due if w.first == "fetch")
        yield {"name": server, "actions": [(stages.fetch_server, [server])], "uptodate": [False],
               "io": NO_CAPTURE, "doc": f"fetch the {due} file(s) due on {server} (--only FILE: just that one)",
               "params": [{"name": "only", "long": "only", "default": "",
                           "help": "fetch only this file (its name as `doit list --all` shows it)"}]}


def extract_tasks(plans):
    """`extract:<server>/<file>` for due and parked files, and the `extract:<server>` groups with the summary.

    In a run of a whole server this first waits for that server's work: see stages.due_needing_tasks."""
    for server, plan in plans.items():
        labels = plan.labels
        for work in stages.due_needing_tasks(server, plan):
            # Runnable on its own (`doit run extract:srv1/FILE`); in a run of the whole server, the
            # group does these files in bulk as rsync delivers them, without a doit task each.
            yield {"name": f"{server}/{labels[work.key]}", "actions": [(stages.process_file, [server, work.key])],
                   "uptodate": [False], "io": NO_CAPTURE, "doc": f"verify, extract and file {server}:{labels[work.key]}"}
        for rec in plan.parked:
            # Up to date while doit remembers parking it: `doit forget` sends it through again.
            yield {"name": f"{server}/{labels[rec.key]}", "actions": [(stages.process_file, [server, rec.key])],
                   "uptodate": [stages.recorded_run], "io": NO_CAPTURE,
                   "doc": f"parked in error/{rec.error_kind}: {rec.last_error}"[:200]}
        # settle:<server> runs first: it waits for the server's work and adds the tasks of files it parked.
        yield {"name": server, "actions": [(stages.finish_server, [server])], "calc_dep": [f"settle:{server}"],
               "uptodate": [False], "io": NO_CAPTURE,
               "doc": f"everything for {server}: fetch, verify, extract and file its {len(plan.due)} due file(s)"}


def settle_tasks(plans):
    """`settle:<server>`: a step of `extract:<server>` that waits for the server's background work.

    Its result names the tasks of the files this run parked, which doit then runs (they do nothing
    but let doit remember them: `doit forget` of such a task is what recovers its file)."""
    for server, plan in plans.items():
        labels = plan.labels
        parked = [f"extract:{server}/{labels[rec.key]}" for rec in plan.parked]
        yield {"name": server, "actions": [(stages.settle_server, [server])],
               "task_dep": [f"fetch:{server}", *parked], "uptodate": [False], "io": NO_CAPTURE,
               "doc": f"wait for {server}'s transfers and extractions (a step of extract:{server})"}


def recover_tasks(plans):
    """`recover:<selector>` groups over parked files, for `doit forget -s recover:<selector>`."""
    groups = {"all": []}
    for server, plan in plans.items():
        labels = plan.labels
        groups.setdefault(server, [])
        for kind in ERROR_KINDS:
            groups.setdefault(kind, [])
            groups.setdefault(f"{kind}/{server}", [])
        for rec in plan.parked:
            task = f"extract:{server}/{labels[rec.key]}"
            for selector in ("all", server, rec.error_kind, f"{rec.error_kind}/{server}"):
                groups[selector].append(task)
    for selector, deps in groups.items():
        yield {"name": selector, "actions": None, "task_dep": deps,
               "doc": f"parked files ({selector}); recover with: doit forget -s recover:{selector} && doit run"}


def plans():
    """The plans of the loaded run."""
    return stages.RUNTIME.plans
