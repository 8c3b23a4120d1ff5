"""The state record of one file version, its statuses and keys (pure: no I/O)."""

import hashlib
import os

import msgspec

PENDING, COPIED, EXTRACTED, PROCESSED, ERROR, SUPERSEDED = (
    "pending",
    "copied",
    "extracted",
    "processed",
    "error",
    "superseded",
)

# The stage that failed decides where a parked file waits and which stage a recovery resumes.
ERROR_KINDS = ("copy", "extract", "quarantine")


class Record(msgspec.Struct, kw_only=True):
    """Everything known about one version (path, size, mtime) of a remote or hand-dropped file."""

    key: str
    server: str
    origin: str  # "remote" or "local" (dropped by hand into incoming/)
    remote_path: str = ""  # surrogate-escaped, as os.fsdecode gives it
    local_name: str = ""  # its name in incoming/
    size: int = -1  # at listing
    mtime: str = ""  # at listing, as the remote `find` printed it
    status: str = PENDING
    sha256: str = ""  # of the compressed bytes
    format: str = ""
    duplicate_of: str = ""  # key of the record whose content this is
    error_kind: str = ""  # copy | extract | quarantine
    last_error: str = ""
    parked_by: str = ""  # the run that parked it
    attempts: dict[str, int] = {}
    extracted_path: str = ""
    extracted_size: int = -1
    source_path: str = ""  # where the compressed source went: processed/, error/…, or "" if deleted
    run_id: str = ""  # the run that last changed it
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def parked(self):
        """True when the file waits in error/ for a recovery."""
        return self.status == ERROR

    @property
    def name(self):
        """The path that names the file to a user: remote path, or the dropped file's name."""
        return self.remote_path or self.local_name


def version_key(server, origin, path, size, mtime):
    """The key of one version of a file: any change of path, size or mtime is another key."""
    raw = b"\0".join([server.encode(), origin.encode(), os.fsencode(path), str(size).encode(), str(mtime).encode()])
    return hashlib.sha256(raw).hexdigest()[:32]


def whole_seconds(mtime):
    """The whole seconds of an mtime string (`1700000000.1234567890`), the precision rsync keeps."""
    return int(float(mtime)) if mtime else 0


def label(name):
    """A printable, shell-friendly rendering of a file name for task names and logs."""
    if name.isascii() and name.isprintable() and "\\" not in name:
        return name
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    if "\\" in name:
        text = os.fsencode(name).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)
