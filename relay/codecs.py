"""Compression formats: detection by magic bytes and streaming extraction with caps, in constant memory."""

import errno
import hashlib
import os
import time
import zlib
from typing import NamedTuple

try:
    from isal import isal_zlib as _zlib
    _CORRUPT = (zlib.error, _zlib.error)
except ImportError:  # pragma: no cover - isal is a declared dependency; stdlib zlib is the fallback
    _zlib = zlib
    _CORRUPT = (zlib.error,)

from .errors import ArchiveError, CorruptArchive
from .faults import crashpoint

CHUNK = 1 << 18  # 256 KiB pieces stay in cache between inflate, hash and write (measured faster than 1 MiB)
MAGIC = {b"\x1f\x8b": "gzip"}
SUPPORTED = ("gzip",)
SUFFIXES = {"gzip": (".gz", ".gzip")}


def detect_format(head):
    """Name the compression format from the first bytes of a file, or '' when unknown."""
    for magic, name in MAGIC.items():
        if head.startswith(magic):
            return name
    return ""


def output_name(name, fmt):
    """The extracted file's name: the compression suffix dropped, or `.out` added."""
    for suffix in SUFFIXES.get(fmt, ()):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name + ".out"


_free_cache = {}  # directory -> (monotonic time, free bytes): statvfs per small file is wasted work


def _free_bytes(directory, max_age=0.5):
    now = time.monotonic()
    cached = _free_cache.get(directory)
    if cached is None or now - cached[0] > max_age:
        st = os.statvfs(directory)
        cached = _free_cache[directory] = (now, st.f_bavail * st.f_frsize)
    return cached[1]


class Inflated(NamedTuple):
    """What one read of a compressed file gave."""

    sha256: str  # of the compressed bytes
    format: str
    size: int  # of the extracted bytes
    out_sha256: str


def _gzip_members(chunks, src):
    """Inflate a stream of compressed chunks: every gzip member, CRC and length checked by zlib;
    output comes in pieces of at most CHUNK bytes, so a bomb never sits in memory."""
    name = os.path.basename(src)
    decomp = _zlib.decompressobj(31)
    for chunk in chunks:
        data = chunk
        while data:
            if decomp.eof:
                if not data.strip(b"\0"):
                    break  # trailing zero padding after the last member is tolerated, as gzip does
                decomp = _zlib.decompressobj(31)
            out = decomp.decompress(data, CHUNK)
            if out:
                yield out
            data = decomp.unused_data if decomp.eof else decomp.unconsumed_tail
    while not decomp.eof:
        out = decomp.decompress(b"", CHUNK)
        if not out:
            raise CorruptArchive(f"{name}: corrupt gzip data: truncated (the end of the last member is missing)")
        yield out


def inflate(src, dst_tmp, *, max_bytes, min_free):
    """One read of `src`: hash it, detect its format, inflate it into `dst_tmp` (not yet fsynced).

    Returns Inflated(sha256, format, size, out_sha256); on any failure no `dst_tmp` is left behind.
    """
    directory = os.path.dirname(dst_tmp)
    name = os.path.basename(src)
    in_sha, out_sha = hashlib.sha256(), hashlib.sha256()
    written = 0
    budget = _free_bytes(directory) - min_free
    if budget <= 0:
        raise ArchiveError(f"{directory}: less than min_free_bytes ({min_free}) free; free some space")
    try:
        with open(src, "rb") as fh, open(dst_tmp, "wb") as out:
            head = fh.read(CHUNK)
            fmt = detect_format(head)
            if fmt not in SUPPORTED:
                raise CorruptArchive(f"{name}: empty file" if not head else
                                     f"{name}: unknown format (magic bytes match none of {', '.join(SUPPORTED)})")

            def chunks():
                block = head
                while block:
                    in_sha.update(block)
                    yield block
                    block = fh.read(CHUNK)

            for piece in _gzip_members(chunks(), src):
                written += len(piece)
                if written > max_bytes:
                    raise CorruptArchive(f"{name}: output exceeds max_extracted_bytes ({max_bytes}); "
                                         "treated as a decompression bomb")
                if written > budget:
                    budget = _free_bytes(directory, max_age=0) - min_free + written
                    if written > budget:
                        raise ArchiveError(f"{directory}: not enough free space to extract {name} "
                                           f"(min_free_bytes {min_free}); free some space and rerun")
                out_sha.update(piece)
                out.write(piece)
                crashpoint("extract")
    except (CorruptArchive, ArchiveError):
        _discard(dst_tmp)
        raise
    except _CORRUPT as exc:
        _discard(dst_tmp)
        raise CorruptArchive(f"{name}: corrupt gzip data: {exc or type(exc).__name__}") from None
    except OSError as exc:
        _discard(dst_tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ArchiveError(f"{directory}: disk full while extracting {name}; free some space "
                               "and rerun") from None
        raise ArchiveError(f"{name}: extraction failed: {exc}") from None
    except BaseException:
        _discard(dst_tmp)
        raise
    return Inflated(in_sha.hexdigest(), fmt, written, out_sha.hexdigest())


def _discard(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
