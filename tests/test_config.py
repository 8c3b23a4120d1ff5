"""Configuration: cerberus validation of .env, sources.conf and pipeline.conf, in-process and through doit."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cerberus import Validator
from cerberus.schema import DefinitionSchema, SchemaError

from relay import config
from relay.config import load_settings
from relay.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

SERVER = {
    "name": "srv1",
    "host": "srv1.example.com",
    "user": "loguser",
    "remote_path": "/var/log/apps/*.gz",
    "enabled": True,
}


def write(conf, env=None, servers=None, pipeline=None, raw_sources=None):
    """Write a config directory; values default to a valid configuration under `conf`."""
    conf.mkdir(parents=True, exist_ok=True)
    base = {
        "DATA_ROOT": str(conf / "data"),
        "STATE_DIR": str(conf / "state"),
        "LOG_DIR": str(conf / "logs"),
        "TMP_DIR": str(conf / "tmp"),
    }
    base.update(env or {})
    (conf / ".env").write_text("".join(f"{k}={v}\n" for k, v in base.items() if v is not None))
    sources = (
        raw_sources
        if raw_sources is not None
        else json.dumps({"servers": servers if servers is not None else [dict(SERVER)]})
    )
    (conf / "sources.conf").write_text(sources)
    (conf / "pipeline.conf").write_text(json.dumps(pipeline or {}))
    return conf


def error_of(conf, environ=None):
    with pytest.raises(ConfigError) as info:
        load_settings(str(conf), environ=environ or {})
    return str(info.value)


def test_valid_config_and_defaults(tmp_path):
    settings = load_settings(str(write(tmp_path / "c")), environ={})
    assert settings.max_retry_copy == 3 and settings.log_format == "json"
    assert settings.servers[0].remote_paths == ("/var/log/apps/*.gz",)
    assert settings.servers[0].port == 22 and settings.delete_source is False
    assert settings.ssh_strict_host_key_checking == "yes"


def test_every_schema_passes_cerberus_own_check():
    """A run takes the schemas as checked (see config._CheckedSchema): this is where they are checked."""
    for schema in config.SCHEMAS.values():
        DefinitionSchema(Validator(), schema)  # raises SchemaError on an unknown or malformed rule
    with pytest.raises(SchemaError):
        DefinitionSchema(Validator(), {"x": {"type": "no-such-type"}})


def test_a_run_does_not_check_the_schemas_again(tmp_path, monkeypatch):
    checked = []
    Validator.clear_caches()  # cerberus remembers schemas it checked earlier in this process
    monkeypatch.setattr(DefinitionSchema, "_validate", lambda self, schema: checked.append(schema))
    settings = load_settings(str(write(tmp_path / "c")), environ={})
    assert checked == [] and settings.servers[0].name == "srv1"


def test_shipped_examples_are_valid(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    for name in (".env", "sources.conf", "pipeline.conf"):
        shutil.copy(conf / f"{name}.example", conf / name)
    environ = {"DATA_ROOT": str(tmp_path / "d"), "TMP_DIR": str(tmp_path / "t")}
    settings = load_settings(str(conf), environ=environ)
    assert [s.name for s in settings.enabled_servers] == ["srv1", "srv2"]


def test_environment_wins_over_dotenv(tmp_path):
    conf = write(tmp_path / "c", env={"MAX_RETRY_COPY": "5", "LOG_FORMAT": "json"})
    settings = load_settings(str(conf), environ={"MAX_RETRY_COPY": "7", "LOG_FORMAT": "text"})
    assert settings.max_retry_copy == 7 and settings.log_format == "text"


def test_relay_config_dir_selects_directory(tmp_path):
    conf = write(tmp_path / "elsewhere", pipeline={"delete_source": True})
    assert load_settings(environ={"RELAY_CONFIG_DIR": str(conf)}).delete_source is True


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (
            {"servers": [{k: v for k, v in SERVER.items() if k != "host"}]},
            "sources.conf: servers[0].host: required field",
        ),
        ({"servers": [dict(SERVER, name="../etc")]}, "servers[0].name: value does not match regex"),
        ({"servers": [dict(SERVER, name="a/b")]}, "servers[0].name"),
        ({"servers": [dict(SERVER, name="-srv")]}, "servers[0].name"),
        ({"servers": [dict(SERVER, name=".hidden")]}, "servers[0].name"),
        ({"servers": [dict(SERVER), dict(SERVER)]}, "servers[1].name: duplicate server name 'srv1'"),
        ({"servers": [dict(SERVER, host="-oProxyCommand=x")]}, "servers[0].host"),
        ({"servers": [dict(SERVER, port=70000)]}, "servers[0].port: max value is 65535"),
        ({"servers": [dict(SERVER, remote_path="relative/*.gz")]}, "servers[0].remote_path"),
        ({"servers": [dict(SERVER, enabled="yes")]}, "servers[0].enabled: must be of boolean type"),
        ({"servers": [dict(SERVER, name="quarantine")]}, "servers[0].name: unallowed value quarantine"),
        ({"servers": [dict(SERVER, colour="blue")]}, "servers[0].colour: unknown field"),
        ({"raw_sources": "{not json"}, "sources.conf: not valid JSON"),
        ({"raw_sources": "{}"}, "sources.conf: servers: required field"),
        ({"pipeline": {"max_workers": 0}}, "pipeline.conf: max_workers: min value is 1"),
        ({"pipeline": {"delete_source": "no"}}, "pipeline.conf: delete_source: must be of boolean type"),
        ({"pipeline": {"min_file_age": 5}}, "pipeline.conf: min_file_age: unknown field"),
        ({"env": {"DATA_ROOT": None}}, ".env: DATA_ROOT: required field"),
        ({"env": {"MAX_RETRY_COPY": "many"}}, ".env: MAX_RETRY_COPY: field 'MAX_RETRY_COPY' cannot be coerced"),
        ({"env": {"LOG_FORMAT": "xml"}}, ".env: LOG_FORMAT: unallowed value xml"),
        ({"env": {"SSH_STRICT_HOST_KEY_CHECKING": "no"}}, ".env: SSH_STRICT_HOST_KEY_CHECKING: unallowed value no"),
        ({"env": {"TMP_DIR": "tmp"}}, ".env: TMP_DIR: value does not match regex"),
    ],
)
def test_bad_configs_name_file_key_and_problem(tmp_path, kwargs, expected):
    assert expected in error_of(write(tmp_path / "c", **kwargs))


def test_password_in_dotenv_is_refused(tmp_path):
    message = error_of(write(tmp_path / "c", env={"SSH_PASSWORD": "hunter2"}))
    assert "SSH_PASSWORD" in message and "export" in message and "hunter2" not in message


def test_missing_file_says_what_to_do(tmp_path):
    conf = write(tmp_path / "c")
    (conf / "pipeline.conf").unlink()
    assert "pipeline.conf: file not found; copy pipeline.conf.example" in error_of(conf)


@pytest.mark.skipif(
    not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev,
    reason="needs /dev/shm on another filesystem than /tmp",
)
def test_tmp_dir_must_share_data_root_filesystem(tmp_path):
    shm = Path("/dev/shm") / f"relay-test-{os.getpid()}"
    try:
        message = error_of(write(tmp_path / "c", env={"TMP_DIR": str(shm)}))
        assert "TMP_DIR" in message and "same filesystem" in message
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_doit_reports_config_error_with_user_error_status_and_no_traceback(tmp_path):
    conf = write(tmp_path / "c", servers=[{k: v for k, v in SERVER.items() if k != "user"}])
    proc = subprocess.run(
        [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "run"],
        cwd=tmp_path,
        env={**os.environ, "RELAY_CONFIG_DIR": str(conf)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3
    assert "sources.conf: servers[0].user: required field" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (conf / "data").exists()  # nothing ran


def test_directory_keys_must_name_usable_directories(tmp_path):
    conf = tmp_path / "c"
    (tmp_path / "a-file").write_text("")
    message = error_of(write(conf, env={"STATE_DIR": str(tmp_path / "a-file" / "state")}))
    assert (
        message == f"{conf / '.env'}: STATE_DIR: {tmp_path / 'a-file' / 'state'}: {tmp_path / 'a-file'} "
        "is not a directory; point STATE_DIR at a directory"
    )
    assert "DATA_ROOT" in error_of(write(conf, env={"DATA_ROOT": str(tmp_path / "a-file")}))


# --- a user's mistake: one line naming the file or variable and what to do, and no traceback --------


def doit_list(conf, environ=None, prefix=()):
    """`doit list` as a user runs it, on the configuration in `conf` (variables of this process left out)."""
    clean = {k: v for k, v in os.environ.items() if k not in config.ENV_SCHEMA and k != "RELAY_CONFIG_DIR"}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "list"],
        cwd=conf,
        env={**clean, "RELAY_CONFIG_DIR": str(conf), **(environ or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_user_error(proc, message):
    """Exit status 3, `message` in what doit printed, and no traceback."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output
    assert message in output
    assert "Traceback" not in output


@contextlib.contextmanager
def read_only_mount(path):
    """A small tmpfs mounted read-only on `path` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("key", config.DIRECTORY_KEYS)
@pytest.mark.parametrize("below", [False, True], ids=["the-mount", "below-it"])
def test_a_directory_on_a_read_only_filesystem_is_refused(tmp_path, key, below):
    with read_only_mount(tmp_path / "ro") as ro:
        path = ro / "data" if below else ro
        env = {key: str(path)}
        if key == "DATA_ROOT":  # TMP_DIR follows it (same filesystem): that check comes later
            env["TMP_DIR"] = str(ro / "tmp")
        conf = write(tmp_path / "c", env=env)
        assert error_of(conf) == (
            f"{conf / '.env'}: {key}: {path} is on a read-only filesystem; "
            f"remount it read-write or point {key} elsewhere"
        )


def test_a_read_only_directory_from_the_environment_says_so(tmp_path):
    with read_only_mount(tmp_path / "ro") as ro:
        conf = write(tmp_path / "c")
        assert error_of(conf, environ={"LOG_DIR": str(ro)}) == (
            f"LOG_DIR={ro} (from the environment, not {conf / '.env'}): {ro} is on a read-only filesystem; "
            "remount it read-write or point LOG_DIR elsewhere"
        )


def test_checking_the_directories_writes_nothing(tmp_path):
    conf = write(
        tmp_path / "c", env={"DATA_ROOT": str(tmp_path / "new" / "data"), "TMP_DIR": str(tmp_path / "new" / "tmp")}
    )
    load_settings(str(conf), environ={})
    assert not (tmp_path / "new").exists() and sorted(p.name for p in conf.iterdir()) == [
        ".env",
        "pipeline.conf",
        "sources.conf",
    ]


def as_unprivileged():
    """A command prefix under which this user's permissions count: root loses CAP_DAC_OVERRIDE."""
    if os.geteuid() != 0:
        return ()
    prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")
    if not shutil.which("setpriv") or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("root bypasses file permissions, and setpriv cannot drop that here")
    return prefix


LOAD = "import sys; from relay.config import load_settings; load_settings(sys.argv[1], environ={})"


@pytest.mark.parametrize("below", [False, True], ids=["existing", "to-create"])
def test_an_unwritable_directory_is_refused(tmp_path, below):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    path = locked / "state" if below else locked
    conf = write(tmp_path / "c", env={"STATE_DIR": str(path)})
    proc = subprocess.run(
        [*as_unprivileged(), sys.executable, "-c", LOAD, str(conf)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    expected = (
        (
            f"{conf / '.env'}: STATE_DIR: {path} does not exist and cannot be created in {locked} "
            "(not writable); create it, or point STATE_DIR somewhere writable"
        )
        if below
        else (
            f"{conf / '.env'}: STATE_DIR: {path} is not writable by this user (uid {os.geteuid()}); "
            "give it write permission, or point STATE_DIR somewhere writable"
        )
    )
    assert f"ConfigError: {expected}\n" in proc.stderr


@pytest.mark.parametrize(
    "key, value",
    [
        ("DATA_ROOT", "data"),
        ("STATE_DIR", "./state"),
        ("LOG_DIR", "logs/"),
        ("TMP_DIR", "tmp"),
        ("SSH_KNOWN_HOSTS", "known_hosts"),
        ("SSH_IDENTITY_FILE", "keys/id_ed25519"),
    ],
)
def test_a_relative_path_must_be_absolute(tmp_path, key, value):
    conf = write(tmp_path / "c", env={key: value})
    assert error_of(conf) == (
        f"{conf / '.env'}: {key}: value does not match regex '^/.*': {value} is a relative "
        "path; it must be absolute (start with /)"
    )


def test_a_relative_identity_file_of_a_server_must_be_absolute(tmp_path):
    conf = write(tmp_path / "c", servers=[dict(SERVER, identity_file="id_ed25519")])
    assert error_of(conf) == (
        f"{conf / 'sources.conf'}: servers[0].identity_file: value does not match regex "
        "'^/.*': id_ed25519 is a relative path; it must be absolute (start with /)"
    )


def test_a_home_relative_path_says_tilde_is_not_expanded(tmp_path):
    assert "~ is not expanded" in error_of(write(tmp_path / "c", env={"SSH_KNOWN_HOSTS": "~/.ssh/known_hosts"}))


@pytest.mark.parametrize("name", [".env", "sources.conf", "pipeline.conf"])
def test_a_missing_file_names_it_and_the_copy_command(tmp_path, name):
    conf = write(tmp_path / "c")
    (conf / name).unlink()
    assert error_of(conf) == (
        f"{conf / name}: file not found; copy {name}.example and edit it: "
        f"cp {REPO / 'conf' / name}.example {conf / name} "
        "(or set RELAY_CONFIG_DIR to the directory that holds it)"
    )


def test_without_dotenv_the_environment_may_give_every_required_key(tmp_path):
    conf = write(tmp_path / "c")
    (conf / ".env").unlink()
    environ = {key: str(tmp_path / key.lower()) for key in config.DIRECTORY_KEYS}
    assert load_settings(str(conf), environ=environ).state_dir == str(tmp_path / "state_dir")


def test_an_unreadable_file_is_named(tmp_path):
    conf = write(tmp_path / "c")
    (conf / ".env").unlink()
    (conf / ".env").mkdir()
    assert error_of(conf) == (
        f"{conf / '.env'}: cannot read it (Is a directory); make it a file the user of the run can read"
    )


@pytest.mark.parametrize("environ", [{}, {"SSH_STRICT_HOST_KEY_CHECKING": "no"}])
def test_strict_host_key_checking_no_is_refused_with_what_to_use(tmp_path, environ):
    conf = write(tmp_path / "c", env={"SSH_STRICT_HOST_KEY_CHECKING": "no" if not environ else "yes"})
    origin = (
        f"SSH_STRICT_HOST_KEY_CHECKING=no (from the environment, not {conf / '.env'})"
        if environ
        else f"{conf / '.env'}: SSH_STRICT_HOST_KEY_CHECKING"
    )
    assert error_of(conf, environ) == (
        f"{origin}: unallowed value no: host keys are always checked: use accept-new to learn the key of a "
        "new server (a changed key is still refused), or yes to accept known keys only"
    )


def test_a_bad_value_from_the_environment_says_it_came_from_there(tmp_path):
    conf = write(tmp_path / "c", env={"MAX_RETRY_COPY": "3"})
    environ = {"MAX_RETRY_COPY": "abc", "SSH_PASSWORD": "hunter2"}
    message = error_of(conf, environ)
    assert message == (
        f"MAX_RETRY_COPY=abc (from the environment, not {conf / '.env'}): field 'MAX_RETRY_COPY' "
        "cannot be coerced: must be an integer"
    )
    assert "hunter2" not in message
    odd = error_of(conf, {"RETRY_DELAY_BASE": "1 minute\n"})
    assert odd.startswith(f"RETRY_DELAY_BASE='1 minute\\n' (from the environment, not {conf / '.env'}): ")
    assert "must be a number" in odd and "\n" not in odd


def test_where_names_the_origin_of_a_loaded_key(tmp_path):
    conf = write(tmp_path / "c")
    settings = load_settings(str(conf), environ={"LOG_DIR": str(tmp_path / "env logs")})
    assert config.where(settings, "LOG_DIR") == (
        f"LOG_DIR='{tmp_path / 'env logs'}' (from the environment, not {conf / '.env'})"
    )
    assert config.where(settings, "STATE_DIR") == f"{conf / '.env'}: STATE_DIR"


def test_relay_config_dir_from_the_environment_that_is_not_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"^RELAY_CONFIG_DIR=\S+/nope \(from the environment\): no such directory"):
        load_settings(environ={"RELAY_CONFIG_DIR": str(tmp_path / "nope")})


@pytest.mark.parametrize(
    "case", ["read-only", "unwritable", "relative", "no-dotenv", "no-sources", "strict-no", "from-environment"]
)
def test_doit_list_reports_a_users_mistake_in_one_line_with_status_3(tmp_path, case):
    conf, environ, prefix = tmp_path / "c", {}, ()
    if case == "read-only":
        with read_only_mount(tmp_path / "ro") as ro:
            write(conf, env={"DATA_ROOT": str(ro), "TMP_DIR": str(ro / "tmp")})
            assert_user_error(doit_list(conf), f"DATA_ROOT: {ro} is on a read-only filesystem; remount it")
        return
    if case == "unwritable":
        (tmp_path / "locked").mkdir(mode=0o555)
        write(conf, env={"LOG_DIR": str(tmp_path / "locked")})
        prefix, expected = as_unprivileged(), f"LOG_DIR: {tmp_path / 'locked'} is not writable by this user"
    elif case == "relative":
        write(conf, env={"TMP_DIR": "tmp"})
        expected = "TMP_DIR: value does not match regex '^/.*': tmp is a relative path; it must be absolute"
    elif case in ("no-dotenv", "no-sources"):
        name = ".env" if case == "no-dotenv" else "sources.conf"
        (write(conf) / name).unlink()
        expected = f"{conf / name}: file not found; copy {name}.example and edit it: cp "
    elif case == "strict-no":
        write(conf, env={"SSH_STRICT_HOST_KEY_CHECKING": "no"})
        expected = "SSH_STRICT_HOST_KEY_CHECKING: unallowed value no: host keys are always checked: use accept-new"
    else:
        write(conf)
        environ = {"MAX_RETRY_COPY": "abc"}
        expected = f"MAX_RETRY_COPY=abc (from the environment, not {conf / '.env'}): "
    assert_user_error(doit_list(conf, environ, prefix), expected)


def test_a_state_dir_that_cannot_be_created_is_a_users_mistake(tmp_path):
    # /proc says it is writable (to root) but takes no directory: only trying to create it shows that.
    conf = write(tmp_path / "c", env={"STATE_DIR": "/proc/no-such-dir/state"})
    assert_user_error(doit_list(conf), ".env: STATE_DIR: /proc/no-such-dir/state: cannot create it (")
