"""Parking a file that retrying cannot fix in error/<kind>/<server>/, and bringing it back."""

import os

import msgspec

from . import durable, logs
from .ledger import incoming_path
from .planning import filed_name
from .records import COPIED, ERROR, PENDING, label


def park(run, rec, kind, error):
    """Record a failed file parked in error/<kind>/<server>/, then move it there (or write why there).

    The record first: a crash before the move leaves a parked record whose file is still in
    incoming/, which a recovery takes from there (unpark looks where the file is)."""
    message = str(error)
    directory = run.layout.error(kind, rec.server)
    os.makedirs(directory, exist_ok=True)
    src = incoming_path(run.settings.data_root, rec)
    moving = kind != "copy" and os.path.exists(src)
    suffix = "" if moving else ".error.json"

    def choose(taken):
        name = filed_name(filing_name(rec), rec.key, lambda n: taken(os.path.join(directory, n + suffix)))
        return [os.path.join(directory, name + suffix)]

    [target] = run.ledger.reserve(rec, choose)
    run.ledger.change(
        rec, status=ERROR, error_kind=kind, last_error=logs.printable(message), source_path=target, parked_by=run.run_id
    )
    run.ledger.flush()
    if moving:
        durable.move_durably(src, target)
    else:
        durable.write_atomic(
            target,
            msgspec.json.encode(
                {"server": rec.server, "file": label(rec.name), "error": logs.printable(message), "run_id": run.run_id}
            ),
        )
    run.emit(40, f"parked in error/{kind}: {message}", rec, operation="park", error=message)


def filing_name(rec):
    """The name a file is filed under: its remote base name, or the name it was dropped with."""
    return os.path.basename(rec.remote_path) if rec.origin == "remote" else rec.local_name


def unpark(run, rec):
    """Bring a parked file back to the stage that failed, with fresh attempt counters. Returns the
    path of a quarantined copy kept until a fresh fetch has landed (else it is extracted again)."""
    stage = "fetch" if rec.error_kind == "copy" else "extract"
    attempts = {k: v for k, v in rec.attempts.items() if k != stage}
    status, kept = COPIED, ""
    src = incoming_path(run.settings.data_root, rec)
    if rec.origin == "remote" and rec.error_kind in ("copy", "quarantine"):
        status = PENDING  # fetched afresh: the fault may have been in transit, or fixed on the server
        if rec.source_path.endswith(".error.json"):
            durable.unlink_durably(rec.source_path)
        elif os.path.exists(rec.source_path):
            kept = rec.source_path  # the only copy if the server no longer has the file
    elif os.path.exists(rec.source_path) and not os.path.exists(src):
        durable.move_durably(rec.source_path, src)
    run.emit(20, f"recovering from error/{rec.error_kind}", rec, operation="recover")
    run.ledger.change(rec, status=status, error_kind="", last_error="", source_path="", attempts=attempts)
    return kept


def settle_kept_copy(run, rec, kept):
    """After a recovery's fetch: drop the quarantined copy if a fresh one landed, else extract it again."""
    if not kept or not os.path.exists(kept):
        return
    if rec.status == COPIED:
        durable.unlink_durably(kept)
        return
    src = incoming_path(run.settings.data_root, rec)
    if not os.path.exists(src):
        durable.move_durably(kept, src)
        run.ledger.change(rec, status=COPIED)
        run.emit(
            30,
            "the server no longer has this version: its quarantined copy is extracted again",
            rec,
            operation="recover",
        )
