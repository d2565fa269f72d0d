"""``GET /<key>/<version>`` repeat reads from a per-process cache bounded by bytes, on a real
SQLite journal: what it keeps, what it drops, and how long it trusts an entry."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from datetime import timezone

import pytest

from rainer_server import Commit
from rainer_server import create_app
from rainer_server.web.context import VersionCache

AUTHOR = {"X-Rainer-Author": "tester"}


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "versions.db"


def make_app(db_path, **settings):
    return create_app({
        "TESTING": True,
        "RAINER_DATABASE_URL": f"sqlite:///{db_path}",
        **{f"RAINER_{k.upper()}": str(v) for k, v in settings.items()},
    })


@pytest.fixture
def app(db_path):
    app = make_app(db_path)
    yield app
    app.extensions["rainer"].close()


def rewrite_behind_the_service(db_path, key: str, version: int, payload: bytes) -> None:
    """What a restore from another backup looks like to a running process: the same version
    number now holds other bytes."""
    with sqlite3.connect(db_path) as db:
        changed = db.execute(
            "UPDATE rainer SET payload = ? WHERE key = ? AND version = ?",
            (payload, key.encode(), version),
        ).rowcount
    assert changed == 1


def test_a_repeat_read_is_answered_from_the_cache(app, db_path):
    client = app.test_client()
    assert client.post("/diary/k/1", data=b'{"v":1}', headers=AUTHOR).status_code == 200
    first = client.get("/diary/k/1")
    assert first.status_code == 200 and first.data == b'{"v":1}'
    rewrite_behind_the_service(db_path, "k", 1, b'{"v":"other"}')
    again = client.get("/diary/k/1")
    assert again.data == b'{"v":1}' and again.headers == first.headers
    assert client.get("/diary/k/1/meta").get_json() == client.get("/diary/k/meta").get_json()
    # The cache only holds what was read by version: the head is the database's.
    assert client.get("/diary/k").data == b'{"v":"other"}'


def test_an_entry_is_read_again_once_it_expired(app, db_path):
    client = app.test_client()
    client.post("/diary/k/1", data=b'{"v":1}', headers=AUTHOR)
    app.extensions["rainer"].version_cache.ttl = 0.0  # expired as soon as kept
    assert client.get("/diary/k/1").data == b'{"v":1}'
    rewrite_behind_the_service(db_path, "k", 1, b'{"v":"restored"}')
    assert client.get("/diary/k/1").data == b'{"v":"restored"}'


def test_a_missing_version_is_not_cached(app):
    client = app.test_client()
    client.post("/diary/k/1", data=b"{}", headers=AUTHOR)
    assert client.get("/diary/k/2").status_code == 404
    client.post("/diary/k/2", data=b'{"v":2}', headers=AUTHOR)
    assert client.get("/diary/k/2").data == b'{"v":2}'


def test_zero_bytes_turns_it_off(db_path):
    app = make_app(db_path, version_cache_bytes=0)
    try:
        client = app.test_client()
        client.post("/diary/k/1", data=b'{"v":1}', headers=AUTHOR)
        assert client.get("/diary/k/1").data == b'{"v":1}'
        rewrite_behind_the_service(db_path, "k", 1, b'{"v":"other"}')
        assert client.get("/diary/k/1").data == b'{"v":"other"}'
        assert len(app.extensions["rainer"].version_cache) == 0
    finally:
        app.extensions["rainer"].close()


def commit(key: str, version: int, size: int) -> Commit:
    return Commit(key, version, b"x" * size, "a", "", datetime(2020, 1, 1, tzinfo=timezone.utc))


def test_the_cache_stays_within_its_bytes_dropping_the_least_recently_read():
    cache = VersionCache(max_bytes=10_000)
    for version in range(1, 101):
        cache.put(commit("k", version, 600))
        assert cache.bytes <= 10_000
    assert 5 < len(cache) < 11
    newest = [v for v in range(1, 101) if cache.get("k", v) is not None]
    assert newest == list(range(101 - len(newest), 101))
    # Reading an entry makes it the last to go.
    oldest = newest[0]
    assert cache.get("k", oldest) is not None
    cache.put(commit("k", 101, 600))
    assert cache.get("k", oldest) is not None and cache.get("k", newest[1]) is None
    # An entry larger than the whole cache is not kept (it would push everything out).
    cache.put(commit("big", 1, 20_000))
    assert cache.get("big", 1) is None and len(cache) > 5
