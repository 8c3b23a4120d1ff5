"""Crash-safe file publication: write to a temp path on the same filesystem, fsync, rename, fsync the directory."""

import ctypes
import os


def fsync_dir(path):
    """Make a rename or unlink inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data):
    """Replace `path` with `data` so that a crash leaves either the old or the new bytes; return its stat."""
    st = _publish(path, data, sync=True)
    fsync_dir(os.path.dirname(path))
    return st


def move_durably(src, dst):
    """Rename `src` to `dst` (same filesystem) and make both directory entries durable."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.replace(src, dst)
    fsync_dir(os.path.dirname(dst))
    if os.path.dirname(src) != os.path.dirname(dst):
        fsync_dir(os.path.dirname(src))


def unlink_durably(path):
    """Remove `path` if present and make the removal durable."""
    if unlink_quietly(path):
        fsync_dir(os.path.dirname(path))


def unlink_quietly(path):
    """Remove `path` if it is there; True if it was."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path):
    """Flush every dirty page and entry of the filesystem holding `path` (one call for a batch)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if not hasattr(_libc, "syncfs"):  # pragma: no cover - not Linux
            os.sync()
        elif _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def replace_unsynced(path, data):
    """Write `data` to a temp file beside `path` and rename it over `path` (durable after syncfs); return its stat."""
    return _publish(path, data, sync=False)


def _publish(path, data, sync):
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".tmp-{name}")  # swept by name if a crash leaves it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
            st = os.fstat(fd)  # a rename keeps size and mtime
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)  # on a full disk, give the space back at once
        raise
    return st
