"""Pure planning: from a listing, the local incoming files and the state records, decide what work is due."""

import functools
import os

import msgspec

from . import state
from .state import Record

# The first stage still to run for a record in each status.
NEXT_STAGE = {state.PENDING: "fetch", state.COPIED: "verify", state.VERIFIED: "extract",
              state.EXTRACTED: "extract"}


class Work(msgspec.Struct):
    """A file with work due, from stage `first` on."""

    key: str
    first: str
    record: Record


class Skip(msgspec.Struct):
    """A listed path left alone this run, and why."""

    path: str
    reason: str


class Plan(msgspec.Struct, dict=True):
    """What one server's run will do."""

    server: str
    due: list = []
    parked: list = []  # Records waiting in error/ for a recovery
    listed: dict = {}  # key -> (size, mtime) now listed, for parked records (a recovery refetches)
    skipped: list = []
    done: int = 0

    @functools.cached_property
    def labels(self):
        """A unique task label per key (its due, then its parked files); asked for by several task
        generators, so made once."""
        labels, used = {}, set()
        for rec in [w.record for w in self.due] + list(self.parked):
            text = label(rec.local_name or rec.remote_path)
            if text in used:
                text = f"{text}~{rec.key[:8]}"
            used.add(text)
            labels[rec.key] = text
        return labels


def label(name):
    """A printable, shell-friendly rendering of a file name for task names and logs."""
    if name.isascii() and name.isprintable() and "\\" not in name:
        return name  # the common case, and it is asked for thousands of times a run
    raw = os.fsencode(name)
    text = raw.decode("utf-8", "backslashreplace").replace("\\", "\\\\") if b"\\" in raw else \
        raw.decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def versioned(name, generation, sha256):
    """`name` for generation 0; later generations get `.<sha12>` before the compression suffix."""
    if generation == 0 or not sha256:
        return name
    stem, dot, suffix = name.rpartition(".")
    tag = sha256[:12]
    return f"{stem}.{tag}.{suffix}" if dot and stem else f"{name}.{tag}"


class _Claims(dict):
    """local name -> key of the record that uses it; built on first use (a no-op run never needs it)."""

    def __init__(self, records):
        super().__init__()
        self._records = records

    def _fill(self):
        if self._records is not None:
            records, self._records = self._records, None
            self.update({r.local_name: r.key for r in records.values() if r.local_name})

    def get(self, name, default=None):
        self._fill()
        return super().get(name, default)

    def __setitem__(self, name, key):
        self._fill()
        super().__setitem__(name, key)


def _local_name(entry_path, key, claims):
    base = os.path.basename(entry_path)
    owner = claims.get(base)
    return base if owner in (None, key) else f"{base}~{key[:8]}"


def _fresh(record, **changes):
    """A new generation of a finished record, ready to go through the stages again."""
    return Record(key=record.key, server=record.server, origin=record.origin,
                  remote_path=record.remote_path, local_name=record.local_name,
                  generation=record.generation + 1, created_at=record.created_at, **changes)


def plan_server(server, records, entries, incoming, now, min_age, drops=True):
    """Decide the due, parked and skipped files of one server.

    `entries`: the remote listing (None if the server could not be listed);
    `incoming`: (name, size, mtime) of files found in incoming/<server>/ (None: not looked at);
    `drops`: whether files there that no record claims are processed as local drops.
    A remote file still to fetch whose copy already sits in incoming/ with the listed size and
    mtime (a run stopped after rsync delivered it) goes on from `verify`: no second transfer.
    """
    plan = Plan(server=server)
    claims = _Claims(records)
    by_path = {r.remote_path: r for r in records.values() if r.origin == "remote"}
    landed = {name: (size, mtime) for name, size, mtime in incoming or ()}
    seen = set()
    listed_paths = set()
    for entry in entries or ():
        if entry.path in listed_paths:
            continue  # matched by two of the server's remote_path patterns: one file all the same
        listed_paths.add(entry.path)
        if entry.kind != "f":
            plan.skipped.append(Skip(entry.path, f"not a regular file (type {entry.kind})"))
            continue
        record = by_path.get(entry.path)
        if (record is not None and record.status == state.PROCESSED and record.size == entry.size
                and record.mtime == entry.mtime):
            seen.add(record.key)  # the common case at scale: done, unchanged
            plan.done += 1
            continue
        key = record.key if record is not None else state.record_key(server, "remote", entry.path)
        seen.add(key)
        young = now - float(entry.mtime) < min_age
        if record is None:
            if young:
                plan.skipped.append(Skip(entry.path, "younger than min_file_age_seconds"))
                continue
            record = Record(key=key, server=server, origin="remote", remote_path=entry.path,
                            local_name=_local_name(entry.path, key, claims), size=entry.size,
                            mtime=entry.mtime)
            claims[record.local_name] = key
            plan.due.append(_to_fetch(record, landed))
        else:
            _place_known(plan, record, entry.size, entry.mtime, young, landed)
    for name, size, mtime in incoming if drops and incoming else ():
        key = state.record_key(server, "local", name)
        if claims.get(name, key) != key:
            continue  # a fetched file waiting for its own stages
        record = records.get(key)
        young = now - float(mtime) < min_age
        if record is None:
            if young:
                plan.skipped.append(Skip(name, "younger than min_file_age_seconds"))
                continue
            record = Record(key=key, server=server, origin="local", local_name=name, size=size,
                            mtime=mtime, status=state.COPIED)
            plan.due.append(Work(key, "verify", record))
        else:
            seen.add(key)
            _place_known(plan, record, size, mtime, young, landed)
    for key, record in records.items():
        if key in seen:
            continue
        if record.parked:
            plan.parked.append(record)
        elif record.status in (state.COPIED, state.VERIFIED, state.EXTRACTED):
            # Fetched already; the listing (or the local drop) no longer shows it, which is fine.
            plan.due.append(Work(key, NEXT_STAGE[record.status], record))
        elif record.status == state.PROCESSED:
            plan.done += 1
    return plan


def _to_fetch(record, landed):
    """Work for a remote record that needs its file: `fetch`, or `verify` when the copy already landed."""
    size_mtime = landed.get(record.local_name)
    # Not over a quarantined copy: the fetch is what supersedes (and removes) it.
    if size_mtime is not None and not record.source_path and size_mtime[0] == record.size and \
            int(float(size_mtime[1])) == int(float(record.mtime)):
        record.status = state.COPIED
        return Work(record.key, NEXT_STAGE[state.COPIED], record)
    return Work(record.key, "fetch", record)


def _place_known(plan, record, size, mtime, young, landed):
    if record.parked:
        plan.parked.append(record)
        plan.listed[record.key] = (size, mtime)
    elif record.status == state.PROCESSED:
        if (record.size, record.mtime) == (size, mtime):
            plan.done += 1
        elif young:
            plan.skipped.append(Skip(record.remote_path or record.local_name,
                                     "changed and younger than min_file_age_seconds"))
        elif record.origin == "local":
            plan.due.append(Work(record.key, "verify", _fresh(record, size=size, mtime=mtime,
                                                                status=state.COPIED)))
        else:
            plan.due.append(_to_fetch(_fresh(record, size=size, mtime=mtime, status=state.PENDING), landed))
    elif record.status == state.PENDING:
        if young:
            plan.skipped.append(Skip(record.remote_path, "younger than min_file_age_seconds"))
            return
        plan.due.append(_to_fetch(msgspec.structs.replace(record, size=size, mtime=mtime), landed))
    else:
        plan.due.append(Work(record.key, NEXT_STAGE[record.status], record))
