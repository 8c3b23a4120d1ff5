"""The doit task graph, made from the configuration and the state store (read-only) — no SSH, no
lock, no write. The work itself happens in the actions (relay.actions), when doit runs them."""

import os

import msgspec
from doit.exceptions import InvalidDodoFile

from . import actions
from .config import load_settings
from .errors import ConfigError, StateCorrupt
from .layout import scan_incoming
from .planning import drop_record
from .records import ERROR, ERROR_KINDS, label
from .run import Run, install_signals
from .store import Store

# doit captures a Python action's output by swapping sys.stdout process-wide, which races between
# worker threads; our actions log, and print only their summary line.
NO_CAPTURE = {"capture": False}
# Servers worked on at once (doit's worker threads); each server's own work is capped by max_per_server.
MAX_SERVERS_AT_ONCE = 8


def _yes(value):
    return value.lower() not in ("0", "no", "false", "off", "")


def build(config_dir=None):
    """Validate the configuration and make the (not yet started) Run; a user error for doit if invalid."""
    try:
        from doit import get_var

        incoming, sequential = get_var("incoming", None), get_var("sequential", None)
        config_dir = config_dir or get_var("config", None)
    except Exception:  # noqa: BLE001 - get_var is only usable under the doit command
        incoming = sequential = None
    try:
        settings = load_settings(config_dir)
    except ConfigError as exc:
        raise InvalidDodoFile(str(exc)) from None
    if sequential is not None and _yes(sequential):
        settings = msgspec.structs.replace(settings, max_workers=1, max_per_server=1)
    run = Run(settings, take_drops=None if incoming is None else _yes(incoming))
    install_signals(run)
    return run


def doit_config(run):
    """DOIT_CONFIG for this configuration (doit opens its own database in STATE_DIR for every command,
    so that directory is made if missing: the one thing loading creates)."""
    settings = run.settings
    try:
        os.makedirs(settings.state_dir, exist_ok=True)
    except OSError as exc:
        raise InvalidDodoFile(
            f"{settings.config_dir}/.env: STATE_DIR: {settings.state_dir}: cannot create it "
            f"({exc.strerror}); create it, or point STATE_DIR somewhere writable"
        ) from None
    servers = len(settings.enabled_servers)
    threads = 1 if settings.max_per_server == 1 and settings.max_workers == 1 else min(MAX_SERVERS_AT_ONCE, servers)
    return {
        "default_tasks": [f"extract:{s.name}" for s in settings.enabled_servers],
        "dep_file": os.path.join(settings.state_dir, "doit.db"),
        "backend": "sqlite3",
        "num_process": threads if threads > 1 else 0,
        "par_type": "thread",
        "continue": True,  # one failing server must not stop the others
        "reporter": "executed-only",  # no line for each up-to-date recover task
    }


class Known:
    """The unfinished records of each server as the store holds them now, and the files dropped in
    its incoming/ that no record names yet (read-only), with task labels."""

    def __init__(self, run):
        self.records = {}
        try:
            store = Store(run.settings.state_dir, readonly=True)
        except StateCorrupt as exc:
            raise InvalidDodoFile(str(exc)) from None
        try:
            for server in run.settings.enabled_servers:
                records = store.unfinished(server.name)
                if run.take_drops:
                    records += _drops(run, server.name, {r.local_name for r in records})
                self.records[server.name] = _labelled(records)
        finally:
            store.close()


def _drops(run, server, named):
    """Records for the files in incoming/<server>/ that `named` does not cover (not stored)."""
    files, _ = scan_incoming(run.layout.incoming(server))
    return [drop_record(server, f) for f in files if f.name not in named]


def _labelled(records):
    """(task label, record) pairs: the file's base name, with `~<key8>` where two records share one."""
    names = [label(os.path.basename(r.remote_path) if r.remote_path else r.local_name) for r in records]
    counts = {name: names.count(name) for name in names}
    pairs = [(name if counts[name] == 1 else f"{name}~{r.key[:8]}", r) for name, r in zip(names, records)]
    return sorted(pairs, key=lambda pair: pair[0])


def plan_tasks(run):
    """`plan:<server>`: one SSH round trip listing the server, and the plan of its work."""
    for server in run.settings.enabled_servers:
        # After the server's recover tasks: a recovery's changes are in the store before the plan reads it.
        yield {
            "name": server.name,
            "actions": [(actions.list_action, [run, server.name])],
            "uptodate": [False],
            "task_dep": [f"recover:{kind}/{server.name}" for kind in ERROR_KINDS],
            "io": NO_CAPTURE,
            "doc": f"list {server.name} and plan its work",
        }


def fetch_tasks(run):
    """`fetch:<server>`: renames recognised on the server, then one batched rsync of the due files."""
    for server in run.settings.enabled_servers:
        yield {
            "name": server.name,
            "actions": [(actions.fetch_action, [run, server.name])],
            "task_dep": [f"plan:{server.name}"],
            "uptodate": [False],
            "io": NO_CAPTURE,
            "doc": f"fetch the files due on {server.name} (--only FILE: just that one)",
            "params": [
                {
                    "name": "only",
                    "long": "only",
                    "default": "",
                    "help": "fetch only this file (its name as `doit list --all` shows it)",
                }
            ],
        }


def extract_tasks(run, known):
    """`extract:<server>` (everything for one server, then its summary) and `extract:<server>/<file>`
    for each file known to be due or parked (running it is doing, or retrying, that file alone)."""
    for server in run.settings.enabled_servers:
        for name, rec in known.records.get(server.name, ()):
            doc = (
                f"parked in error/{rec.error_kind}: {rec.last_error}"[:200]
                if rec.status == ERROR
                else f"verify, extract and file {server.name}:{name}"
            )
            yield {
                "name": f"{server.name}/{name}",
                "actions": [(actions.file_action, [run, server.name, rec.key, rec if rec.origin == "local" else None])],
                "io": NO_CAPTURE,
                "uptodate": [False],
                "doc": doc,
            }
        yield {
            "name": server.name,
            "actions": [(actions.extract_action, [run, server.name])],
            "task_dep": [f"fetch:{server.name}"],
            "uptodate": [False],
            "io": NO_CAPTURE,
            "doc": f"everything for {server.name}: list, fetch, verify, extract and file",
        }


def recover_tasks(run, known):
    """`recover:<kind>/<server>`: retries that server's files parked in error/<kind> when doit does not
    remember running it (`doit forget -s recover:<selector> && doit run`); `recover:<server>`,
    `recover:<kind>` and `recover:all` group them."""
    groups: dict[str, list[str]] = {"all": []}
    for server in run.settings.enabled_servers:
        parked = [rec for _, rec in known.records.get(server.name, ()) if rec.status == ERROR]
        for kind in ERROR_KINDS:
            leaf = f"{kind}/{server.name}"
            count = sum(1 for rec in parked if rec.error_kind == kind)
            yield {
                "name": leaf,
                "actions": [(actions.recover_action, [run, server.name, kind])],
                "uptodate": [actions.armed],
                "io": NO_CAPTURE,
                "doc": f"{count} file(s) parked in error/{leaf}; retry with: doit forget -s recover:{leaf} && doit run",
            }
            for selector in ("all", server.name, kind):
                groups.setdefault(selector, []).append(f"recover:{leaf}")
    for selector, deps in groups.items():
        yield {
            "name": selector,
            "actions": None,
            "task_dep": deps,
            "doc": f"parked files ({selector}); retry with: doit forget -s recover:{selector} && doit run",
        }
