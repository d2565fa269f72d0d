"""Blocking reads and the change feed over HTTP, in Consul's conventions.

``?index=N&wait=30s`` on a listing or a key answers as soon as what it reads has an index
above N, or after ``wait`` with the unchanged answer; ``?changes_since=N`` pages the
journal's feed. The waiting itself is the process's ``WatchHub`` (``web/watch.py``): a
waiting request holds a waiter and an event, and no database connection.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from typing import Any

from flask import request
from flask import Response

from rainer_server.commit import Commit
from rainer_server.commit import parse_version
from rainer_server.errors import InvalidCommit
from rainer_server.storage.db import cooperative
from rainer_server.web.auth import Caller
from rainer_server.web.context import RainerContext
from rainer_server.web.middleware import INDEX_HEADER
from rainer_server.web.middleware import NO_STORE

#: The longest ``wait``, and the wait of a blocking read that gives none (Consul's).
MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0
#: A sync worker is killed after gunicorn's 30 s timeout: its waits stop short of that.
SYNC_WORKER_WAIT = 20.0
MAX_FEED_LIMIT = 1000
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m)?\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}

Answer = Callable[[], tuple[Response, int]]


def index_parameter(name: str = "index") -> int | None:
    """``?index=N`` (or ``name``): a non-negative decimal integer, or ``None`` when absent."""
    text = request.args.get(name)
    if text is None:
        return None
    value = parse_version(text.strip())
    if value is None:
        raise InvalidCommit(f"Invalid '{name}' parameter (should be a non-negative integer)")
    return value


def wait_parameter(default: float | None) -> float | None:
    """``?wait=30s`` (``ms``, ``s`` or ``m``; a bare number is seconds), at most 10 minutes,
    plus up to a sixteenth of random jitter, as Consul adds, so that watchers woken together
    do not all come back at once. ``default`` when absent."""
    text = request.args.get("wait")
    if text is None:
        seconds = default
    else:
        match = _DURATION.match(text.strip())
        if match is None:
            raise InvalidCommit(
                "Invalid 'wait' parameter (a duration such as 30s, 500ms or 5m)"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        if seconds > MAX_WAIT:
            raise InvalidCommit("Invalid 'wait' parameter (at most 10m)")
    if seconds is None:
        return None
    seconds += random.uniform(0, seconds / 16)
    environ = request.environ
    if (
        not cooperative()
        and str(environ.get("SERVER_SOFTWARE", "")).startswith("gunicorn")
        and not environ.get("wsgi.multithread")
    ):
        seconds = min(seconds, SYNC_WORKER_WAIT)
    return seconds


def limit_parameter() -> int:
    text = request.args.get("limit")
    if text is None:
        return MAX_FEED_LIMIT
    value = parse_version(text.strip())
    if value is None or value < 1:
        raise InvalidCommit("Invalid 'limit' parameter (should be a positive integer)")
    if value > MAX_FEED_LIMIT:
        raise InvalidCommit(f"Invalid 'limit' parameter (at most {MAX_FEED_LIMIT})")
    return value


def key_test(rainer: RainerContext, caller: Caller, prefix: str) -> Callable[[str], bool] | None:
    """Which keys a listing or feed shows this caller: under ``prefix`` and readable by it
    (``None``: every key)."""
    gate = rainer.gate
    readable = None
    if gate.enabled:
        may_read, identity = gate.policy.may_read, caller.identity
        readable = lambda key: may_read(identity, key)  # noqa: E731
    if not prefix:
        return readable
    if readable is None:
        return lambda key: key.startswith(prefix)
    return lambda key: key.startswith(prefix) and readable(key)


def _check_not_ahead(rainer: RainerContext, after: int, name: str = "index") -> None:
    hub = rainer.watch_hub
    if after > hub.index and after > rainer.database_storage.last_index():
        raise InvalidCommit(f"Invalid '{name}' parameter (ahead of the current index)")


def blocking_answer(
    rainer: RainerContext,
    answer: Answer,
    key: str | None = None,
    wants: Callable[[str], bool] | None = None,
) -> Response:
    """``answer()`` now, or, with ``?index=N``, once it has an index above N (at most
    ``wait``; then the unchanged answer). ``key`` or ``wants`` say which commits matter."""
    after = index_parameter()
    wait = wait_parameter(DEFAULT_WAIT if after is not None else None)
    if after is None:
        if request.args.get("wait") is not None:
            raise InvalidCommit("Invalid 'wait' parameter (a blocking read needs 'index')")
        return answer()[0]
    _check_not_ahead(rainer, after)
    hub = rainer.watch_hub
    # Before reading: a commit landing between the read and the wait still wakes it.
    waiter = hub.register(after, key=key, wants=wants)
    try:
        deadline = time.monotonic() + (wait or 0.0)
        while True:
            response, current = answer()
            remaining = deadline - time.monotonic()
            if current > after or remaining <= 0 or hub.stopping:
                response.headers.extend(NO_STORE)
                return response
            # A waiting request holds no connection: a thousand watchers, a handful of them.
            rainer.release_connections()
            waiter.event.wait(remaining)
            waiter.event.clear()
    finally:
        hub.unregister(waiter)


def changes_answer(
    rainer: RainerContext,
    caller: Caller,
    since: int,
    prefix: str,
    entry: Callable[[Commit], dict[str, Any]],
) -> Response:
    """``{"index": M, "changes": [...]}``: the commits above ``since`` the caller may read,
    in index order, at most ``limit``; with ``wait``, once there is at least one.

    M is where to resume: the last commit returned when the page is full, else the journal's
    index when it was read. It advances past commits the caller may not read (they are
    never shown), so it tells that commits happened, never which.
    """
    limit = limit_parameter()
    wait = wait_parameter(None)
    storage = rainer.database_storage
    if since > storage.last_index():
        raise InvalidCommit("Invalid 'changes_since' parameter (ahead of the current index)")
    wants = key_test(rainer, caller, prefix)
    readable = key_test(rainer, caller, "")

    def read(position: int) -> tuple[list[Commit], int]:
        top = storage.last_index()  # before the page: every commit up to it is in the page
        page = storage.changes(position, limit, prefix)
        last = page[-1].index or position if page else position
        # A full page may stop short of ``top``: resume after its last commit.
        end = last if len(page) >= limit else max(top, last)
        shown = page if readable is None else [c for c in page if readable(c.key)]
        return shown, end

    shown, end = read(since)
    if not shown and wait is not None:
        hub = rainer.watch_hub
        waiter = hub.register(end, wants=wants)
        try:
            deadline = time.monotonic() + wait
            while not shown and not hub.stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                rainer.release_connections()
                waiter.event.wait(remaining)
                waiter.event.clear()
                shown, end = read(end)
                waiter.after = end
        finally:
            hub.unregister(waiter)
    body = {"index": end, "changes": [{**entry(c), "index": c.index} for c in shown]}
    return Response(
        json.dumps(body, ensure_ascii=False), 200, mimetype="application/json",
        headers={INDEX_HEADER: str(end), **dict(NO_STORE)},
    )
