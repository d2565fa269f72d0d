"""Watching over HTTP: X-Rainer-Index, blocking reads, prefixes, the change feed, ETags, and
what sees only what it may read. In-process live servers here; gunicorn in test_watch_live."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from rainer_server.client import RainerClient
from tests.live import live_server  # noqa: F401  (a fixture)
from tests.live import start_live_server
from tests.zk_support import wait_until

AUTHOR = {"X-Rainer-Author": "tester"}


def call(url: str, data: bytes | None = None, headers: dict | None = None, method=None, timeout=30):
    """(status, headers, body) of one request; errors are answers too."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, exc.headers, exc.read()
        finally:
            exc.close()


def post(base: str, key: str, version: int, payload: bytes = b"{}", empty: bool = False, **headers):
    status, answer, body = call(
        f"{base}/{key}/{version}",
        data=b"" if empty else payload,
        headers={**AUTHOR, "Content-Type": "application/octet-stream",
                 **({"X-Rainer-Empty": "yes"} if empty else {}), **headers},
        method="POST",
    )
    assert status == 200, body
    return int(answer["X-Rainer-Index"])


def later(seconds: float, fn, *args, **kwargs) -> threading.Thread:
    """Run ``fn`` on a thread after ``seconds`` (what another client does meanwhile)."""

    def run() -> None:
        time.sleep(seconds)
        fn(*args, **kwargs)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def server(live_server):
    return live_server


# ---------------------------------------------------------------------- the index on answers


def test_every_answer_carries_the_index(server):
    base = server.url
    assert post(base, "a", 1) == 1
    assert post(base, "b", 1) == 2
    assert post(base, "a", 2) == 3
    status, headers, _ = call(base)
    assert status == 200 and headers["X-Rainer-Index"] == "3"
    status, headers, body = call(f"{base}/b")
    assert headers["X-Rainer-Index"] == "2" and headers["ETag"] == '"v1"' and body == b"{}"
    status, headers, body = call(f"{base}/b/meta")
    assert headers["X-Rainer-Index"] == "2" and headers["ETag"] == '"m1"'
    assert "index" not in json.loads(body)  # the meta JSON stays the original's
    status, headers, _ = call(f"{base}/missing")
    assert status == 404 and headers["X-Rainer-Index"] == "0"
    # Deleting a key is a change of the listing: its index moves on.
    post(base, "b", 2, empty=True)
    assert call(base)[1]["X-Rainer-Index"] == "4"


def test_per_key_etags_answer_304(server):
    base = server.url
    post(base, "k", 1)
    status, headers, _ = call(f"{base}/k", headers={"If-None-Match": '"v1"'})
    assert status == 304 and headers["ETag"] == '"v1"' and headers["X-Rainer-Index"] == "1"
    assert call(f"{base}/k/meta", headers={"If-None-Match": '"m1"'})[0] == 304
    assert call(f"{base}/k/meta", headers={"If-None-Match": '"v1"'})[0] == 200
    post(base, "k", 2)
    status, headers, body = call(f"{base}/k", headers={"If-None-Match": '"v1"'})
    assert status == 200 and headers["ETag"] == '"v2"'


def test_prefix_lists_only_keys_under_it_with_their_index(server):
    base = server.url
    post(base, "pay.a", 1)
    post(base, "web.a", 1)
    post(base, "pay.b", 1)
    post(base, "web.a", 2)
    status, headers, body = call(f"{base}?prefix=pay.")
    assert sorted(json.loads(body)) == ["pay.a", "pay.b"]
    assert headers["X-Rainer-Index"] == "3"
    status, headers, body = call(f"{base}?prefix=nothing")
    assert json.loads(body) == {} and headers["X-Rainer-Index"] == "0"


def test_bad_watch_parameters_are_400(server):
    base = server.url
    post(base, "k", 1)
    for query, words in [
        ("index=x", "'index'"),
        ("index=-1", "'index'"),
        ("index=0&wait=forever", "'wait'"),
        ("index=0&wait=-1s", "'wait'"),
        ("index=0&wait=11m", "at most 10m"),
        ("wait=5s", "needs 'index'"),
        ("index=99", "ahead"),
        ("changes_since=x", "'changes_since'"),
        ("changes_since=0&limit=1001", "at most 1000"),
        ("changes_since=0&limit=0", "'limit'"),
        ("changes_since=7", "ahead"),
    ]:
        for path in ("", "/k", "/k/meta"):
            if query.startswith("changes_since") and path:
                continue
            status, _, body = call(f"{base}{path}?{query}")
            assert status == 400 and words in json.loads(body)["error"], (path, query, body)


# ---------------------------------------------------------------------- blocking reads


def test_a_blocking_key_read_wakes_on_a_commit(server):
    base = server.url
    post(base, "k", 1)
    later(0.3, post, base, "k", 2, b'{"v": 2}')
    started = time.monotonic()
    status, headers, body = call(f"{base}/k?index=1&wait=20s")
    assert status == 200 and body == b'{"v": 2}' and headers["X-Rainer-Index"] == "2"
    assert time.monotonic() - started < 5
    # The meta too.
    later(0.3, post, base, "k", 3)
    status, headers, body = call(f"{base}/k/meta?index=2&wait=20s")
    assert json.loads(body)["version"] == 3 and headers["X-Rainer-Index"] == "3"


def test_a_blocking_read_times_out_with_the_unchanged_answer(server):
    base = server.url
    post(base, "k", 1)
    started = time.monotonic()
    status, headers, body = call(f"{base}/k?index=1&wait=600ms")
    took = time.monotonic() - started
    assert status == 200 and body == b"{}" and headers["X-Rainer-Index"] == "1"
    assert 0.6 <= took < 3
    status, headers, body = call(f"{base}?index=1&wait=0.5")
    assert status == 200 and "k" in json.loads(body) and headers["X-Rainer-Index"] == "1"


def test_an_index_behind_answers_at_once(server):
    base = server.url
    post(base, "k", 1)
    post(base, "k", 2)
    started = time.monotonic()
    status, headers, _ = call(f"{base}/k?index=1&wait=30s")
    assert headers["X-Rainer-Index"] == "2" and time.monotonic() - started < 2


def test_a_key_that_does_not_exist_yet_can_be_waited_on(server):
    base = server.url
    post(base, "other", 1)
    status, headers, _ = call(f"{base}/new")
    assert status == 404 and headers["X-Rainer-Index"] == "0"

    def others() -> None:
        post(base, "other", 2)  # not this key: no wake-up
        time.sleep(0.3)
        post(base, "new", 1, b'{"new": true}')

    later(0.3, others)  # one thread: two could post in either order
    status, headers, body = call(f"{base}/new?index=0&wait=20s")
    assert status == 200 and body == b'{"new": true}' and headers["X-Rainer-Index"] == "3"


def test_a_blocking_listing_wakes_on_any_commit(server):
    base = server.url
    post(base, "a", 1)
    later(0.3, post, base, "b", 1)
    status, headers, body = call(f"{base}?index=1&wait=20s")
    assert sorted(json.loads(body)) == ["a", "b"] and headers["X-Rainer-Index"] == "2"


def test_blocking_on_a_prefix_wakes_only_for_changes_under_it(server):
    base = server.url
    post(base, "pay.a", 1)
    post(base, "web.a", 1)
    outside = later(0.2, post, base, "web.a", 2)  # outside the prefix
    started = time.monotonic()
    status, headers, body = call(f"{base}?prefix=pay.&index=1&wait=1s")
    assert time.monotonic() - started >= 1.0, "woken by a change outside the prefix"
    assert headers["X-Rainer-Index"] == "1" and list(json.loads(body)) == ["pay.a"]
    outside.join(30)  # index 3, before pay.b's post below (a loaded machine may delay it)
    later(0.2, post, base, "pay.b", 1)
    status, headers, body = call(f"{base}?prefix=pay.&index=1&wait=20s")
    assert sorted(json.loads(body)) == ["pay.a", "pay.b"] and headers["X-Rainer-Index"] == "4"


def test_a_deletion_wakes_a_blocking_listing(server):
    base = server.url
    post(base, "a", 1)
    later(0.3, post, base, "a", 2, empty=True)
    status, headers, body = call(f"{base}?index=1&wait=20s")
    assert json.loads(body) == {} and headers["X-Rainer-Index"] == "2"


# ---------------------------------------------------------------------- the feed


def test_the_feed_pages_every_commit_in_order(server):
    base = server.url
    post(base, "pay.a", 1)
    post(base, "web.a", 1)
    post(base, "pay.a", 2, empty=True)
    status, headers, body = call(f"{base}?changes_since=0")
    feed = json.loads(body)
    assert feed["index"] == 3 and headers["X-Rainer-Index"] == "3"
    assert [(c["key"], c["version"], c["index"], c["empty"]) for c in feed["changes"]] == [
        ("pay.a", 1, 1, False), ("web.a", 1, 2, False), ("pay.a", 2, 3, True),
    ]
    assert set(feed["changes"][0]) == {"key", "version", "author", "comment", "mtime", "empty", "index"}
    page = json.loads(call(f"{base}?changes_since=0&limit=2")[2])
    assert page["index"] == 2 and len(page["changes"]) == 2
    page = json.loads(call(f"{base}?changes_since=2&limit=2")[2])
    assert page["index"] == 3 and [c["index"] for c in page["changes"]] == [3]
    page = json.loads(call(f"{base}?changes_since=0&prefix=pay.")[2])
    assert [c["index"] for c in page["changes"]] == [1, 3] and page["index"] == 3
    page = json.loads(call(f"{base}?changes_since=0&prefix=pay.&payload_base64=yes")[2])
    assert page["changes"][0]["payload_base64"] == "e30="
    assert json.loads(call(f"{base}?changes_since=3")[2]) == {"index": 3, "changes": []}


def test_the_feed_waits_for_at_least_one_change(server):
    base = server.url
    post(base, "a", 1)
    later(0.3, post, base, "a", 2)
    started = time.monotonic()
    feed = json.loads(call(f"{base}?changes_since=1&wait=20s")[2])
    assert [c["version"] for c in feed["changes"]] == [2] and time.monotonic() - started < 5
    started = time.monotonic()
    feed = json.loads(call(f"{base}?changes_since=2&wait=500ms")[2])
    assert feed == {"index": 2, "changes": []} and time.monotonic() - started >= 0.5


def test_the_client_pages_and_watches(server):
    client = RainerClient(server.url)
    for n in range(1, 6):
        client.post_commit({"key": "k", "version": n, "author": "t"}, b'{"n": %d}' % n)
    position, commits = client.changes(since=0, limit=2)
    assert position == 2 and [c.version for c in commits] == [1, 2] and commits[0].index == 1
    assert commits[1].payload == b'{"n": 2}'
    assert client.index(key="k") == 5 and client.index(key="missing") == 0
    assert client.index() == 5 and client.index(prefix="zz") == 0
    seen = []
    watch = client.watch(key="k", wait=5)

    def others() -> None:
        client.post_commit({"key": "k.other", "version": 1, "author": "t"}, b"{}")
        time.sleep(0.2)
        client.post_commit({"key": "k", "version": 6, "author": "t"}, b'{"n": 6}')

    later(0.3, others)  # one thread: two could post in either order
    for commit in watch:
        seen.append(commit)
        break
    assert [(c.key, c.version, c.index, c.payload) for c in seen] == [("k", 6, 7, b'{"n": 6}')]
    # From an index: every later change, in order, tombstones too.
    client.post_commit({"key": "k", "version": 7, "author": "t", "empty": True}, None)
    resumed = client.watch(prefix="k", index=5, wait=5)
    got = [next(resumed) for _ in range(3)]
    assert [(c.key, c.version, c.empty) for c in got] == [("k.other", 1, False), ("k", 6, False), ("k", 7, True)]


# ---------------------------------------------------------------------- access


POLICY = """
rules:
  - keys: "secret.*"
    read: [admin]
    write: [admin]
  - keys: "*"
    read: ["*"]
    write: ["*"]
"""


@pytest.fixture
def guarded(app_config, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    server = start_live_server(
        {**app_config, "RAINER_AUTH": "proxy", "RAINER_POLICY": str(policy),
         "RAINER_SECRET_KEY": "test-only-secret-key-0123456789abcdef"}
    )
    yield server
    server.stop()


def test_watchers_never_learn_of_keys_they_may_not_read(guarded):
    base = guarded.url
    admin = {"X-Remote-User": "admin", "X-Rainer-Author": "admin"}
    alice = {"X-Remote-User": "alice", "X-Rainer-Author": "alice"}
    post(base, "public.a", 1, **alice)
    post(base, "secret.a", 1, **admin)
    # Alice's listing: its index is that of the newest commit she may read.
    status, headers, body = call(base, headers=alice)
    assert list(json.loads(body)) == ["public.a"] and headers["X-Rainer-Index"] == "1"
    assert call(base, headers=admin)[1]["X-Rainer-Index"] == "2"
    # A commit she may not read does not wake her...
    later(0.2, post, base, "secret.a", 2, **admin)
    started = time.monotonic()
    status, headers, body = call(f"{base}?index=1&wait=1s", headers=alice)
    assert time.monotonic() - started >= 1.0 and headers["X-Rainer-Index"] == "1"
    # ...nor shows in her feed, with or without waiting.
    feed = json.loads(call(f"{base}?changes_since=0", headers=alice)[2])
    assert [c["key"] for c in feed["changes"]] == ["public.a"]

    def others() -> None:
        post(base, "secret.b", 1, **admin)
        time.sleep(0.3)
        post(base, "public.a", 2, **alice)

    later(0.2, others)  # one thread: two could post in either order
    feed = json.loads(call(f"{base}?changes_since={feed['index']}&wait=20s", headers=alice)[2])
    assert [(c["key"], c["version"]) for c in feed["changes"]] == [("public.a", 2)]
    # Nor can she wait on a secret key.
    assert call(f"{base}/secret.a?index=0&wait=1s", headers=alice)[0] == 403
    assert call(f"{base}/secret.a?index=0&wait=1s")[0] == 401


# ---------------------------------------------------------------------- the hub itself


@pytest.mark.parametrize("wants", [None, "k"], ids=["listing", "key"])
def test_a_waiter_registered_before_the_hub_starts_wakes_for_a_commit_before_it_starts(
    db_storage, wants
):
    """The race a request meets on a fresh worker: it registers (the hub is not following yet)
    and reads index N from the database; commit N+1 lands; only then does the hub read where
    the journal is, N+1. Nothing after that is new to the hub, so it must wake what waited
    already, or the request sleeps through its whole ``wait``."""
    from rainer_server.web.watch import WatchHub
    from tests.storage_contract import commit

    db_storage.save(commit("k", 1))
    after = db_storage.last_index()
    hub = WatchHub(db_storage, poll_interval=0.05)
    waiter = hub.register(after, key=wants)
    db_storage.save(commit("k", 2))
    try:
        hub.start()
        assert hub.wait_ready(10)
        assert hub.index == after + 1
        assert waiter.event.wait(10), "the commit that landed before the hub started never woke it"
    finally:
        hub.unregister(waiter)
        hub.stop()


@contextlib.contextmanager
def hub_over_a_mirror(db_storage, zk_chroot):
    """(keeper, mirror, hub): a started watch hub following ``db_storage`` with a mirror of
    a keeper in ``zk_chroot``; everything stopped on exit."""
    from rainer_server.web.watch import WatchHub
    from rainer_server.zk.keeper import CommitKeeper
    from tests.zk_support import started_client

    clients = started_client(zk_chroot)
    keeper = CommitKeeper(next(clients), "/hub")
    mirror = keeper.mirror()
    hub = WatchHub(db_storage, mirror, poll_interval=600.0)
    try:
        hub.start()
        assert hub.wait_ready(10)
        yield keeper, mirror, hub
    finally:
        hub.stop()
        mirror.close()
        next(clients, None)


@pytest.mark.zookeeper
def test_an_answer_claiming_the_index_reads_the_feed_the_pausing_hub_has_not(
    db_storage, zk_chroot, monkeypatch
):
    """While nobody waits the hub reads the feed in batches (``IDLE_BATCH``); an answer built
    from the mirror claims the hub's index, and must not claim less than the mirror shows
    because the hub is pausing."""
    from rainer_server.web import watch
    from tests.storage_contract import commit

    monkeypatch.setattr(watch, "IDLE_BATCH", 600.0)  # the hub's thread reads nothing more
    views = []
    with hub_over_a_mirror(db_storage, zk_chroot) as (keeper, mirror, hub):
        # The mirror shows a view before it tells its subscribers, in the order they came: a
        # view this later subscriber has seen, the hub's has been told of (and poked it).
        mirror.subscribe(views.append)
        hub.mirror_index()  # the hub's own first pass may still be reading: wait it out
        for version in (1, 2):
            kept = db_storage.save(commit("k", version))
            keeper.save(kept)
            wait_until(lambda v=version: views[-1].get("k") is not None
                       and views[-1]["k"].version == v, what="the mirror")
            assert hub.mirror_index() == kept.index
            assert hub.head_index("k", version) == kept.index


@pytest.mark.zookeeper
def test_the_mirror_serves_answers_once_it_shows_every_head_whichever_heard_first(
    db_storage, zk_chroot, monkeypatch
):
    """Heads the journal has and ZooKeeper lacks (a drifted ZooKeeper) keep answers on the
    database until the mirror shows each of them, whether the mirror heard of a commit before
    the feed did or after; and each mirror change costs a check of the keys it changed, not of
    every head still missing (thousands while a first publish is pending)."""
    from rainer_server.web import watch
    from tests.storage_contract import commit

    monkeypatch.setattr(watch, "IDLE_BATCH", 600.0)  # the feed is read when an answer asks
    drifted = [db_storage.save(commit(f"drift-{n:03d}", 1)) for n in range(200)]
    checks = []
    shows = watch._shows
    monkeypatch.setattr(watch, "_shows", lambda *a: checks.append(a[1]) or shows(*a))
    with hub_over_a_mirror(db_storage, zk_chroot) as (keeper, mirror, hub):
        assert hub.mirror_index() is None  # 200 heads ZooKeeper lacks
        # The mirror hears of "early" before the feed does: the feed's announcement must
        # find it shown.
        early = db_storage.save(commit("early", 1))
        keeper.save(early)
        wait_until(lambda: "early" in mirror.current, what="the mirror to show early")
        checks.clear()
        hub.poke()
        assert hub.mirror_index() is None
        assert checks == ["early"]
        assert "early" not in hub._unmirrored
        # The feed hears of "late" before the mirror does: the mirror's change must find it.
        late = db_storage.save(commit("late", 1))
        hub.poke()  # what a save in this process does
        assert hub.mirror_index() is None
        assert "late" in hub._unmirrored
        checks.clear()
        keeper.save(late)
        wait_until(lambda: "late" not in hub._unmirrored, what="the hub to see late mirrored")
        assert checks == ["late"]
        for kept in drifted:
            keeper.save(kept)
        wait_until(lambda: hub.mirror_index() is not None, what="every head mirrored")
        assert hub.mirror_index() == late.index
        assert len(checks) <= 1 + len(drifted)  # each key checked when its znode changed
