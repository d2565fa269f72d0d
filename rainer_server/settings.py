"""Settings: their names, defaults and validation, independent of Flask.

Every setting is named ``RAINER_<NAME>`` in the environment and in a settings file; this
module sees them without the prefix, lower-cased (``database_url``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from typing import Any

from marshmallow import EXCLUDE
from marshmallow import Schema
from marshmallow import ValidationError
from marshmallow import fields
from marshmallow import post_load
from marshmallow import validate

from rainer_server.errors import ConfigurationError
from rainer_server.payloads import FORMATS

PAYLOAD_FORMATS = tuple(FORMATS)


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///rainer.db"
    table: str = "rainer"
    url_prefix: str = "/diary"
    payload_format: str = "json"
    max_payload_bytes: int = 524288
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


NAMES = tuple(f"RAINER_{field.name.upper()}" for field in dataclasses.fields(Settings))
DEFAULTS = {f"RAINER_{f.name.upper()}": getattr(Settings(), f.name) for f in dataclasses.fields(Settings)}


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

    database_url = fields.String(validate=validate.Regexp(r"^(sqlite|mysql)[a-z+]*://", error=(
        "must be sqlite:///path or mysql://user:password@host:port/database")))
    table = fields.String(validate=validate.Regexp(
        r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", error="must be a plain SQL identifier"))
    url_prefix = fields.String(validate=validate.Regexp(
        r"^(/[^/\s]+)*$", error="must be empty or start with '/' and not end with '/'"))
    payload_format = fields.String(validate=validate.OneOf(PAYLOAD_FORMATS))
    max_payload_bytes = fields.Integer(validate=validate.Range(min=1, max=16 * 1024 * 1024))
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

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> Settings:
        for name in ("zk_hosts", "policy", "audit_log", "auth"):
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
        raise ConfigurationError(f"Invalid setting RAINER_{name.upper()}: {detail}") from None
    if settings.auth_modes and not settings.policy:
        raise ConfigurationError(
            f"Invalid setting RAINER_POLICY: required with RAINER_AUTH={settings.auth} "
            "(a YAML file of rules; RAINER_AUTH=none keeps anonymous writes)"
        )
    if settings.payload_schemas and settings.payload_format not in ("json", "yaml"):
        raise ConfigurationError(
            "Invalid setting RAINER_PAYLOAD_SCHEMAS: schemas need RAINER_PAYLOAD_FORMAT json or yaml"
        )
    return settings


def _flatten(messages: Any) -> list[Any]:
    if isinstance(messages, dict):
        return [f"{k}: {v}" for k, value in messages.items() for v in _flatten(value)]
    if isinstance(messages, list):
        return [m for item in messages for m in _flatten(item)]
    return [messages]


def settings_from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``RAINER_*`` settings present in ``environ`` (other ``RAINER_`` names belong to tools)."""
    return {name: environ[name] for name in NAMES if name in environ}


