"""The actions doit calls: each stage of a server, one file, a parked file; and the run summary."""

import concurrent.futures

from doit.exceptions import TaskFailed

from . import engine, logs
from .errors import RelayError
from .records import COPIED, ERROR, PENDING, PROCESSED, SUPERSEDED, Record, label, version_key

RECOVER_HINT = {
    "copy": "check the path and permissions on the server",
    "extract": "free disk space or fix the local problem",
    "quarantine": "replace the file on the server if it is really corrupt",
}


def _guarded(fn):
    """An action that turns expected failures (RelayError) into one-line task failures."""
    def action(*args):
        try:
            return fn(*args)
        except RelayError as exc:
            return TaskFailed(logs.printable(str(exc)))
    action.__name__ = action.__qualname__ = fn.__name__
    action.__doc__ = fn.__doc__
    return action


@_guarded
def list_action(run, server):
    """`plan:<server>`: list the server and plan its work."""
    engine.list_server(run, server)
    return True


@_guarded
def fetch_action(run, server):
    """`fetch:<server>`: fetch the server's due files."""
    return engine.fetch_server(run, server)


@_guarded
def extract_action(run, server):
    """`extract:<server>`: verify, extract and file every due file of the server, then report."""
    run.start()
    plan = run.plans.get(server)
    due = []
    if plan is not None:
        for rec in plan.finish:
            if not engine.finish_source(run, rec):
                due.extend(run.ledger.adopt([_as_drop(run, rec)]))
        due.extend(r for r in plan.due if r.status == COPIED)
    _extract_all(run, due)
    run.ledger.flush()
    return summary(run, server)


def _as_drop(run, rec):
    """A file in incoming/ that has a processed file's name and version but not its bytes."""
    local = next(f for f in engine.scan_incoming(run, rec.server) if f.name == rec.local_name)
    key = version_key(rec.server, "local", local.name, local.size, local.mtime)
    return Record(key=key, server=rec.server, origin="local", local_name=local.name, size=local.size,
                  mtime=local.mtime, status=COPIED)


def _extract_all(run, records):
    """Extract `records` on the run's workers; re-raise the first error a job raised."""
    futures = [run.pool.submit(engine.extract_file, run, rec) for rec in records]
    for future in concurrent.futures.as_completed(futures):
        future.result()


def summary(run, server):
    """Log and print the server's run summary; a TaskFailed if it parked a file, left one due, or failed to list."""
    changed = run.ledger.changed_in_run(server)
    parked_now = [r for r in changed if r.status == ERROR]
    processed = [r for r in changed if r.status == PROCESSED and not r.duplicate_of]
    duplicates = sum(1 for r in changed if r.status == PROCESSED and r.duplicate_of)
    still_parked = len(run.store.parked(server))
    problems = list(run.problems.get(server, ())) + [
        f"{label(r.name)} parked in error/{r.error_kind}/{server}: {r.last_error}" for r in parked_now]
    where = f" ({still_parked} in all wait in {run.settings.data_root}/error/*/{server}/: `doit list` names them)" \
        if still_parked else ""
    line = (f"run summary: {len(processed)} file(s) processed, {duplicates} duplicate(s), "
            f"{len(parked_now)} parked{where}{', listing failed' if server not in run.plans or not run.plans[server].listed else ''}")
    logs.note(run.log, 30 if problems else 20, line, {
        "server": server, "operation": "summary", "bytes": sum(r.extracted_size for r in processed),
        "duration_ms": run.elapsed_ms()})
    print(f"{server}: {line}", flush=True)
    if not problems:
        return True
    hints = [f"then recover with: doit forget -s recover:{kind}/{server} && doit run  ({RECOVER_HINT[kind]})"
             for kind in sorted({r.error_kind for r in parked_now})]
    return TaskFailed(logs.printable("\n  ".join([f"{server}: {len(problems)} problem(s):", *problems, *hints])))


@_guarded
def file_action(run, server, key):
    """`extract:<server>/<file>`: bring one due or recovered file through every stage left."""
    run.start()
    rec = run.ledger.record(key)
    if rec is None or rec.status in (PROCESSED, SUPERSEDED):
        return {"seen": key}
    if rec.status == ERROR:
        if not rec.parked_seen:
            # First seen since it was parked: doit now remembers this task; `doit forget` of it retries.
            run.ledger.change(rec, parked_seen=True)
            run.ledger.flush()
            return {"seen": key}
        engine.unpark(run, rec)
    if rec.status == PENDING:
        engine.fetch_server(run, server, [rec])
    if rec.status == COPIED:
        _extract_all(run, [rec])
    run.ledger.flush()
    if rec.status == ERROR:
        # Failed, so doit does not remember it: running this task again is what retries the file.
        return TaskFailed(logs.printable(f"{server}: {label(rec.name)} parked in error/{rec.error_kind}/{server}: "
                                         f"{rec.last_error}\n  fix it, then run this task again "
                                         f"({RECOVER_HINT[rec.error_kind]})"))
    if rec.status == PENDING:
        return TaskFailed(logs.printable(f"{server}: {label(rec.name)} could not be fetched: "
                                         f"{'; '.join(run.problems.get(server, ())) or 'see the log'}"))
    return {"seen": key}


def recorded(key):
    """doit `uptodate` of a parked file's task: true while doit remembers running it for this record."""
    def uptodate(_task, values):
        return values.get("seen") == key
    return uptodate

