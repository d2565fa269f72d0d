"""Writing a commit by the API's rules: the one code path of ``POST /<key>/<version>`` and of
every change made in the console.

A write is checked in this order, and a dry run goes through every step but the last: may
the caller write the key (``check_write``); is the author the caller, or may the caller act
as another author and set the time (``sign``); is the payload within the size limit, is the
version in range, does the payload deserialize with the configured format and schema, is the
version the key's next one (``save_commit``). Only then is the commit stored (and published
to ZooKeeper), counted, audited and logged. Errors are the domain errors of
``rainer_server.errors``: the API maps them to HTTP answers, the console to pages.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime
from typing import Any

from rainer_server import audit
from rainer_server.audit import escape_controls
from rainer_server.commit import MAX_VERSION
from rainer_server.commit import Commit
from rainer_server.commit import now
from rainer_server.commit import parse_mtime
from rainer_server.errors import AccessDenied
from rainer_server.errors import CommitNotFound
from rainer_server.errors import CommitOrderingError
from rainer_server.errors import InvalidCommit
from rainer_server.errors import PayloadTooLarge
from rainer_server.metrics import metrics
from rainer_server.web.auth import Caller
from rainer_server.web.auth import request_id
from rainer_server.web.context import RainerContext

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Signature:
    """Who a commit is by and when: checked against the caller (``sign``)."""

    caller: Caller
    author: str
    mtime: datetime


def check_write(rainer: RainerContext, environ: dict[str, Any], key: str, version: int) -> Caller:
    """The caller, once it may write ``key``.

    :raises AuthenticationRequired: (401) no or invalid credentials.
    :raises AccessDenied: (403) the policy does not let this identity write the key.
    """
    return rainer.gate.check(environ, key, write=True, version=version)


def sign(
    rainer: RainerContext,
    environ: dict[str, Any],
    caller: Caller,
    key: str,
    version: int,
    author: str | None,
    mtime_text: str | None,
) -> Signature:
    """The author and time of a commit by ``caller``.

    With access control on, the author is the caller's identity (``author`` may be omitted or
    equal to it) and the server sets the time, unless the identity may act as others.

    :raises AccessDenied: another author, or a time, from an identity that may not set them.
    :raises InvalidCommit: no author at all (anonymous), or a time that is not ISO-8601.
    """
    gate = rainer.gate
    identity = caller.identity
    if identity is not None and not gate.policy.may_act_as(identity):
        # The author is a fact, not a claim: who authenticated, unless trusted to say so.
        if author is not None and author != identity:
            gate.refuse(environ, caller, key, version, "denied", "author is not the caller")
            raise AccessDenied(f"Author must be {identity}")
        if mtime_text is not None:
            gate.refuse(environ, caller, key, version, "denied", "sets the time")
            raise AccessDenied("Only act_as identities may set X-Rainer-Modified-Time")
    if author is None:
        if identity is None:
            raise InvalidCommit("Missing header: X-Rainer-Author")
        author = identity
    try:
        mtime = now() if mtime_text is None else parse_mtime(mtime_text)
    except ValueError:
        raise InvalidCommit(
            "Malformed header: X-Rainer-Modified-Time (expected ISO-8601, "
            "e.g. 2014-01-01T00:00:00.000Z)"
        ) from None
    return Signature(caller, author, mtime)


def save_commit(
    rainer: RainerContext,
    environ: dict[str, Any],
    key: str,
    version: int,
    signature: Signature,
    payload: bytes | None,
    comment: str | None,
    *,
    revert_to: int | None = None,
    dry_run: bool = False,
) -> Commit:
    """Check and store version ``version`` of ``key``; return the commit (not stored when
    ``dry_run``: then it is what would have been).

    :param payload: the new payload, ``None`` for a tombstone; ``b""`` with ``revert_to``.
    :param comment: ``None`` or empty: none (with ``revert_to``: "Revert to version V").
    :param revert_to: commit exactly the payload of this version (a tombstone if it was one).
    :raises CommitNotFound: ``revert_to`` names a version the key does not have.
    :raises PayloadTooLarge: a payload over ``RAINER_MAX_PAYLOAD_BYTES``.
    :raises PayloadRejected: a payload the format or the key's schema refuses.
    :raises CommitOrderingError: ``version`` is not the key's next version.
    """
    reason = None
    if revert_to is not None:
        if payload is None or payload:
            raise InvalidCommit("A revert (revert_to) takes an empty body and no X-Rainer-Empty")
        target = rainer.database_storage.get(key, revert_to)
        if target is None:
            raise CommitNotFound(key, revert_to)
        payload = target.payload
        comment = comment or f"Revert to version {revert_to}"
        reason = f"revert to version {revert_to}"
    limit = rainer.settings.max_payload_bytes
    if payload is not None and len(payload) > limit:
        raise PayloadTooLarge(limit)
    if not 1 <= version <= MAX_VERSION:
        # Never the next version: answer as any other out-of-order write.
        head = rainer.database_storage.get(key)
        raise CommitOrderingError(key, (head.version if head else 0) + 1, version)
    if payload is not None:
        # Validation is deserializing with the format readers use; the value is not kept.
        rainer.payloads.deserialize(key, payload)
    identity = signature.caller.identity
    commit = Commit(
        key,
        version,
        payload,
        signature.author,
        comment or "",
        signature.mtime,
        identity=identity or "",
    )
    if dry_run:
        # The check the storage makes when it saves, made by reading: nothing is written.
        head = rainer.database_storage.get(key)
        expected = (head.version if head else 0) + 1
        if version != expected:
            raise CommitOrderingError(key, expected, version)
        return commit
    # The storage hands back the commit as kept: with its place in the global index.
    kept = rainer.storage.save(commit)
    metrics().commits_saved.inc()
    hub = rainer.watching()
    if hub is not None:
        hub.poke()  # this process's watchers need not wait for the mirror or the next poll
    audit.record(
        decision="committed",
        identity=identity,
        peer=environ.get("REMOTE_ADDR"),
        method=environ.get("REQUEST_METHOD", "POST"),
        key=key,
        version=version,
        reason=reason,
        request_id=request_id(environ),
    )
    # Who changed what, never the payload itself (it may hold secrets): its size only.
    # The author may hold anything, a line break included: escaped, it cannot forge a line.
    log.info(
        "Saved commit %s version %s by %s (%s)%s",
        key,
        version,
        escape_controls(signature.author),
        "empty" if payload is None else f"{len(payload)} bytes",
        f", a revert to version {revert_to}" if revert_to is not None else "",
    )
    return kept if kept is not None else commit
