"""The doit task graph, made from the configuration and the state store (read-only) — no SSH, no
lock, no write. The work itself happens in the actions (relay.actions), when doit runs them."""

import os

import msgspec
from doit.exceptions import InvalidDodoFile

from . import actions
from .config import load_settings
from .errors import ConfigError, StateCorrupt
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
    os.makedirs(settings.state_dir, exist_ok=True)
    servers = len(settings.enabled_servers)
    threads = 1 if settings.max_per_server == 1 and settings.max_workers == 1 else min(MAX_SERVERS_AT_ONCE, servers)
    return {
        "default_tasks": [f"extract:{s.name}" for s in settings.enabled_servers],
        "dep_file": os.path.join(settings.state_dir, "doit.db"),
        "backend": "sqlite3",
        "num_process": threads if threads > 1 else 0,
        "par_type": "thread",
        "continue": True,  # one failing server must not stop the others
    }


class Known:
    """The unfinished records of each server as the store holds them now (read-only), with task labels."""

    def __init__(self, run):
        self.records = {}
        try:
            store = Store(run.settings.state_dir, readonly=True)
        except StateCorrupt as exc:
            raise InvalidDodoFile(str(exc)) from None
        try:
            for server in run.settings.enabled_servers:
                self.records[server.name] = _labelled(store.unfinished(server.name))
        finally:
            store.close()


def _labelled(records):
    """(task label, record) pairs: the file's name, with `~<key8>` where two records share one."""
    counts = {}
    for rec in records:
        counts[label(rec.name)] = counts.get(label(rec.name), 0) + 1
    return [(label(r.name) if counts[label(r.name)] == 1 else f"{label(r.name)}~{r.key[:8]}", r)
            for r in sorted(records, key=lambda r: r.key)]


def plan_tasks(run):
    """`plan:<server>`: one SSH round trip listing the server, and the plan of its work."""
    for server in run.settings.enabled_servers:
        yield {"name": server.name, "actions": [(actions.list_action, [run, server.name])], "uptodate": [False],
               "io": NO_CAPTURE, "doc": f"list {server.name} and plan its work"}


def fetch_tasks(run):
    """`fetch:<server>`: renames recognised on the server, then one batched rsync of the due files."""
    for server in run.settings.enabled_servers:
        yield {"name": server.name, "actions": [(actions.fetch_action, [run, server.name])],
               "task_dep": [f"plan:{server.name}"], "uptodate": [False], "io": NO_CAPTURE,
               "doc": f"fetch the files due on {server.name}"}


def extract_tasks(run, known):
    """`extract:<server>` (everything for one server, then its summary) and `extract:<server>/<file>`
    for each file known to be due or parked."""
    for server in run.settings.enabled_servers:
        parked = []
        for name, rec in known.records.get(server.name, ()):
            task = {"name": f"{server.name}/{name}", "actions": [(actions.file_action, [run, server.name, rec.key])],
                    "io": NO_CAPTURE, "uptodate": [False], "doc": f"verify, extract and file {server.name}:{name}"}
            if rec.status == ERROR:
                # Up to date while doit remembers having seen it parked: `doit forget` sends it through again.
                task["uptodate"] = [actions.recorded(rec.key)]
                task["doc"] = f"parked in error/{rec.error_kind}: {rec.last_error}"[:200]
                parked.append(f"extract:{server.name}/{name}")
            yield task
        yield {"name": server.name, "actions": [(actions.extract_action, [run, server.name])],
               "task_dep": [*parked, f"fetch:{server.name}"], "uptodate": [False], "io": NO_CAPTURE,
               "doc": f"everything for {server.name}: list, fetch, verify, extract and file"}


def recover_tasks(run, known):
    """`recover:<selector>` groups of parked files, for `doit forget -s recover:<selector> && doit run`."""
    groups = {"all": []}
    for server in run.settings.enabled_servers:
        groups.setdefault(server.name, [])
        for kind in ERROR_KINDS:
            groups.setdefault(kind, [])
            groups.setdefault(f"{kind}/{server.name}", [])
        for name, rec in known.records.get(server.name, ()):
            if rec.status == ERROR:
                for selector in ("all", server.name, rec.error_kind, f"{rec.error_kind}/{server.name}"):
                    groups[selector].append(f"extract:{server.name}/{name}")
    for selector, deps in groups.items():
        yield {"name": selector, "actions": None, "task_dep": deps,
               "doc": f"parked files ({selector}); recover with: doit forget -s recover:{selector} && doit run"}
