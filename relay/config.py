"""Load and validate `.env`, `sources.conf` and `pipeline.conf` with cerberus before anything runs."""

import functools
import json
import os
import shlex
from pathlib import Path
from typing import Optional

import msgspec
from cerberus import Validator
from cerberus.errors import BasicErrorHandler
from cerberus.schema import DefinitionSchema
from dotenv import dotenv_values

from .errors import ConfigError

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"

# Error kinds name the recover groups, so no server may take one of these names.
RESERVED_NAMES = ("all", "copy", "extract", "quarantine")

SERVER_NAME_RE = r"^(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,63}$"
# A host or user starting with '-' would be read by ssh as an option.
HOST_RE = r"^[A-Za-z0-9_.:\[\]%-]+$"
USER_RE = r"^[A-Za-z0-9_][A-Za-z0-9_.@-]*\$?$"
ENV_NAME_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _integer(value):
    try:
        return int(value)
    except (TypeError, ValueError):  # int()'s own message quotes Python, not the user's problem
        raise ValueError("must be an integer") from None


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a number") from None


ABSOLUTE_RE = r"^/.*"
_POS_INT = {"type": "integer", "coerce": _integer, "min": 1}
_NONNEG_FLOAT = {"type": "float", "coerce": _number, "min": 0}
_PATH = {"type": "string", "empty": False, "coerce": str.strip, "regex": ABSOLUTE_RE}

ENV_SCHEMA = {
    "DATA_ROOT": {**_PATH, "required": True},
    "STATE_DIR": {**_PATH, "required": True},
    "LOG_DIR": {**_PATH, "required": True},
    "TMP_DIR": {**_PATH, "required": True},
    "MAX_RETRY_COPY": {**_POS_INT, "default": 3},
    "MAX_RETRY_EXTRACT": {**_POS_INT, "default": 3},
    "RETRY_DELAY_BASE": {**_NONNEG_FLOAT, "default": 60.0},
    "RETRY_DELAY_MAX": {**_NONNEG_FLOAT, "default": 600.0},
    "LOG_FORMAT": {"type": "string", "allowed": ["json", "text"], "default": "json"},
    "LOG_LEVEL": {
        "type": "string",
        "coerce": str.upper,
        "allowed": ["DEBUG", "INFO", "WARNING", "ERROR"],
        "default": "INFO",
    },
    "SSH_KNOWN_HOSTS": {**_PATH, "default": str(Path.home() / ".ssh" / "known_hosts")},
    "SSH_IDENTITY_FILE": {**_PATH, "nullable": True, "default": None},
    "SSH_STRICT_HOST_KEY_CHECKING": {"type": "string", "allowed": ["yes", "accept-new"], "default": "yes"},
    "SSH_CONNECT_TIMEOUT": {**_POS_INT, "default": 10},
    "SSH_SERVER_ALIVE_INTERVAL": {**_POS_INT, "default": 15},
    "SSH_SERVER_ALIVE_COUNT_MAX": {**_POS_INT, "default": 3},
    "SSH_DEADLINE": {**_POS_INT, "default": 3600},
    "SSH_CONTROL_PERSIST": {**_POS_INT, "default": 60},
}

SERVER_SCHEMA = {
    "name": {"type": "string", "required": True, "regex": SERVER_NAME_RE, "forbidden": list(RESERVED_NAMES)},
    "host": {"type": "string", "required": True, "empty": False, "regex": HOST_RE},
    "user": {"type": "string", "required": True, "empty": False, "regex": USER_RE},
    "remote_path": {
        "required": True,
        "anyof": [
            {"type": "string", "regex": r"^/[^\n\x00]*$"},
            {"type": "list", "minlength": 1, "schema": {"type": "string", "regex": r"^/[^\n\x00]*$"}},
        ],
    },
    "enabled": {"type": "boolean", "default": True},
    "port": {"type": "integer", "min": 1, "max": 65535, "default": 22},
    "identity_file": {"type": "string", "regex": ABSOLUTE_RE, "nullable": True, "default": None},
    "auth": {"type": "string", "allowed": ["key", "password"], "default": "key"},
    "password_env": {"type": "string", "regex": ENV_NAME_RE, "default": "SSH_PASSWORD"},
}

SOURCES_SCHEMA = {
    "servers": {"type": "list", "required": True, "schema": {"type": "dict", "schema": SERVER_SCHEMA}},
}

PIPELINE_SCHEMA = {
    "delete_source": {"type": "boolean", "default": False},
    "process_incoming": {"type": "boolean", "default": True},
    "max_workers": {"type": "integer", "min": 1, "max": 64, "default": 2},
    "max_per_server": {"type": "integer", "min": 1, "max": 64, "default": 2},
    "min_file_age_seconds": {"type": "number", "min": 0, "default": 60},
    "max_extracted_bytes": {"type": "integer", "min": 1, "default": 64 * 2**30},
    "min_free_bytes": {"type": "integer", "min": 0, "default": 256 * 2**20},
}

SECRET_KEYS = ("SSH_PASSWORD",)


class Server(msgspec.Struct, frozen=True):
    """One source server as configured in sources.conf."""

    name: str
    host: str
    user: str
    remote_paths: tuple
    enabled: bool = True
    port: int = 22
    identity_file: Optional[str] = None
    auth: str = "key"
    password_env: str = "SSH_PASSWORD"


class Settings(msgspec.Struct, frozen=True):
    """Everything the pipeline needs, validated."""

    config_dir: str
    data_root: str
    state_dir: str
    log_dir: str
    tmp_dir: str
    max_retry_copy: int
    max_retry_extract: int
    retry_delay_base: float
    retry_delay_max: float
    log_format: str
    log_level: str
    ssh_known_hosts: str
    ssh_identity_file: Optional[str]
    ssh_strict_host_key_checking: str
    ssh_connect_timeout: int
    ssh_server_alive_interval: int
    ssh_server_alive_count_max: int
    ssh_deadline: int
    ssh_control_persist: int
    servers: tuple
    delete_source: bool
    process_incoming: bool
    max_workers: int
    max_per_server: int
    min_file_age_seconds: float
    max_extracted_bytes: int
    min_free_bytes: int
    from_environment: tuple = ()  # the .env keys whose value came from the process environment

    def server(self, name):
        """The configured server called `name`."""
        for srv in self.servers:
            if srv.name == name:
                return srv
        raise KeyError(name)

    @property
    def enabled_servers(self):
        """Servers that produce work."""
        return tuple(s for s in self.servers if s.enabled)


def flatten_errors(errors, prefix=""):
    """Turn cerberus' nested error tree into `key.path[i]: problem` lines."""
    lines = []
    for key, problems in sorted(errors.items(), key=lambda kv: str(kv[0])):
        path = f"{prefix}[{key}]" if isinstance(key, int) else (f"{prefix}.{key}" if prefix else str(key))
        for problem in problems:
            if isinstance(problem, dict):
                lines.extend(flatten_errors(problem, path))
            else:
                lines.append(f"{path}: {problem}")
    return lines


SCHEMAS = {"ENV_SCHEMA": ENV_SCHEMA, "SOURCES_SCHEMA": SOURCES_SCHEMA, "PIPELINE_SCHEMA": PIPELINE_SCHEMA}


def _hint(field, error):
    """What to do about `error`, where cerberus' message alone does not say it."""
    if error.rule == "regex" and error.constraint == ABSOLUTE_RE:
        tilde = " (~ is not expanded here: write the home directory out)" if str(error.value).startswith("~") else ""
        return f"{error.value} is a relative path; it must be absolute (start with /){tilde}"
    if field == "SSH_STRICT_HOST_KEY_CHECKING" and error.rule == "allowed":
        return (
            "host keys are always checked: use accept-new to learn the key of a new server "
            "(a changed key is still refused), or yes to accept known keys only"
        )
    return None


class _Messages(BasicErrorHandler):
    """cerberus' messages, each followed by what to do where `_hint` knows it."""

    def __call__(self, errors):
        # A value that could not be coerced also fails its type: one line says it.
        uncoerced = {e.document_path for e in errors if e.rule == "coerce"}
        return super().__call__([e for e in errors if not (e.rule == "type" and e.document_path in uncoerced)])

    def _format_message(self, field, error):
        message = super()._format_message(field, error)
        hint = _hint(field, error)
        return f"{message}: {hint}" if hint else message


class _CheckedSchema(DefinitionSchema):
    """One of SCHEMAS, taken as it is: the tests check each against cerberus's own rules.

    cerberus checks a schema on its first use in every process, about 35 ms of each run's start,
    before any server is contacted; ours are constants, so that check belongs in the tests."""

    def validate(self, schema=None):
        """Skipped: tests/test_config.py checks every schema in SCHEMAS."""


def _validate(document, schema, filename, named=None):
    """The normalised `document`, or ConfigError with a line a problem; `named(key)` names a top-level key."""
    validator = Validator(error_handler=_Messages)
    validator.schema = _CheckedSchema(validator, schema)
    if not validator.validate(document):
        if named is None:
            lines = [f"{filename}: {line}" for line in flatten_errors(validator.errors)]
        else:  # a flat schema (.env): every problem is a string under its key
            lines = [
                f"{named(key)}: {problem}" for key, problems in sorted(validator.errors.items()) for problem in problems
            ]
        raise ConfigError("\n".join(lines))
    return validator.document


def _not_found(path):
    example = DEFAULT_CONFIG_DIR / f"{path.name}.example"
    return ConfigError(
        f"{path}: file not found; copy {path.name}.example and edit it: cp {example} {path} "
        "(or set RELAY_CONFIG_DIR to the directory that holds it)"
    )


def _unreadable(path, exc):
    return ConfigError(f"{path}: cannot read it ({exc.strerror}); make it a file the user of the run can read")


def _read_json(path):
    try:
        with open(path, "rb") as fh:
            document = json.load(fh)
    except FileNotFoundError:
        raise _not_found(path) from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    return document


def _where(env_path, from_environment, key):
    if key in from_environment:  # else the user would look for it in .env
        value = str(from_environment[key])
        shown = shlex.quote(value) if value.isprintable() else repr(value)
        return f"{key}={shown} (from the environment, not {env_path})"
    return f"{env_path}: {key}"


def where(settings, key):
    """How a message names .env key `key`: `…/.env: KEY`, or `KEY=value (from the environment, not …/.env)`."""
    from_environment = {k: getattr(settings, k.lower()) for k in settings.from_environment}  # as loaded
    return _where(Path(settings.config_dir) / ".env", from_environment, key)


REQUIRED_ENV = tuple(key for key, rules in ENV_SCHEMA.items() if isinstance(rules, dict) and rules.get("required"))


def _read_dotenv(env_path, environ):
    try:
        with open(env_path, encoding="utf-8") as fh:  # dotenv_values(path) takes a missing file for an empty one
            return {k: v for k, v in dotenv_values(stream=fh).items() if v is not None}
    except FileNotFoundError:
        if all(key in environ for key in REQUIRED_ENV):
            return {}  # everything it must hold comes from the environment (systemd's EnvironmentFile=)
        raise _not_found(env_path) from None
    except OSError as exc:
        raise _unreadable(env_path, exc) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{env_path}: not a text file in UTF-8 ({exc.reason} at byte {exc.start})") from None


def read_env(config_dir, environ):
    """`<config_dir>/.env` merged with the process environment (which wins), validated: (values, those from environ)."""
    env_path = Path(config_dir) / ".env"
    from_file = _read_dotenv(env_path, environ)
    for key in SECRET_KEYS:
        if key in from_file:
            raise ConfigError(
                f"{env_path}: {key}: a password must not be stored in a file; "
                f"remove it and export {key} in the environment of the run instead"
            )
    from_environment = {k: environ[k] for k in ENV_SCHEMA if k in environ}
    named = functools.partial(_where, env_path, from_environment)
    return _validate({**from_file, **from_environment}, ENV_SCHEMA, env_path, named), from_environment


def _check_unique_names(servers, path):
    seen = set()
    for index, srv in enumerate(servers):
        if srv["name"] in seen:
            raise ConfigError(f"{path}: servers[{index}].name: duplicate server name {srv['name']!r}")
        seen.add(srv["name"])


def _nearest_existing(path):
    path = Path(path)
    while not path.exists():
        path = path.parent
    return path


DIRECTORY_KEYS = ("DATA_ROOT", "STATE_DIR", "LOG_DIR", "TMP_DIR")


def check_directories(env, named):
    """Each directory key names a writable directory, or a path one can be created at; nothing is written."""
    for key in DIRECTORY_KEYS:
        path = Path(env[key])
        anchor = _nearest_existing(path)
        if not anchor.is_dir():
            raise ConfigError(f"{named(key)}: {path}: {anchor} is not a directory; point {key} at a directory")
        # Before os.access: that says "not writable" for a read-only mount too, without saying why.
        if os.statvfs(anchor).f_flag & os.ST_RDONLY:
            raise ConfigError(
                f"{named(key)}: {path} is on a read-only filesystem; remount it read-write or point {key} elsewhere"
            )
        if os.access(anchor, os.W_OK | os.X_OK):
            continue
        if anchor != path:
            raise ConfigError(
                f"{named(key)}: {path} does not exist and cannot be created in {anchor} "
                f"(not writable); create it, or point {key} somewhere writable"
            )
        raise ConfigError(
            f"{named(key)}: {path} is not writable by this user (uid {os.getuid()}); "
            f"give it write permission, or point {key} somewhere writable"
        )


def check_same_filesystem(env, named):
    """TMP_DIR must share DATA_ROOT's filesystem so that a rename publishes a file atomically."""
    data_dev = _nearest_existing(env["DATA_ROOT"]).stat().st_dev
    tmp_dev = _nearest_existing(env["TMP_DIR"]).stat().st_dev
    if data_dev != tmp_dev:
        raise ConfigError(
            f"{named('TMP_DIR')}: {env['TMP_DIR']} is not on the same filesystem as "
            f"DATA_ROOT {env['DATA_ROOT']}; files are published by rename, so choose a "
            "TMP_DIR on that filesystem"
        )


def load_settings(config_dir=None, environ=None):
    """Read and validate all three configuration files; raise ConfigError naming file and key."""
    environ = os.environ if environ is None else environ
    if not config_dir and environ.get("RELAY_CONFIG_DIR") and not Path(environ["RELAY_CONFIG_DIR"]).is_dir():
        raise ConfigError(
            f"RELAY_CONFIG_DIR={environ['RELAY_CONFIG_DIR']} (from the environment): no such "
            "directory; point it at the directory that holds .env, sources.conf and pipeline.conf"
        )
    config_dir = Path(config_dir or environ.get("RELAY_CONFIG_DIR") or DEFAULT_CONFIG_DIR).resolve()
    if not config_dir.is_dir():
        raise ConfigError(f"{config_dir}: configuration directory not found (set RELAY_CONFIG_DIR)")
    env, from_environment = read_env(config_dir, environ)
    named = functools.partial(_where, config_dir / ".env", from_environment)
    sources_path = config_dir / "sources.conf"
    sources = _validate(_read_json(sources_path), SOURCES_SCHEMA, sources_path)
    _check_unique_names(sources["servers"], sources_path)
    pipeline_path = config_dir / "pipeline.conf"
    pipeline = _validate(_read_json(pipeline_path), PIPELINE_SCHEMA, pipeline_path)
    check_directories(env, named)
    check_same_filesystem(env, named)
    servers = []
    for srv in sources["servers"]:
        paths = srv.pop("remote_path")
        servers.append(Server(remote_paths=tuple([paths] if isinstance(paths, str) else paths), **srv))
    return Settings(
        config_dir=str(config_dir),
        servers=tuple(servers),
        from_environment=tuple(from_environment),
        **{k.lower(): v for k, v in env.items()},
        **pipeline,
    )
