"""A server's work, stage by stage: list and plan, fetch (renames recognised on the server first),
then verify → extract → place each file. Every record change goes through the run's Ledger."""

import fnmatch
import os
import time

from . import codecs, durable, fetching, layout, parking
from .errors import ArchiveError, CorruptArchive, DiskFull, RemoteError, SourceChanged, SourceGone
from .faults import crashpoint
from .ledger import incoming_path, move_source
from .planning import filed_name, plan_server
from .records import COPIED, ERROR, EXTRACTED, PENDING, PROCESSED, SUPERSEDED, label, whole_seconds
from .retry import call_with_retry

# --- list and plan ---------------------------------------------------------------------------


def scan_incoming(run, server):
    """The regular files in incoming/<server>/ (other kinds are said and left alone)."""
    files, others = layout.scan_incoming(run.layout.incoming(server))
    for name in others if run.take_drops else ():
        run.emit(30, f"skipped {label(name)} in incoming/: not a regular file", server=server, operation="list")
    return files


def _listing(run, server):
    """The server's listing, retried on transient faults; None (and a problem noted) if it failed."""
    settings = run.settings
    started = time.monotonic()
    try:
        entries = call_with_retry(
            run.connections[server.name].list_files,
            attempts=settings.max_retry_copy,
            base=settings.retry_delay_base,
            cap=settings.retry_delay_max,
            is_transient=lambda e: getattr(e, "transient", False),
            fields={"server": server.name, "operation": "list"},
            interrupted=run.stopping,
        )
    except RemoteError as exc:
        run.problems.setdefault(server.name, []).append(f"listing failed: {exc}")
        run.emit(40, f"listing failed: {exc}", server=server.name, operation="list", error=str(exc))
        return None
    run.emit(
        20,
        f"listed {len(entries)} path(s)",
        server=server.name,
        operation="list",
        duration_ms=round((time.monotonic() - started) * 1000, 1),
    )
    for pattern in server.remote_paths:
        if not any(fnmatch.fnmatchcase(e.path, pattern.rstrip("/")) for e in entries):
            run.emit(
                30,
                f"remote_path {pattern} matched nothing (no such directory, or no file yet)",
                server=server.name,
                operation="list",
            )
    return entries


def list_server(run, server_name):
    """doit action of `plan:<server>`: list the server, plan its work and record the plan."""
    run.start()
    server = run.settings.server(server_name)
    entries = _listing(run, server)
    store = run.store
    incoming = scan_incoming(run, server_name)
    named = {f.name: store.processed_named(server_name, f.name) for f in incoming}
    plan = plan_server(
        server_name,
        entries=entries,
        incoming=incoming,
        known=store.known(server_name),
        unfinished=store.unfinished(server_name),
        processed_named=named,
        now=time.time(),
        min_age=run.settings.min_file_age_seconds,
        take_drops=run.take_drops,
    )
    ledger = run.ledger
    plan.due = [r for r in ledger.adopt(plan.due) if r.status in (PENDING, COPIED, EXTRACTED)]
    plan.parked = ledger.adopt(plan.parked)
    for skip in plan.skipped:
        run.emit(20, f"skipped {label(skip.path)}: {skip.reason}", server=server_name, operation="list")
    for rec in ledger.adopt(plan.superseded):
        if rec.status == ERROR:
            run.emit(
                20,
                f"parked version superseded: the server now has another version of the file (it is "
                f"planned as such); {label(rec.source_path)} is left for you to delete",
                rec,
                operation="recover",
            )
        ledger.change(rec, status=SUPERSEDED)
    for rec in plan.due:
        # Recorded as due with the run's next batch (at the latest when it ends): `doit list` then shows
        # it, `doit run extract:S/FILE` finds it.
        ledger.change(rec)
    run.plans[server_name] = plan
    return plan


# --- fetch ---------------------------------------------------------------------------------


def fetch_server(run, server_name, records=None):
    """doit action of `fetch:<server>`: recognise renames on the server, then fetch the rest in one batch."""
    run.start()
    plan = run.plans.get(server_name)
    if records is None:
        records = [r for r in plan.due if r.status == PENDING] if plan else []
    records = _renames(run, server_name, records, plan.probes if plan else {})
    if records:
        fetching.fetch_batch(run, server_name, records, parking.park)
    # No flush of its own: the copies are recorded with the next batch (the planner recognises a copy
    # in incoming/ by name, size and mtime should the run die first).
    return True


def _renames(run, server_name, records, probes):
    """Records due whose content the server's own sha256sum shows is known already: duplicates, with
    no transfer. Returns the records still to fetch."""
    candidates = [r for r in records if r.key in probes]
    if not candidates:
        return records
    try:
        hashes = run.connections[server_name].remote_sha256([r.remote_path for r in candidates])
    except RemoteError as exc:
        run.emit(30, f"could not hash on the server ({exc}); fetching instead", server=server_name, operation="verify")
        return records
    if hashes is None:
        run.emit(
            20,
            "the server has no sha256sum: possible renames are fetched and compared here",
            server=server_name,
            operation="verify",
        )
        return records
    renamed = set()
    for rec in candidates:
        sha = hashes.get(rec.remote_path)
        owner = run.ledger.content_owner(server_name, sha) if sha else None
        if owner is not None:
            run.ledger.change(rec, status=PROCESSED, sha256=sha, duplicate_of=owner, source_path="", local_name="")
            run.emit(
                20,
                f"renamed copy of already processed content ({owner}); not transferred",
                rec,
                operation="verify",
            )
            renamed.add(rec.key)
    return [r for r in records if r.key not in renamed]


# --- verify, extract, place ----------------------------------------------------------------


def extract_file(run, rec):
    """Verify, extract and place one file whose copy is in incoming/ (a worker's job)."""
    if not run.ledger.begin(rec.key):
        return
    try:
        run.check_stop()
        if rec.status == COPIED:
            with run.slot(rec.server):
                extract(run, rec)
    finally:
        run.ledger.end(rec.key)


def expected(rec):
    """The size and whole-second mtime the copy in incoming/ must still have (a drop's mtime is its own)."""
    return rec.size, whole_seconds(rec.mtime) if rec.origin == "remote" else None


def extract(run, rec):
    """Verify, extract and place one file taken by the caller (its copy in incoming/)."""

    settings = run.settings
    src = incoming_path(settings.data_root, rec)
    tmp = f"{run.layout.extract_tmp(rec.server)}/{rec.key}.part"
    expect = expected(rec)
    started = time.monotonic()

    def once():
        run.ledger.attempt(rec, "extract")
        return codecs.inflate(
            src, tmp, max_bytes=settings.max_extracted_bytes, min_free=settings.min_free_bytes, expect=expect
        )

    try:
        result = call_with_retry(
            once,
            attempts=settings.max_retry_extract,
            base=settings.retry_delay_base,
            cap=settings.retry_delay_max,
            is_transient=lambda e: isinstance(e, ArchiveError) and not isinstance(e, DiskFull),
            fields={"server": rec.server, "file": label(rec.name), "operation": "extract"},
            interrupted=run.stopping,
        )
    except (SourceGone, SourceChanged) as exc:
        _source_moved(run, rec, src, exc)
        return
    except CorruptArchive as exc:
        if rec.origin == "remote" and _still_changing(run, rec):
            durable.unlink_durably(src)
            run.ledger.change(rec, status=SUPERSEDED)
            run.emit(
                30,
                "truncated and still changing on the server; its final version is fetched once stable",
                rec,
                operation="extract",
                error=str(exc),
            )
            return
        parking.park(run, rec, "quarantine", exc)
        return
    except ArchiveError as exc:
        parking.park(run, rec, "extract", exc)
        return
    crashpoint("extract")
    place(run, rec, tmp, result, started)


def _source_moved(run, rec, src, exc):
    if isinstance(exc, SourceGone):
        run.ledger.change(rec, status=PENDING if rec.origin == "remote" else SUPERSEDED)
        run.emit(
            30,
            "its copy left incoming/ before it was extracted; a remote file is fetched again",
            rec,
            operation="verify",
        )
        return
    if rec.origin == "remote":
        durable.unlink_durably(src)
    run.ledger.change(rec, status=SUPERSEDED)  # another version of the file: planned as such next run
    run.emit(
        30,
        f"changed during the run (listed {rec.size} bytes, got {exc.size}); its new version is processed once stable",
        rec,
        operation="verify",
    )


def _still_changing(run, rec):
    try:
        entry = run.connections[rec.server].stat_path(rec.remote_path)
    except (RemoteError, UnicodeError):
        return True  # cannot tell now: look again next run rather than quarantine a good file
    return entry is None or (entry.size, entry.mtime) != (rec.size, rec.mtime)


def place(run, rec, tmp, result, started):
    """Rename a verified extraction into extracted/ (or drop it: known content), plan the source's place."""
    ledger, layout = run.ledger, run.layout
    rec.sha256, rec.format = result.sha256, result.format
    owner = ledger.claim_content(rec, result.sha256)
    extracted_dir, processed_dir = layout.extracted(rec.server), layout.processed(rec.server)

    def choose(taken):
        def name_taken(name):
            out = f"{extracted_dir}/{codecs.output_name(name, result.format)}"
            return taken(f"{processed_dir}/{name}") or (owner is None and taken(out))

        name = filed_name(parking.filing_name(rec), result.sha256, name_taken)
        source = "" if run.settings.delete_source else f"{processed_dir}/{name}"
        return [source, "" if owner else f"{extracted_dir}/{codecs.output_name(name, result.format)}"]

    source, target = ledger.reserve(rec, choose)
    if owner is not None:
        os.unlink(tmp)
        due = ledger.change(rec, status=EXTRACTED, duplicate_of=owner, source_path=source)
        run.emit(20, f"duplicate of already processed content ({owner}); not extracted again", rec, operation="verify")
    else:
        if rec.origin == "local" and os.path.basename(target) != codecs.output_name(rec.local_name, result.format):
            run.emit(
                30,
                "a file dropped in incoming/ has the name of another file; extracted as "
                f"{label(os.path.basename(target))}",
                rec,
                operation="place",
            )
        os.replace(tmp, target)
        crashpoint("place")
        due = ledger.change(
            rec,
            nbytes=result.size,
            status=EXTRACTED,
            extracted_path=target,
            extracted_size=result.size,
            source_path=source,
        )
        run.emit(
            20,
            "extracted",
            rec,
            operation="extract",
            bytes=result.size,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
    if due:
        ledger.flush()


def finish_source(run, rec):
    """A processed record whose source a crash left in incoming/: file it now if it is that file;
    True when it was (else it is another file under that name, to take as a drop)."""
    src = incoming_path(run.settings.data_root, rec)
    try:
        same = codecs.sha256_of(src) == rec.sha256
    except FileNotFoundError:
        return True
    if same:
        move_source(rec, rec.source_path, run.settings.data_root)
        run.emit(20, "source filed (the run that processed it stopped first)", rec, operation="place")
    return same
