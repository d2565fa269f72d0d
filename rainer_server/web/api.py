"""The HTTP API (spec §4) as a Flask blueprint, and the one place errors become HTTP answers."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from flask import Blueprint
from flask import Flask
from flask import request
from flask import Response
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from rainer_server.commit import Commit
from rainer_server.commit import parse_canonical_version
from rainer_server.commit import parse_version
from rainer_server.commit import validate_key
from rainer_server.diff import DEFAULT_CONTEXT
from rainer_server.diff import diff_lines
from rainer_server.diff import side_name
from rainer_server.diff import unified_text
from rainer_server.errors import AccessDenied
from rainer_server.errors import AuthenticationRequired
from rainer_server.errors import CommitNotFound
from rainer_server.errors import CommitOrderingError
from rainer_server.errors import CsrfRejected
from rainer_server.errors import InvalidCommit
from rainer_server.errors import PayloadRejected
from rainer_server.errors import PayloadTooLarge
from rainer_server.errors import RainerError
from rainer_server.errors import StorageUnavailable
from rainer_server.headers import decode_text_header
from rainer_server.headers import HEADER_ENCODING
from rainer_server.headers import is_percent_encoded
from rainer_server.metrics import metrics
from rainer_server.web import blocking
from rainer_server.web.auth import Caller
from rainer_server.web.commits import check_write
from rainer_server.web.commits import save_commit
from rainer_server.web.commits import sign
from rainer_server.web.context import get_rainer
from rainer_server.web.context import RainerContext
from rainer_server.web.listing import ListingFragments
from rainer_server.web.middleware import CACHED
from rainer_server.web.middleware import edge_headers
from rainer_server.web.middleware import path_is_utf8
from rainer_server.web.middleware import INDEX_HEADER
from rainer_server.web.middleware import etag
from rainer_server.web.middleware import etag_matches
from rainer_server.web.middleware import payload_headers
from rainer_server.web.middleware import prepared_headers

log = logging.getLogger(__name__)

bp = Blueprint("rainer", __name__)

JSON = "application/json"
_TRUE = frozenset(("yes", "true", "1"))
_FALSE = frozenset(("no", "false", "0"))
RETRY_AFTER_SECONDS = 5


def register(app: Flask, url_prefix: str) -> None:
    app.register_blueprint(bp, url_prefix=url_prefix or None)


# ---------------------------------------------------------------------- helpers


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status, mimetype=JSON)


def _error(status: int, message: str, **extra: Any) -> Response:
    return _json({"error": message, **extra}, status)


def _boolean(value: str | None, name: str, what: str = "parameter") -> bool:
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    if what == "header":
        raise InvalidCommit(f"Malformed header: {name}")
    raise InvalidCommit(f"Invalid '{name}' parameter (should be boolean)")


def _key(key: str) -> str:
    # Werkzeug decodes the path with errors="replace": %FF, %ED%A0%80 and %EF%BF%BD would
    # all name the key U+FFFD.
    if not path_is_utf8(request.environ):
        raise InvalidCommit("Key must be valid UTF-8")
    return validate_key(key)


def _may_read(key: str) -> str:
    """``key``, once the caller is known to be allowed to read it."""
    get_rainer().gate.check(request.environ, key, write=False)
    return key


def _version(text: str) -> int:
    version = parse_canonical_version(text)
    if version is None:
        raise InvalidCommit(
            f"Invalid version {text!r}: versions are decimal integers without leading zeros"
        )
    return version


def _request_header(name: str) -> str | None:
    """A text header of the request, decoded (see ``rainer_server.headers``)."""
    value = request.headers.get(name)
    if value is None:
        return None
    percent = is_percent_encoded(request.headers.get(HEADER_ENCODING))
    return decode_text_header(name, value, percent)


def _found(key: str, version: int | None = None) -> Commit:
    commit = get_rainer().database_storage.get(key, version)
    if commit is None:
        raise CommitNotFound(key, version)
    return commit


def _edge(response: Response, shared: bool) -> Response:
    """``response`` with how long caches may keep it (``edge_headers``), unless it says so
    already (a blocking read's ``no-store``)."""
    if "Cache-Control" not in response.headers:
        response.headers.extend(edge_headers(shared))
    return response


def _shared(key: str) -> bool:
    """Whether an answer about ``key`` may be shared between callers: anyone may read it."""
    gate = get_rainer().gate
    return not gate.enabled or gate.policy.anyone_may_read(key)


def _found_version(key: str, version: int) -> Commit:
    """Version ``version`` of ``key`` (access already checked), from the process's cache when
    a recent read put it there."""
    rainer = get_rainer()
    cache = rainer.version_cache
    if cache.max_bytes:
        commit = cache.get(key, version)
        if commit is None:
            commit = _found(key, version)
            cache.put(commit)
        return commit
    return _found(key, version)


def _payload_response(commit: Commit) -> Response:
    return Response(commit.payload or b"", 200, headers=payload_headers(commit))


#: The most of an oversized body read (and dropped) before answering 413. A client still
#: sending when the answer comes and the connection closes gets a broken pipe instead of the
#: 413; past this, it does (nginx refuses such bodies before they reach us anyway).
_DRAIN_LIMIT = 32 * 1024 * 1024
_DRAIN_CHUNK = 64 * 1024


def _read_body(limit: int) -> bytes:
    # Refuse by Content-Length before storing anything; a chunked body is read to at most
    # limit + 1 bytes.
    length = request.content_length
    if length is not None and length > limit:
        if length <= _DRAIN_LIMIT:
            while request.stream.read(_DRAIN_CHUNK):
                pass
        raise PayloadTooLarge(limit)
    body = request.stream.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(limit)
    return body


# ---------------------------------------------------------------------- routes


@bp.get("/", strict_slashes=False)
def list_heads() -> Response:
    include_all = _boolean(request.args.get("all"), "all")
    utf8 = _boolean(request.args.get("payload_utf8"), "payload_utf8")
    b64 = _boolean(request.args.get("payload_base64"), "payload_base64")
    prefix = request.args.get("prefix", "")
    rainer = get_rainer()
    caller = rainer.gate.check(request.environ, None, write=False)
    since = blocking.index_parameter("changes_since")
    if since is not None:
        return blocking.changes_answer(
            rainer, caller, since, prefix, lambda c: _meta_with_payload(c, utf8, b64)
        )
    response = blocking.blocking_answer(
        rainer,
        lambda: _listing(rainer, caller, include_all, utf8, b64, prefix),
        wants=blocking.key_test(rainer, caller, prefix),
    )
    # The anonymous caller's listing is everyone's; an identity's may show more.
    return _edge(response, not rainer.gate.enabled or caller.identity is None)


def _listing(
    rainer: RainerContext, caller: Caller, include_all: bool, utf8: bool, b64: bool, prefix: str
) -> tuple[Response, int]:
    """The listing and its index: that of the newest head it covers (tombstones too)."""
    if rainer.gate.enabled:
        return _filtered_listing(rainer, caller, include_all, utf8, b64, prefix)
    mirrored = None if include_all else _mirror_state(rainer)
    if mirrored is not None:
        # The mirror swaps in a new immutable mapping on every change: identity revalidates.
        index, heads, hub = mirrored
        flags = ("mirror", utf8, b64, prefix)
        cached = rainer.list_cache.get(flags)
        if cached is None or cached[0] is not heads or cached[2] != index:
            if prefix:
                newest = min(index, hub.newest_index(lambda key: key.startswith(prefix)))
            else:
                newest = index
            # The tag is of the body, not of the index: every worker names the same listing
            # alike, so an edge cache revalidates it with whichever worker it reaches.
            # (Hashing needs the whole body first: the listing is built, then sent.)
            if utf8 or b64 or prefix:
                chunks = list(rainer.listing.chunks(heads, False, utf8, b64, prefix))
                digest = hashlib.sha256()
                for chunk in chunks:
                    digest.update(chunk)
                tag = '"%s"' % digest.hexdigest()[:32]
            else:
                chunks, tag = rainer.listing.whole(heads)
            cached = (heads, chunks, index, newest, tag)
            rainer.list_cache[flags] = cached
        heads, chunks, index, newest, tag = cached
        headers = {**CACHED, "ETag": tag, INDEX_HEADER: str(newest)}
        if etag_matches(request.headers.get("If-None-Match"), tag):
            return Response(status=304, headers=headers), newest
        headers["Content-Length"] = str(sum(map(len, chunks)))
        return Response(chunks, 200, mimetype=JSON, headers=headers), newest
    storage = rainer.database_storage
    flags = ("storage", include_all, utf8, b64, prefix)
    token = storage.heads_token()
    cached = rainer.list_cache.get(flags)
    if cached is None or cached[0] != token:
        heads = storage.heads()
        # The token is derived from the heads just read, not from the earlier query, so a
        # commit landing in between can never be cached under a token that hides it. So is
        # the index: every commit up to the newest head read is in what was read.
        cached = (
            sum(c.version for c in heads.values()),
            _list_body(heads, include_all, utf8, b64, prefix),
            _newest(heads, prefix),
        )
        rainer.list_cache[flags] = cached
    tag = f'"{cached[0]}"'
    headers = {"ETag": tag, INDEX_HEADER: str(cached[2])}
    if tag in request.headers.get("If-None-Match", ""):
        return Response(status=304, headers=headers), cached[2]
    return Response(cached[1], 200, mimetype=JSON, headers=headers), cached[2]


def _mirror_state(rainer: RainerContext) -> tuple[int, Mapping[str, Commit], Any] | None:
    """(index, heads, hub) when the mirror shows every commit up to the index it can claim,
    else ``None``: answer from the database."""
    view = rainer.cached_view()
    if view is None:
        return None
    hub = rainer.watch_hub
    # The index first, the view second: views only move forward, so the view read shows at
    # least everything up to the index.
    index = hub.mirror_index()
    if index is None:
        return None
    return index, view.current, hub


def _newest(heads: Mapping[str, Commit], prefix: str = "", wants: Any = None) -> int:
    """The index of the newest of ``heads`` (tombstones too: deleting a key changes a
    listing) under ``prefix`` and, with ``wants``, that it accepts."""
    return max(
        (
            c.index or 0
            for key, c in heads.items()
            if key.startswith(prefix) and (wants is None or wants(key))
        ),
        default=0,
    )


def _filtered_listing(
    rainer: RainerContext, caller: Caller, include_all: bool, utf8: bool, b64: bool, prefix: str
) -> tuple[Response, int]:
    """The listing of the keys ``caller`` may read, cached per identity (never one caller's
    listing served to another), with an ETag of its own visible set, and as its index that
    of the newest commit it may read: others' activity shows in neither."""
    mirrored = None if include_all else _mirror_state(rainer)
    storage = rainer.database_storage
    source: Any = (mirrored[1], mirrored[0]) if mirrored is not None else storage.heads_token()
    flags = ("filtered", caller.identity, mirrored is not None, include_all, utf8, b64, prefix)
    cached = rainer.list_cache.get(flags)
    # A mirror view is revalidated by identity (equality would compare every key).
    fresh = cached is not None and (
        cached[0][0] is source[0] and cached[0][1] == source[1]
        if mirrored is not None
        else cached[0] == source
    )
    if not fresh:
        heads = mirrored[1] if mirrored is not None else storage.heads()
        may_read = rainer.gate.policy.may_read
        visible = {
            key: commit
            for key, commit in heads.items()
            if key.startswith(prefix) and may_read(caller.identity, key)
        }
        hidden = any(
            include_all or not heads[key].empty
            for key in heads.keys() - visible.keys()
            if key.startswith(prefix)
        )
        body = _list_body(visible, include_all, utf8, b64)
        tag = '"%s"' % hashlib.sha256(body).hexdigest()[:32]
        if mirrored is None:
            # As in the unfiltered listing: the token and index of the heads just read.
            source = sum(c.version for c in heads.values())
            index = _newest(heads, prefix, lambda key: may_read(caller.identity, key))
        else:
            wants = blocking.key_test(rainer, caller, prefix)
            index = min(mirrored[0], mirrored[2].newest_index(wants))
        cached = (source, body, tag, hidden, index)
        rainer.list_cache[flags] = cached
    _, body, tag, hidden, index = cached
    headers = {"ETag": tag, "Vary": "Authorization", INDEX_HEADER: str(index)}
    if hidden:
        headers["X-Rainer-Results-Filtered"] = "yes"
    if mirrored is not None:
        headers.update(CACHED)
    if tag in request.headers.get("If-None-Match", ""):
        return Response(status=304, headers=headers), index
    return Response(body, 200, mimetype=JSON, headers=headers), index


def _list_body(
    heads: Mapping[str, Commit], include_all: bool, utf8: bool, b64: bool, prefix: str = ""
) -> bytes:
    # Heads read from the database are new objects on every read: nothing to keep.
    return b"".join(ListingFragments().chunks(heads, include_all, utf8, b64, prefix, cache=False))


def _meta_with_payload(commit: Commit, utf8: bool, b64: bool) -> dict[str, Any]:
    meta = commit.meta
    if commit.payload is not None:
        if utf8:
            meta["payload_utf8"] = commit.payload.decode("utf-8", "replace")
        if b64:
            meta["payload_base64"] = base64.b64encode(commit.payload).decode("ascii")
    return meta


def _head(key: str) -> tuple[Commit, bool, int]:
    """The newest commit of ``key``, whether it came from the mirror, and its index.

    A key the mirror lacks (tombstoned, or created a moment ago and not yet seen) is read
    from the storage, so a writer never sees a 404 for the key it just wrote; so is a key
    whose mirror commit the watch hub cannot place in the index yet.
    """
    rainer = get_rainer()
    view = rainer.cached_view()
    if view is not None:
        commit = view.current.get(key)
        if commit is not None:
            hub = rainer.watch_hub
            index = hub.head_index(key, commit.version)
            if index is not None:
                return commit, True, index
            try:
                stored = rainer.database_storage.get(key)
            except StorageUnavailable:
                if hub.failing:
                    return commit, True, 0  # the database is down: the mirror still serves
                raise
            if stored is None or stored.version < commit.version:
                # Written by another journal's Rainer sharing the ZooKeeper path (a JVM one):
                # served as before, outside this journal's index.
                return commit, True, 0
            if stored.version > commit.version:
                return stored, False, stored.index or 0
            # The mirror shows it before the feed does: one lookup, then the hub knows.
            hub.learn(stored)
            return commit, True, stored.index or 0
    commit = _found(key)
    return commit, False, commit.index or 0


def _key_answer(key: str, meta: bool) -> Response:
    """``GET /<key>`` or ``/<key>/meta``, blocking with ``?index=N``: a key that does not
    exist yet answers 404 (index 0) and can be waited on until it is created."""
    rainer = get_rainer()

    def answer() -> tuple[Response, int]:
        try:
            commit, cached, index = _head(key)
        except CommitNotFound:
            response = _error(404, "Key not found")
            response.headers[INDEX_HEADER] = "0"
            return response, 0
        tag = etag(commit, meta)
        headers = {"ETag": tag, INDEX_HEADER: str(index), **(CACHED if cached else {})}
        if etag_matches(request.headers.get("If-None-Match"), tag):
            return Response(status=304, headers=headers), index
        if meta:
            response = _json(commit.meta)
            response.headers.update(headers)
            return response, index
        if not cached:
            response = _payload_response(commit)
            response.headers.update(headers)
            return response, index
        # The hot path of a cluster's config reads: a mirror commit never changes, so its
        # headers are built once and reused while the mirror holds that same commit object.
        prepared = Headers()
        prepared[:] = prepared_headers(rainer, commit, index)  # a copy: hooks may change it
        # A list, not bytes: bytes would make werkzeug set (and check) Content-Length again.
        return _PreparedResponse([commit.payload or b""], 200, headers=prepared), index

    return blocking.blocking_answer(rainer, answer, key=key)


# "/-/" (GitLab's convention) cannot be a key's route: a version is digits, so without this
# rule "/-/whoami" would be a 400; as a static rule it wins over "/<key>/<version>".
@bp.get("/-/whoami")
def whoami() -> Response:
    """The identity the server sees for these credentials, and what it may do on ``?key=K``.

    401 for a wrong, expired or revoked token, as on every route; the anonymous caller gets
    ``"identity": null``.
    """
    gate = get_rainer().gate
    caller = gate.check(request.environ, None, write=False)
    answer: dict[str, Any] = {
        "identity": caller.identity,
        "via": caller.via,
        "auth": sorted(gate.modes) or ["none"],
        "act_as": gate.policy.may_act_as(caller.identity),
    }
    key = request.args.get("key")
    if key is not None:
        key = _key(key)
        answer.update(
            key=key,
            read=gate.policy.may_read(caller.identity, key),
            write=gate.policy.may_write(caller.identity, key),
        )
    return _json(answer)


@bp.get("/<key>")
def get_head(key: str) -> Response:
    key = _may_read(_key(key))
    return _edge(_key_answer(key, meta=False), _shared(key))


class _PreparedResponse(Response):
    """A response whose headers are complete (Content-Length included) and need no fixing.

    Werkzeug copies and re-checks every header of every response before sending it; for the
    mirror-backed payload, the most frequent request, that was a fifth of its cost.
    """

    def get_wsgi_headers(self, environ: Any) -> Headers:
        return self.headers


@bp.get("/<key>/meta")
def get_head_meta(key: str) -> Response:
    key = _may_read(_key(key))
    return _edge(_key_answer(key, meta=True), _shared(key))


MAX_HISTORY_LIMIT = 1000


def _positive_int_parameter(name: str, default: int | None) -> int | None:
    text = request.args.get(name)
    if text is None:
        return default
    value = parse_version(text.strip())
    if value is None or value < 1:
        raise InvalidCommit(f"Invalid '{name}' parameter (should be a positive integer)")
    return value


@bp.get("/<key>/history")
def get_history(key: str) -> Response:
    """Metas of ``key`` newest first, tombstones included, one page per request.

    ``payload_utf8``/``payload_base64`` add payloads as ``GET /`` does, so a client can show
    a page of diffs (``rainer log``) without one request per version.
    """
    key = _may_read(_key(key))
    limit = _positive_int_parameter("limit", 100)
    if limit > MAX_HISTORY_LIMIT:
        raise InvalidCommit(f"Invalid 'limit' parameter (at most {MAX_HISTORY_LIMIT})")
    before = _positive_int_parameter("before", None)
    utf8 = _boolean(request.args.get("payload_utf8"), "payload_utf8")
    b64 = _boolean(request.args.get("payload_base64"), "payload_base64")
    storage = get_rainer().database_storage
    commits = storage.history(key, limit=limit, before=before)
    if not commits and storage.get(key) is None:
        raise CommitNotFound(key)
    entries = []
    for commit in commits:
        entry = _meta_with_payload(commit, utf8, b64)
        # Who really wrote it (the authenticated caller), beside who it says wrote it.
        entry["identity"] = commit.identity or None
        entries.append(entry)
    return _json(entries)


@bp.get("/<key>/<version>")
def get_version(key: str, version: str) -> Response:
    key = _key(key)
    number = _version(version)
    return _payload_response(_found_version(_may_read(key), number))


@bp.get("/<key>/<version>/meta")
def get_version_meta(key: str, version: str) -> Response:
    key = _key(key)
    number = _version(version)
    return _json(_found_version(_may_read(key), number).meta)


@bp.get("/<key>/diff")
def get_diff(key: str) -> Response:
    """The unified diff of two versions of ``key`` (``text/plain``, or JSON lines with
    ``format=json``): ``to`` defaults to the head, ``from`` to the version before ``to``."""
    key = _may_read(_key(key))
    to_version = _positive_int_parameter("to", None)
    from_version = _positive_int_parameter("from", None)
    context = _int_parameter("context", DEFAULT_CONTEXT, 0, 100_000)
    answer_json = _format_parameter()
    new = _found(key, to_version)
    if from_version is None:
        # Contiguous versions: the one before always exists (none before version 1).
        old = _found(key, new.version - 1) if new.version > 1 else None
    else:
        old = _found(key, from_version)
    lines = diff_lines(old.payload if old else None, new.payload, context)
    if answer_json:
        return _json({
            "key": key,
            "from": old.meta if old is not None else None,
            "to": new.meta,
            "lines": [line.as_json() for line in lines],
        })
    text = unified_text(lines, side_name(key, old), side_name(key, new), always_header=True)
    return Response(text, 200, mimetype="text/plain")


def _int_parameter(name: str, default: int, low: int, high: int) -> int:
    text = request.args.get(name)
    if text is None:
        return default
    value = parse_version(text.strip())
    if value is None or not low <= value <= high:
        raise InvalidCommit(
            f"Invalid '{name}' parameter (should be an integer from {low} to {high})"
        )
    return value


def _format_parameter() -> bool:
    """Whether ``?format=`` asks for JSON (``text``, the default, or ``json``)."""
    value = request.args.get("format", "text").strip().lower()
    if value not in ("text", "json"):
        raise InvalidCommit("Invalid 'format' parameter (should be text or json)")
    return value == "json"


@bp.post("/<key>/<version>")
def post_commit(key: str, version: str) -> Response:
    """Commit version ``version`` of ``key``: the body as the payload; with ``revert_to=V``
    (and an empty body) version V's payload; with ``dry_run=yes`` every check and no write.

    The rules are ``web/commits.py``'s, which the console's changes follow as well.
    """
    rainer = get_rainer()
    key = _key(key)
    number = _version(version)
    environ = request.environ
    caller = check_write(rainer, environ, key, number)
    header_key = _request_header("X-Rainer-Key")
    if header_key is not None and header_key != key:
        raise InvalidCommit("X-Rainer-Key must match URL key, or be omitted")
    header_version = request.headers.get("X-Rainer-Version")
    if header_version is not None and parse_canonical_version(header_version.strip()) != number:
        raise InvalidCommit("X-Rainer-Version must match URL version, or be omitted")
    signature = sign(
        rainer,
        environ,
        caller,
        key,
        number,
        _request_header("X-Rainer-Author"),
        request.headers.get("X-Rainer-Modified-Time"),
    )
    comment = _request_header("X-Rainer-Comment")
    empty = _boolean(request.headers.get("X-Rainer-Empty"), "X-Rainer-Empty", "header")
    revert_to = _positive_int_parameter("revert_to", None)
    dry_run = _boolean(request.args.get("dry_run"), "dry_run")
    body = _read_body(rainer.settings.max_payload_bytes)
    if empty and body:
        raise InvalidCommit("Empty payload required with X-Rainer-Empty")
    commit = save_commit(
        rainer,
        environ,
        key,
        number,
        signature,
        None if empty else body,
        comment,
        revert_to=revert_to,
        dry_run=dry_run,
    )
    response = _json(commit.meta)
    if dry_run:
        response.headers["X-Rainer-Dry-Run"] = "yes"
    if commit.index is not None:
        response.headers[INDEX_HEADER] = str(commit.index)
    return response


# ---------------------------------------------------------------------- errors


# Flask picks the handler of the closest class in the error's MRO, so each type maps here once.


@bp.errorhandler(CommitOrderingError)
def _conflict(exc: CommitOrderingError) -> Response:
    metrics().conflicts.inc()
    # The original's body, which pyrainer reads.
    conflict = {
        "key": exc.key,
        "expectedVersion": exc.expected_version,
        "providedVersion": exc.provided_version,
    }
    return _json({"conflict": conflict}, 409)


@bp.errorhandler(CommitNotFound)
def _not_found(exc: CommitNotFound) -> Response:
    return _error(404, "Key not found")


@bp.errorhandler(PayloadTooLarge)
def _too_large(exc: PayloadTooLarge) -> Response:
    metrics().payloads_rejected.labels("too_large").inc()
    return _error(413, str(exc))


@bp.errorhandler(PayloadRejected)
def _payload_rejected(exc: PayloadRejected) -> Response:
    if exc.messages is None:
        metrics().payloads_rejected.labels("malformed").inc()
        return _error(400, str(exc))
    metrics().payloads_rejected.labels("schema").inc()
    return _error(400, str(exc), messages=exc.messages)


@bp.errorhandler(AuthenticationRequired)
def _unauthenticated(exc: AuthenticationRequired) -> Response:
    response = _error(401, str(exc))
    challenge = 'Bearer realm="rainer"'
    if exc.invalid_token:
        challenge += ', error="invalid_token"'
    response.headers["WWW-Authenticate"] = challenge
    return response


@bp.errorhandler(AccessDenied)
def _denied(exc: AccessDenied) -> Response:
    return _error(403, str(exc))


@bp.errorhandler(InvalidCommit)
def _invalid(exc: InvalidCommit) -> Response:
    return _error(400, str(exc))


@bp.errorhandler(CsrfRejected)
def _csrf_rejected(exc: CsrfRejected) -> Response:
    # Raised by the console's forms, which answer with a page of their own; never an API call.
    return _error(400, str(exc))


@bp.errorhandler(StorageUnavailable)
def _unavailable(exc: StorageUnavailable) -> Response:
    log.warning("%s %s: %s: %s", request.method, request.path, exc, exc.detail or "no detail")
    response = _error(503, str(exc))
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


@bp.errorhandler(RainerError)
def _rainer_error(exc: RainerError) -> Response:
    log.error("Unexpected Rainer error: %s", exc)
    return _error(500, "Internal server error")


@bp.app_errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    # App-wide: routing 404/405 never reach blueprint handlers.
    response = _error(exc.code or 500, exc.description or exc.name)
    for name, value in exc.get_headers():
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    return response


@bp.app_errorhandler(Exception)
def _unexpected_error(exc: Exception) -> Response:
    log.exception("Unhandled error on %s %s", request.method, request.path)
    return _error(500, "Internal server error")
