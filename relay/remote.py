"""Everything that crosses SSH: listing, fetch, connection reuse; the only user of `sh` (argv: relay.sshargs)."""

import os
import re
import stat
import tempfile
import threading

import sh

from .children import Children
from .errors import AuthFailed, RemoteError, RemoteUnreachable

# Re-exported: callers and tests use them as remote.<name>.
from .sshargs import (  # noqa: F401
    Entry,
    check_master_argv,
    classify,
    control_dir,
    control_socket,
    decode_rsync_name,
    exit_master_argv,
    glob_escape,
    listing_script,
    master_argv,
    parse_listing,
    parse_sha256,
    refuses_trust_sender,
    rsync_argv,
    sha256_input,
    sha256_script,
    sha256_unavailable,
    split_glob,
    ssh_options,
    with_password,
)


def private_dir(path):
    """Create `path` as a 0700 directory of ours; refuse one someone else made (it may be in /tmp)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise RemoteError(
            f"{path}: the SSH control-socket directory is not a directory owned by this "
            "user; remove it (someone else may have created it)"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


# --- the run's children ----------------------------------------------------------------------

_ANY_STATUS = list(range(-64, 256))  # every exit status and death by signal (negative): the caller judges


def _env_for(server, secret=True, environ=None):
    """The environment of an ssh or rsync child: this process's, with the password (read from
    `environ`, the run's environment, by default this process's) in SSHPASS for a password server."""
    env = dict(os.environ)
    env.pop("SSHPASS", None)
    env["LC_ALL"] = "C"  # rsync then logs every non-ASCII name byte as \#ooo, which we decode exactly
    if server.auth == "password" and secret:
        secret = (os.environ if environ is None else environ).get(server.password_env)
        if not secret:
            raise AuthFailed(
                f"server {server.name} uses password auth but ${server.password_env} is "
                "not set; export it in the environment of the run",
                server=server.name,
            )
        env["SSHPASS"] = secret
    return env


def _not_installed(tool, server):
    return RemoteError(
        f"{tool} is not installed; install it (apt-get install -y {'openssh-client' if tool == 'ssh' else tool})",
        server=server.name,
    )


def _too_slow(tool, server, deadline):
    return RemoteUnreachable(
        f"{tool} to {server.name}: no answer within the {deadline}s deadline (SSH_DEADLINE); the peer may be dead",
        server=server.name,
    )


# Why starting a command cannot deadlock while other threads run (issue 11, point 14). sh forks and
# runs Python in the child before exec; only the forking thread exists there, and a lock another
# thread held at fork time stays held forever, so the child must take no such lock. It takes none:
# - os.fork() runs with the GIL held, so no other thread was inside Python or pymalloc at that
#   instant; the child's CPython reinitialises the GIL, the import lock (taken just before the
#   fork) and threading's locks; logging's at-fork hook takes its module lock before the fork and
#   gives every handler a fresh lock in the child; glibc's fork() holds malloc's arena locks across
#   it, so malloc works in the child whatever other threads were doing.
# - sh's child branch (sh/__init__.py, after os.fork) only makes system calls (fcntl, sigaction,
#   setpgid, dup2, close, listdir of /dev/fd, execve) and small allocations: no logging, no
#   import, no sh lock; sh also disables the gc around the fork, so no collection runs
#   finalizers there. Its error path formats a traceback into a pipe (sys.stderr only if that fails).
# - our preexec (Children.preexec) is one prctl through a ctypes function resolved before the fork
#   (no dlsym in the child) and a getppid.
# One way in stays open: CPython frees the other threads' thread-state dicts in the child, running
# the finalizers of what only a threading.local held. So no thread of a run may keep in a
# threading.local an object whose finalizer takes a lock (a sqlite connection, a file being
# written); none does. tests/test_remote.py starts hundreds of commands from 8 threads while others
# log, allocate, import and dlopen.
def _spawn(children, server, argv, **kwargs):
    """Start `argv` with sh in the background, in a process group of its own that dies with this thread."""
    children.check()
    try:
        return sh.Command(argv[0])(
            *argv[1:], _new_group=True, _preexec_fn=children.preexec(), _bg=True, _ok_code=_ANY_STATUS, **kwargs
        )
    except sh.CommandNotFound:
        raise _not_installed(argv[0], server) from None


def _run(server, argv, *, deadline, children, stdin=None, secret=True, on_line=None, environ=None):
    """Run argv in its own process group; return (code, stdout, stderr); kill the group at the deadline.

    The calling thread reads the child's stdout itself, whatever is there at each read: sh's reader
    thread costs about 40 ns a byte (0.2 s of CPU for the listing of 50,000 files) and, with a
    callback, a thread wake-up a line. With `on_line`, each stdout line is handed to it as it comes
    instead of being collected. The calling thread must live until this returns (it does: it waits),
    as the child's parent-death signal follows the thread that forked, not the process."""
    # coreutils timeout signals the whole process group (rsync and its ssh), which sh's _timeout does
    # not; and sh's _timeout would add up to 0.1 s to every command (its watcher thread polls at that
    # interval, and wait() waits for it).
    guarded = ["timeout", "-s", "TERM", "-k", "5", str(deadline), *argv]
    read_end, write_end = os.pipe()
    try:
        try:
            proc = _spawn(
                children,
                server,
                guarded,
                _env=_env_for(server, secret, environ),
                _in=stdin,
                _out=write_end,
            )
        finally:
            os.close(write_end)  # the child has its own copy: end of file when it (and its children) exit
        with children.running(proc.pgid):
            out = b""
            if on_line:
                _read_lines(read_end, on_line)
            else:
                out = _read_all(read_end)
            proc.wait()
    finally:
        os.close(read_end)
    children.check()  # stopped while it ran: its output may be cut short
    code, stderr = proc.exit_code, proc.stderr.decode(errors="replace")
    if code in (124, 137):
        raise _too_slow(argv[0], server, deadline)
    if code == 127 and re.match(r"\S*timeout: failed to run command", stderr):
        raise _not_installed(argv[0], server)
    if code < 0:
        raise RemoteUnreachable(f"{argv[0]} to {server.name}: killed by signal {-code}", server=server.name)
    return code, out, stderr


def _read_all(fd):
    """Everything read from `fd` until end of file."""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_lines(fd, on_line):
    """Hand each line read from `fd` (decoded, without its newline) to `on_line`, until end of file."""
    pending = b""
    while chunk := os.read(fd, 1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            on_line(line.decode("utf-8", "surrogateescape"))
    if pending:
        on_line(pending.decode("utf-8", "surrogateescape"))


class Connection:
    """A per-server handle that keeps one ControlMaster open for the run."""

    def __init__(self, settings, server, environ=None, children=None):
        self.settings = settings
        self.server = server
        self.environ = environ  # where the password is read (None: this process's environment)
        self.children = Children() if children is None else children  # the run's, to stop them all
        self.sockets = control_dir(settings.state_dir)
        self.socket = control_socket(settings, server, self.sockets)
        self._lock = threading.Lock()
        self._open = False
        self._trusts_sender = True  # until the local rsync says it does not know --trust-sender

    def _tool(self):
        return "sshpass+ssh" if self.server.auth == "password" else "ssh"

    def _run(self, argv, deadline, **kwargs):
        return _run(self.server, argv, deadline=deadline, children=self.children, environ=self.environ, **kwargs)

    def _master_alive(self):
        private_dir(self.sockets)
        code, _, _ = self._run(
            check_master_argv(self.settings, self.server, self.sockets),
            self.settings.ssh_connect_timeout + 5,
            secret=False,
        )
        if code != 0:
            try:
                os.unlink(self.socket)  # a dead master's socket
            except FileNotFoundError:
                pass
        return code == 0

    def open(self):
        """Make sure a ControlMaster is up, starting one if needed."""
        with self._lock:
            if not self._open and not self._master_alive():
                self._start_master()
            self._open = True

    def _start_master(self):
        # The master lives on in the background; its stdio must not be pipes we wait on.
        with tempfile.TemporaryFile() as err:
            argv = master_argv(self.settings, self.server, self.sockets)
            try:
                proc = _spawn(
                    self.children,
                    self.server,
                    argv,
                    _env=_env_for(self.server, environ=self.environ),
                    _in=None,
                    _out=os.devnull,
                    _err=err,
                    _timeout=self.settings.ssh_connect_timeout * 3 + 5,
                )
                with self.children.running(proc.pgid):  # until ssh -f is in the background
                    proc.wait()
            except sh.TimeoutException:
                raise RemoteUnreachable(
                    f"ssh to {self.server.name}: no answer while connecting", server=self.server.name
                ) from None
            self.children.check()
            err.seek(0)
            stderr = err.read().decode(errors="replace")
        if proc.exit_code != 0:
            raise classify(
                proc.exit_code,
                stderr,
                server=self.server.name,
                tool="sshpass" if self.server.auth == "password" else "ssh",
            )

    def close(self):
        """Stop the ControlMaster now rather than after SSH_CONTROL_PERSIST idle seconds."""
        with self._lock:
            self._run(exit_master_argv(self.settings, self.server, self.sockets), 10, secret=False)
            self._open = False

    def list_files(self):
        """One round trip: every path matching the server's remote_path globs."""
        return self.list_paths(self.server.remote_paths)

    def stat_path(self, path):
        """The listing entry of one exact remote path, or None."""
        for entry in self.list_paths([glob_escape(path)]):
            if entry.path == path:
                return entry
        return None

    def list_paths(self, patterns):
        """One round trip: every path matching `patterns`."""
        code, out, err = self._remote(listing_script(patterns))
        if code != 0:
            raise classify(code, err, server=self.server.name, tool=self._tool())
        return parse_listing(out)

    def remote_sha256(self, paths, search_path=None):
        """{path: lowercase hex SHA256} of those of `paths` the server can read, in one round trip;
        None if it has no sha256sum (or one without -z). `search_path`: the remote PATH to use."""
        if not paths:
            return {}
        code, out, err = self._remote(sha256_script(search_path), stdin=sha256_input(paths))
        if sha256_unavailable(code, err):
            return None
        if code not in (0, 123):  # 123: sha256sum failed for some (gone, unreadable): they are left out
            raise classify(code, err, server=self.server.name, tool=self._tool())
        return parse_sha256(out, paths)

    def _remote(self, script, stdin=None):
        """Run `script` on the server over the shared connection; (code, stdout, stderr).

        With no shared connection up yet, this ssh becomes the ControlMaster and stays in the
        background (its stdio detached): the handshake and the command cost one session."""
        with self._lock:
            if not self._open:
                # `auto`: use a live master if there is one (a stale socket is removed), else become it.
                private_dir(self.sockets)
                result = self._ssh(
                    script,
                    stdin,
                    "-o",
                    "ControlMaster=auto",
                    "-o",
                    f"ControlPersist={self.settings.ssh_control_persist}",
                )
                self._open = result[0] == 0
                return result
        return self._ssh(script, stdin, "-o", "ControlMaster=no")

    def _ssh(self, script, stdin, *mux):
        argv = ["ssh", *ssh_options(self.settings, self.server, self.sockets), *mux, "--", self.server.host, script]
        return self._run(with_password(self.server, argv), self.settings.ssh_deadline, stdin=stdin)

    def fetch(self, remote_dir, names, staging, on_file=None):
        """Pull `names` (basenames in `remote_dir`) into `staging`, a private directory of this
        batch alone, in one rsync; raise on failure.

        `on_file(name)` is called as rsync reports each file done, so work can start before the batch ends."""
        self.open()
        listing = b"".join(os.fsencode(n) + b"\0" for n in names)
        on_line = None if on_file is None else (lambda line: on_file(decode_rsync_name(line)))

        def rsync(trust_sender):
            argv = rsync_argv(self.settings, self.server, self.sockets, remote_dir, staging, trust_sender)
            if on_file is not None:
                argv[1:1] = ["--out-format=%n", "--outbuf=L"]  # one line per finished file, at once
            return self._run(argv, self.settings.ssh_deadline, stdin=listing, on_line=on_line)

        trusting = self._trusts_sender
        code, _, err = rsync(trusting)
        if code != 0 and trusting and refuses_trust_sender(err):
            self._trusts_sender = False  # an rsync older than 3.2.5, which has no such check either
            code, _, err = rsync(False)
        if code != 0:
            raise classify(code, err, server=self.server.name, tool="rsync")
