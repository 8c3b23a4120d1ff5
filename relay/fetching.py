"""One server's batch fetch: rsync into a private landing directory per remote directory, each file
moved into incoming/ as rsync reports it done (never over a file already there)."""

import collections
import itertools
import os
import shutil
import stat
import tempfile
import time

from . import logs
from .errors import RemoteError, RemoteFileMissing
from .faults import crashpoint
from .records import COPIED, SUPERSEDED, label
from .retry import call_with_retry


def fetch_batch(run, server, records, park):
    """Fetch `records` (PENDING, of `server`); transient failures leave them due, others park them."""
    by_dir = collections.defaultdict(list)
    for rec in records:
        by_dir[os.path.dirname(rec.remote_path)].append(rec)
    with run.slot(server):
        for remote_dir, group in by_dir.items():
            run.check_stop()
            area = run.layout.fetch_area(server)
            os.makedirs(area, exist_ok=True)
            staging = tempfile.mkdtemp(prefix="batch-", dir=area)  # 0700, this batch's alone
            try:
                _Batch(run, server, remote_dir, group, staging, park).fetch()
            finally:
                _clear_staging(run, server, staging, {os.path.basename(r.remote_path) for r in group})


def _note(run, level, message, **fields):
    logs.note(run.log, level, message, fields)


def _clear_staging(run, server, staging, asked):
    """Remove a batch's landing directory; say so if the server sent files nobody asked for."""
    try:
        unasked = sorted(n for n in os.listdir(staging) if n not in asked and not n.startswith("."))
    except OSError:
        unasked = []
    if unasked:
        shown = ", ".join(label(n) for n in unasked[:3]) + (", …" if len(unasked) > 3 else "")
        _note(
            run,
            30,
            f"the server sent {len(unasked)} file(s) that were not asked for ({shown}); removed, not processed",
            server=server,
            operation="fetch",
        )
    shutil.rmtree(staging, ignore_errors=True)  # what stays (an I/O error) goes at the next run's sweep


class _Batch:
    """The files of one remote directory, fetched by one rsync (retried on transient faults)."""

    def __init__(self, run, server, remote_dir, group, staging, park):
        self.run = run
        self.server = server
        self.remote_dir = remote_dir
        self.staging = staging
        self.park = park
        self.incoming = run.layout.incoming(server)
        self.waiting = {os.path.basename(r.remote_path): r for r in group}
        self.reported = []  # reported by rsync, not landed yet
        self.arrived = 0
        self.bytes = 0

    def land(self, name, reported=True):
        """Move a finished file from the landing directory into incoming/, under a name of its own.

        `reported`: rsync said it is done; else (after rsync exits) it must be a regular file."""
        rec = self.waiting.get(name)
        if rec is None:
            return
        staged = f"{self.staging}/{name}"
        try:
            if not reported and not stat.S_ISREG(os.lstat(staged).st_mode):
                return  # a name that became a directory on the server: left, and handled as missing
            self._link(staged, rec)
        except FileNotFoundError:
            return  # not renamed into place yet: the pass after rsync exits takes it
        del self.waiting[name]
        crashpoint("fetch")
        self.run.ledger.change(rec, status=COPIED)
        self.arrived += 1
        self.bytes += rec.size

    def _link(self, staged, rec):
        # A hard link never replaces what is there (a hand drop that arrived since the plan).
        base = os.path.basename(rec.remote_path)
        others = (f"{base}~{rec.key[:8]}" + (f".{n}" if n else "") for n in range(100))  # made only if needed
        for name in itertools.chain([rec.local_name], others):
            try:
                os.link(staged, f"{self.incoming}/{name}")
            except FileExistsError:
                continue
            rec.local_name = name
            os.unlink(staged)
            return
        raise FileExistsError(f"{self.incoming}: no free name for {label(base)}")

    def on_report(self, name):
        # rsync logs a file just before renaming it into place, one file after the other: when it
        # reports a file, the ones it reported before are in place.
        for earlier in self.reported:
            self.land(earlier)
        self.reported = [n for n in self.reported if n in self.waiting]
        self.reported.append(name)

    def attempt(self):
        self.run.check_stop()
        for rec in self.waiting.values():
            self.run.ledger.attempt(rec, "fetch")
        try:
            self.run.connections[self.server].fetch(
                self.remote_dir, sorted(self.waiting), self.staging, on_file=self.on_report
            )
        finally:
            for name in list(self.waiting):  # rsync may fail for some files and deliver the others
                self.land(name, reported=False)

    def fetch(self):
        settings = self.run.settings
        started = time.monotonic()
        try:
            call_with_retry(
                self.attempt,
                attempts=settings.max_retry_copy,
                base=settings.retry_delay_base,
                cap=settings.retry_delay_max,
                is_transient=lambda e: getattr(e, "transient", False),
                fields={"server": self.server, "operation": "fetch"},
                interrupted=self.run.stopping,
            )
        except RemoteError as exc:
            self._failed(exc)
        for rec in self.waiting.values():  # rsync succeeded, but the file was not there to send
            self.run.ledger.change(rec, status=SUPERSEDED)
            _note(
                self.run,
                30,
                "vanished from the server between listing and fetch (rotated or removed); "
                "under a new name it is found by the next listing",
                server=self.server,
                file=label(rec.remote_path),
                operation="fetch",
            )
        if self.arrived:
            _note(
                self.run,
                20,
                f"fetched {self.arrived} file(s)",
                server=self.server,
                operation="fetch",
                bytes=self.bytes,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )

    def _failed(self, exc):
        left, self.waiting = list(self.waiting.values()), {}
        if getattr(exc, "transient", False) or self.run.stopping.is_set():
            # Transient (or stopped): the files stay due, never parked; the next run tries again.
            self.run.problems.setdefault(self.server, []).append(
                f"{len(left)} file(s) not fetched ({exc}); they stay due, the next run tries again"
            )
            return
        for rec in left:
            self.park(
                self.run,
                rec,
                "copy",
                exc
                if not isinstance(exc, RemoteFileMissing) or len(left) == 1
                else RemoteFileMissing(f"{exc} (one rsync for {len(left)} files)", server=self.server),
            )
