"""Compression formats: detection by magic bytes and streaming extraction with caps, in constant memory."""

import errno
import hashlib
import os
import types
import zlib
from typing import NamedTuple

from . import durable
from .errors import ArchiveError, CorruptArchive, DiskFull, SourceChanged, SourceGone
from .faults import crashpoint

_zlib: types.ModuleType
_CORRUPT: tuple[type[BaseException], ...]
try:
    from isal import isal_zlib as _zlib

    _CORRUPT = (zlib.error, _zlib.error)
except ImportError:  # pragma: no cover - isal is a declared dependency; stdlib zlib is the fallback
    _zlib = zlib
    _CORRUPT = (zlib.error,)

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


def _free_bytes(directory):
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def sha256_of(path):
    """Hex SHA256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class Inflated(NamedTuple):
    """What one read of a compressed file gave."""

    sha256: str  # of the compressed bytes
    format: str
    size: int  # of the extracted bytes


def inflate(src, dst_tmp, *, max_bytes, min_free, expect=None):
    """One read of `src`: hash it, detect its format, inflate it into `dst_tmp` (not yet fsynced).

    `expect`: (size, whole-second mtime or None) the file must still have, else SourceChanged; a
    missing `src` raises SourceGone. The check is on the open file, so it is the file that is read.

    Every gzip member is inflated, CRC and length checked by zlib; output comes in pieces of at most
    CHUNK bytes, so a bomb never sits in memory. Returns Inflated(sha256, format, size);
    on any failure no `dst_tmp` is left behind.
    """
    directory = os.path.dirname(dst_tmp)
    name = os.path.basename(src)
    budget = _free_bytes(directory) - min_free
    if budget <= 0:
        raise DiskFull(f"{directory}: less than min_free_bytes ({min_free}) free; free some space")
    try:
        with _OpenChecked(src, name, expect) as (src_fd, size):
            out_fd = os.open(dst_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                sink = _Sink(out_fd, name, directory, max_bytes, min_free, budget)
                in_sha, fmt = _inflate_stream(src_fd, size, name, sink)
            finally:
                os.close(out_fd)
    except BaseException as exc:
        durable.unlink_quietly(dst_tmp)  # whatever failed, no partial output stays
        raise _as_archive_error(exc, name, directory) from None
    return Inflated(in_sha.hexdigest(), fmt, sink.written)


class _OpenChecked:
    """The source opened as a plain descriptor, after checking it is still the file listed."""

    def __init__(self, src, name, expect):
        self.src, self.name, self.expect = src, name, expect
        self.fd = None

    def __enter__(self):
        # Plain file descriptors: for a small file, Python's buffered file objects cost more than the I/O.
        try:
            self.fd = os.open(self.src, os.O_RDONLY)
        except FileNotFoundError:
            raise SourceGone(f"{self.name}: no longer there") from None
        st = os.fstat(self.fd)
        expect = self.expect
        if expect is not None and (
            st.st_size != expect[0] or (expect[1] is not None and int(st.st_mtime) != expect[1])
        ):
            os.close(self.fd)
            raise SourceChanged(f"{self.name}: {st.st_size} bytes, {expect[0]} expected", st.st_size)
        return self.fd, st.st_size

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)


def _inflate_stream(src_fd, size, name, sink):
    """Read, hash and inflate every member of the file into `sink`; (sha256 object, format)."""
    # A small file in one read of its own size: a CHUNK-sized buffer each time costs an mmap.
    step = min(CHUNK, size + 1)
    block = os.read(src_fd, step)
    fmt = detect_format(block)
    if fmt not in SUPPORTED:
        raise CorruptArchive(
            f"{name}: empty file"
            if not block
            else f"{name}: unknown format (magic bytes match none of {', '.join(SUPPORTED)})"
        )
    in_sha = hashlib.sha256()
    decomp = _zlib.decompressobj(31)
    while block:
        in_sha.update(block)
        decomp = _inflate_block(decomp, block, sink)
        # A short read means the end: no extra call just to be told so.
        block = os.read(src_fd, step) if len(block) == step else b""
    while not decomp.eof:
        piece = decomp.decompress(b"", CHUNK)
        if not piece:
            raise CorruptArchive(f"{name}: corrupt gzip data: truncated (the end of the last member is missing)")
        sink.write(piece)
    return in_sha, fmt


def _inflate_block(decomp, data, sink):
    """Inflate one block read from the file, starting a new decompressor at each gzip member."""
    while data:
        if decomp.eof:
            if not data.strip(b"\0"):
                break  # trailing zero padding after the last member is tolerated, as gzip does
            decomp = _zlib.decompressobj(31)
        sink.write(decomp.decompress(data, CHUNK))
        data = decomp.unused_data if decomp.eof else decomp.unconsumed_tail
    return decomp


def _as_archive_error(exc, name, directory):
    """The named error a failure of extraction is to the caller."""
    if isinstance(exc, _CORRUPT):
        return CorruptArchive(f"{name}: corrupt gzip data: {exc or type(exc).__name__}")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"{directory}: disk full while extracting {name}; free some space and rerun")
    if isinstance(exc, OSError):
        return ArchiveError(f"{name}: extraction failed: {exc}")
    return exc


class _Sink:
    """Where inflated pieces go: the output cap and free-space check, then the file."""

    def __init__(self, out, name, directory, max_bytes, min_free, budget):  # `out`: a file descriptor
        self.out, self.name, self.directory = out, name, directory
        self.max_bytes, self.min_free, self.budget = max_bytes, min_free, budget
        self.written = 0

    def write(self, piece):
        if not piece:
            return
        self.written += len(piece)
        if self.written > self.max_bytes:
            raise CorruptArchive(
                f"{self.name}: output exceeds max_extracted_bytes ({self.max_bytes}); treated as a decompression bomb"
            )
        if self.written > self.budget:
            self.budget = _free_bytes(self.directory) - self.min_free + self.written
            if self.written > self.budget:
                raise DiskFull(
                    f"{self.directory}: not enough free space to extract {self.name} "
                    f"(min_free_bytes {self.min_free}); free some space and rerun"
                )
        view = memoryview(piece)
        while view:
            view = view[os.write(self.out, view) :]
        crashpoint("extract")
