"""The HTTP API (spec §4) as a Flask blueprint, and the one place errors become HTTP answers."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote
from urllib.parse import unquote

from flask import Blueprint
from flask import Flask
from flask import Response
from flask import request
from marshmallow import ValidationError
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from rainer_server.commit import MAX_VERSION
from rainer_server.commit import Commit
from rainer_server.commit import format_mtime
from rainer_server.commit import now
from rainer_server.commit import parse_mtime
from rainer_server.commit import parse_version
from rainer_server.commit import validate_key
from rainer_server.errors import CommitNotFound
from rainer_server.errors import CommitOrderingError
from rainer_server.errors import InvalidCommit
from rainer_server.errors import PayloadTooLarge
from rainer_server.errors import RainerError
from rainer_server.errors import StorageUnavailable
from rainer_server.extension import get_rainer
from rainer_server.metrics import metrics
from rainer_server.payloads import PayloadRejected

log = logging.getLogger(__name__)

bp = Blueprint("rainer", __name__)

JSON = "application/json"
_TRUE = frozenset(("yes", "true", "1"))
_FALSE = frozenset(("no", "false", "0"))
RETRY_AFTER_SECONDS = 5
CACHED = {"X-Rainer-Cached": "Yes"}


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
    return validate_key(key)


def _version(text: str) -> int:
    version = parse_version(text)
    if version is None:
        raise InvalidCommit(f"Invalid version {text!r}: versions are positive decimal integers")
    return version


HEADER_ENCODING = "X-Rainer-Header-Encoding"
# Printable ASCII but '%': what a percent-encoded header value may keep as is.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
_TEXT_HEADERS = ("X-Rainer-Key", "X-Rainer-Author", "X-Rainer-Comment")


def _request_header(name: str) -> str | None:
    """A text header of the request, decoded.

    With ``X-Rainer-Header-Encoding: percent`` (our client sends it when a value is not
    printable ASCII, e.g. a multi-line comment) the key, author and comment are
    percent-encoded UTF-8. Without it, raw bytes are read as UTF-8 when valid (WSGI hands
    them over as latin-1), else as latin-1, which is what pyrainer sends.
    """
    value = request.headers.get(name)
    if value is None:
        return None
    if _percent_encoded_request():
        try:
            return unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise InvalidCommit(f"Malformed header: {name} (not percent-encoded UTF-8)") from None
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def _percent_encoded_request() -> bool:
    encoding = request.headers.get(HEADER_ENCODING)
    if encoding is None:
        return False
    if encoding.strip().lower() != "percent":
        raise InvalidCommit(f"Malformed header: {HEADER_ENCODING} (only 'percent' is known)")
    return True


def _commit_headers(commit: Commit) -> dict[str, str]:
    texts = dict(zip(_TEXT_HEADERS, (commit.key, commit.author, commit.comment)))
    headers = {
        "X-Rainer-Version": str(commit.version),
        "X-Rainer-Modified-Time": format_mtime(commit.mtime),
        "X-Rainer-Empty": "Yes" if commit.empty else "No",
    }
    if all(text.isascii() and text.isprintable() for text in texts.values()):
        headers.update(texts)
    else:
        # Header values must be printable ASCII to survive WSGI and proxies. The marker makes
        # the encoding unambiguous: without it, a '%' in a value is just a '%'.
        headers.update({name: quote(text, safe=_HEADER_SAFE) for name, text in texts.items()})
        headers[HEADER_ENCODING] = "percent"
    return headers


def _found(key: str, version: int | None = None) -> Commit:
    commit = get_rainer().database_storage.get(key, version)
    if commit is None:
        raise CommitNotFound(key, version)
    return commit


def _payload_headers(commit: Commit) -> list[tuple[str, str]]:
    try:
        (commit.payload or b"").decode("utf-8")
        content_type = "text/plain; charset=UTF-8"
    except UnicodeDecodeError:
        content_type = "application/octet-stream"
    return [("Content-Type", content_type), *_commit_headers(commit).items()]


def _payload_response(commit: Commit) -> Response:
    return Response(commit.payload or b"", 200, headers=_payload_headers(commit))


def _read_body(limit: int) -> bytes:
    # Refuse by Content-Length before reading; a chunked body is read to at most limit + 1 bytes.
    length = request.content_length
    if length is not None and length > limit:
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
    rainer = get_rainer()
    view = None if include_all else rainer.cached_view()
    if view is not None:
        # The mirror swaps in a new immutable mapping on every change: identity revalidates.
        heads = view.current
        flags = ("mirror", utf8, b64)
        cached = rainer.list_cache.get(flags)
        if cached is None or cached[0] is not heads:
            cached = (heads, _list_body(heads, False, utf8, b64))
            rainer.list_cache[flags] = cached
        return Response(cached[1], 200, mimetype=JSON, headers=CACHED)
    storage = rainer.database_storage
    flags = ("storage", include_all, utf8, b64)
    token = storage.heads_token()
    cached = rainer.list_cache.get(flags)
    if cached is None or cached[0] != token:
        heads = storage.heads()
        # The token is derived from the heads just read, not from the earlier query, so a
        # commit landing in between can never be cached under a token that hides it.
        cached = (sum(c.version for c in heads.values()), _list_body(heads, include_all, utf8, b64))
        rainer.list_cache[flags] = cached
    etag = f'"{cached[0]}"'
    if etag in request.headers.get("If-None-Match", ""):
        return Response(status=304, headers={"ETag": etag})
    return Response(cached[1], 200, mimetype=JSON, headers={"ETag": etag})


def _list_body(heads: Mapping[str, Commit], include_all: bool, utf8: bool, b64: bool) -> bytes:
    listing = {
        key: _meta_with_payload(heads[key], utf8, b64)
        for key in sorted(heads)
        if include_all or not heads[key].empty
    }
    return json.dumps(listing, ensure_ascii=False).encode("utf-8")


def _meta_with_payload(commit: Commit, utf8: bool, b64: bool) -> dict[str, Any]:
    meta = commit.meta
    if commit.payload is not None:
        if utf8:
            meta["payload_utf8"] = commit.payload.decode("utf-8", "replace")
        if b64:
            meta["payload_base64"] = base64.b64encode(commit.payload).decode("ascii")
    return meta


def _head(key: str) -> tuple[Commit, bool]:
    """The newest commit of ``key`` and whether it came from the mirror.

    A key the mirror lacks (tombstoned, or created a moment ago and not yet seen) is read
    from the storage, so a writer never sees a 404 for the key it just wrote.
    """
    rainer = get_rainer()
    view = rainer.cached_view()
    if view is not None:
        commit = view.current.get(key)
        if commit is not None:
            return commit, True
    return _found(key), False


@bp.get("/<key>")
def get_head(key: str) -> Response:
    commit, cached = _head(_key(key))
    if not cached:
        return _payload_response(commit)
    # The hot path of a cluster's config reads: a mirror commit never changes, so its
    # headers are built once and reused while the mirror holds that same commit object.
    headers = Headers()
    headers[:] = _prepared_headers(get_rainer(), commit)  # a copy: hooks may change it
    # A list, not bytes: bytes would make werkzeug set (and check) Content-Length again.
    return _PreparedResponse([commit.payload or b""], 200, headers=headers)


def _prepared_headers(rainer: Any, commit: Commit) -> list[tuple[str, str]]:
    """The complete response headers of a mirror commit's payload, built once per commit."""
    prepared = rainer.prepared_headers
    entry = prepared.get(commit.key)
    if entry is None or entry[0] is not commit:
        if len(prepared) > 2 * len(rainer.mirror.current) + 100:
            prepared.clear()  # mostly keys deleted since: rebuilt on demand
        payload = commit.payload or b""
        items = [*_payload_headers(commit), *CACHED.items(), ("Content-Length", str(len(payload)))]
        entry = prepared[commit.key] = (commit, items)
    return entry[1]


class MirrorReads:
    """WSGI middleware: answers ``GET <prefix>/<key>`` from the mirror without Flask.

    A cluster's most frequent request, a process reading its configuration, needs a dict
    lookup and prebuilt headers; Flask's request machinery (context, routing, response
    object) costs several times that. Everything else goes to Flask unchanged: other methods,
    query strings, keys the mirror lacks (and invalid ones), and every request of an app with
    request hooks (``before_request``, ``after_request``, ``teardown_request``), which must
    see all requests. The answer is the one ``get_head`` gives, headers included.
    """

    def __init__(self, wsgi_app: Any, app: Flask, rainer: Any, url_prefix: str) -> None:
        self.wsgi_app = wsgi_app
        self.app = app
        self.rainer = rainer
        self.prefix = url_prefix.rstrip("/") + "/"
        #: The route label request metrics use for these answers (the Flask rule's text).
        self.route = self.prefix + "<key>"
        self._static_paths: frozenset[str] | None = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if (
            environ.get("REQUEST_METHOD") == "GET"
            and path.startswith(self.prefix)
            and not environ.get("QUERY_STRING")
            and "/" not in path[len(self.prefix) :]
            and not self._request_hooks()
            and path not in self._static()
        ):
            view = self.rainer.cached_view()
            if view is not None:
                # As werkzeug decodes a WSGI path; a key in the mirror is a valid key.
                key = path[len(self.prefix) :].encode("latin-1").decode("utf-8", "replace")
                commit = view.current.get(key)
                if commit is not None:
                    environ[ROUTE_ENVIRON_KEY] = self.route
                    start_response("200 OK", list(_prepared_headers(self.rainer, commit)))
                    return [commit.payload or b""]
        return self.wsgi_app(environ, start_response)

    def _static(self) -> frozenset[str]:
        # Rules without arguments win over <key> in Flask (/healthz with an empty prefix).
        if self._static_paths is None:
            self._static_paths = frozenset(
                rule.rule for rule in self.app.url_map.iter_rules() if not rule.arguments
            )
        return self._static_paths

    def _request_hooks(self) -> bool:
        app = self.app
        return any(
            funcs
            for registry in (
                app.before_request_funcs,
                app.after_request_funcs,
                app.teardown_request_funcs,
                app.url_value_preprocessors,
            )
            for funcs in registry.values()
        )


#: Where MirrorReads leaves the route label for the request metrics around it.
ROUTE_ENVIRON_KEY = "rainer.route"


class _PreparedResponse(Response):
    """A response whose headers are complete (Content-Length included) and need no fixing.

    Werkzeug copies and re-checks every header of every response before sending it; for the
    mirror-backed payload, the most frequent request, that was a fifth of its cost.
    """

    def get_wsgi_headers(self, environ: Any) -> Headers:
        return self.headers


@bp.get("/<key>/meta")
def get_head_meta(key: str) -> Response:
    commit, cached = _head(_key(key))
    response = _json(commit.meta)
    if cached:
        response.headers.update(CACHED)
    return response


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
    key = _key(key)
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
    return _json([_meta_with_payload(commit, utf8, b64) for commit in commits])


@bp.get("/<key>/<version>")
def get_version(key: str, version: str) -> Response:
    return _payload_response(_found(_key(key), _version(version)))


@bp.get("/<key>/<version>/meta")
def get_version_meta(key: str, version: str) -> Response:
    return _json(_found(_key(key), _version(version)).meta)


@bp.post("/<key>/<version>")
def post_commit(key: str, version: str) -> Response:
    rainer = get_rainer()
    key = _key(key)
    number = _version(version)
    header_key = _request_header("X-Rainer-Key")
    if header_key is not None and header_key != key:
        raise InvalidCommit("X-Rainer-Key must match URL key, or be omitted")
    header_version = request.headers.get("X-Rainer-Version")
    if header_version is not None and parse_version(header_version.strip()) != number:
        raise InvalidCommit("X-Rainer-Version must match URL version, or be omitted")
    author = _request_header("X-Rainer-Author")
    if author is None:
        raise InvalidCommit("Missing header: X-Rainer-Author")
    comment = _request_header("X-Rainer-Comment") or ""
    empty = _boolean(request.headers.get("X-Rainer-Empty"), "X-Rainer-Empty", "header")
    mtime_header = request.headers.get("X-Rainer-Modified-Time")
    try:
        mtime = now() if mtime_header is None else parse_mtime(mtime_header)
    except ValueError:
        raise InvalidCommit(
            "Malformed header: X-Rainer-Modified-Time (expected ISO-8601, "
            "e.g. 2014-01-01T00:00:00.000Z)"
        ) from None
    body = _read_body(rainer.settings.max_payload_bytes)
    if empty and body:
        raise InvalidCommit("Empty payload required with X-Rainer-Empty")
    if not 1 <= number <= MAX_VERSION:
        # Never the next version: answer as any other out-of-order write.
        head = rainer.database_storage.get(key)
        raise CommitOrderingError(key, (head.version if head else 0) + 1, number)
    if not empty:
        rainer.payloads.validate(key, body)
    commit = Commit(key, number, None if empty else body, author, comment, mtime)
    rainer.storage.save(commit)
    metrics().commits_saved.inc()
    # Who changed what, never the payload itself (it may hold secrets): its size only.
    log.info(
        "Saved commit %s version %s by %s (%s)",
        key,
        number,
        author,
        "empty" if empty else f"{len(body)} bytes",
    )
    return _json(commit.meta)


# ---------------------------------------------------------------------- errors


@bp.errorhandler(RainerError)
def _rainer_error(exc: RainerError) -> Response:
    _count_refusal(exc)
    if isinstance(exc, CommitOrderingError):
        return _json(
            {
                "conflict": {
                    "key": exc.key,
                    "expectedVersion": exc.expected_version,
                    "providedVersion": exc.provided_version,
                }
            },
            409,
        )
    if isinstance(exc, CommitNotFound):
        return _error(404, "Key not found")
    if isinstance(exc, PayloadTooLarge):
        return _error(413, str(exc))
    if isinstance(exc, PayloadRejected) and exc.messages is not None:
        return _error(400, str(exc), messages=exc.messages)
    if isinstance(exc, InvalidCommit):
        return _error(400, str(exc))
    if isinstance(exc, StorageUnavailable):
        response = _error(503, str(exc))
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response
    log.error("Unexpected Rainer error: %s", exc)
    return _error(500, "Internal server error")


def _count_refusal(exc: RainerError) -> None:
    if isinstance(exc, CommitOrderingError):
        metrics().conflicts.inc()
    elif isinstance(exc, PayloadTooLarge):
        metrics().payloads_rejected.labels("too_large").inc()
    elif isinstance(exc, PayloadRejected):
        reason = "schema" if exc.messages is not None else "malformed"
        metrics().payloads_rejected.labels(reason).inc()


@bp.errorhandler(ValidationError)
def _validation_error(exc: ValidationError) -> Response:
    return _error(400, "invalid request", messages=exc.messages)


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
    if isinstance(exc, HTTPException):
        return _http_error(exc)
    log.exception("Unhandled error on %s %s", request.method, request.path)
    return _error(500, "Internal server error")

