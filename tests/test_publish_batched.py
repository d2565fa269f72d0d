"""The batched publish (issue 13): a first publish locks heads a batch at a time and creates
many znodes per ZooKeeper transaction, with the guarantees of the key-by-key pass; a new leader
publishes at once when ZooKeeper is empty or drifted."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from collections.abc import Mapping
from datetime import datetime
from datetime import timedelta
from datetime import timezone

import pytest

from rainer_server.commit import Commit
from rainer_server.errors import LostCompareAndSet
from rainer_server.storage.memory import MemoryCommitStorage
from rainer_server.zk.keeper import KEYS_PER_TRANSACTION
from rainer_server.zk.keeper import CommitKeeper
from rainer_server.zk.keeper import make_kazoo_client
from rainer_server.zk.publisher import AutoPublisher
from rainer_server.zk.publisher import PublishCounts
from rainer_server.zk.publisher import publish_heads_batched
from rainer_server.zk.publishing import keeper_publishing
from tests.conftest import STORAGE_KINDS
from tests.conftest import make_storage
from tests.zk_support import started_client
from tests.zk_support import wait_until

pytestmark = pytest.mark.zookeeper

MTIME = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=2)
BASE = "/rainer"


def make_commit(key: str, version: int = 1, payload: bytes | None = b'{"s":1}') -> Commit:
    return Commit(key, version, payload, "nobody", "nothing", MTIME)


def keys(count: int) -> list[str]:
    return [f"key-{i:04d}" for i in range(count)]


@pytest.fixture
def client(zk_chroot):
    yield from started_client(zk_chroot)


@pytest.fixture
def keeper(client) -> CommitKeeper:
    return CommitKeeper(client, BASE)


class HeadsThenHook:
    """Any storage whose ``heads()`` runs ``after_heads`` once, right after reading them."""

    def __init__(self, storage) -> None:
        self.storage = storage
        self.after_heads: Callable[[], object] | None = None

    def __getattr__(self, name):
        return getattr(self.storage, name)

    def heads(self) -> dict[str, Commit]:
        heads = self.storage.heads()
        hook, self.after_heads = self.after_heads, None
        if hook is not None:
            hook()
        return heads


@pytest.mark.parametrize("kind", STORAGE_KINDS)
def test_a_first_publish_creates_every_key_in_few_transactions(
    kind, keeper, zk, tmp_path, request, caplog
):
    count = 2 * KEYS_PER_TRANSACTION + 50
    storage = make_storage(kind, tmp_path, request)
    for i, key in enumerate(keys(count)):
        storage.save(make_commit(key, 1, b'{"n":%d}' % i))
    with keeper.mirror() as mirror, keeper.deletions_mirror() as deletions:
        counts = PublishCounts()
        with caplog.at_level(logging.INFO, logger="rainer_server.zk.keeper"):
            publish_heads_batched(
                keeper,
                storage.heads(),
                counts,
                lock_heads=storage.locked_heads,
                published=mirror.current,
                deleted=deletions.current,
                batch_keys=200,  # several storage transactions
            )
        assert counts == PublishCounts(created=count, duration=0.0)
        transactions = [r for r in caplog.records if "in one transaction" in r.getMessage()]
        assert len(transactions) == 3  # 200 + 200 + 50 keys: lock batches split none
        # JVM-compatible: data/<key> holds exactly the wire format; no record stays behind.
        for i, key in enumerate(keys(count)):
            data, _ = zk.get(keeper.znode(key))
            assert data == make_commit(key, 1, b'{"n":%d}' % i).serialize()
        assert zk.get_children(keeper.deleted_path) == []
        wait_until(lambda: len(mirror.current) == count, what="the mirror to see every key")
        again = PublishCounts()
        publish_heads_batched(
            keeper,
            storage.heads(),
            again,
            lock_heads=storage.locked_heads,
            published=mirror.current,
            deleted=deletions.current,
        )
        assert again.unchanged == count and again.written == 0


def test_create_many_writes_nothing_of_a_transaction_that_meets_a_record_or_a_znode(keeper, zk):
    keeper.save(make_commit("key-0003", 3, None))  # recorded deleted at version 3
    zk.create(keeper.znode("key-0007"), make_commit("key-0007").serialize())
    commits = [make_commit(key) for key in keys(10)]
    outcome = keeper.create_many(commits)
    assert set(outcome) == set(keys(10))
    assert all(isinstance(error, LostCompareAndSet) for error in outcome.values())
    assert zk.get_children(keeper.data_path) == ["key-0007"]
    assert zk.get_children(keeper.deleted_path) == ["key-0003"]


def test_keys_a_lagging_mirror_hid_are_decided_one_by_one(keeper, zk):
    # The mirrors passed in know nothing (as if they lagged): the bulk transaction fails on the
    # recorded deletion and the existing znodes, and each key is then decided with a read.
    storage = MemoryCommitStorage()
    for key in keys(20):
        storage.save(make_commit(key))
    storage.save(make_commit("key-0011", 2))
    keeper.save(make_commit("key-0003", 3, None))  # ZooKeeper is ahead: a newer deletion
    keeper.save(make_commit("key-0005"))  # already published
    keeper.save(make_commit("key-0011"))  # older than the storage's head
    counts = PublishCounts()
    publish_heads_batched(
        keeper, storage.heads(), counts, lock_heads=storage.locked_heads, published={}, deleted={}
    )
    assert (counts.created, counts.updated, counts.unchanged, counts.refused) == (17, 1, 1, 1)
    assert keeper.get("key-0003") is None
    assert keeper.get_deletion("key-0003") == make_commit("key-0003", 3, None)
    assert keeper.get("key-0011") == make_commit("key-0011", 2)
    assert len(zk.get_children(keeper.data_path)) == 19


class ViewRecorder:
    def __init__(self) -> None:
        self.views: list[Mapping[str, Commit]] = []

    def __call__(self, view: Mapping[str, Commit]) -> None:
        self.views.append(view)


@pytest.mark.parametrize("kind", STORAGE_KINDS)
def test_tombstones_racing_a_batched_pass_never_come_back(
    kind, keeper, zk, zk_chroot, tmp_path, request
):
    # A writer deletes every key while the pass (another process's publisher) runs over the
    # heads it read before: its locked batches make each tombstone wait for, and follow,
    # the create of that key, so no key reappears after its deletion.
    count = 300
    storage = HeadsThenHook(make_storage(kind, tmp_path, request))
    names = keys(count)
    for key in names:
        storage.save(make_commit(key))
    publishing = keeper_publishing(storage.storage, keeper)
    errors: list[BaseException] = []

    def delete_all() -> None:
        try:
            for key in reversed(names):  # the pass goes forwards: they cross in the middle
                publishing.save(make_commit(key, 2, None))
        except BaseException as exc:  # noqa: BLE001 (reported by the test thread)
            errors.append(exc)

    deleter = threading.Thread(target=delete_all)
    storage.after_heads = deleter.start
    other = make_kazoo_client(zk_chroot, session_timeout=10.0)
    other.start(timeout=15)
    try:
        publisher_keeper = CommitKeeper(other, BASE)
        with publisher_keeper.mirror() as mirror:
            recorder = ViewRecorder()
            mirror.subscribe(recorder)
            publisher = AutoPublisher(other, publisher_keeper, storage, mirror=mirror)
            publisher.lock_batch_keys = 50  # the deleter meets the pass between batches
            try:
                first = publisher.publish_all()
                deleter.join(60)
                assert not deleter.is_alive() and errors == []
                assert zk.get_children(keeper.data_path) == []
                assert len(zk.get_children(keeper.deleted_path)) == count
                wait_until(lambda: len(mirror.current) == 0, what="the mirror to settle")
                for key in names:
                    runs, shown = 0, False
                    for view in recorder.views:
                        if key in view and not shown:
                            runs += 1
                        shown = key in view
                    assert runs <= 1, key
                assert first.created + first.refused + first.unchanged == count
                assert first.failed == 0 and not first.aborted
                second = publisher.publish_all()
                assert second.written == 0 and second.refused == 0
            finally:
                publisher.close()
    finally:
        other.stop()
        other.close()


@pytest.mark.parametrize("state", ["empty", "drifted"])
def test_a_new_leader_publishes_at_once_when_zookeeper_is_empty_or_drifted(state, keeper):
    storage = MemoryCommitStorage()
    for key in keys(50):
        storage.save(make_commit(key))
    if state == "drifted":
        for key in keys(40):
            keeper.save(make_commit(key))
    # A period no test outlives: only the comparison at the start of the term can publish.
    publisher = AutoPublisher(keeper.client, keeper, storage, period=3600, delay=True)
    try:
        publisher.start()
        # last_counts, not passes: a pass counts itself before it records its counts.
        wait_until(lambda: publisher.last_counts is not None, what="a pass at once")
        assert publisher.last_counts.created == (50 if state == "empty" else 10)
        assert keeper.heads() == storage.heads()
    finally:
        publisher.close()


def test_drift_counts_what_a_pass_would_write(keeper):
    storage = MemoryCommitStorage()
    for key in keys(5):
        storage.save(make_commit(key))
    storage.save(make_commit("key-0001", 2))
    storage.save(make_commit("key-0002", 2, None))
    publisher = AutoPublisher(keeper.client, keeper, storage, period=3600)
    try:
        assert publisher.drift() == 5
        publisher.publish_all()
        wait_until(lambda: publisher.drift() == 0, what="the mirrors to catch up")
    finally:
        publisher.close()


# ---------------------------------------------------------------- mirror start-up


def test_a_mirror_paces_its_first_reads_and_its_reads_after_a_session_loss(
    keeper, zk, zk_chroot, monkeypatch
):
    from rainer_server.zk import mirror as mirror_module
    from tests.zk_support import expire_session

    monkeypatch.setattr(mirror_module, "READS_IN_FLIGHT", 7)  # 250 keys: many rounds of 7
    names = keys(250)
    outcome = keeper.create_many([make_commit(key) for key in names])
    assert all(error is None for error in outcome.values())
    with keeper.mirror() as mirror:
        assert mirror.current == {key: make_commit(key) for key in names}
        expire_session(keeper.client, zk_chroot, wait_for_new_session=False)
        # Made while the mirror's session was gone: only the paced full re-read finds them.
        zk.set(keeper.znode("key-0100"), make_commit("key-0100", 2).serialize())
        zk.set(keeper.znode("key-0249"), make_commit("key-0249", 2).serialize())
        wait_until(
            lambda: mirror.current.get("key-0100") == make_commit("key-0100", 2)
            and mirror.current.get("key-0249") == make_commit("key-0249", 2)
            and mirror.stale_since is None,
            what="the re-read after the session loss",
        )
        # And every key is watched again.
        zk.set(keeper.znode("key-0003"), make_commit("key-0003", 2).serialize())
        wait_until(lambda: mirror.current["key-0003"].version == 2, what="a change after it")
        assert len(mirror.current) == 250


def test_a_mirror_opened_while_keys_change_ends_with_their_newest_commits(keeper, zk):
    # First answers are applied in one go once all are in; a key changed meanwhile is read
    # again, and its older first answer must not win.
    names = keys(400)
    assert all(e is None for e in keeper.create_many([make_commit(k) for k in names]).values())
    zk.create(keeper.znode("corrupt"), b"\x00not a commit")
    stop = threading.Event()
    versions = dict.fromkeys(names, 1)

    def churn() -> None:
        while not stop.is_set():
            for key in names[::7]:
                versions[key] += 1
                zk.set(keeper.znode(key), make_commit(key, versions[key]).serialize())

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        mirror = keeper.mirror(wait=False)
    finally:
        try:
            assert mirror.wait_initialized(30)
        finally:
            stop.set()
            writer.join(30)
    with mirror:
        expected = {key: make_commit(key, version) for key, version in versions.items()}
        wait_until(lambda: mirror.current == expected, what="the newest commit of every key")
        assert mirror.unparseable == {"corrupt"}


def test_create_many_keeps_each_transaction_below_zookeepers_packet_limit(keeper, zk, caplog):
    # Five 300 kB commits: any two together pass the 512 KiB a transaction may carry (a
    # request over jute.maxbuffer, 1 MiB, would make the server drop the connection).
    big = [make_commit(f"big-{i}", 1, b'"%s"' % (b"x" * 300_000)) for i in range(5)]
    with caplog.at_level(logging.INFO, logger="rainer_server.zk.keeper"):
        outcome = keeper.create_many(big)
    assert outcome == dict.fromkeys((c.key for c in big), None)
    assert len([r for r in caplog.records if "in one transaction" in r.getMessage()]) == 5
    assert all(zk.get(keeper.znode(c.key))[0] == c.serialize() for c in big)
    assert keeper.client.connected
