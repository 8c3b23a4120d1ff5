"""Pure (no I/O): the ssh and rsync argument lists and remote scripts remote.py runs, and the parsers of
what they print and how they fail."""

import hashlib
import json
import os
import re
import shlex
import sys
import tempfile

import msgspec

from .errors import AuthFailed, HostKeyMismatch, RemoteFileMissing, RemoteUnreachable


class Entry(msgspec.Struct, frozen=True):
    """One path as the remote listing saw it."""

    kind: str  # find's %y: f regular, l link, d directory, …
    size: int
    mtime: str  # seconds since the epoch with fraction, as find printed it
    path: str  # surrogate-escaped str of the raw bytes

    @property
    def mtime_s(self):
        """Whole seconds of the mtime, the precision compared after a fetch."""
        return int(self.mtime.split(".")[0])


def control_dir(state_dir):
    """A private directory for ControlMaster sockets, short enough for a unix socket path."""
    candidate = os.path.join(state_dir, "ssh")
    if len(candidate) <= 50:
        return candidate
    digest = hashlib.sha256(state_dir.encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"logpipe-relay-{os.getuid()}-{digest}")


def identity_file(settings, server):
    """The key file this server is reached with: its own, else SSH_IDENTITY_FILE (None: ssh's default)."""
    return server.identity_file or settings.ssh_identity_file


def control_socket(settings, server, sockets):
    """The ControlMaster socket of exactly this connection, in `sockets`.

    Named after a hash of everything that decides who connects where and how: a master is reused
    for SSH_CONTROL_PERSIST seconds and ssh then ignores the options of the command, so a changed
    user, key, known_hosts file, port, host, auth mode or host-key policy must get a master of its
    own (named by the server name alone, it silently went on using the old one). The server name is
    in it too, so that close() of one server never ends another's master. 16 hex digits keep the
    path well under the 108 bytes of a unix socket (control_dir is at most 50, ssh adds 17)."""
    fields = [
        server.name,
        server.host,
        server.port,
        server.user,
        identity_file(settings, server),
        settings.ssh_known_hosts,
        server.auth,
        server.password_env,
        settings.ssh_strict_host_key_checking,
    ]
    return f"{sockets}/{hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]}"


def ssh_options(settings, server, sockets):
    """ssh `-o` options: host keys checked, timeouts, keepalives and a shared connection."""
    opts = [
        "-o",
        f"UserKnownHostsFile={settings.ssh_known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        f"StrictHostKeyChecking={settings.ssh_strict_host_key_checking}",
        "-o",
        f"ConnectTimeout={settings.ssh_connect_timeout}",
        "-o",
        f"ServerAliveInterval={settings.ssh_server_alive_interval}",
        "-o",
        f"ServerAliveCountMax={settings.ssh_server_alive_count_max}",
        "-o",
        f"ControlPath={control_socket(settings, server, sockets)}",
        "-o",
        "LogLevel=ERROR",
        "-p",
        str(server.port),
        "-l",
        server.user,
    ]
    identity = identity_file(settings, server)
    if identity:
        opts += ["-i", identity, "-o", "IdentitiesOnly=yes"]
    if server.auth == "password":
        opts += [
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "NumberOfPasswordPrompts=1",
        ]
    else:
        opts += ["-o", "BatchMode=yes", "-o", "PasswordAuthentication=no"]
    return opts


def with_password(server, argv):
    """Prefix `argv` with `sshpass -e` for password servers; the password travels in SSHPASS only."""
    return ["sshpass", "-e", *argv] if server.auth == "password" else list(argv)


def master_argv(settings, server, sockets):
    """Start a background ControlMaster that later commands share."""
    return with_password(
        server,
        [
            "ssh",
            *ssh_options(settings, server, sockets),
            "-o",
            "ControlMaster=yes",
            "-o",
            f"ControlPersist={settings.ssh_control_persist}",
            "-f",
            "-N",
            "--",
            server.host,
        ],
    )


def check_master_argv(settings, server, sockets):
    """Ask whether a ControlMaster is already up (no network)."""
    return ["ssh", *ssh_options(settings, server, sockets), "-O", "check", "--", server.host]


def exit_master_argv(settings, server, sockets):
    """Ask the ControlMaster to exit."""
    return ["ssh", *ssh_options(settings, server, sockets), "-O", "exit", "--", server.host]


def _rsync_quote(arg):
    # rsync splits -e on spaces and honours single or double quotes (no backslashes).
    if not re.search(r"[\s'\"]", arg):
        return arg
    return f"'{arg}'" if "'" not in arg else f'"{arg}"'


def rsync_argv(settings, server, sockets, remote_dir, staging, trust_sender=True):
    """Hardened rsync pulling the basenames given on stdin from `remote_dir` into `staging`.

    `trust_sender`: skip rsync's own check that the sender sent only the names asked for. That check
    costs time quadratic in the number of names (bench/run.py's `backlog`, 10,000 files in one
    batch: 4.98 s a run with it, 3.82 s without). Ours stands in for it: `staging` is a private
    directory of this batch alone, rsync still refuses absolute and `..` names, and only the names
    asked for are taken out of it (relay.stages)."""
    ssh = with_password(server, ["ssh", *ssh_options(settings, server, sockets), "-o", "ControlMaster=no"])
    return [
        "rsync",
        *(["--trust-sender"] if trust_sender else []),
        "--protect-args",
        "--times",
        "--no-relative",
        "--from0",
        "--files-from=-",
        "--ignore-missing-args",
        "--chmod=F0644",
        "--no-motd",
        f"--timeout={settings.ssh_deadline}",
        "-e",
        " ".join(_rsync_quote(a) for a in ssh),
        "--",
        f"{server.host}:{remote_dir.rstrip('/')}/",
        staging.rstrip("/") + "/",
    ]


def refuses_trust_sender(stderr):
    """Whether rsync's stderr says it does not know --trust-sender (rsync before 3.2.5)."""
    return "trust-sender" in stderr and re.search(r"unknown option|unrecognized option", stderr) is not None


def split_glob(pattern):
    """Split an absolute glob into the deepest wildcard-free directory and the depth below it."""
    parts = pattern.rstrip("/").split("/")[1:]
    fixed = 0
    while fixed < len(parts) - 1 and not re.search(r"[*?\[]", parts[fixed]):
        fixed += 1
    return "/" + "/".join(parts[:fixed]), len(parts) - fixed


def glob_escape(path):
    """`path` as a find -path pattern that matches only itself."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", path)


def listing_script(patterns):
    """One POSIX shell line that prints `type size mtime path\\0` for every match of `patterns`."""
    steps = []
    for pattern in patterns:
        root, depth = split_glob(pattern)
        steps.append(
            f"{{ [ ! -e {shlex.quote(root)} ] || find {shlex.quote(root)} -mindepth {depth} "
            f"-maxdepth {depth} -path {shlex.quote(pattern.rstrip('/'))} "
            f"-printf '%y %s %T@ %p\\0'; }}"
        )
    return "LC_ALL=C; export LC_ALL; cd / && " + " && ".join(steps)


def sha256_script(search_path=None):
    """One POSIX shell line printing `HASH  PATH\\0` for each NUL-terminated path on its stdin it can read.

    The paths never enter a command line a shell reads: xargs hands them to sha256sum as arguments,
    after `--`; `-z` ends each line with NUL and prints the name as it is (no escaping), so every
    byte comes back. `search_path`: the PATH to find xargs and sha256sum in (default: the login's)."""
    path = "" if search_path is None else f"PATH={shlex.quote(search_path)}; export PATH; "
    return f"LC_ALL=C; export LC_ALL; {path}cd / && exec xargs -0 -r sha256sum -z --"


# What an xargs or sha256sum without -0 / -z says (in the C locale): no sha256sum we can use.
_NO_SHA256 = re.compile(r"^(xargs|sha256sum): (invalid|unrecognized) option", re.M)


def sha256_unavailable(code, stderr):
    """Whether sha256_script failed for want of a usable sha256sum (or xargs), not of a file or the link."""
    return code == 127 or code in (1, 123) and _NO_SHA256.search(stderr) is not None


def _as_sent(path):
    # A relative path goes as ./path: sha256sum reads a bare `-` as its stdin, even after `--`.
    return path if path.startswith("/") else "./" + path


def sha256_input(paths):
    """The stdin of sha256_script for `paths` (surrogate-escaped str): their bytes, NUL-terminated."""
    return b"".join(os.fsencode(_as_sent(p)) + b"\0" for p in paths)


def parse_sha256(raw, paths):
    """{path: hex} from sha256_script's output, for the asked `paths` alone."""
    wanted = {_as_sent(p): p for p in paths}
    found = {}
    for line in raw.split(b"\0"):
        digest, mark, name = line[:64], line[64:66], line[66:]
        path = wanted.get(os.fsdecode(name))
        if path is not None and mark in (b"  ", b" *") and re.fullmatch(rb"[0-9a-f]{64}", digest):
            found[path] = digest.decode()
    return found


def decode_rsync_name(line):
    """A file name as rsync logs it (non-printable bytes as \\#ooo, in the C locale) back to its bytes."""
    if line.isascii() and "\\" not in line:
        return line.rstrip("\n")  # nothing escaped: the common case, once a file
    raw = line.rstrip("\n").encode("ascii", "surrogateescape")
    return os.fsdecode(re.sub(rb"\\#([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw))


def parse_listing(raw):
    """Entries from the NUL-separated listing output; names keep every byte (surrogate-escaped)."""
    encoding = sys.getfilesystemencoding()
    entries = []
    for chunk in raw.split(b"\0"):
        if chunk:
            kind, size, mtime, path = chunk.split(b" ", 3)
            entries.append(Entry(kind.decode(), int(size), mtime.decode(), path.decode(encoding, "surrogateescape")))
    return entries


_HOSTKEY = re.compile(
    r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|"
    r"No .* host key is known",
    re.I,
)
_AUTH = re.compile(
    r"Permission denied \((publickey|password|keyboard)|Permission denied, please try again|"
    r"Authentication failed|Too many authentication failures",
    re.I,
)
_UNREACHABLE = re.compile(
    r"Connection refused|Connection timed out|timed out|Connection reset|"
    r"Broken pipe|No route to host|Network is unreachable|connection unexpectedly "
    r"closed|Connection closed|Could not resolve|Name or service not known|"
    r"kex_exchange_identification|lost connection|deadline",
    re.I,
)
_MISSING = re.compile(r"No such file or directory|failed to open|Permission denied \(13\)", re.I)


def classify(code, stderr, *, server="", tool="ssh"):
    """Turn an exit code plus stderr into a named RemoteError; codes alone are ambiguous."""
    text = stderr.strip().splitlines()
    detail = text[-1] if text else f"exit status {code}"
    where = f"{tool} to {server}" if server else tool
    if tool.startswith("sshpass") and code == 5 or _AUTH.search(stderr):
        return AuthFailed(
            f"{where}: authentication refused ({detail}); check the user, key or password for this server",
            server=server,
            code=code,
        )
    if tool.startswith("sshpass") and code == 6 or _HOSTKEY.search(stderr):
        return HostKeyMismatch(
            f"{where}: host key not accepted ({detail}); check SSH_KNOWN_HOSTS for this host", server=server, code=code
        )
    if _UNREACHABLE.search(stderr) or code in (255, 10, 12, 30, 35):
        return RemoteUnreachable(f"{where}: unreachable ({detail})", server=server, code=code)
    if _MISSING.search(stderr):
        return RemoteFileMissing(f"{where}: {detail}", server=server, code=code)
    return RemoteUnreachable(f"{where}: failed with status {code} ({detail})", server=server, code=code)
