"""The actions doit calls: each stage of a server, one file, a parked file; and the run summary."""

import concurrent.futures
import functools
import os
import sys

from doit.exceptions import TaskFailed

from . import engine, logs, parking, smallfiles
from .errors import RelayError
from .planning import drop_record
from .records import COPIED, ERROR, PENDING, PROCESSED, SUPERSEDED, label

RECOVER_HINT = {
    "copy": "check the path and permissions on the server",
    "extract": "free disk space or fix the local problem",
    "quarantine": "replace the file on the server if it is really corrupt",
}


def _guarded(fn):
    """An action that turns expected failures (RelayError) into one-line task failures."""

    @functools.wraps(fn)  # doit reads the signature (through __wrapped__) to pass task parameters
    def action(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RelayError as exc:
            return TaskFailed(logs.printable(str(exc)))

    return action


@_guarded
def list_action(run, server):
    """`plan:<server>`: list the server and plan its work."""
    plan = engine.list_server(run, server)
    if run.inflater is not None and sum(r.size < LARGE_BYTES for r in plan.due) >= smallfiles.HELPER_BATCH:
        run.inflater.warm()  # it boots while the files are fetched
    return True


@_guarded
def fetch_action(run, server, only=""):
    """`fetch:<server>`: fetch the server's due files (`--only NAME`: just that one)."""
    if not only:
        return engine.fetch_server(run, server)
    plan = run.plans.get(server)
    due = {label(os.path.basename(r.remote_path)): r for r in plan.due if r.status == PENDING} if plan else {}
    if only not in due:
        return TaskFailed(
            f"{server}: no file called {only!r} is due for fetching "
            f"(due: {', '.join(sorted(due)) or 'none'}); see `doit list --all`"
        )
    return engine.fetch_server(run, server, [due[only]])


@_guarded
def extract_action(run, server):
    """`extract:<server>`: verify, extract and file every due file of the server, then report."""
    run.start()
    plan = run.plans.get(server)
    due = []
    if plan is not None:
        for rec in plan.finish:
            drop = None if engine.finish_source(run, rec) else _as_drop(run, rec)
            if drop is not None:
                due.extend(run.ledger.adopt([drop]))
        due.extend(r for r in plan.due if r.status == COPIED)
    _extract_all(run, due)
    run.ledger.flush()
    return summary(run, server)


def _as_drop(run, rec):
    """A file in incoming/ that has a processed file's name and version but not its bytes."""
    local = next((f for f in engine.scan_incoming(run, rec.server) if f.name == rec.local_name), None)
    return drop_record(rec.server, local) if local is not None else None  # None: gone since the plan


# Compressed size from which a file is extracted on the run's pool: such work is in C (isal, hashing,
# I/O) and uses every core. A smaller file's work is half Python: a second thread would only contend
# for the interpreter lock, so those are done by the calling thread with the run's helper process.
LARGE_BYTES = 256 * 2**10


def _extract_all(run, records):
    """Extract `records`: large ones on the run's pool, small ones here; re-raise the first error."""
    futures = [run.pool.submit(engine.extract_file, run, rec) for rec in records if rec.size >= LARGE_BYTES]
    smallfiles.extract_small(run, [rec for rec in records if rec.size < LARGE_BYTES])
    for future in concurrent.futures.as_completed(futures):
        future.result()


def summary(run, server):
    """Log and print the server's run summary; a TaskFailed if it parked a file, left one due, or failed to list."""
    changed = run.ledger.changed_in_run(server)
    parked_now = [r for r in changed if r.status == ERROR and r.parked_by == run.run_id]
    processed = [r for r in changed if r.status == PROCESSED and not r.duplicate_of]
    duplicates = sum(1 for r in changed if r.status == PROCESSED and r.duplicate_of)
    still_parked = len(run.store.parked(server))
    problems = list(run.problems.get(server, ())) + [
        f"{label(r.name)} parked in error/{r.error_kind}/{server}: {r.last_error}" for r in parked_now
    ]
    where = (
        f" ({still_parked} in all wait in {run.settings.data_root}/error/*/{server}/: `doit list` names them)"
        if still_parked
        else ""
    )
    unlisted = server not in run.plans or not run.plans[server].listed
    line = (
        f"run summary: {len(processed)} file(s) processed, {duplicates} duplicate(s), "
        f"{len(parked_now)} parked{where}{', listing failed' if unlisted else ''}"
    )
    logs.note(
        run.log,
        30 if problems else 20,
        line,
        {
            "server": server,
            "operation": "summary",
            "bytes": sum(r.extracted_size for r in processed),
            "duration_ms": run.elapsed_ms(),
        },
    )
    sys.stdout.write(f"{server}: {line}\n")  # one write: doit's reporter writes from other threads
    sys.stdout.flush()
    if not problems:
        return True
    hints = [
        f"then recover with: doit forget -s recover:{kind}/{server} && doit run  ({RECOVER_HINT[kind]})"
        for kind in sorted({r.error_kind for r in parked_now})
    ]
    return TaskFailed(logs.printable("\n  ".join([f"{server}: {len(problems)} problem(s):", *problems, *hints])))


@_guarded
def file_action(run, server, key, dropped=None):
    """`extract:<server>/<file>`: bring one file through every stage left, whatever its version now
    (a remote file is listed again first); a parked file is retried: naming its task asks for that.
    `dropped`: the Record of a hand drop the store does not know yet."""
    run.start()
    known = run.store.get(key) or dropped  # only looked at: the plan's record is the one worked on
    if known is None:
        return True
    if known.origin == "remote":
        plan = run.plans.get(server) or engine.list_server(run, server)
        if not plan.listed:
            return TaskFailed(
                logs.printable(
                    f"{server}: could not list the server, so {label(known.name)} "
                    f"was not done: {'; '.join(run.problems.get(server, ()))}"
                )
            )
        todo = [r for r in plan.due + plan.parked if r.remote_path == known.remote_path]
    else:
        rec = run.ledger.adopt([run.ledger.record(key) or known])[0]
        todo = [rec] if rec.status not in (PROCESSED, SUPERSEDED) else []
    _retry(run, server, todo)
    run.ledger.flush()
    for rec in todo:
        if rec.status == ERROR:
            return TaskFailed(
                logs.printable(
                    f"{server}: {label(rec.name)} parked in error/{rec.error_kind}/{server}: {rec.last_error}\n"
                    f"  fix it, then run this task again ({RECOVER_HINT[rec.error_kind]})"
                )
            )
        if rec.status == PENDING:
            return TaskFailed(
                logs.printable(
                    f"{server}: {label(rec.name)} could not be fetched: "
                    f"{'; '.join(run.problems.get(server, ())) or 'see the log'}"
                )
            )
    return True


def _retry(run, server, records):
    """Unpark `records` (fresh attempt counters) and bring each through the stages left."""
    kept = {rec.key: parking.unpark(run, rec) for rec in records if rec.status == ERROR}
    pending = [r for r in records if r.status == PENDING]
    if pending:
        engine.fetch_server(run, server, pending)
    for rec in records:
        parking.settle_kept_copy(run, rec, kept.get(rec.key, ""))
    _extract_all(run, [r for r in records if r.status == COPIED])


@_guarded
def recover_action(run, server, kind):
    """`recover:<kind>/<server>`: run when doit does not remember it (`doit forget -s recover:…`):
    every file of `server` parked in error/<kind> goes through the stage that failed again."""
    run.start()
    parked = [r for r in run.ledger.adopt(run.store.parked(server)) if r.error_kind == kind and r.status == ERROR]
    if parked:
        logs.note(
            run.log,
            20,
            f"recovering {len(parked)} file(s) from error/{kind}",
            {"server": server, "operation": "recover"},
        )
        _retry(run, server, parked)
        run.ledger.flush()
    # Remembered by doit whatever became of the files: one that fails again is parked again (and
    # said by extract:<server>), not retried at every run.
    return {"armed": True}


def armed(task, values):
    """doit `uptodate` of a recover task: true while doit remembers having run it."""
    del task  # doit passes arguments by these names
    return values.get("armed") is True
