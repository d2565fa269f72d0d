"""WSGI middleware around the Flask app: mirror-backed reads and request metrics.

Middleware rather than Flask's hooks because both sit on the hottest path of a cluster, a
process reading its configuration: Flask's request machinery (context, routing, hooks,
response object) costs several times a dict lookup and prebuilt headers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

from flask import Flask

from rainer_server.commit import Commit
from rainer_server.commit import parse_canonical_version
from rainer_server.commit import validate_key
from rainer_server.errors import InvalidCommit
from rainer_server.errors import RainerError
from rainer_server.headers import commit_headers
from rainer_server.metrics import metrics
from rainer_server.web.context import RainerContext

log = logging.getLogger(__name__)

CACHED = {"X-Rainer-Cached": "Yes"}
#: Where MirrorReads leaves the route label for the request metrics around it.
ROUTE_ENVIRON_KEY = "rainer.route"
_UNMATCHED = "<unmatched>"


def path_is_utf8(environ: Mapping[str, Any]) -> bool:
    """Whether the request's path, in the bytes the client sent, is valid UTF-8.

    In a Rainer path only the key can be anything but ASCII, so this is "the key's bytes are
    UTF-8". WSGI hands those bytes over as a latin-1 ``PATH_INFO`` (gunicorn does), but some
    servers percent-decode with ``errors="replace"`` first (werkzeug's, and its test client),
    so the request line (``RAW_URI``/``REQUEST_URI``) is checked too when it has escapes.
    """
    try:
        environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
    except UnicodeEncodeError:
        pass  # a server that decoded the path itself: only the request line can tell
    except UnicodeDecodeError:
        return False
    return _request_line_is_utf8(environ)


def _request_line_is_utf8(environ: Mapping[str, Any]) -> bool:
    uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    if "%" not in uri:  # nothing was decoded: PATH_INFO holds the bytes
        return True
    try:
        unquote_to_bytes(uri.partition("?")[0]).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def payload_headers(commit: Commit) -> list[tuple[str, str]]:
    """The headers of ``GET /<key>``: content type and the commit's meta."""
    try:
        (commit.payload or b"").decode("utf-8")
        content_type = "text/plain; charset=UTF-8"
    except UnicodeDecodeError:
        content_type = "application/octet-stream"
    return [("Content-Type", content_type), *commit_headers(commit).items()]


INDEX_HEADER = "X-Rainer-Index"


def etag(commit: Commit, meta: bool = False) -> str:
    """The entity tag of a key's payload (or its meta) at this commit: its version names it."""
    return f'"{"m" if meta else "v"}{commit.version}"'


def etag_matches(if_none_match: str | None, tag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``tag`` (or ``*``); weak tags compare too."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == tag:
            return True
    return False


def index_headers(commit: Commit, index: int) -> list[tuple[str, str]]:
    return [("ETag", etag(commit)), (INDEX_HEADER, str(index))]


def prepared_headers(rainer: RainerContext, commit: Commit, index: int) -> list[tuple[str, str]]:
    """The complete response headers of a mirror commit's payload, built once per commit."""
    prepared = rainer.prepared_headers
    entry = prepared.get(commit.key)
    if entry is None or entry[0] is not commit or entry[1] != index:
        if len(prepared) > 2 * len(rainer.mirror.current) + 100:
            prepared.clear()  # mostly keys deleted since: rebuilt on demand
        payload = commit.payload or b""
        items = [
            *payload_headers(commit),
            *CACHED.items(),
            *index_headers(commit, index),
            ("Content-Length", str(len(payload))),
        ]
        entry = prepared[commit.key] = (commit, index, items)
    return entry[2]


def not_modified_headers(commit: Commit, index: int) -> list[tuple[str, str]]:
    return [*CACHED.items(), *index_headers(commit, index)]


#: An answer one caller may not hand to another: a browser may keep it, revalidating each
#: time; a shared cache (deploy/nginx/rainer.conf's micro-cache) must not keep it.
PRIVATE = [("Cache-Control", "private, no-cache")]
#: An answer that changes with every commit while the client waits for it (a blocking read,
#: the change feed): nobody keeps it.
NO_STORE = [("Cache-Control", "no-store")]


def edge_headers(shared: bool) -> list[tuple[str, str]]:
    """How long caches may keep a read's answer: for a second when anyone may read it
    (``shared``), else ``PRIVATE``.

    ``max-age=1`` is for HTTP caches in general. nginx counts validity in whole seconds, so
    with ``max-age=1`` alone it could keep an answer made at 10.0 until 12.0: its own header,
    ``X-Accel-Expires`` at an absolute second (this one), ends the copy when the second the
    answer was made in ends, never more than 1 s later. nginx hides the header from clients.
    """
    if not shared:
        return PRIVATE
    return [
        ("Cache-Control", "public, max-age=1"),
        ("X-Accel-Expires", f"@{int(time.time())}"),
    ]


class MirrorReads:
    """WSGI middleware: answers ``GET <prefix>/<key>`` from the mirror, and
    ``GET <prefix>/<key>/<version>`` from the version cache or the journal, without Flask.

    A cluster's most frequent request, a process reading its configuration, needs a dict
    lookup and prebuilt headers; Flask's request machinery (context, routing, response
    object) costs several times that, and a third of a versioned read from the database.
    Everything else goes to Flask unchanged: other methods, query strings, keys the mirror
    lacks (and invalid ones), versions not found, callers refused, and every request of an
    app with request hooks (``before_request``, ``after_request``, ``teardown_request``),
    which must see all requests. The answers are the ones ``get_head`` and ``get_version``
    give, headers included.
    """

    def __init__(self, wsgi_app: Any, app: Flask, rainer: RainerContext, url_prefix: str) -> None:
        self.wsgi_app = wsgi_app
        self.app = app
        self.rainer = rainer
        self.prefix = url_prefix.rstrip("/") + "/"
        #: The route label request metrics use for these answers (the Flask rule's text).
        self.route = self.prefix + "<key>"
        self.version_route = self.prefix + "<key>/<version>"
        self._static_paths: frozenset[str] | None = None
        self._other_root_names: frozenset[str] | None = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if (
            environ.get("REQUEST_METHOD") != "GET"
            or not path.startswith(self.prefix)
            or environ.get("QUERY_STRING")
            or self._request_hooks()
        ):
            return self.wsgi_app(environ, start_response)
        rest = path[len(self.prefix) :]
        if rest.count("/") == 1:
            answer = self._version(environ, start_response, rest)
            if answer is not None:
                return answer
        elif "/" not in rest and path not in self._static():
            view = self.rainer.cached_view()
            if view is not None and self.rainer.watching() is None:
                self.rainer.watch_hub  # noqa: B018  (started once, here or by gunicorn's hook)
            if view is not None:
                # The path's bytes, strictly: replacing invalid UTF-8 with U+FFFD (as werkzeug
                # does) would answer for another key. Flask answers those with a 400.
                try:
                    key: str | None = rest.encode("latin-1").decode("utf-8")
                except UnicodeError:
                    key = None
                commit = (
                    view.current.get(key)
                    if key is not None and _request_line_is_utf8(environ)
                    else None
                )
                gate = self.rainer.gate
                # The index this commit has in the journal, known once the process's watch
                # hub has read it; until then (or while the mirror is behind or ahead of
                # it) Flask's view answers from the database.
                hub = self.rainer.watching()
                index = None if commit is None or hub is None else hub.head_index(key, commit.version)
                if index is not None and (
                    not gate.enabled or gate.may_read(gate.caller(environ), key)
                ):
                    # A caller who may not read it gets Flask's view, which refuses (401/403)
                    # and audits the refusal.
                    environ[ROUTE_ENVIRON_KEY] = self.route
                    edge = edge_headers(not gate.enabled or gate.policy.anyone_may_read(key))
                    if etag_matches(environ.get("HTTP_IF_NONE_MATCH"), etag(commit)):
                        start_response(
                            "304 Not Modified", [*not_modified_headers(commit, index), *edge]
                        )
                        return [b""]
                    start_response("200 OK", [*prepared_headers(self.rainer, commit, index), *edge])
                    return [commit.payload or b""]
        return self.wsgi_app(environ, start_response)

    def _version(self, environ: dict[str, Any], start_response: Any, rest: str) -> Any:
        """``GET <prefix>/<key>/<version>``, an immutable commit, from the process's version
        cache or the journal: the answer ``get_version`` gives, or ``None`` for Flask to
        answer (a version that is not canonical, a key that is not valid, a caller who may
        not read it, a commit not found, a database that fails: Flask says why)."""
        raw_key, _, raw_version = rest.partition("/")
        version = parse_canonical_version(raw_version)
        if version is None or raw_key in self._other_roots():
            return None
        try:
            key = validate_key(raw_key.encode("latin-1").decode("utf-8"))
        except (UnicodeError, InvalidCommit):
            return None
        if not _request_line_is_utf8(environ):
            return None
        gate = self.rainer.gate
        if gate.enabled and not gate.may_read(gate.caller(environ), key):
            return None
        cache = self.rainer.version_cache
        commit = cache.get(key, version) if cache.max_bytes else None
        if commit is None:
            try:
                commit = self.rainer.database_storage.get(key, version)
            except RainerError:
                return None
            if commit is None:
                return None
            if cache.max_bytes:
                cache.put(commit)
        environ[ROUTE_ENVIRON_KEY] = self.version_route
        payload = commit.payload or b""
        start_response(
            "200 OK", [*payload_headers(commit), ("Content-Length", str(len(payload)))]
        )
        return [payload]

    def _other_roots(self) -> frozenset[str]:
        # First path segments under the prefix that belong to other routes than the API's
        # (the console's, say, under an empty prefix): never a key's version.
        if self._other_root_names is None:
            names = set()
            for rule in self.app.url_map.iter_rules():
                if rule.rule.startswith(self.prefix) and not rule.endpoint.startswith("rainer."):
                    names.add(rule.rule[len(self.prefix) :].split("/", 1)[0])
            self._other_root_names = frozenset(names)
        return self._other_root_names

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


class ReleaseConnections:
    """WSGI middleware: when a request ends, its pooled database connections go back.

    Under gevent each request is a greenlet of its own and peewee lends it a connection from
    the pool (``storage.db.open_database``); without this, a thousand waiting watchers would
    hold a thousand connections. With sync workers (no pool) it does nothing.
    """

    def __init__(self, wsgi_app: Callable[..., Any], rainer: RainerContext) -> None:
        self.wsgi_app = wsgi_app
        self.rainer = rainer

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        try:
            return self.wsgi_app(environ, start_response)
        finally:
            self.rainer.release_connections()


_metrics_failed = False


class RequestMetrics:
    """WSGI middleware: counts and times every request of the app it wraps.

    Middleware rather than Flask's before/after-request hooks: those cost a hook dispatch, ``g``
    and context-local lookups per request, a tenth of a mirror-backed read. The route label is
    the URL rule Flask matched (never the raw path, so keys cannot explode the series), read
    from the request object werkzeug puts in the environ.
    """

    def __init__(self, wsgi_app: Callable[..., Any]) -> None:
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        started = time.perf_counter()
        status, route = "500", _UNMATCHED

        def capturing_start_response(status_line: str, *args: Any) -> Any:
            nonlocal status, route
            status = status_line
            # Flask clears environ["werkzeug.request"] when the request ends: read it now.
            rule = getattr(environ.get("werkzeug.request"), "url_rule", None)
            if rule is not None:
                route = rule.rule
            return start_response(status_line, *args)

        try:
            return self.wsgi_app(environ, capturing_start_response)
        finally:
            route = environ.get(ROUTE_ENVIRON_KEY, route)  # answered by api.MirrorReads
            _observe(environ.get("REQUEST_METHOD", ""), route, status, time.perf_counter() - started)


def _observe(method: str, route: str, status: str, seconds: float) -> None:
    global _metrics_failed
    try:
        metrics().observe_request(method, route, int(status[:3]), seconds)
    except Exception:
        # Metrics must never fail a request (e.g. the multiprocess directory was removed).
        if not _metrics_failed:
            _metrics_failed = True
            log.exception("Cannot record request metrics; further failures are not logged")
