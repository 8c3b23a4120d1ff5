"""Compression formats: detection by magic bytes and streaming extraction with caps, in constant memory."""

import errno
import hashlib
import os
import zlib

try:
    from isal import igzip as _gzip
    from isal.igzip_lib import IsalError
    from isal.isal_zlib import error as IsalZlibError
    _CORRUPT = (EOFError, _gzip.BadGzipFile, zlib.error, IsalError, IsalZlibError)
except ImportError:  # pragma: no cover - isal is a declared dependency; stdlib is the fallback
    import gzip as _gzip
    _CORRUPT = (EOFError, _gzip.BadGzipFile, zlib.error)

from .errors import ArchiveError, CorruptArchive
from .faults import crashpoint

CHUNK = 1 << 20
MAGIC = {b"\x1f\x8b": "gzip"}
SUPPORTED = ("gzip",)
SUFFIXES = {"gzip": (".gz", ".gzip")}


def detect_format(head):
    """Name the compression format from the first bytes of a file, or '' when unknown."""
    for magic, name in MAGIC.items():
        if head.startswith(magic):
            return name
    return ""


def hash_and_detect(path):
    """SHA256 of the file's bytes and its format, in one read."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        head = fh.read(CHUNK)
        fmt = detect_format(head)
        while head:
            digest.update(head)
            head = fh.read(CHUNK)
    return digest.hexdigest(), fmt


def output_name(name, fmt):
    """The extracted file's name: the compression suffix dropped, or `.out` added."""
    for suffix in SUFFIXES.get(fmt, ()):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name + ".out"


def _free_bytes(directory):
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def extract(src, dst_tmp, fmt, *, max_bytes, min_free):
    """Inflate `src` into `dst_tmp` (fsynced); return (size, sha256). Leaves no file on failure."""
    if fmt not in SUPPORTED:
        raise CorruptArchive(f"{src}: unsupported or unknown format (magic bytes match no supported "
                             f"format: {', '.join(SUPPORTED)})")
    if os.path.getsize(src) == 0:
        raise CorruptArchive(f"{os.path.basename(src)}: empty file")
    directory = os.path.dirname(dst_tmp)
    name = os.path.basename(src)
    digest = hashlib.sha256()
    written = 0
    budget = _free_bytes(directory) - min_free
    if budget <= 0:
        raise ArchiveError(f"{directory}: less than min_free_bytes ({min_free}) free; free some space")
    try:
        with _gzip.open(src, "rb") as reader, open(dst_tmp, "wb") as out:
            while True:
                chunk = reader.read(CHUNK)
                if not chunk:
                    break
                written += len(chunk)
                if written > max_bytes:
                    raise CorruptArchive(f"{name}: output exceeds max_extracted_bytes ({max_bytes}); "
                                         "treated as a decompression bomb")
                if written > budget:
                    budget = _free_bytes(directory) - min_free + written
                    if written > budget:
                        raise ArchiveError(f"{directory}: not enough free space to extract {src} "
                                           f"(min_free_bytes {min_free}); free some space and rerun")
                digest.update(chunk)
                out.write(chunk)
                crashpoint("extract")
            out.flush()
            os.fsync(out.fileno())
    except (CorruptArchive, ArchiveError):
        _discard(dst_tmp)
        raise
    except _CORRUPT as exc:
        _discard(dst_tmp)
        raise CorruptArchive(f"{name}: corrupt gzip data: {exc or type(exc).__name__}") from None
    except OSError as exc:
        _discard(dst_tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ArchiveError(f"{directory}: disk full while extracting {src}; free some space "
                               "and rerun") from None
        raise ArchiveError(f"{src}: extraction failed: {exc}") from None
    except BaseException:
        _discard(dst_tmp)
        raise
    return written, digest.hexdigest()


def _discard(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
