"""Pure planning: from a server's listing, the files in its incoming/ and its known records, the Plan.

A record is one version of a file (relay.records.version_key): a listed version the store does not
know is new work, whatever became of earlier versions of that path. Everything in incoming/ is
unprocessed work: a fetched copy of a listed version, a leftover whose source move a crash cut
short, or a file dropped by hand."""

import os

import msgspec

from .records import COPIED, ERROR, PENDING, PROCESSED, SUPERSEDED, Record, version_key, whole_seconds


class Skip(msgspec.Struct, frozen=True):
    """A listed or dropped path left alone this run, and why."""

    path: str
    reason: str


class Plan(msgspec.Struct, kw_only=True):
    """What one server's run will do; its records are the ones the run executes."""

    server: str
    due: list = []  # Records to bring to `processed`: PENDING (to fetch) or COPIED (in incoming/)
    probes: dict = {}  # key of a due PENDING record -> sha256 values it may be a rename of
    parked: list = []  # Records waiting in error/ for a recovery
    superseded: list = []  # unfinished Records whose version is gone: nothing left to do for them
    finish: list = []  # processed Records whose source is still in incoming/ (a crash cut the move short)
    skipped: list = []
    listed: bool = True  # False when the listing failed: only what is already local is due
    done: int = 0


class Local(msgspec.Struct, frozen=True):
    """A regular file in incoming/<server>/."""

    name: str
    size: int
    mtime: str  # "seconds.nanoseconds"


def _copy_matches(local, rec):
    return (
        local is not None
        and local.size == rec.size
        and (
            rec.origin == "local"
            and local.mtime == rec.mtime
            or rec.origin == "remote"
            and whole_seconds(local.mtime) == whole_seconds(rec.mtime)
        )
    )


class _Planner:
    def __init__(self, server, known, unfinished, incoming, now, min_age):
        self.plan = Plan(server=server)
        self.known = known
        self.unfinished = {r.key: r for r in unfinished}
        self.incoming = {f.name: f for f in incoming}
        self.claimed = set()  # names in incoming/ explained by a record
        self.names = set()  # local names given to due remote records
        self.now = now
        self.min_age = min_age
        self.processed_by_size: dict[int, list] = {}
        for k in known.values():
            if k.status == PROCESSED and k.sha256:
                self.processed_by_size.setdefault(k.size, []).append(k)

    def young(self, mtime):
        return self.now - float(mtime) < self.min_age

    def resume_local_copies(self):
        """Unfinished records whose copy sits in incoming/: due whatever the listing says."""
        for rec in self.unfinished.values():
            if rec.status == ERROR:
                continue
            if rec.status == COPIED and _copy_matches(self.incoming.get(rec.local_name), rec):
                self.claimed.add(rec.local_name)
                self.names.add(rec.local_name)

    def listed(self, entries):
        seen = set()
        for entry in entries:
            if entry.path in seen:
                continue  # matched by two of the server's patterns: one file all the same
            seen.add(entry.path)
            if entry.kind != "f":
                self.plan.skipped.append(Skip(entry.path, f"not a regular file (type {entry.kind})"))
                continue
            self.version(entry)
        return seen

    def version(self, entry):
        key = version_key(self.plan.server, "remote", entry.path, entry.size, entry.mtime)
        known = self.known.get(key)
        if known is not None and known.status == PROCESSED:
            self.plan.done += 1
            return
        rec = self.unfinished.pop(key, None)
        if rec is not None and rec.status == ERROR:
            self.plan.parked.append(rec)
            return
        if rec is None and self.young(entry.mtime):
            self.plan.skipped.append(Skip(entry.path, "younger than min_file_age_seconds"))
            return
        if rec is None or rec.status == SUPERSEDED:
            rec = Record(
                key=key,
                server=self.plan.server,
                origin="remote",
                remote_path=entry.path,
                size=entry.size,
                mtime=entry.mtime,
                attempts=rec.attempts if rec else {},
            )
        self.place_remote(rec)

    def place_remote(self, rec):
        if rec.status == COPIED and rec.local_name in self.claimed:
            self.plan.due.append(rec)  # its copy is in incoming/ already
            return
        base = os.path.basename(rec.remote_path)
        landed = [
            n
            for n in dict.fromkeys([rec.local_name, base])
            if n and n not in self.claimed and _copy_matches(self.incoming.get(n), rec)
        ]
        if landed:
            rec.status, rec.local_name = COPIED, landed[0]  # fetched by a run that stopped before recording it
            self.claimed.add(landed[0])
        else:
            rec.status = PENDING
            # Never over a file already in incoming/ (a hand drop) or another due file's name.
            rec.local_name = base if base not in self.incoming and base not in self.names else f"{base}~{rec.key[:8]}"
            candidates = [
                k.sha256
                for k in self.processed_by_size.get(rec.size, ())
                if k.mtime == rec.mtime or k.remote_path == rec.remote_path
            ]
            if candidates:
                self.plan.probes[rec.key] = sorted(set(candidates))
        self.names.add(rec.local_name)
        self.plan.due.append(rec)

    def leftovers(self, listed_ok, listed_paths):
        """Unfinished records not listed now: local copies go on; the rest wait or are superseded (a
        parked version whose path now holds another one too: that file changed on the server)."""
        for rec in self.unfinished.values():
            # Not for error/extract: its copy there is the only one of that version.
            if (
                rec.status == ERROR
                and rec.origin == "remote"
                and rec.error_kind != "extract"
                and rec.remote_path in listed_paths
            ):
                self.plan.superseded.append(rec)
            elif rec.status == ERROR:
                self.plan.parked.append(rec)
            elif rec.local_name in self.claimed and rec.status == COPIED:
                self.plan.due.append(rec)
            elif listed_ok or rec.origin == "local":
                self.plan.superseded.append(rec)

    def drops(self, processed_named, take_drops):
        """Files in incoming/ that no due record explains: finished sources, or hand drops."""
        for name, local in sorted(self.incoming.items()):
            if name in self.claimed:
                continue
            leftover = [r for r in processed_named.get(name, ()) if _copy_matches(local, r)]
            if leftover:
                self.plan.finish.append(leftover[0])
            elif take_drops:
                self.drop(local)

    def drop(self, local):
        rec = drop_record(self.plan.server, local)
        known = self.known.get(rec.key)
        if known is not None and known.status == ERROR:
            return  # parked already (listed among the unfinished)
        if self.young(local.mtime):
            self.plan.skipped.append(Skip(local.name, "younger than min_file_age_seconds"))
            return
        self.plan.due.append(rec)


def drop_record(server, local):
    """The Record of a file dropped by hand into incoming/ (a Local), ready to extract."""
    return Record(
        key=version_key(server, "local", local.name, local.size, local.mtime),
        server=server,
        origin="local",
        local_name=local.name,
        size=local.size,
        mtime=local.mtime,
        status=COPIED,
    )


def plan_server(server, *, entries, incoming, known, unfinished, processed_named, now, min_age, take_drops=True):
    """Decide the due, parked, superseded and skipped files of one server.

    `entries`: the remote listing, None if it failed; `incoming`: Local files in incoming/<server>/;
    `known`: key -> store.Known; `unfinished`: the server's Records neither processed nor superseded;
    `processed_named`: name in incoming/ -> processed Records whose copy had that name."""
    planner = _Planner(server, known, unfinished, incoming, now, min_age)
    planner.resume_local_copies()
    listed_paths = planner.listed(entries) if entries is not None else set()
    planner.plan.listed = entries is not None
    planner.leftovers(entries is not None, listed_paths)
    planner.drops(processed_named, take_drops)
    return planner.plan


def filed_name(name, sha256, taken):
    """The name a file is filed under in processed/ (its extraction drops the compression suffix):
    `name` itself, or, when `taken(candidate)` says another file has it, `.<sha12>` before the suffix."""
    if not taken(name):
        return name
    stem, dot, suffix = name.rpartition(".")
    tagged = (
        f"{stem}.{sha256[:12]}.{suffix}"
        if dot and stem and suffix.lower() in ("gz", "gzip")
        else f"{name}.{sha256[:12]}"
    )
    return tagged if not taken(tagged) else f"{tagged}~{sha256[12:20]}"
