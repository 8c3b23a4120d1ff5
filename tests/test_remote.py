"""relay.remote against real ssh, rsync and sshd on loopback: the shared connection's identity, the
server's sha256sum, the run's children (stopped, or killed with the run) and starting commands
from many threads."""

import json
import re

import msgspec
import pytest

from relay import config, remote
from relay.errors import AuthFailed

from conftest import needs_root


def load(tmp_path, servers, **env):
    """Settings read from a config directory written under `tmp_path` (no server is contacted)."""
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    values = {key: str(tmp_path / key.lower()) for key in config.DIRECTORY_KEYS}
    values.update(SSH_KNOWN_HOSTS="/k/known_hosts", **env)
    (conf / ".env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    (conf / "sources.conf").write_text(json.dumps({"servers": servers}))
    (conf / "pipeline.conf").write_text("{}")
    return config.load_settings(str(conf), {})


def env_settings(env):
    """The settings of an `env` fixture's config, as a run would load them."""
    return config.load_settings(str(env.conf), env.environ())


# --- the ControlMaster socket is named by the whole connection -------------------------------

def test_the_control_socket_changes_with_every_field_that_defines_the_connection(tmp_path):
    settings = load(tmp_path, [{"name": "srv1", "host": "h1", "user": "u", "remote_path": "/x/*.gz"}])
    server = settings.server("srv1")
    base = remote.control_socket(settings, server, "/sock")
    assert base == remote.control_socket(settings, server, "/sock")  # same inputs, same socket
    assert re.fullmatch(r"/sock/[0-9a-f]{16}", base)
    opts = remote.ssh_options(settings, server, "/sock")
    assert f"ControlPath={base}" in opts
    replace = msgspec.structs.replace
    variants = {
        "host": (settings, replace(server, host="h2")),
        "port": (settings, replace(server, port=2222)),
        "user": (settings, replace(server, user="other")),
        "server identity file": (settings, replace(server, identity_file="/id_other")),
        "identity file": (replace(settings, ssh_identity_file="/id"), server),
        "known_hosts": (replace(settings, ssh_known_hosts="/k/other"), server),
        "auth mode": (settings, replace(server, auth="password")),
        "password variable": (settings, replace(server, auth="password", password_env="OTHER")),
        "host key policy": (replace(settings, ssh_strict_host_key_checking="accept-new"), server),
        "server name": (settings, replace(server, name="srv9")),
    }
    paths = {what: remote.control_socket(s, srv, "/sock") for what, (s, srv) in variants.items()}
    assert base not in paths.values(), paths
    assert len(set(paths.values())) == len(paths), paths
    longest = remote.control_socket(settings, server, remote.control_dir("/" + "x" * 200))
    assert len(longest) + len(".0123456789abcdef") < 104  # ssh's temporary name beside it still fits


@needs_root
@pytest.mark.parametrize("name", ["srv1", "srv2"])  # a key server and the password server
def test_a_changed_user_is_refused_not_served_by_the_old_master(env, name):
    settings = env_settings(env)
    conn = remote.Connection(settings, settings.server(name), env.environ())
    try:
        assert conn.list_files() == []  # this listing's ssh stays on as the shared connection
        assert conn._master_alive()
        env.configure(servers=[{"user": "nosuchuser"}] * 3)
        changed = env_settings(env)
        other = remote.Connection(changed, changed.server(name), env.environ())
        with pytest.raises(AuthFailed, match="authentication refused"):
            other.list_files()
        assert conn._master_alive()  # the old master was there all along, and not used
    finally:
        conn.close()
