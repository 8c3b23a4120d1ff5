"""Throwaway sshd "servers" on loopback, with their own host keys, for the demo, the tests and the benchmark.

Needs root (sshd, a dedicated login user). Nothing here is used by the pipeline itself.
"""

import gzip
import json
import os
import pwd
import random
import secrets
import shutil
import socket
import subprocess
import time
from typing import Any

SANDBOX_USER = "logpipe-test"
_PASSWORD_FILE = "/var/lib/logpipe-relay-sandbox/password"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def ensure_user():
    """Create the dedicated login user (plain /bin/sh: no slow shell start-up) and return its password."""
    try:
        pwd.getpwnam(SANDBOX_USER)
        exists = True
    except KeyError:
        subprocess.run(["useradd", "-M", "-d", "/", "-s", "/bin/sh", SANDBOX_USER], check=True)
        exists = False
    if exists and pwd.getpwnam(SANDBOX_USER).pw_dir != "/":
        subprocess.run(
            ["usermod", "-d", "/", SANDBOX_USER], check=False, capture_output=True
        )  # cosmetic: a home ssh can enter
    if exists and os.path.exists(_PASSWORD_FILE):
        with open(_PASSWORD_FILE) as fh:
            return fh.read().strip()
    password = secrets.token_urlsafe(18)
    os.makedirs(os.path.dirname(_PASSWORD_FILE), mode=0o700, exist_ok=True)
    with open(os.open(_PASSWORD_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        fh.write(password)
    subprocess.run(["chpasswd"], input=f"{SANDBOX_USER}:{password}\n", text=True, check=True)
    return password


def _free_port(address):
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def _open_up(path):
    """Let the sandbox user traverse every directory down to `path`."""
    path = os.path.abspath(path)
    while path != "/":
        mode = os.stat(path).st_mode
        os.chmod(path, mode | 0o755)
        path = os.path.dirname(path)


class SshServer:
    """One sshd on 127.0.0.N serving `remote_dir` to the sandbox user."""

    def __init__(self, root, name, address, auth, extra_config=()):
        self.root = root
        self.name = name
        self.address = address
        self.auth = auth
        self.port = None
        self.proc: Any = None
        self.remote_dir = os.path.join(root, "remote")
        self.host_key = os.path.join(root, "host_key")
        self.extra_config = list(extra_config)  # more sshd_config lines (tests: e.g. SetEnv PATH=…)

    def start(self, authorized_keys):
        """Write the config, start sshd and wait until it says it listens."""
        os.makedirs(self.remote_dir, exist_ok=True)
        if not os.path.exists(self.host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.host_key], check=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.port = _free_port(self.address)
        config = os.path.join(self.root, "sshd_config")
        with open(config, "w") as fh:
            fh.write(
                "\n".join(
                    [
                        f"Port {self.port}",
                        f"ListenAddress {self.address}",
                        f"HostKey {self.host_key}",
                        f"PidFile {self.root}/sshd.pid",
                        f"AuthorizedKeysFile {authorized_keys}",
                        "StrictModes no",
                        "UsePAM no",
                        "PermitRootLogin no",
                        f"AllowUsers {SANDBOX_USER}",
                        "PubkeyAuthentication " + ("no" if self.auth == "password" else "yes"),
                        "PasswordAuthentication " + ("yes" if self.auth == "password" else "no"),
                        "KbdInteractiveAuthentication no",
                        "MaxStartups 100:30:200",
                        "MaxSessions 100",
                        "LogLevel INFO",
                        "PrintMotd no",
                        "UseDNS no",
                        "Subsystem sftp internal-sftp",
                        *self.extra_config,
                        "",
                    ]
                )
            )
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", config],
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        lines = []
        for raw in self.proc.stderr or ():
            line = raw.decode(errors="replace")
            lines.append(line)
            if "Server listening on" in line:
                break
        else:
            raise RuntimeError(f"sshd {self.name} did not start: {''.join(lines)}")
        # Keep draining sshd's log so it never blocks on a full pipe.
        self._drain = open(os.path.join(self.root, "sshd.log"), "ab")
        subprocess.Popen(["cat"], stdin=self.proc.stderr, stdout=self._drain)
        return self

    def known_hosts_line(self):
        """`[addr]:port key` for a known_hosts file."""
        with open(self.host_key + ".pub") as fh:
            key = " ".join(fh.read().split()[:2])
        return f"[{self.address}]:{self.port} {key}\n"

    def stop(self):
        """Stop sshd and every session it forked."""
        if self.proc is None:
            return
        for pid in _descendants(self.proc.pid):
            _kill(pid)
        _kill(self.proc.pid)
        self.proc.wait()
        self.proc = None

    def kill_sessions(self):
        """Cut every open connection (as a dead peer would), keeping the listener."""
        for pid in _descendants(self.proc.pid):
            _kill(pid)


def _descendants(pid):
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(pid):
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


class Sandbox:
    """Several sshd servers plus a client key, a known_hosts file and a config directory for the pipeline."""

    def __init__(self, root, count=3, password_servers=(2,)):
        self.root = os.path.abspath(root)
        self.count = count
        self.password_servers = password_servers
        self.servers = []
        self.password: Any = None

    def start(self):
        """Start every server; returns self."""
        os.makedirs(self.root, exist_ok=True)
        _open_up(self.root)
        self.password = ensure_user() if self.password_servers else ensure_user()
        self.client_key = os.path.join(self.root, "client_key")
        if not os.path.exists(self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.client_key], check=True)
        authorized = os.path.join(self.root, "authorized_keys")
        shutil.copy(self.client_key + ".pub", authorized)
        os.chmod(authorized, 0o644)
        for index in range(1, self.count + 1):
            auth = "password" if index in self.password_servers else "key"
            server = SshServer(os.path.join(self.root, f"srv{index}"), f"srv{index}", f"127.0.0.{10 + index}", auth)
            self.servers.append(server.start(authorized))
            _open_up(server.remote_dir)
        self.known_hosts = os.path.join(self.root, "known_hosts")
        with open(self.known_hosts, "w") as fh:
            fh.writelines(s.known_hosts_line() for s in self.servers)
        return self

    def stop(self):
        """Stop every server."""
        for server in self.servers:
            server.stop()

    def environ(self):
        """Environment for a run against the sandbox: the password servers' secret."""
        env = dict(os.environ)
        env["SSH_PASSWORD"] = self.password
        return env

    def write_config(self, conf_dir, work_dir, pipeline=None, env=None, patterns=("*.gz",), subdir="", servers=None):
        """Write .env, sources.conf and pipeline.conf pointing at the sandbox; return conf_dir."""
        os.makedirs(conf_dir, exist_ok=True)
        values = {
            "DATA_ROOT": os.path.join(work_dir, "data"),
            "STATE_DIR": os.path.join(work_dir, "state"),
            "LOG_DIR": os.path.join(work_dir, "logs"),
            "TMP_DIR": os.path.join(work_dir, "tmp"),
            "SSH_KNOWN_HOSTS": self.known_hosts,
            "SSH_IDENTITY_FILE": self.client_key,
            "SSH_CONNECT_TIMEOUT": "5",
            "RETRY_DELAY_BASE": "0.05",
            "RETRY_DELAY_MAX": "0.2",
            "SSH_DEADLINE": "120",
            "SSH_CONTROL_PERSIST": "30",
        }
        values.update(env or {})
        with open(os.path.join(conf_dir, ".env"), "w") as fh:
            fh.writelines(f"{k}={v}\n" for k, v in values.items())
        sources = {
            "servers": [
                {
                    "name": s.name,
                    "host": s.address,
                    "port": s.port,
                    "user": SANDBOX_USER,
                    "remote_path": [os.path.join(s.remote_dir, subdir, p) for p in patterns]
                    if len(patterns) > 1
                    else os.path.join(s.remote_dir, subdir, patterns[0]),
                    "enabled": True,
                    "auth": s.auth,
                }
                for s in self.servers
            ]
        }
        for entry, override in zip(sources["servers"], servers or []):
            entry.update(override)
        with open(os.path.join(conf_dir, "sources.conf"), "w") as fh:
            json.dump(sources, fh, indent=2)
        settings = {"min_file_age_seconds": 0, "max_workers": 2, "min_free_bytes": 0}
        settings.update(pipeline or {})
        with open(os.path.join(conf_dir, "pipeline.conf"), "w") as fh:
            json.dump(settings, fh, indent=2)
        return conf_dir


# --- generated logs ------------------------------------------------------------------------

_PATHS = [
    "/",
    "/index.html",
    "/api/v1/users",
    "/api/v1/orders",
    "/static/app.js",
    "/static/app.css",
    "/login",
    "/health",
    "/api/v1/search",
    "/img/logo.png",
    "/checkout",
    "/api/v1/cart",
    "/products/list",
    "/favicon.ico",
]
_AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "curl/8.5.0",
    "python-requests/2.32.3",
]
_REFERERS = ["-", "https://www.example.com/", "https://www.example.com/products/list", "https://www.google.com/"]
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def log_lines(rng, count, start=1_700_000_000):
    """`count` combined-format access-log lines: a pool of client IPs, varied paths, statuses, agents
    and referers, increasing timestamps; compresses about 10x like real access logs."""
    clients = [
        f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}" for _ in range(300)
    ]
    out = []
    stamp = start
    for _ in range(count):
        stamp += rng.choice((0, 0, 1, 1, 2))
        t = time.gmtime(stamp)
        when = (
            f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
        )
        ip = clients[min(int(rng.expovariate(1 / 40)), len(clients) - 1)]
        status = rng.choices((200, 301, 304, 404, 500), (80, 5, 8, 5, 2))[0]
        path = rng.choice(_PATHS)
        if path.startswith("/api") and rng.random() < 0.5:
            path += f"?page={rng.randint(1, 20)}"
        size = rng.choice((512, 1024, 2048, 4096, 8192, 15320, 43100)) if status == 200 else 0
        out.append(
            f'{ip} - - [{when}] "GET {path} HTTP/1.1" {status} {size} '
            f'"{rng.choice(_REFERERS)}" "{rng.choice(_AGENTS)}"\n'
        )
    return "".join(out).encode()


def write_gz(path, data, mtime=1_700_000_000):
    """Write `data` gzip-compressed at `path` with an old mtime (so it is due at once)."""
    with open(path, "wb") as fh:
        fh.write(gzip.compress(data, compresslevel=6, mtime=0))
    os.chmod(path, 0o644)
    os.utime(path, (mtime, mtime))


def populate(server, rotations=4, lines=400, corrupt=False, seed=0):
    """Rotated logs `app.log.N.gz` on a server (one truncated when `corrupt`); returns {name: plain bytes}."""
    rng = random.Random(f"{server.name}-{seed}")
    plain = {}
    for n in range(1, rotations + 1):
        name = f"app.log.{n}.gz"
        data = log_lines(rng, lines)
        write_gz(os.path.join(server.remote_dir, name), data)
        plain[name] = data
    if corrupt:
        path = os.path.join(server.remote_dir, "app.log.broken.gz")
        raw = gzip.compress(log_lines(rng, lines))
        with open(path, "wb") as fh:
            fh.write(raw[: len(raw) // 2])
        os.chmod(path, 0o644)
        os.utime(path, (1_700_000_000, 1_700_000_000))
    return plain
