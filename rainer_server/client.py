"""Talk to a Rainer server over HTTP: ``RainerClient`` and ``HttpCommitStorage``.

``RainerClient`` keeps the published ``pyrainer`` client's method names and shapes, so code
written against pyrainer works unchanged; errors are the domain errors of
``rainer_server.errors`` (plus HTTP-specific subclasses), so callers catch one set of types
whether the storage is local or remote. ``HttpCommitStorage`` is the ``CommitStorage``
protocol over that client (as the original's JVM ``HttpCommitStorage`` was).

Standard library only (urllib): importing this module imports neither Flask, peewee nor
kazoo, so services that only read configuration install nothing of the server stack.
"""

from __future__ import annotations

import base64
import binascii
import errno
import http.client
import json
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from collections.abc import Mapping
from datetime import datetime
from email.message import Message
from typing import TYPE_CHECKING
from typing import Any

from rainer_server.commit import Commit
from rainer_server.commit import format_mtime
from rainer_server.commit import parse_version
from rainer_server.errors import CommitNotFound
from rainer_server.errors import CommitOrderingError
from rainer_server.errors import InvalidCommit
from rainer_server.errors import RainerError
from rainer_server.errors import RainerBadRequest
from rainer_server.errors import RainerConnectionError
from rainer_server.errors import RainerForbidden
from rainer_server.errors import RainerHTTPError
from rainer_server.errors import RainerUnauthorized
from rainer_server.errors import RainerUnavailable
from rainer_server.headers import HEADER_ENCODING
from rainer_server.headers import TEXT_HEADERS
from rainer_server.headers import decode_text_header
from rainer_server.headers import encode_text_headers
from rainer_server.headers import is_percent_encoded

if TYPE_CHECKING:
    # Types only: payloads.py imports marshmallow and PyYAML, which a client must not need.
    from rainer_server.payloads import KeyValueDeserialization

__all__ = [
    "HttpCommitStorage",
    "RainerBadRequest",
    "RainerClient",
    "RainerConnectionError",
    "RainerForbidden",
    "RainerHTTPError",
    "RainerUnauthorized",
    "RainerUnavailable",
    "RemoteCommit",
]

#: The server's largest history page (``GET /<key>/history?limit=``).
MAX_HISTORY_PAGE = 1000
#: The server's largest feed page (``GET /?changes_since=N&limit=``).
MAX_FEED_PAGE = 1000
#: How long one watching request waits on the server (it answers sooner on a change).
WATCH_WAIT_SECONDS = 60.0
#: Reconnecting after a failure waits this long, doubling up to ``WATCH_MAX_BACKOFF``.
WATCH_BACKOFF = 0.5
WATCH_MAX_BACKOFF = 30.0

# Characters kept as they are in a key's URL path segment (RFC 3986 pchar): keys stay readable
# in `rainer list`, and everything else ("?", "#", "%", spaces, non-ASCII) is percent-encoded.
_PATH_SAFE = "!$&'()*+,;=:@"
_TRUE_WORDS = frozenset(("yes", "true", "1"))
#: How long a read keeps trying through a blip by default: a database failover or a
#: gunicorn restart takes seconds, an outage longer than this should be seen.
DEFAULT_RETRY_SECONDS = 30.0
_FIRST_RETRY_DELAY = 0.2
_MAX_RETRY_DELAY = 5.0
_ERROR_BODY_LIMIT = 300


# ---------------------------------------------------------------------- commits


class RemoteCommit(Commit):
    """A ``Commit`` read over HTTP. It compares equal to a plain ``Commit`` with the same fields.

    Its ``value`` is ``Commit.value``: from a client without a deserialization, the payload
    bytes (``None`` for a tombstone), exactly pyrainer's ``RainerCommit.value``; from a client
    built with one, the deserialized value.
    """

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Commit):
            return NotImplemented
        return _fields(self) == _fields(other)

    __hash__ = Commit.__hash__

    def to_commit(self) -> Commit:
        """The plain ``Commit`` (what storages return), with the same deserialization."""
        return Commit(*_fields(self), deserialization=self.deserialization)


def _fields(commit: Commit) -> tuple[Any, ...]:
    return (commit.key, commit.version, commit.payload, commit.author, commit.comment, commit.mtime)


def _remote(
    meta: Mapping[str, Any],
    payload: bytes | None,
    deserialization: KeyValueDeserialization | None,
) -> RemoteCommit:
    try:
        return RemoteCommit.from_meta(meta, payload, deserialization)
    except (InvalidCommit, TypeError, AttributeError) as exc:
        raise RainerHTTPError(
            200, f"unexpected commit metadata {dict(meta)!r}: {exc}", ""
        ) from None


def _payload_bytes(value: bytes | bytearray | memoryview | str | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"payload must be bytes, str or None, not {type(value).__name__}")


def _truthy(value: object) -> bool:
    # pyrainer callers pass True/False or the strings "True"/"false".
    if isinstance(value, str):
        return value.strip().lower() in _TRUE_WORDS
    return bool(value)


# ---------------------------------------------------------------------- the client


class RainerClient:
    """A client of one Rainer server, e.g. ``RainerClient("http://config:8080/diary")``.

    Method names and return shapes are pyrainer's; payloads are ``bytes`` (``str`` is accepted
    on input and sent as UTF-8).

    :param base_url: the API root, including its prefix (``/diary`` by default).
    :param timeout: seconds to wait for the connection and for each read.
    :param token: an API token (``flask rainer token create``), sent as ``Authorization:
        Bearer``; ``None`` reads and writes anonymously.
    :param retry_for: how long a read keeps retrying through a blip (a 503, honouring its
        ``Retry-After``, or a refused connection) before it raises; 0 turns retries off.
        Writes are never retried.
    :param deserialization: makes the ``value`` of the commits it reads (``get_commit``,
        ``list_full``, ``history_full``...) typed, deserialized at first use; without one a
        ``value`` is the payload bytes, as pyrainer's. ``get_value`` is always the bytes.
    :raises CommitNotFound: (from any read) the key, or that version of it, does not exist.
    :raises CommitOrderingError: (from ``post_commit``) the version is not the next one.
    :raises RainerHTTPError: any other error status; ``RainerBadRequest`` for 400/413 and
        ``RainerUnavailable`` for 503 are also ``InvalidCommit``/``StorageUnavailable``.
    :raises RainerConnectionError: the server cannot be reached; the message names the URL.
    """

    def __init__(
        self,
        base_url: str,
        timeout: float = 10.0,
        token: str | None = None,
        *,
        deserialization: KeyValueDeserialization | None = None,
        retry_for: float = DEFAULT_RETRY_SECONDS,
    ) -> None:
        if not base_url:
            raise ValueError("base_url is required")
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be an http:// or https:// URL, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry_for = retry_for
        self._clock = time.monotonic
        self._sleep = time.sleep
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.deserialization = deserialization

    def __repr__(self) -> str:  # never the token
        return f"RainerClient({self.base_url!r})"

    def whoami(self, key: str | None = None) -> dict[str, Any]:
        """The identity the server sees for this client's credentials (``None``: anonymous),
        and with ``key``, whether it may ``read`` and ``write`` that key."""
        url = f"{self.base_url}/-/whoami"
        if key is not None:
            url += "?" + urllib.parse.urlencode({"key": key})
        return self._json("GET", url)

    # ------------------------------------------------------------------ pyrainer's API

    def commit_uri(self, key: str, version: int | None = None) -> str:
        """The URL of ``key``, or of one version of it."""
        uri = f"{self.base_url}/{urllib.parse.quote(key, safe=_PATH_SAFE)}"
        return uri if version is None else f"{uri}/{int(version)}"

    def list(self, all: bool = False) -> dict[str, dict[str, Any]]:
        """Key -> meta of each key's newest commit; tombstones only with ``all``."""
        return self._json("GET", self._list_url(all, payloads=False))

    def list_full(self, all: bool = False) -> dict[str, RemoteCommit]:
        """Key -> newest commit with its payload (one request); tombstones only with ``all``."""
        listing = self._json("GET", self._list_url(all, payloads=True))
        return {key: self._commit_from_listing(meta) for key, meta in listing.items()}

    def get_commit(self, key: str, version: int | None = None) -> RemoteCommit:
        """The newest commit of ``key``, or its commit at ``version``."""
        url = self.commit_uri(key, version)
        _, headers, body = self._request("GET", url, key=key, version=version)
        percent = is_percent_encoded(headers.get(HEADER_ENCODING))
        texts = [
            None if value is None else decode_text_header(name, value, percent)
            for name, value in ((name, headers.get(name)) for name in TEXT_HEADERS)
        ]
        number = parse_version((headers.get("X-Rainer-Version") or "").strip())
        if (
            number is None
            or any(t is None for t in texts)
            or not headers.get("X-Rainer-Modified-Time")
        ):
            meta = self.get_metadata(key, version)
            number = meta["version"]
            if version is None:
                # The head may have moved between the two requests: read that exact version.
                body = self._request("GET", self.commit_uri(key, number), key=key, version=number)[
                    2
                ]
        else:
            meta = {
                "key": texts[0],
                "version": number,
                "author": texts[1],
                "comment": texts[2],
                "mtime": headers["X-Rainer-Modified-Time"],
                "empty": _truthy(headers.get("X-Rainer-Empty", "no")),
            }
        return _remote(meta, None if meta.get("empty") else body, self.deserialization)

    def get_value(self, key: str, version: int | None = None) -> bytes:
        """The payload of ``key`` (at ``version``); ``b""`` for a tombstone, as pyrainer."""
        return self._request("GET", self.commit_uri(key, version), key=key, version=version)[2]

    def get_metadata(self, key: str, version: int | None = None) -> dict[str, Any]:
        """The meta of ``key`` (at ``version``): key, version, author, comment, mtime, empty."""
        return self._json("GET", self.commit_uri(key, version) + "/meta", key=key, version=version)

    def post_commit(
        self,
        meta: Mapping[str, Any],
        value: bytes | bytearray | memoryview | str | None,
        *,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Save a commit; return the server's meta of it.

        :param meta: ``key``, ``version`` and ``author``; optional ``comment``, ``empty`` and
            ``mtime`` (ISO-8601 text or an aware ``datetime``; the server's clock otherwise).
        :param value: the payload; ``None`` (or ``meta["empty"]``) makes a tombstone.
        :param dry_run: only check: the server runs every check of the commit and answers the
            meta it would write, or the error it would give; nothing is stored.
        :raises CommitOrderingError: unless ``meta["version"]`` is the key's next version.
        :raises InvalidCommit: when the server refuses the commit (``RainerBadRequest``).
        """
        key = meta["key"]
        version = int(meta["version"])
        payload = _payload_bytes(value)
        empty = _truthy(meta.get("empty", False)) or payload is None
        headers: dict[str, Any] = {
            "Content-Type": "application/octet-stream",
            "X-Rainer-Empty": "true" if empty else "false",
        }
        texts = {"X-Rainer-Comment": str(meta.get("comment") or "")}
        if meta.get("author") is not None:
            texts["X-Rainer-Author"] = str(meta["author"])
        headers.update(encode_text_headers(texts))
        mtime = meta.get("mtime")
        if isinstance(mtime, datetime):
            headers["X-Rainer-Modified-Time"] = format_mtime(mtime)
        elif mtime:
            headers["X-Rainer-Modified-Time"] = str(mtime)
        body = b"" if empty else payload or b""
        url = self.commit_uri(key, version) + ("?dry_run=yes" if dry_run else "")
        return self._json(
            "POST",
            url,
            data=body,
            headers=headers,
            key=key,
            version=version,
        )

    def revert(
        self,
        key: str,
        version: int,
        revert_to: int,
        author: str | None = None,
        comment: str | None = None,
        *,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Commit ``version`` (the key's next) carrying exactly version ``revert_to``'s
        payload, a tombstone if that was one; return the server's meta of it.

        :param comment: the server's default is "Revert to version ``revert_to``".
        :raises CommitNotFound: the key has no version ``revert_to``.
        :raises CommitOrderingError: ``version`` is not the next version.
        """
        texts = {}
        if author is not None:
            texts["X-Rainer-Author"] = str(author)
        if comment:
            texts["X-Rainer-Comment"] = str(comment)
        query = {"revert_to": int(revert_to)}
        if dry_run:
            query["dry_run"] = "yes"
        url = self.commit_uri(key, version) + "?" + urllib.parse.urlencode(query)
        return self._json(
            "POST",
            url,
            data=b"",
            headers={"Content-Type": "application/octet-stream", **encode_text_headers(texts)},
            key=key,
            version=revert_to,
        )

    def diff(
        self,
        key: str,
        from_version: int | None = None,
        to_version: int | None = None,
        *,
        as_json: bool = False,
        context: int | None = None,
    ) -> Any:
        """The server's diff of two versions of ``key``: unified text naming both versions,
        or with ``as_json`` the mapping of ``GET /<key>/diff?format=json`` (both metas and
        the lines). ``to_version`` defaults to the head, ``from_version`` to the one before.

        :raises CommitNotFound: the key, or one of the versions, does not exist.
        """
        query: dict[str, Any] = {}
        if from_version is not None:
            query["from"] = int(from_version)
        if to_version is not None:
            query["to"] = int(to_version)
        if context is not None:
            query["context"] = int(context)
        if as_json:
            query["format"] = "json"
        url = self.commit_uri(key) + "/diff"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        if as_json:
            return self._json("GET", url, key=key)
        return self._request("GET", url, key=key)[2].decode("utf-8", "replace")

    # ------------------------------------------------------------------ history

    def history(
        self, key: str, limit: int | None = None, before: int | None = None
    ) -> list[dict[str, Any]]:
        """Metas of ``key``, newest first, tombstones included: one page, one request.

        :param limit: at most this many (server default 100, at most 1000).
        :param before: only versions below this one (to fetch the next page).
        """
        return self._json("GET", self._history_url(key, limit, before, payloads=False), key=key)

    def history_full(
        self, key: str, limit: int | None = None, before: int | None = None
    ) -> list[RemoteCommit]:
        """Commits of ``key`` with payloads, newest first: one page, as ``history``.

        A server without payloads in its history pages gets one extra request per commit.
        """
        metas = self._json("GET", self._history_url(key, limit, before, payloads=True), key=key)
        commits = []
        for meta in metas:
            if not meta.get("empty") and "payload_base64" not in meta:
                commits.append(self.get_commit(key, meta["version"]))
            else:
                commits.append(self._commit_from_listing(meta))
        return commits

    def iter_history(
        self, key: str, before: int | None = None, page_size: int = 100
    ) -> Iterator[RemoteCommit]:
        """Every commit of ``key`` below ``before``, newest first, fetched a page at a time.

        :raises CommitNotFound: when ``key`` has no commits at all.
        """
        while before is None or before > 1:
            page = self.history_full(key, limit=page_size, before=before)
            yield from page
            if len(page) < page_size:
                return
            before = page[-1].version

    # ------------------------------------------------------------------ watching

    def index(self, key: str | None = None, prefix: str | None = None) -> int:
        """The current index of ``key`` (its head's; 0 while it does not exist), or of the
        listing under ``prefix`` (every key when ``None``): where a watch starts from."""
        if key is not None:
            url = self.commit_uri(key) + "/meta"
            try:
                _, headers, _ = self._request("GET", url, key=key)
            except CommitNotFound:
                return 0
        else:
            query = {"prefix": prefix} if prefix else {}
            url = self.base_url + ("?" + urllib.parse.urlencode(query) if query else "")
            _, headers, _ = self._request("GET", url)
        number = parse_version((headers.get("X-Rainer-Index") or "").strip())
        if number is None:
            raise RainerHTTPError(200, "the server sends no X-Rainer-Index (too old?)", url)
        return number

    def changes(
        self,
        since: int = 0,
        prefix: str | None = None,
        limit: int | None = None,
        wait: float | None = None,
    ) -> tuple[int, list[RemoteCommit]]:
        """One page of the feed: the commits after index ``since`` (of keys starting with
        ``prefix``), oldest first, tombstones included, each with its ``index`` and payload;
        and the index to ask from next. With ``wait`` (seconds), the server answers once there
        is at least one (or after ``wait``, with none).

        Every commit after ``since`` comes exactly once, in order, over successive pages,
        whenever they are asked for: the journal keeps every version.
        """
        query: dict[str, Any] = {"changes_since": int(since), "payload_base64": "yes"}
        if prefix:
            query["prefix"] = prefix
        if limit is not None:
            query["limit"] = int(limit)
        timeout = self.timeout
        if wait is not None:
            query["wait"] = f"{max(0.0, wait):g}s"
            # The server waits up to wait + wait/16 before it says anything.
            timeout = self.timeout + wait * 17 / 16
        url = self.base_url + "?" + urllib.parse.urlencode(query)
        answer = self._json("GET", url, timeout=timeout)
        try:
            position = int(answer["index"])
            entries = list(answer["changes"])
        except (KeyError, TypeError, ValueError):
            raise RainerHTTPError(200, f"not a feed page: {_snippet(json.dumps(answer).encode())}", url) from None
        commits = [
            self._commit_from_listing(entry).with_index(int(entry["index"])) for entry in entries
        ]
        return position, commits

    def watch(
        self,
        key: str | None = None,
        prefix: str | None = None,
        index: int | None = None,
        *,
        wait: float = WATCH_WAIT_SECONDS,
        sleep: Any = time.sleep,
    ) -> Iterator[RemoteCommit]:
        """Yield each change of ``key`` (or of the keys under ``prefix``; every key when both
        are ``None``) as it happens, tombstones included, each with its ``index``, forever.

        Starts after ``index`` (default: now). A dropped connection, a server restart or a
        503 is retried with backoff (0.5 s doubling to 30 s, with jitter), and the watch
        resumes from the last index it yielded: no change is lost or repeated. Errors that
        retrying cannot cure (401, 403, 400) are raised.
        """
        if key is not None and prefix is not None:
            raise ValueError("watch a key or a prefix, not both")
        position = index
        backoff = WATCH_BACKOFF
        while True:
            try:
                if position is None:
                    position = self.index(key=key, prefix=prefix)
                # A key is watched through the feed of its name as a prefix, keeping only it.
                after, commits = self.changes(
                    position, prefix=key if key is not None else prefix, wait=wait
                )
            except (RainerConnectionError, RainerUnavailable):
                sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, WATCH_MAX_BACKOFF)
                continue
            except RainerHTTPError as exc:
                if exc.status < 500:
                    raise
                sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, WATCH_MAX_BACKOFF)
                continue
            backoff = WATCH_BACKOFF
            for commit in commits:
                # Advanced one commit at a time: a consumer that stops here resumes after it.
                position = commit.index
                if key is None or commit.key == key:
                    yield commit
            position = max(position or 0, after)

    # ------------------------------------------------------------------ plumbing

    def _list_url(self, all: bool, payloads: bool) -> str:
        query = {}
        if payloads:
            query["payload_base64"] = "yes"
        if all:
            query["all"] = "yes"
        return self.base_url + ("?" + urllib.parse.urlencode(query) if query else "")

    def _history_url(self, key: str, limit: int | None, before: int | None, payloads: bool) -> str:
        query: dict[str, Any] = {}
        if limit is not None:
            query["limit"] = int(limit)
        if before is not None:
            query["before"] = int(before)
        if payloads:
            query["payload_base64"] = "yes"
        url = self.commit_uri(key) + "/history"
        return url + ("?" + urllib.parse.urlencode(query) if query else "")

    def _commit_from_listing(self, meta: Mapping[str, Any]) -> RemoteCommit:
        encoded = meta.get("payload_base64")
        try:
            payload = base64.b64decode(encoded, validate=True) if encoded is not None else None
        except (binascii.Error, TypeError) as exc:
            raise RainerHTTPError(
                200, f"bad payload_base64 for {meta.get('key')!r}: {exc}", self.base_url
            ) from None
        return _remote(
            {k: v for k, v in meta.items() if not k.startswith("payload_")},
            payload,
            self.deserialization,
        )

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        _, headers, body = self._request(method, url, **kwargs)
        try:
            return json.loads(body)
        except ValueError:
            raise RainerHTTPError(
                200,
                f"expected JSON, got {headers.get('Content-Type') or 'no content type'}: "
                f"{_snippet(body)} (is the URL the API root, e.g. .../diary?)",
                url,
            ) from None

    def _request(
        self,
        method: str,
        url: str,
        data: bytes | None = None,
        headers: Mapping[str, Any] | None = None,
        key: str | None = None,
        version: int | None = None,
        timeout: float | None = None,
    ) -> tuple[int, Message, bytes]:
        """One request; a read is retried through a blip (503, a refused connection).

        Never a POST: whether it was stored is for the caller to find out, and the 409 rule
        makes that safe (the same commit again is refused, never stored twice).
        """
        if method != "GET" or self.retry_for <= 0:
            return self._request_once(method, url, data, headers, key, version, timeout)
        deadline = self._clock() + self.retry_for
        delay = _FIRST_RETRY_DELAY
        tries = 0
        while True:
            tries += 1
            try:
                return self._request_once(method, url, data, headers, key, version, timeout)
            except (RainerUnavailable, RainerConnectionError) as exc:
                if isinstance(exc, RainerConnectionError) and not _refused(exc):
                    raise  # a timeout or a reset mid-answer: not known to be a blip
                # The server's Retry-After when it gave one, else backing off; never past
                # the deadline, which is also where the waiting stops.
                wait = exc.retry_after if getattr(exc, "retry_after", None) else delay
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise type(exc).retried(exc, tries, self.retry_for) from None
                self._sleep(min(wait, remaining))
                delay = min(delay * 2, _MAX_RETRY_DELAY)

    def _request_once(
        self,
        method: str,
        url: str,
        data: bytes | None = None,
        headers: Mapping[str, Any] | None = None,
        key: str | None = None,
        version: int | None = None,
        timeout: float | None = None,
    ) -> tuple[int, Message, bytes]:
        request = urllib.request.Request(
            url, data=data, headers={**self._auth, **(headers or {})}, method=method
        )
        timeout = self.timeout if timeout is None else timeout
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            try:
                body = exc.read()
            except (OSError, http.client.HTTPException):
                body = b""
            finally:
                exc.close()
            error = self._http_error(exc.code, body, url, key, version)
            if isinstance(error, RainerUnavailable):
                error.retry_after = _retry_after(exc.headers.get("Retry-After"))
            raise error from None
        except urllib.error.URLError as exc:
            raise RainerConnectionError(url, exc.reason) from None
        except TimeoutError:
            raise RainerConnectionError(url, f"no answer within {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            # Connection reset, server closed the connection mid-answer, ...
            raise RainerConnectionError(url, exc or type(exc).__name__) from None

    @staticmethod
    def _http_error(
        status: int, body: bytes, url: str, key: str | None, version: int | None
    ) -> RainerError:
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if status == 409 and isinstance(answer, dict) and isinstance(answer.get("conflict"), dict):
            conflict = answer["conflict"]
            try:
                return CommitOrderingError(
                    conflict.get("key", key),
                    int(conflict["expectedVersion"]),
                    int(conflict["providedVersion"]),
                )
            except (KeyError, TypeError, ValueError):
                pass
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            message = answer["error"]
        else:
            message = _snippet(body) or http.client.responses.get(status, "")
        # A 404 from a wrong base URL (routing) is not a missing key: say what the server said.
        if status == 404:
            if key is not None and "Key not found" in message:
                return CommitNotFound(key, version)
            message += " (is the base URL the API root, e.g. http://host:8080/diary?)"
        if status in (400, 413):
            return RainerBadRequest(status, message, url)
        if status == 401:
            return RainerUnauthorized(status, message, url)
        if status == 403:
            return RainerForbidden(status, message, url)
        if status == 503:
            return RainerUnavailable(status, message, url)
        return RainerHTTPError(status, message, url)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (the delta form; a date is not worth parsing)."""
    if value is None or not value.strip().isdigit():
        return None
    return min(float(value.strip()), _MAX_RETRY_DELAY * 6)


def _refused(exc: RainerConnectionError) -> bool:
    """Whether the connection was refused (nothing listening yet): safe to try again."""
    reason = exc.reason
    return isinstance(reason, ConnectionRefusedError) or (
        isinstance(reason, OSError) and reason.errno == errno.ECONNREFUSED
    )


def _snippet(body: bytes) -> str:
    text = " ".join(body[:_ERROR_BODY_LIMIT].decode("utf-8", "replace").split())
    return text + " ..." if len(body) > _ERROR_BODY_LIMIT else text


# ---------------------------------------------------------------------- the storage


class HttpCommitStorage:
    """The ``CommitStorage`` protocol over a Rainer server's HTTP API.

    Reads and writes go to the server, which keeps the ordering rules: a lost race is a
    ``CommitOrderingError`` here as with a local storage.

    :param base_url: the API root, e.g. ``http://config:8080/diary``.
    :param timeout: seconds per request.
    :param token: an API token. ``save`` keeps each commit's author and mtime, which under a
        policy only an ``act_as`` identity may set (an import over HTTP, a replica).
    :param deserialization: how the commits read from it make their ``value``.
    """

    def __init__(
        self,
        base_url: str,
        timeout: float = 10.0,
        token: str | None = None,
        *,
        deserialization: KeyValueDeserialization | None = None,
        retry_for: float = DEFAULT_RETRY_SECONDS,
    ) -> None:
        self.client = RainerClient(
            base_url,
            timeout=timeout,
            token=token,
            deserialization=deserialization,
            retry_for=retry_for,
        )

    @property
    def deserialization(self) -> KeyValueDeserialization | None:
        return self.client.deserialization

    def __repr__(self) -> str:
        return f"HttpCommitStorage({self.client.base_url!r})"

    def start(self) -> None:
        """Nothing to prepare: the server owns its storage."""

    def stop(self) -> None:
        """Nothing to release: every request has its own connection."""

    def heads(self) -> dict[str, Commit]:
        return {k: c.to_commit() for k, c in self.client.list_full(all=True).items()}

    def heads_non_empty(self) -> dict[str, Commit]:
        return {k: c.to_commit() for k, c in self.client.list_full(all=False).items()}

    def heads_token(self) -> int:
        """The sum of head versions (it grows by one per commit).

        Read from the listing's ``ETag`` with a ``HEAD`` request when the server sends a
        numeric one (ours does), else computed from the heads.
        """
        _, headers, _ = self.client._request("HEAD", self.client._list_url(True, False))
        version = parse_version((headers.get("ETag") or "").strip().strip('"'))
        if version is not None:
            return version
        return sum(c.version for c in self.heads().values())

    def get(self, key: str, version: int | None = None) -> Commit | None:
        if version is not None and version < 1:
            return None
        try:
            return self.client.get_commit(key, version).to_commit()
        except CommitNotFound:
            return None

    def history(self, key: str, limit: int = 100, before: int | None = None) -> list[Commit]:
        commits: list[Commit] = []
        if limit < 1:
            return commits
        try:
            for commit in self.client.iter_history(
                key, before=before, page_size=max(1, min(limit, MAX_HISTORY_PAGE))
            ):
                commits.append(commit.to_commit())
                if len(commits) >= limit:
                    break
        except CommitNotFound:
            return []
        return commits

    def save(self, commit: Commit) -> None:
        self.client.post_commit(commit.meta, commit.payload)

    def last_index(self) -> int:
        """The index of the newest commit the server lets this client see."""
        return self.client.index()

    def changes(self, since: int, limit: int = 1000, prefix: str = "") -> list[Commit]:
        """One page of the server's feed (see ``RainerClient.changes``)."""
        _, commits = self.client.changes(since, prefix=prefix or None, limit=min(limit, MAX_FEED_PAGE))
        return [c.to_commit().with_index(c.index) for c in commits]
