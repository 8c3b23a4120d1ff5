"""Configuration: cerberus validation of .env, sources.conf and pipeline.conf, in-process and through doit."""

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

SERVER = {"name": "srv1", "host": "srv1.example.com", "user": "loguser",
          "remote_path": "/var/log/apps/*.gz", "enabled": True}


def write(conf, env=None, servers=None, pipeline=None, raw_sources=None):
    """Write a config directory; values default to a valid configuration under `conf`."""
    conf.mkdir(parents=True, exist_ok=True)
    base = {"DATA_ROOT": str(conf / "data"), "STATE_DIR": str(conf / "state"),
            "LOG_DIR": str(conf / "logs"), "TMP_DIR": str(conf / "tmp")}
    base.update(env or {})
    (conf / ".env").write_text("".join(f"{k}={v}\n" for k, v in base.items() if v is not None))
    sources = raw_sources if raw_sources is not None else json.dumps(
        {"servers": servers if servers is not None else [dict(SERVER)]})
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
    for name, schema in config.SCHEMAS.items():
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


@pytest.mark.parametrize("kwargs, expected", [
    ({"servers": [{k: v for k, v in SERVER.items() if k != "host"}]}, "sources.conf: servers[0].host: required field"),
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
])
def test_bad_configs_name_file_key_and_problem(tmp_path, kwargs, expected):
    assert expected in error_of(write(tmp_path / "c", **kwargs))


def test_password_in_dotenv_is_refused(tmp_path):
    message = error_of(write(tmp_path / "c", env={"SSH_PASSWORD": "hunter2"}))
    assert "SSH_PASSWORD" in message and "export" in message and "hunter2" not in message


def test_missing_file_says_what_to_do(tmp_path):
    conf = write(tmp_path / "c")
    (conf / "pipeline.conf").unlink()
    assert "pipeline.conf: file not found; copy pipeline.conf.example" in error_of(conf)


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev,
                    reason="needs /dev/shm on another filesystem than /tmp")
def test_tmp_dir_must_share_data_root_filesystem(tmp_path):
    shm = Path("/dev/shm") / f"relay-test-{os.getpid()}"
    try:
        message = error_of(write(tmp_path / "c", env={"TMP_DIR": str(shm)}))
        assert "TMP_DIR" in message and "same filesystem" in message
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_doit_reports_config_error_with_user_error_status_and_no_traceback(tmp_path):
    conf = write(tmp_path / "c", servers=[{k: v for k, v in SERVER.items() if k != "user"}])
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "run"],
                          cwd=tmp_path, env={**os.environ, "RELAY_CONFIG_DIR": str(conf)},
                          capture_output=True, text=True)
    assert proc.returncode == 3
    assert "sources.conf: servers[0].user: required field" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (conf / "data").exists()  # nothing ran


def test_directory_keys_must_name_usable_directories(tmp_path):
    conf = tmp_path / "c"
    (tmp_path / "a-file").write_text("")
    message = error_of(write(conf, env={"STATE_DIR": str(tmp_path / "a-file" / "state")}))
    assert message == f"{conf / '.env'}: STATE_DIR: {tmp_path / 'a-file' / 'state'}: {tmp_path / 'a-file'} " \
                      "is not a directory; point STATE_DIR at a directory"
    assert "DATA_ROOT" in error_of(write(conf, env={"DATA_ROOT": str(tmp_path / "a-file")}))


def test_a_directory_that_cannot_be_created_is_a_config_error_of_the_run(tmp_path):
    from relay import tasks  # noqa: PLC0415 - load takes the lock and creates directories
    conf = write(tmp_path / "c", env={"LOG_DIR": "/proc/no-such-dir/logs"})
    with pytest.raises(ConfigError, match=r"\.env: LOG_DIR: /proc/no-such-dir/logs: cannot create it \("):
        tasks.load(str(conf), environ={})
    tasks.release_lock()
