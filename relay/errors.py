"""Expected failures, each a small named exception whose message says what, where and what to do."""


class RelayError(Exception):
    """Base of every expected logpipe-relay failure."""


class ConfigError(RelayError):
    """The configuration is invalid; the message names file, key and problem."""


class LockHeld(RelayError):
    """Another run holds the lock."""


class StateWriteError(RelayError):
    """State records could not be written (disk full, I/O): the files they describe are done again next run."""


class RemoteError(RelayError):
    """rsync or ssh failed; `kind` says how and `transient` whether a retry may help."""

    kind = "remote"
    transient = False

    def __init__(self, message, *, server="", code=None):
        super().__init__(message)
        self.server = server
        self.code = code


class RemoteUnreachable(RemoteError):
    """Refused, timed out, reset: worth a retry."""

    kind = "unreachable"
    transient = True


class AuthFailed(RemoteError):
    """Key or password refused by the server."""

    kind = "auth"


class HostKeyMismatch(RemoteError):
    """The server's host key is unknown or changed."""

    kind = "hostkey"


class RemoteFileMissing(RemoteError):
    """The file vanished between listing and fetch."""

    kind = "missing"


class ArchiveError(RelayError):
    """Extraction failed for a reason other than corrupt input (disk full, I/O): retryable."""

    kind = "extract"


class SourceGone(RelayError):
    """The file to extract is no longer in incoming/."""


class SourceChanged(RelayError):
    """The file in incoming/ is not the one listed: its size (or mtime) differs; `size` is what it has."""

    def __init__(self, message, size):
        super().__init__(message)
        self.size = size


class CorruptArchive(RelayError):
    """The input is corrupt, truncated, of an unknown format or a decompression bomb."""

    kind = "corrupt"


class StateCorrupt(RelayError):
    """STATE_DIR/state.db cannot be read as our database: a one-line error, never a silent reset."""


class RunInterrupted(RelayError):
    """The run is stopping (Ctrl-C, SIGTERM): its ssh and rsync were ended and no new one starts."""


class DiskFull(ArchiveError):
    """No room to extract (ENOSPC, or below min_free_bytes): retrying at once cannot help."""
