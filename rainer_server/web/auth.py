"""Who is calling, and whether they may: identity from a token or a trusted proxy, the
policy's decision, and the audit line of every refusal.

Runs before anything is read or stored, on every route and on the mirror fast path alike
(``web/middleware.py`` asks ``gate.may_read`` and steps aside to Flask, which refuses, when
the answer is no). With ``RAINER_AUTH=none`` every caller is anonymous and the policy lets
anyone do anything: the checks cost a dict lookup.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import uuid
from typing import Any

from rainer_server import audit
from rainer_server.access import Policy
from rainer_server.errors import AccessDenied
from rainer_server.errors import AuthenticationRequired
from rainer_server.errors import ConfigurationError
from rainer_server.metrics import metrics
from rainer_server.settings import Settings
from rainer_server.storage.tokens import DbTokenStore

log = logging.getLogger(__name__)

#: Where a request's resolved caller is kept, so the middleware and the view resolve it once.
CALLER_ENVIRON_KEY = "rainer.caller"
_BEARER = "bearer "


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """The caller of one request. ``identity`` is ``None`` for the anonymous caller."""

    identity: str | None
    #: "token", "proxy", or None (anonymous).
    via: str | None
    peer: str | None
    #: Why the credentials given prove nothing (a wrong, expired or revoked token): every
    #: request carrying them is refused with 401, whatever the policy allows anonymously.
    invalid: str | None = None


ANONYMOUS = Caller(None, None, None)


class Gate:
    """Identity and access decisions for one app, from its settings."""

    def __init__(self, settings: Settings, tokens: DbTokenStore | None) -> None:
        self.settings = settings
        self.modes = settings.auth_modes
        self.enabled = bool(self.modes)
        self.tokens = tokens
        self.policy = Policy.load(settings.policy) if self.enabled and settings.policy else Policy.allow_all()
        self._networks = settings.trusted_networks
        # As WSGI names it: X-Remote-User -> HTTP_X_REMOTE_USER.
        self._proxy_environ = "HTTP_" + settings.proxy_identity_header.upper().replace("-", "_")

    def reload_policy(self) -> bool:
        """Read the policy file again; on a bad file keep the current policy and log why.

        :returns: whether the new policy is in force.
        """
        if not self.enabled or not self.settings.policy:
            return False
        try:
            policy = Policy.load(self.settings.policy)
        except ConfigurationError as exc:
            log.error("Keeping the current access policy: %s", exc)
            return False
        self.policy = policy
        log.info("Access policy reloaded from %s (%d rules)", self.settings.policy, len(policy.rules))
        return True

    # ------------------------------------------------------------------ identity

    def caller(self, environ: dict[str, Any]) -> Caller:
        """The caller of the request ``environ`` describes (resolved once per request)."""
        found = environ.get(CALLER_ENVIRON_KEY)
        if found is None:
            found = environ[CALLER_ENVIRON_KEY] = self._identify(environ)
        return found

    def _identify(self, environ: dict[str, Any]) -> Caller:
        if not self.enabled:
            return ANONYMOUS
        peer = environ.get("REMOTE_ADDR")
        if "token" in self.modes:
            # An empty header carries no credentials: the caller is anonymous, as nginx's
            # micro-cache (deploy/nginx/rainer.conf) takes it to be when it shares answers.
            authorization = environ.get("HTTP_AUTHORIZATION") or None
            # Another scheme (Basic, from a proxy that checked the password itself) is not a
            # token: with proxy mode on, the proxy's identity header decides instead.
            if authorization is not None and (
                _is_bearer(authorization) or "proxy" not in self.modes
            ):
                return self._from_token(authorization, peer)
        proxied = environ.get(self._proxy_environ)
        if proxied is not None:
            if "proxy" in self.modes and self._trusted(peer):
                name = _header_text(proxied).strip()
                if name:
                    return Caller(name, "proxy", peer)
            else:
                audit.record(
                    decision="ignored-proxy-header",
                    identity=None,
                    peer=peer,
                    method=environ.get("REQUEST_METHOD", ""),
                    key=None,
                    reason=f"{self.settings.proxy_identity_header} from an untrusted peer",
                    request_id=request_id(environ),
                )
                metrics().access_denied.labels("untrusted_proxy_header").inc()
        return Caller(None, None, peer)

    def _from_token(self, authorization: str, peer: str | None) -> Caller:
        if not _is_bearer(authorization):
            return Caller(None, None, peer, invalid="Authorization must be 'Bearer <token>'")
        token = authorization[len(_BEARER) :].strip()
        assert self.tokens is not None
        identity = self.tokens.identify(token) if token else None
        if identity is None:
            return Caller(None, None, peer, invalid="Invalid, expired or revoked token")
        return Caller(identity, "token", peer)

    def _trusted(self, peer: str | None) -> bool:
        if not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    # ------------------------------------------------------------------ decisions

    def may_read(self, caller: Caller, key: str) -> bool:
        return caller.invalid is None and self.policy.may_read(caller.identity, key)

    def check(self, environ: dict[str, Any], key: str | None, write: bool, version: int | None = None) -> Caller:
        """The caller, when it may read (or ``write``) ``key``; ``key=None``: any route that
        needs only valid credentials (a listing filters what it shows instead).

        :raises AuthenticationRequired: no or invalid credentials where they are needed.
        :raises AccessDenied: an identity the policy does not allow this.
        """
        caller = self.caller(environ)
        if caller.invalid is not None:
            self.refuse(environ, caller, key, version, "unauthenticated", caller.invalid)
            raise AuthenticationRequired(caller.invalid, invalid_token=True)
        if key is None:
            return caller
        allowed = (
            self.policy.may_write(caller.identity, key)
            if write
            else self.policy.may_read(caller.identity, key)
        )
        if allowed:
            return caller
        action = "write" if write else "read"
        if caller.identity is None:
            self.refuse(environ, caller, key, version, "unauthenticated", f"{action} needs an identity")
            raise AuthenticationRequired()
        self.refuse(environ, caller, key, version, "denied", f"may not {action} this key")
        raise AccessDenied(f"{caller.identity} may not {action} {key}")

    def refuse(
        self,
        environ: dict[str, Any],
        caller: Caller,
        key: str | None,
        version: int | None,
        decision: str,
        reason: str,
    ) -> None:
        """Audit and count one refusal."""
        audit.record(
            decision=decision,
            identity=caller.identity,
            peer=caller.peer or environ.get("REMOTE_ADDR"),
            method=environ.get("REQUEST_METHOD", ""),
            key=key,
            version=version,
            reason=reason,
            request_id=request_id(environ),
        )
        metrics().access_denied.labels(decision).inc()


def _is_bearer(authorization: str) -> bool:
    return authorization[: len(_BEARER)].lower() == _BEARER


def request_id(environ: dict[str, Any]) -> str:
    """The request's id: the proxy's ``X-Request-Id`` when it sent one, else a new one."""
    found = environ.get("rainer.request_id")
    if found is None:
        given = environ.get("HTTP_X_REQUEST_ID", "")
        found = given if 0 < len(given) <= 64 and given.isprintable() else uuid.uuid4().hex
        environ["rainer.request_id"] = found
    return found


def _header_text(value: str) -> str:
    # WSGI hands header values over as latin-1; a proxy sends UTF-8 names.
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def open_gate(settings: Settings, database: Any | None) -> Gate:
    """The gate for ``settings``; ``database`` holds the token table when tokens are on."""
    tokens = None
    if "token" in settings.auth_modes:
        tokens = DbTokenStore(database, settings.table + "_tokens")
    return Gate(settings, tokens)
