"""Settings: their names, defaults, validation and sources, independent of Flask and gunicorn.

Every setting is named ``RAINER_<NAME>`` in the environment, in the settings file named by
``RAINER_CONFIG`` and in a Flask app's config; ``SettingsSchema`` sees them without the
prefix, lower-cased (``database_url``). The gunicorn settings (``RAINER_BIND``,
``RAINER_WORKERS``) are validated here too, so one bad value of any kind stops every way of
starting the service with the same one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import traceback
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from marshmallow import EXCLUDE
from marshmallow import Schema
from marshmallow import ValidationError
from marshmallow import fields
from marshmallow import post_load
from marshmallow import validate

from rainer_server.errors import ConfigurationError
from rainer_server.payloads import FORMATS

PAYLOAD_FORMATS = tuple(FORMATS)
PREFIX = "RAINER_"
#: The environment variable naming a Python settings file.
CONFIG_NAME = "RAINER_CONFIG"


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///rainer.db"
    #: Seconds a database operation of a gevent worker may take, connect and handshake
    #: included, before its request answers 503 (a hung server answers nothing at all).
    database_timeout: float = 2.0
    table: str = "rainer"
    url_prefix: str = "/diary"
    payload_format: str = "json"
    max_payload_bytes: int = 524288
    #: Per process: repeat ``GET /<key>/<version>`` reads are answered from memory (0: off).
    version_cache_bytes: int = 16 * 1024 * 1024
    payload_schemas: Mapping[str, str] = dataclasses.field(default_factory=dict)
    zk_hosts: str | None = None
    zk_path: str = "/rainer"
    zk_session_timeout: float = 10.0
    publish_period: float = 90.0
    publish_fuzz: float = 0.2
    #: None (unset): "none" while the service listens on loopback only, else it refuses to
    #: start (see ``auth_modes``).
    auth: str | None = None
    policy: str | None = None
    proxy_identity_header: str = "X-Remote-User"
    trusted_proxies: str = "127.0.0.1,::1"
    audit_log: str | None = None
    health_routes: bool = True
    #: The web console (rainer_server/web/console.py), and where it is mounted.
    ui: bool = True
    ui_prefix: str = "/ui"
    #: Signs the console's session cookie and its forms' CSRF tokens. No default: required
    #: when the console and RAINER_AUTH are both on (see ``load_settings``). Never shown.
    secret_key: str | None = dataclasses.field(default=None, repr=False)
    # gunicorn's (rainer_server.gunicorn_conf); the Flask app does not use them.
    bind: str = "127.0.0.1:8080"
    workers: int = 2
    worker_class: str = "gevent"
    worker_connections: int = 1000

    @property
    def auth_modes(self) -> frozenset[str]:
        """How callers prove who they are: a subset of {"token", "proxy"}; empty: anonymous."""
        return frozenset(m for m in (self.auth or "none").split(",") if m != "none")

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(
            ipaddress.ip_network(part.strip(), strict=False)
            for part in self.trusted_proxies.split(",")
            if part.strip()
        )


NAMES = tuple(f"{PREFIX}{field.name.upper()}" for field in dataclasses.fields(Settings))
DEFAULTS = {
    f"{PREFIX}{f.name.upper()}": getattr(Settings(), f.name) for f in dataclasses.fields(Settings)
}

#: RAINER_* names that are not settings of the service but may well be set in the same
#: shell or unit, so they are never reported as unknown.
OTHER_NAMES = {
    CONFIG_NAME: "the settings file",
    "RAINER_URL": "the rainer command's server",
    "RAINER_TOKEN": "the rainer command's credentials",
    "RAINER_AUTHOR": "the rainer command's author of commits",
    "RAINER_PROMETHEUS_MASTER": "gunicorn_hooks' mark on the metrics directory it prepared",
}
#: Prefixes of RAINER_* names that belong to tools: the test suite's services and options.
OTHER_PREFIXES = ("RAINER_TEST_",)

_DATABASE_URL_FORM = "must be sqlite:///path or mysql://user:password@host:port/database"
# host:port, [ipv6]:port, unix:path or fd://number: the forms gunicorn's --bind takes.
_BIND = re.compile(r"(?:unix:.+|fd://\d+|(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5}))\Z")


def _check_database_url(value: str) -> None:
    # The scheme is the Regexp's job; this catches what peewee would refuse only on the first
    # request. The messages never repeat the URL: it may hold a password.
    parts = urlsplit(value)
    if not parts.scheme.startswith("mysql"):
        return
    try:
        parts.port
    except ValueError:
        raise ValidationError("the port must be a number from 0 to 65535") from None
    if not parts.path.strip("/"):
        raise ValidationError(f"names no database: {_DATABASE_URL_FORM}")


def _check_bind(value: str) -> None:
    match = _BIND.match(value)
    if match is None or (match.group(1) is not None and not 0 < int(match.group(1)) < 65536):
        raise ValidationError("must be host:port, [ipv6 address]:port, unix:/path or fd://number")


#: A secret key shorter than this is a password someone typed, not a key.
MIN_SECRET_KEY_LENGTH = 32
_NEW_SECRET = "make one with python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"

def _check_secret_key(value: str) -> None:
    # Empty is unset (as for the other optional settings); the message never repeats the value.
    if value and len(value) < MIN_SECRET_KEY_LENGTH:
        raise ValidationError(f"must be at least {MIN_SECRET_KEY_LENGTH} characters: {_NEW_SECRET}")


AUTH_CHOICES = ("none", "token", "proxy", "token,proxy", "proxy,token")


def _valid_networks(value: str) -> None:
    for part in value.split(","):
        try:
            ipaddress.ip_network(part.strip(), strict=False)
        except ValueError:
            raise ValidationError(
                f"{part.strip()!r} is not an IP address or network (e.g. 10.0.0.0/8)"
            ) from None


class SettingsSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    database_url = fields.String(validate=[
        validate.Regexp(r"^(sqlite|mysql)[a-z+]*://", error=_DATABASE_URL_FORM),
        _check_database_url,
    ])
    # Below gunicorn's worker timeout (30 s), so a hung database is a 503, not a killed worker.
    database_timeout = fields.Float(validate=validate.Range(min=0.1, max=25))
    table = fields.String(validate=validate.Regexp(
        r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", error="must be a plain SQL identifier"))
    url_prefix = fields.String(validate=validate.Regexp(
        r"^(/[^/\s]+)*$", error="must be empty or start with '/' and not end with '/'"))
    payload_format = fields.String(validate=validate.OneOf(PAYLOAD_FORMATS))
    max_payload_bytes = fields.Integer(validate=validate.Range(min=1, max=16 * 1024 * 1024))
    version_cache_bytes = fields.Integer(validate=validate.Range(min=0, max=1 << 34))
    payload_schemas = fields.Dict(keys=fields.String(), values=fields.String(
        validate=validate.Regexp(r"^[\w.]+:\w+$", error="must be 'module:SchemaClass'")))
    zk_hosts = fields.String(allow_none=True)
    zk_path = fields.String(validate=validate.Regexp(r"^(/[^/\s]+)+$", error="must be an absolute znode path"))
    zk_session_timeout = fields.Float(validate=validate.Range(min=1, max=300))
    publish_period = fields.Float(validate=validate.Range(min=0.1, min_inclusive=True))
    publish_fuzz = fields.Float(validate=validate.Range(min=0, max=1, max_inclusive=False))
    auth = fields.String(allow_none=True, validate=validate.OneOf(
        AUTH_CHOICES, error="must be none, token, proxy or token,proxy"))
    policy = fields.String(allow_none=True)
    proxy_identity_header = fields.String(validate=validate.Regexp(
        r"^[A-Za-z0-9-]+$", error="must be an HTTP header name"))
    trusted_proxies = fields.String(validate=_valid_networks)
    audit_log = fields.String(allow_none=True)
    health_routes = fields.Boolean()
    ui = fields.Boolean()
    ui_prefix = fields.String(validate=validate.Regexp(
        r"^(/[^/\s]+)+$", error="must start with '/' and not end with '/' (e.g. /ui)"))
    secret_key = fields.String(allow_none=True, validate=_check_secret_key)
    bind = fields.String(validate=_check_bind)
    workers = fields.Integer(validate=validate.Range(min=1, max=1024))
    worker_class = fields.String(validate=validate.OneOf(
        ("gevent", "sync"), error="must be gevent or sync"))
    worker_connections = fields.Integer(validate=validate.Range(min=1, max=100000))

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> Settings:
        for name in ("zk_hosts", "policy", "audit_log", "auth", "secret_key"):
            if data.get(name) == "":
                data[name] = None
        return Settings(**data)


def load_settings(values: Mapping[str, Any]) -> Settings:
    """Validate settings given without their ``RAINER_`` prefix, lower-cased.

    :raises ConfigurationError: naming the first bad setting, in one line.
    """
    try:
        settings = SettingsSchema().load(dict(values))
    except ValidationError as exc:
        name, messages = next(iter(sorted(exc.messages.items())))
        detail = messages if isinstance(messages, str) else "; ".join(map(str, _flatten(messages)))
        raise ConfigurationError(f"Invalid setting {PREFIX}{name.upper()}: {detail}") from None
    if settings.auth_modes and not settings.policy:
        raise ConfigurationError(
            f"Invalid setting RAINER_POLICY: required with RAINER_AUTH={settings.auth} "
            "(a YAML file of rules; RAINER_AUTH=none keeps anonymous writes)"
        )
    if settings.ui and settings.auth_modes and not settings.secret_key:
        # The console's sessions say who is signed in: a key known to anyone (a default)
        # would let anyone sign a session naming any identity.
        raise ConfigurationError(
            f"Invalid setting RAINER_SECRET_KEY: required when the console (RAINER_UI) and "
            f"RAINER_AUTH={settings.auth} are both on ({_NEW_SECRET}), or set RAINER_UI=off"
        )
    if settings.ui and settings.url_prefix and (
        settings.ui_prefix == settings.url_prefix
        or settings.ui_prefix.startswith(settings.url_prefix + "/")
    ):
        raise ConfigurationError(
            f"Invalid setting RAINER_UI_PREFIX: {settings.ui_prefix} is inside the API's "
            f"RAINER_URL_PREFIX {settings.url_prefix}, where keys have their URLs"
        )
    if settings.payload_schemas and settings.payload_format not in ("json", "yaml"):
        raise ConfigurationError(
            "Invalid setting RAINER_PAYLOAD_SCHEMAS: schemas need RAINER_PAYLOAD_FORMAT json or yaml"
        )
    return settings


def without_prefix(values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``RAINER_*`` entries of ``values`` as ``load_settings`` takes them."""
    return {
        name[len(PREFIX):].lower(): value
        for name, value in values.items()
        if name.startswith(PREFIX)
    }


def _flatten(messages: Any) -> list[Any]:
    if isinstance(messages, dict):
        return [f"{k}: {v}" for k, value in messages.items() for v in _flatten(value)]
    if isinstance(messages, list):
        return [m for item in messages for m in _flatten(item)]
    return [messages]


# ---------------------------------------------------------------------- sources


def settings_from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``RAINER_*`` settings present in ``environ`` (other ``RAINER_`` names belong to
    tools)."""
    return {name: environ[name] for name in NAMES if name in environ}


def configured_values(
    environ: Mapping[str, str], warn: Callable[[str], Any] | None = None
) -> dict[str, Any]:
    """What the file named by ``RAINER_CONFIG`` and then the environment set (the environment
    wins), with their prefix, not yet validated.

    The file's other upper-case names (Flask's own settings) are returned as well. Unknown
    ``RAINER_*`` names are left out, and each is passed to ``warn`` in one line naming the
    closest known name: a typo must not pass silently, but it need not stop the service.

    :raises ConfigurationError: when ``RAINER_CONFIG`` names a file that is missing, or that
        does not run.
    """
    path = environ.get(CONFIG_NAME)
    from_file = read_settings_file(path) if path else {}
    if warn is not None:
        for message in (
            *unknown_setting_messages(from_file, str(path)),
            *unknown_setting_messages(environ, "the environment"),
        ):
            warn(message)
    values = {
        name: value
        for name, value in from_file.items()
        if not name.startswith(PREFIX) or name in NAMES
    }
    values.update(settings_from_environ(environ))
    return values


def read_settings_file(path: str) -> dict[str, Any]:
    """The upper-case names a Python settings file defines (Flask's ``from_pyfile`` rules).

    A relative path is relative to the working directory.

    :raises ConfigurationError: in one line naming ``RAINER_CONFIG`` (and the line of the
        file), when the file cannot be read or does not run.
    """
    def refuse(reason: str) -> ConfigurationError:
        return ConfigurationError(f"Invalid setting {CONFIG_NAME}: {' '.join(reason.split())}")

    try:
        with open(path, "rb") as file:
            source = file.read()
    except OSError as exc:
        raise refuse(f"cannot read {path}: {exc.strerror or exc}") from None
    namespace: dict[str, Any] = {"__file__": path, "__name__": "rainer_config"}
    try:
        code = compile(source, path, "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: null bytes
        line = getattr(exc, "lineno", None)
        where = f"{path} line {line}" if line else path
        raise refuse(f"{where}: {getattr(exc, 'msg', None) or exc}") from None
    try:
        exec(code, namespace)
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        line = next((f.lineno for f in reversed(frames) if f.filename == path), None)
        where = f"{path} line {line}" if line else path
        raise refuse(f"{where}: {type(exc).__name__}: {exc}") from None
    return {name: value for name, value in namespace.items() if name.isupper()}


def unknown_setting_messages(names: Iterable[str], where: str) -> list[str]:
    """One line for each ``RAINER_*`` name in ``names`` that nothing reads, with the closest
    known name when one is close."""
    known = (*NAMES, *OTHER_NAMES)
    # Compared without the prefix every name shares, which would make any two look alike.
    stems = {name[len(PREFIX):]: name for name in known}
    messages = []
    for name in sorted(names):
        if not name.startswith(PREFIX) or name in known or name.startswith(OTHER_PREFIXES):
            continue
        close = difflib.get_close_matches(name[len(PREFIX):], stems, n=1)
        hint = f" (did you mean {stems[close[0]]}?)" if close else ""
        messages.append(f"Unknown setting {name} in {where} is ignored{hint}")
    return messages
