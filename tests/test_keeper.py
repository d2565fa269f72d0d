"""CommitKeeper and CommitMirror against a real ZooKeeper (spec §5)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from collections.abc import Mapping
from datetime import datetime
from datetime import timedelta
from datetime import timezone

import pytest
from kazoo.client import KazooClient

from rainer_server.commit import Commit
from rainer_server.errors import ConcurrentCommitError
from rainer_server.errors import InvalidCommit
from rainer_server.errors import KeeperError
from rainer_server.zk.keeper import CommitKeeper
from rainer_server.errors import CommitTooLarge
from rainer_server.zk.keeper import SaveResult
from rainer_server.zk.keeper import make_kazoo_client
from tests.tcpproxy import TcpProxy
from tests.zk_support import wait_until
from tests.zk_support import expire_session
from tests.zk_support import started_client

pytestmark = pytest.mark.zookeeper

MTIME = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=2)
BASE = "/hey"


def make_commit(
    key: str = "what",
    version: int = 1,
    payload: bytes | None = b'{"s":"xxx"}',
    author: str = "nobody",
    comment: str = "nothing",
) -> Commit:
    return Commit(key, version, payload, author, comment, MTIME)



def original_bytes(header: str, payload: bytes) -> bytes:
    """A znode as the JVM Rainer writes it: ``<len>\\n<header>\\n<payload>\\n``."""
    raw = header.encode("utf-8")
    return b"%d\n%s\n%s\n" % (len(raw), raw, payload)


@pytest.fixture
def client(zk_chroot):
    yield from started_client(zk_chroot)


@pytest.fixture
def keeper(client) -> CommitKeeper:
    return CommitKeeper(client, BASE)


@pytest.fixture
def other(zk) -> KazooClient:
    """Another client on the same chroot: "someone else" (another host, a JVM Rainer)."""
    return zk


# ---------------------------------------------------------------- client factory


def test_make_kazoo_client_caps_backoff_at_about_a_second():
    c = make_kazoo_client("127.0.0.1:1", session_timeout=7.0)
    assert c._conn_retry.max_tries == -1
    assert c._conn_retry.max_delay == 1.0
    assert c._conn_retry.delay * (1 + c._conn_retry.max_jitter) <= 1.2
    assert c._retry.max_delay == 1.0
    assert c._session_timeout == 7000
    c.close()


# ---------------------------------------------------------------- reads


def test_empty_keeper(keeper):
    assert keeper.heads() == {}
    assert keeper.keys() == []
    assert keeper.get("what") is None


def test_paths(client):
    assert CommitKeeper(client, "/rainer").znode("k") == "/rainer/data/k"
    assert CommitKeeper(client, "/rainer/").election_path == "/rainer/election"
    assert CommitKeeper(client, "/").znode("k") == "/data/k"


def test_not_connected_fails_fast_once_the_first_connect_window_is_over(zk_chroot):
    c = make_kazoo_client(zk_chroot)  # never started
    # The window opens when the keeper is made: timed from before that, the first save takes
    # at least the whole window however the test is scheduled. A window long enough that the
    # bounds, loose for a loaded machine, still tell failing at once from waiting it out.
    started = time.monotonic()
    keeper = CommitKeeper(c, BASE, timeout=1.0)
    with pytest.raises(KeeperError):
        keeper.save(make_commit())  # waits out what is left of the 1 s window
    assert 0.95 < time.monotonic() - started < 2.0
    started = time.monotonic()
    with pytest.raises(KeeperError):
        keeper.save(make_commit())
    with pytest.raises(KeeperError):
        keeper.get("what")
    assert time.monotonic() - started < 0.5
    c.close()


def test_a_write_racing_the_first_connection_waits_for_it(zk_chroot):
    # A worker that just booted: its client connects in the background while a write arrives.
    c = make_kazoo_client(zk_chroot)
    c.start_async()
    try:
        keeper = CommitKeeper(c, BASE)
        assert keeper.save(make_commit()) is SaveResult.CREATED
        assert keeper.get("what") == make_commit()
    finally:
        c.stop()
        c.close()


# ---------------------------------------------------------------- the save table, row by row


def test_absent_and_empty_does_nothing(keeper, client):
    assert keeper.save(make_commit(payload=None)) is SaveResult.UNCHANGED
    assert client.exists(keeper.znode("what")) is None
    assert keeper.heads() == {}


def test_absent_and_nonempty_creates_with_parents(keeper, client):
    commit = make_commit()
    assert client.exists(BASE) is None
    assert keeper.save(commit) is SaveResult.CREATED
    data, _ = client.get(keeper.znode("what"))
    assert data == commit.serialize()
    assert keeper.get("what") == commit
    assert keeper.heads() == {"what": commit}
    assert keeper.keys() == ["what"]


def test_written_znode_is_the_original_wire_format(keeper, client):
    keeper.save(make_commit(payload=b'{"s": "xxx"}\n'))
    data, _ = client.get(keeper.znode("what"))
    header = (
        '{"key":"what","version":1,"author":"nobody","comment":"nothing",'
        '"mtime":"1970-01-01T00:00:00.002Z","empty":false}'
    )
    assert data == original_bytes(header, b'{"s": "xxx"}\n')


def test_newer_empty_commit_deletes(keeper, client):
    keeper.save(make_commit(version=1))
    assert keeper.save(make_commit(version=2, payload=None)) is SaveResult.DELETED
    assert client.exists(keeper.znode("what")) is None
    assert keeper.heads() == {}
    # The original's known limit (with the znode gone, an older commit was accepted again)
    # is gone: the deletion is recorded, and only a newer commit creates the key again.
    with pytest.raises(ConcurrentCommitError):
        keeper.save(make_commit(version=1))
    assert client.exists(keeper.znode("what")) is None
    assert keeper.save(make_commit(version=3)) is SaveResult.CREATED


def test_equal_commit_is_a_no_op(keeper, client):
    commit = make_commit()
    keeper.save(commit)
    _, before = client.get(keeper.znode("what"))
    assert keeper.save(commit) is SaveResult.UNCHANGED
    assert keeper.save(make_commit()) is SaveResult.UNCHANGED  # equal, not identical
    _, after = client.get(keeper.znode("what"))
    assert after.mzxid == before.mzxid


def test_newer_version_sets_data(keeper, client):
    keeper.save(make_commit(version=1))
    _, before = client.get(keeper.znode("what"))
    newer = make_commit(version=2, payload=b'{"s":"yyy"}')
    assert keeper.save(newer) is SaveResult.UPDATED
    data, after = client.get(keeper.znode("what"))
    assert data == newer.serialize()
    assert after.version == before.version + 1
    # Versions may skip (the keeper keeps heads, not history).
    assert keeper.save(make_commit(version=7)) is SaveResult.UPDATED
    assert keeper.get("what").version == 7


@pytest.mark.parametrize(
    "refused",
    [
        make_commit(version=1),  # rollback
        make_commit(version=2, payload=b'{"s":"yyy2"}'),  # same version, other payload
        make_commit(version=2, author="nobody2"),  # same version, other author
        make_commit(version=2, comment="something"),
        make_commit(version=2, payload=None),  # a tombstone that is not newer
        make_commit(version=1, payload=None),
    ],
    ids=["rollback", "payload", "author", "comment", "same-version-empty", "older-empty"],
)
def test_same_or_older_different_commit_is_refused(keeper, client, refused):
    keeper.save(make_commit(version=1))
    current = make_commit(version=2, payload=b'{"s":"yyy"}')
    keeper.save(current)
    _, before = client.get(keeper.znode("what"))
    with pytest.raises(ConcurrentCommitError) as excinfo:
        keeper.save(refused)
    assert excinfo.value.key == "what"
    assert "Refusing to update commit what" in str(excinfo.value)
    data, after = client.get(keeper.znode("what"))
    assert data == current.serialize()
    assert after.mzxid == before.mzxid
    # Republishing the current commit is still fine.
    assert keeper.save(current) is SaveResult.UNCHANGED


@pytest.mark.parametrize(
    "garbage",
    [
        b"garbage",
        b"",
        b"12\n{not json!}\n\n",
        make_commit(key="other", version=9).serialize(),  # a commit of another key
    ],
    ids=["garbage", "empty-bytes", "bad-json", "wrong-key"],
)
def test_unparseable_znode_is_replaced(keeper, other, garbage):
    path = keeper.znode("what")
    other.create(path, garbage, makepath=True)
    commit = make_commit(version=1)  # even version 1 replaces a corrupt znode
    assert keeper.save(commit) is SaveResult.UPDATED
    assert keeper.get("what") == commit


def test_unparseable_znode_is_deleted_by_an_empty_commit(keeper, other):
    path = keeper.znode("what")
    other.create(path, b"garbage", makepath=True)
    assert keeper.save(make_commit(version=1, payload=None)) is SaveResult.DELETED
    assert other.exists(path) is None


class RacingKeeper(CommitKeeper):
    """A keeper that lets another client write between its read and its compare-and-set."""

    def __init__(self, client: KazooClient, base_path: str, race: Callable[[str], object]) -> None:
        super().__init__(client, base_path)
        self.race = race

    def _read_znode(self, path, deadline):
        result = super()._read_znode(path, deadline)
        self.race(path)
        return result


@pytest.mark.parametrize("row", ["create", "set", "delete", "replace-corrupt"])
def test_lost_compare_and_set_is_a_concurrent_commit_error(client, other, row):
    plain = CommitKeeper(client, BASE)
    path = plain.znode("what")
    if row == "create":
        racer = make_commit(version=5)
        race = lambda p: other.create(p, racer.serialize(), makepath=True)  # noqa: E731
        commit = make_commit(version=1)
    else:
        if row == "replace-corrupt":
            other.create(path, b"garbage", makepath=True)
        else:
            plain.save(make_commit(version=1))
        racer = make_commit(version=5)
        race = lambda p: other.set(p, racer.serialize())  # noqa: E731
        commit = make_commit(version=2, payload=None if row == "delete" else b'{"s":"2"}')
    keeper = RacingKeeper(client, BASE, race)
    with pytest.raises(ConcurrentCommitError) as excinfo:
        keeper.save(commit)
    assert "Concurrent modification when trying to update commit: what" in str(excinfo.value)
    # The winner of the race stays.
    assert plain.get("what") == racer


def test_too_large_commit_is_refused_before_reaching_zookeeper(client):
    keeper = CommitKeeper(client, BASE, max_znode_bytes=1000)
    with pytest.raises(CommitTooLarge) as excinfo:
        keeper.save(make_commit(payload=b"x" * 1000))
    assert isinstance(excinfo.value, KeeperError)
    assert client.exists(keeper.znode("what")) is None
    assert client.connected
    keeper.save(make_commit(payload=b"x" * 100))  # the client is fine afterwards


def test_get_raises_on_unparseable_but_heads_skips_it(keeper, other, caplog):
    keeper.save(make_commit(key="good"))
    other.create(keeper.znode("bad"), b"garbage")
    with pytest.raises(InvalidCommit):
        keeper.get("bad")
    with caplog.at_level(logging.ERROR, logger="rainer_server.zk"):
        assert keeper.heads() == {"good": make_commit(key="good")}
    assert "bad serialization: bad" in caplog.text
    assert keeper.keys() == ["bad", "good"]


# ---------------------------------------------------------------- the original's wire format

ORIGINAL_HEADERS = {
    # As the JVM Rainer of before "empty" existed: no "empty" field.
    "no-empty-field": (
        '{"key":"what","version":3,"author":"nobody","comment":"nothing",'
        '"mtime":"1970-01-01T00:00:00.002Z"}'
    ),
    # Jackson made no promise about field order, and whitespace is legal JSON.
    "reordered": (
        '{"mtime": "1970-01-01T00:00:00.002Z", "empty": false, "comment": "nothing",\n'
        ' "version": 3, "author": "nobody", "key": "what"}'
    ),
    "offset-mtime": (
        '{"key":"what","version":3,"author":"nobody","comment":"nothing",'
        '"mtime":"1970-01-01T01:00:00.002+01:00","empty":false}'
    ),
}


@pytest.mark.parametrize("variant", sorted(ORIGINAL_HEADERS))
def test_reads_znodes_written_by_the_original(keeper, other, variant):
    payload = b'{"s": "xxx",\n "n": 1}'
    other.create(
        keeper.znode("what"), original_bytes(ORIGINAL_HEADERS[variant], payload), makepath=True
    )
    expected = make_commit(version=3, payload=payload)
    assert keeper.get("what") == expected
    assert keeper.heads() == {"what": expected}
    with keeper.mirror() as mirror:
        assert mirror.current == {"what": expected}
    # The same commit in other bytes is still the same commit: nothing is rewritten.
    _, before = other.get(keeper.znode("what"))
    assert keeper.save(expected) is SaveResult.UNCHANGED
    _, after = other.get(keeper.znode("what"))
    assert after.mzxid == before.mzxid
    with pytest.raises(ConcurrentCommitError):
        keeper.save(make_commit(version=2))


def test_reads_an_original_tombstone_header(keeper, other):
    header = (
        '{"key":"what","version":4,"author":"a","comment":"gone",'
        '"mtime":"1970-01-01T00:00:00.002Z","empty":true}'
    )
    other.create(keeper.znode("what"), original_bytes(header, b""), makepath=True)
    commit = keeper.get("what")
    assert commit.empty and commit.payload is None and commit.version == 4


# ---------------------------------------------------------------- mirrors


def test_mirror_is_complete_before_it_is_returned(keeper, other, caplog):
    commits = {f"key-{i:03d}": make_commit(key=f"key-{i:03d}", version=i + 1) for i in range(300)}
    other.ensure_path(keeper.data_path)
    results = [other.create_async(keeper.znode(k), c.serialize()) for k, c in commits.items()]
    for result in results:
        result.get(timeout=10)
    other.create(keeper.znode("broken"), b"garbage")
    with caplog.at_level(logging.ERROR, logger="rainer_server.zk"):
        mirror = keeper.mirror()
    try:
        assert mirror.initialized
        assert mirror.last_update is not None
        assert dict(mirror.current) == commits
        assert mirror.unparseable == {"broken"}
        assert "Commit added with bad serialization: broken" in caplog.text
    finally:
        mirror.close()


def test_mirror_of_a_missing_path_is_empty_and_then_live(keeper, other):
    with keeper.mirror() as mirror:
        assert mirror.initialized and dict(mirror.current) == {}
        other.create(keeper.znode("what"), make_commit().serialize())
        wait_until(lambda: "what" in mirror.current, what="the new key")
        assert mirror.current["what"] == make_commit()


def test_mirror_follows_another_client(keeper, other, caplog):
    caplog.set_level(logging.INFO, logger="rainer_server.zk")
    keeper.save(make_commit(key="a"))
    seen: list[object] = []
    with keeper.mirror() as mirror:
        unsubscribe = mirror.subscribe(seen.append)
        first = mirror.current
        assert isinstance(first, Mapping)
        with pytest.raises(TypeError):
            first["b"] = make_commit(key="b")  # type: ignore[index]
        assert seen == [first]

        # Created by someone else, in the original's format.
        other.create(
            keeper.znode("b"),
            original_bytes(ORIGINAL_HEADERS["no-empty-field"].replace('"what"', '"b"'), b"{}"),
        )
        wait_until(lambda: "b" in mirror.current, what="a created key")
        assert mirror.current["b"] == make_commit(key="b", version=3, payload=b"{}")
        assert first == {"a": make_commit(key="a")}  # old views never change

        # Updated.
        other.set(keeper.znode("a"), make_commit(key="a", version=2, payload=b"[2]").serialize())
        wait_until(lambda: mirror.current["a"].version == 2, what="an update")

        # Corrupted: dropped from the view, and logged.
        other.set(keeper.znode("a"), b"\x00garbage")
        wait_until(lambda: "a" not in mirror.current, what="a corrupt key to be dropped")
        assert mirror.unparseable == {"a"}
        assert "Commit updated with bad serialization: a" in caplog.text

        # Repaired.
        keeper.save(make_commit(key="a", version=3))
        wait_until(lambda: "a" in mirror.current, what="the repaired key")
        assert mirror.unparseable == frozenset()

        # Deleted.
        other.delete(keeper.znode("b"))
        wait_until(lambda: "b" not in mirror.current, what="a deleted key")
        assert "Commit removed: b" in caplog.text

        # Deleted and re-created at once.
        other.delete(keeper.znode("a"))
        other.create(keeper.znode("a"), make_commit(key="a", version=9).serialize())
        wait_until(
            lambda: "a" in mirror.current and mirror.current["a"].version == 9,
            what="a re-created key",
        )

        # Every change was a new mapping, and subscribers saw each in order.
        wait_until(lambda: seen[-1] is mirror.current, what="the last notification")
        assert len({id(view) for view in seen}) == len(seen)
        assert all(isinstance(view, Mapping) for view in seen)
        unsubscribe()
        count = len(seen)
        keeper.save(make_commit(key="c"))
        wait_until(lambda: "c" in mirror.current, what="c")
        assert len(seen) == count


def test_closed_mirror_stops_changing(keeper, other):
    keeper.save(make_commit(key="a"))
    closed = keeper.mirror()
    closed.close()
    view = closed.current
    with keeper.mirror() as live:
        other.set(keeper.znode("a"), make_commit(key="a", version=2).serialize())
        other.create(keeper.znode("b"), make_commit(key="b").serialize())
        wait_until(
            lambda: len(live.current) == 2 and live.current["a"].version == 2,
            what="the live mirror",
        )
    assert closed.current is view


def test_mirror_survives_session_expiry(keeper, client, other, zk_chroot):
    keeper.save(make_commit(key="a"))
    with keeper.mirror() as mirror:
        expire_session(client, zk_chroot)
        other.set(keeper.znode("a"), make_commit(key="a", version=2).serialize())
        other.create(keeper.znode("b"), make_commit(key="b").serialize())
        wait_until(
            lambda: "b" in mirror.current and mirror.current["a"].version == 2,
            what="changes made after the session expired",
        )
        other.delete(keeper.znode("b"))
        wait_until(lambda: "b" not in mirror.current, what="a delete after the session expired")


def test_mirror_catches_up_on_changes_made_while_its_session_was_gone(
    keeper, client, other, zk_chroot
):
    keeper.save(make_commit(key="a"))
    keeper.save(make_commit(key="c"))
    with keeper.mirror() as mirror:
        expire_session(client, zk_chroot, wait_for_new_session=False)
        # Before the mirror's client has a new session: only a full re-read can find these.
        other.set(keeper.znode("a"), make_commit(key="a", version=2).serialize())
        other.delete(keeper.znode("c"))
        other.create(keeper.znode("b"), make_commit(key="b").serialize())
        wait_until(
            lambda: mirror.current == {"a": make_commit(key="a", version=2), "b": make_commit(key="b")},
            what="the changes made while the session was gone",
        )


def test_mirror_payload_is_json_compatible(keeper):
    # The mirror hands out commits whose payload bytes are exactly what was saved.
    payload = json.dumps({"k": [1, 2, 3], "text": "é"}, indent=2).encode("utf-8") + b"\n"
    keeper.save(make_commit(payload=payload))
    with keeper.mirror() as mirror:
        assert mirror.current["what"].payload == payload


def test_mirror_follows_a_deleted_and_recreated_data_path(keeper, other):
    keeper.save(make_commit(key="a"))
    with keeper.mirror() as mirror:
        other.delete(keeper.data_path, recursive=True)  # an operator's deleteall
        wait_until(lambda: len(mirror.current) == 0, what="the view to empty")
        keeper.save(make_commit(key="b"))  # re-creates data/
        wait_until(lambda: "b" in mirror.current, what="a key under the re-created path")
        other.create(keeper.znode("a"), make_commit(key="a", version=2).serialize())
        wait_until(lambda: "a" in mirror.current, what="a re-created key")
        assert mirror.current["a"].version == 2


def test_a_burst_of_new_keys_costs_a_few_listings_not_one_each(keeper, other):
    # kazoo's ChildrenWatch re-lists data/ per created key: O(n^2) for a first publish.
    with keeper.mirror() as mirror:
        before = mirror.listings
        creations = [
            other.create_async(keeper.znode(f"k{n:04d}"), make_commit(key=f"k{n:04d}").serialize())
            for n in range(1000)
        ]
        for creation in creations:
            creation.get(timeout=30)
        wait_until(lambda: len(mirror.current) == 1000, what="every new key", timeout=30)
        assert mirror.listings - before < 100, mirror.listings - before


def test_a_new_key_shows_up_within_a_second_after_opening_over_many(keeper, other):
    # Opening issues a first read per key; that must not count as listing cost and delay the
    # next listing (it once did: 10k keys delayed the first new key by 16 s).
    other.ensure_path(keeper.data_path)
    for creation in [
        other.create_async(keeper.znode(f"k{n:04d}"), make_commit(key=f"k{n:04d}").serialize())
        for n in range(3000)
    ]:
        creation.get(timeout=30)
    with keeper.mirror() as mirror:
        assert len(mirror.current) == 3000
        started = time.monotonic()
        other.create(keeper.znode("new"), make_commit(key="new").serialize())
        wait_until(lambda: "new" in mirror.current, what="the new key", timeout=10)
        # At most about a second (the next listing is at most CHILDREN_RELIST_MAX_INTERVAL
        # away, then a read): loose for a loaded machine, still well below the 16 s above.
        assert time.monotonic() - started < 5.0


def test_a_key_zookeeper_refuses_is_an_invalid_commit(keeper, client):
    # Valid for Rainer, but ZooKeeper refuses U+E000-U+F8FF and U+FFF0-U+FFFF in names.
    with pytest.raises(InvalidCommit):
        keeper.save(make_commit(key="a\ue000b"))
    assert client.connected


def test_mirror_follows_existing_keys_after_a_connection_drop_that_keeps_the_session(zk_chroot):
    # kazoo drops every watch when the connection drops (SUSPENDED), not only on session loss:
    # a mirror that re-read only on session loss froze every existing key after a blip.
    hosts, _, chroot = zk_chroot.partition("/")
    host, _, port = hosts.split(",")[0].rpartition(":")
    proxy = TcpProxy((host, int(port)))
    client = make_kazoo_client(f"{proxy.address}/{chroot}", session_timeout=10)
    other = make_kazoo_client(zk_chroot)
    client.start(timeout=10)
    other.start(timeout=10)
    session_id = client.client_id[0]
    states: list[str] = []
    client.add_listener(states.append)
    try:
        keeper = CommitKeeper(client, "/blip")
        writer = CommitKeeper(other, "/blip")
        writer.save(make_commit(key="a"))
        with keeper.mirror() as mirror:
            assert mirror.current["a"].version == 1
            assert mirror.stale_since is None
            proxy.cut()
            wait_until(lambda: "SUSPENDED" in states, what="the connection to drop")
            # It cannot see changes now, and says so: from its own state listener, which kazoo
            # may call after the test's.
            wait_until(lambda: mirror.stale_since is not None, what="the mirror to say it is stale")
            proxy.restore()
            wait_until(lambda: client.connected, what="the reconnect")
            wait_until(lambda: mirror.stale_since is None, what="the mirror to follow again")
            assert client.client_id[0] == session_id  # the same session: no LOST
            writer.save(make_commit(key="a", version=2))
            wait_until(
                lambda: mirror.current["a"].version == 2,
                what="the existing key's change after the blip",
            )
    finally:
        proxy.cut()
        for c in (client, other):
            c.stop()
            c.close()


# ---------------------------------------------------------------- combined compare-and-sets


def _queued_saves(keeper, client, saves):
    """Run ``keeper.save(commit, known)`` for each of ``saves`` on its own thread while a
    transaction is (as far as the combiner knows) in flight, so that every set queues; then
    let the first queued one send. Returns the results and the transactions committed."""
    import threading

    sent = []
    real_transaction = client.transaction

    def counting_transaction():
        transaction = real_transaction()
        sent.append(transaction)
        return transaction

    combiner = keeper._sets
    results: dict[str, object] = {}

    def save(commit, known):
        try:
            results[commit.key] = keeper.save(commit, known=known)
        except Exception as exc:  # reported by the assertions
            results[commit.key] = exc

    with combiner._lock:
        combiner._sending = True  # another save's transaction "in flight"
    client.transaction = counting_transaction
    try:
        threads = [threading.Thread(target=save, args=item) for item in saves]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(combiner._queue) == len(saves), what="every set queued")
        with combiner._lock:  # that transaction is answered: the first queued sends next
            combiner._queue[0].leads = True
            combiner._queue[0].wake.set()
        for thread in threads:
            thread.join(10)
    finally:
        client.transaction = real_transaction
    return results, sent


def test_concurrent_updates_are_sent_as_one_transaction(keeper, client):
    keys = [f"k{i}" for i in range(5)]
    for key in keys:
        keeper.save(make_commit(key, 1))
    saves = [
        (make_commit(key, 2, b'{"s":"two"}'), (make_commit(key, 1), client.exists(keeper.znode(key)).version))
        for key in keys
    ]
    results, sent = _queued_saves(keeper, client, saves)
    assert results == {key: SaveResult.UPDATED for key in keys}
    assert len(sent) == 1 and len(sent[0].operations) == len(keys)
    for key in keys:
        data, _ = client.get(keeper.znode(key))
        assert b'{"s":"two"}' in data
    assert not keeper._sets._sending and not keeper._sets._queue


def test_a_lost_set_in_a_combined_transaction_costs_the_others_nothing(keeper, client, other):
    keys = ["a", "b", "c"]
    for key in keys:
        keeper.save(make_commit(key, 1))
    known = {key: (make_commit(key, 1), client.exists(keeper.znode(key)).version) for key in keys}
    # Someone else moved "b" on since our mirror read it: its compare-and-set must fail.
    other.set(f"{BASE}/data/b", client.get(keeper.znode("b"))[0])
    saves = [(make_commit(key, 2, b'{"s":"two"}'), known[key]) for key in keys]
    results, sent = _queued_saves(keeper, client, saves)
    # "b" is decided again on fresh reads; "a" and "c", rolled back with it, are sent alone.
    assert results == {key: SaveResult.UPDATED for key in keys}
    assert len(sent[0].operations) == 3 and len(sent) == 4
    for key in keys:
        assert b'{"s":"two"}' in client.get(keeper.znode(key))[0]


def test_a_queued_set_gives_up_at_its_deadline_and_leaves_the_queue(keeper, client):
    keeper.save(make_commit("a", 1))
    combiner = keeper._sets
    with combiner._lock:
        combiner._sending = True  # a transaction that never returns
    started = time.monotonic()
    with pytest.raises(KeeperError):
        combiner.set(keeper.znode("a"), b"x", 0, time.monotonic() + 0.2)
    assert 0.2 <= time.monotonic() - started < 5
    assert combiner._queue == []


def test_a_mirror_opened_as_its_client_starts_warns_of_nothing(zk_chroot, caplog):
    # What a gunicorn worker does at boot: start_async(), then the mirror at once, which may
    # ask before the connection thread runs; the client refuses that (ConnectionClosedError)
    # and the mirror asks again. No news for an operator: a warning there cried wolf at
    # every boot.
    client = make_kazoo_client(zk_chroot, session_timeout=10)
    try:
        with caplog.at_level(logging.DEBUG, logger="rainer_server.zk.mirror"):
            mirror = CommitKeeper(client, "/boot").mirror(wait=False)
            wait_until(lambda: "cannot list keys yet" in caplog.text, what="a refused listing")
            client.start_async()
            assert mirror.wait_initialized(30)
            mirror.close()
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    finally:
        client.stop()
        client.close()


def test_a_mirror_whose_zookeeper_stays_out_of_reach_says_so(caplog):
    # Port 9 (discard) on loopback refuses at once: the client never connects.
    client = make_kazoo_client("127.0.0.1:9", session_timeout=10)
    client.start_async()
    try:
        with caplog.at_level(logging.DEBUG, logger="rainer_server.zk.mirror"):
            mirror = CommitKeeper(client, "/boot", timeout=0.5).mirror(wait=False)
            wait_until(
                lambda: any(r.levelno == logging.WARNING for r in caplog.records),
                timeout=30,
                what="a warning that the mirror cannot list its keys",
            )
            mirror.close()
        assert "cannot list keys yet" in caplog.text
    finally:
        client.stop()
        client.close()
