"""Where files live: the user's data tree under DATA_ROOT and our private work areas under TMP_DIR."""

import os

from .planning import Local
from .records import ERROR_KINDS


def scan_incoming(directory):
    """(Local of each regular file, names of everything else) in an incoming/<server>/ directory."""
    files: list[Local] = []
    others: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return files, others
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            files.append(Local(entry.name, st.st_size, f"{st.st_mtime_ns // 10**9}.{st.st_mtime_ns % 10**9:09d}"))
        else:
            others.append(entry.name)
    return files, others


class Layout:
    """Paths of the data tree for one configuration."""

    # Paths are joined with f-strings, not os.path.join: they are asked for several times a file, and
    # the roots are validated absolute paths while server names and file names hold no "/".

    def __init__(self, settings):
        self.root = settings.data_root.rstrip("/") or "/"
        self.tmp = settings.tmp_dir.rstrip("/") or "/"

    def incoming(self, server):
        """Fetched or dropped files waiting for extraction."""
        return f"{self.root}/incoming/{server}"

    def extracted(self, server):
        """Extracted output."""
        return f"{self.root}/extracted/{server}"

    def processed(self, server):
        """Sources kept after extraction."""
        return f"{self.root}/processed/{server}"

    def error(self, kind, server):
        """Parked files of one error kind."""
        return f"{self.root}/error/{kind}/{server}"

    def fetch_area(self, server):
        """Where each rsync batch of `server` gets a private landing directory of its own."""
        return f"{self.tmp}/fetch/{server}"

    def extract_tmp(self, server):
        """Where extraction output is written before it is renamed into extracted/."""
        return f"{self.tmp}/extract/{server}"

    def make_tree(self, servers):
        """Create every directory of the data tree for `servers`."""
        for server in servers:
            for path in (
                self.incoming(server),
                self.extracted(server),
                self.processed(server),
                self.extract_tmp(server),
                *(self.error(k, server) for k in ERROR_KINDS),
            ):
                os.makedirs(path, exist_ok=True)
