"""Deletes stay deleted: no publish pass, stale save, restart or outage brings a tombstoned key
back into ``data/``, nor into any mirror, even briefly."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from datetime import datetime
from datetime import timedelta
from datetime import timezone

import pytest
from kazoo.client import KazooClient

from rainer_server.commit import Commit
from rainer_server.errors import ConcurrentCommitError
from rainer_server.storage.memory import MemoryCommitStorage
from rainer_server.zk.keeper import CommitKeeper
from rainer_server.zk.keeper import SaveResult
from rainer_server.zk.keeper import make_kazoo_client
from rainer_server.zk.publisher import AutoPublisher
from rainer_server.zk.publishing import keeper_publishing
from tests.tcpproxy import TcpProxy
from tests.zk_support import started_client
from tests.zk_support import wait_until

pytestmark = pytest.mark.zookeeper

MTIME = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=2)
BASE = "/rainer"


def make_commit(key: str = "what", version: int = 1, payload: bytes | None = b'{"s":1}') -> Commit:
    return Commit(key, version, payload, "nobody", "nothing", MTIME)


def tombstone(key: str = "what", version: int = 2) -> Commit:
    return make_commit(key, version, None)


@pytest.fixture
def client(zk_chroot):
    yield from started_client(zk_chroot)


@pytest.fixture
def keeper(client) -> CommitKeeper:
    return CommitKeeper(client, BASE)


@contextlib.contextmanager
def another_client(hosts: str) -> Iterator[KazooClient]:
    """A second started client (another process, a restarted one), stopped on the way out."""
    other = make_kazoo_client(hosts, session_timeout=10.0)
    other.start(timeout=15)
    try:
        yield other
    finally:
        other.stop()
        other.close()


class HookedHeadsStorage(MemoryCommitStorage):
    """A storage that runs ``after_heads`` once, right after a pass has read the heads."""

    after_heads: Callable[[], object] | None = None

    def heads(self) -> dict[str, Commit]:
        heads = super().heads()
        hook, self.after_heads = self.after_heads, None
        if hook is not None:
            hook()
        return heads


class ViewRecorder:
    """Every view a mirror hands out, from subscription on."""

    def __init__(self) -> None:
        self.views: list[Mapping[str, Commit]] = []

    def __call__(self, view: Mapping[str, Commit]) -> None:
        self.views.append(view)

    def showed(self, key: str, since: int = 0) -> list[Commit]:
        return [view[key] for view in self.views[since:] if key in view]


# ---------------------------------------------------------------- the race of the fault run


def test_a_stale_save_after_a_tombstone_does_not_recreate_the_key(keeper, zk):
    storage = MemoryCommitStorage()
    publishing = keeper_publishing(storage, keeper)
    publishing.save(make_commit(version=1))
    assert keeper.get("what") == make_commit(version=1)
    stale = storage.heads()["what"]  # a pass starts: it read v1
    publishing.save(tombstone(version=2))  # the tombstone deletes the znode
    assert zk.exists(keeper.znode("what")) is None

    # The pass reaches the key and publishes what it read.
    with pytest.raises(ConcurrentCommitError):
        keeper.save(stale)
    assert zk.exists(keeper.znode("what")) is None
    assert keeper.heads() == {}


def test_a_pass_that_read_heads_before_a_tombstone_does_not_bring_the_key_back(keeper, zk):
    # The head is missing from ZooKeeper when the pass starts (first publish, after an outage,
    # after a failed publish): the mirror cannot tell the pass that the key is deleted.
    storage = HookedHeadsStorage()
    storage.save(make_commit(version=1))
    publishing = keeper_publishing(storage, keeper)
    with keeper.mirror() as mirror:
        recorder = ViewRecorder()
        mirror.subscribe(recorder)
        publisher = AutoPublisher(keeper.client, keeper, storage, mirror=mirror)
        try:
            storage.after_heads = lambda: publishing.save(tombstone(version=2))
            counts = publisher.publish_all()
            assert counts.created == 0
            assert zk.exists(keeper.znode("what")) is None
            # The next pass agrees, and no view ever showed the key.
            again = publisher.publish_all()
            assert again.written == 0
        finally:
            publisher.close()
        assert zk.exists(keeper.znode("what")) is None
        assert recorder.showed("what") == []


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


@pytest.mark.parametrize("kind", ["memory", "sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def test_a_pass_never_publishes_a_head_a_tombstone_replaced_while_zookeeper_never_heard(
    kind, keeper, zk, tmp_path, request
):
    # The tombstone's writer cannot reach ZooKeeper (a partitioned host): only the database
    # knows the key is deleted. The pass read the heads just before; it must publish what
    # the database holds when it writes, not its snapshot.
    from tests.conftest import make_storage

    storage = HeadsThenHook(make_storage(kind, tmp_path, request))
    storage.save(make_commit(version=1))
    with keeper.mirror() as mirror:
        recorder = ViewRecorder()
        mirror.subscribe(recorder)
        publisher = AutoPublisher(keeper.client, keeper, storage, mirror=mirror)
        try:
            storage.after_heads = lambda: storage.storage.save(tombstone(version=2))
            counts = publisher.publish_all()
            assert counts.created == 0 and counts.unchanged == 1  # recorded, data/ unchanged
            assert zk.exists(keeper.znode("what")) is None
            assert keeper.get_deletion("what") == tombstone(version=2)
        finally:
            publisher.close()
        assert recorder.showed("what") == []


# ---------------------------------------------------------------- the keeper's rules


def test_a_tombstone_of_an_absent_key_is_still_recorded(keeper, zk):
    assert keeper.save(tombstone(version=2)) is SaveResult.UNCHANGED  # data/ did not change
    assert zk.exists(keeper.znode("what")) is None
    assert keeper.get_deletion("what") == tombstone(version=2)
    assert keeper.deletions() == {"what": tombstone(version=2)}
    for stale in (make_commit(version=1), make_commit(version=2)):
        with pytest.raises(ConcurrentCommitError) as excinfo:
            keeper.save(stale)
        assert "deleted at version[2]" in str(excinfo.value)
    assert zk.exists(keeper.znode("what")) is None
    # Saving it again writes nothing.
    _, before = zk.get(keeper.deleted_znode("what"))
    assert keeper.save(tombstone(version=2)) is SaveResult.UNCHANGED
    assert zk.get(keeper.deleted_znode("what"))[1].mzxid == before.mzxid


def test_a_key_can_be_created_again_after_its_deletion(keeper, zk):
    assert keeper.save(make_commit(version=1)) is SaveResult.CREATED
    assert keeper.save(tombstone(version=2)) is SaveResult.DELETED
    assert keeper.get_deletion("what") == tombstone(version=2)

    again = make_commit(version=3, payload=b'{"s":3}')
    assert keeper.save(again) is SaveResult.CREATED
    assert keeper.get("what") == again
    # The record goes with the deletion it recorded; the znode's version now guards the key.
    assert keeper.get_deletion("what") is None and keeper.deletions() == {}
    with pytest.raises(ConcurrentCommitError):
        keeper.save(make_commit(version=1))

    assert keeper.save(tombstone(version=4)) is SaveResult.DELETED
    assert keeper.get_deletion("what") == tombstone(version=4)
    with pytest.raises(ConcurrentCommitError):
        keeper.save(again)
    assert keeper.save(make_commit(version=5)) is SaveResult.CREATED


def test_an_older_tombstone_never_lowers_the_record(keeper):
    keeper.save(make_commit(version=3))
    keeper.save(tombstone(version=4))
    assert keeper.save(tombstone(version=2)) is SaveResult.UNCHANGED
    assert keeper.get_deletion("what") == tombstone(version=4)
    with pytest.raises(ConcurrentCommitError):
        keeper.save(make_commit(version=3))


def test_a_newer_tombstone_replaces_the_record(keeper, zk):
    keeper.save(tombstone(version=2))
    assert keeper.save(tombstone(version=5)) is SaveResult.UNCHANGED
    assert keeper.get_deletion("what") == tombstone(version=5)
    with pytest.raises(ConcurrentCommitError):
        keeper.save(make_commit(version=4))
    assert zk.exists(keeper.znode("what")) is None


def test_a_corrupt_record_is_ignored_and_replaced(keeper, zk, caplog):
    zk.create(keeper.deleted_znode("what"), b"garbage", makepath=True)
    assert keeper.save(make_commit(version=1)) is SaveResult.CREATED
    assert zk.exists(keeper.deleted_znode("what")) is None
    assert "Ignoring corrupt deletion record" in caplog.text
    zk.create(keeper.deleted_znode("other"), b"garbage")
    assert keeper.save(tombstone("other", 2)) is SaveResult.UNCHANGED
    assert keeper.get_deletion("other") == tombstone("other", 2)


class RacingKeeper(CommitKeeper):
    """A keeper that lets someone else write between its reads and its transaction."""

    def __init__(self, client, base_path: str, race: Callable[[], object]) -> None:
        super().__init__(client, base_path)
        self.race = race

    def _read_znode(self, path, deadline):
        result = super()._read_znode(path, deadline)
        self.race()
        return result


def test_a_create_racing_a_deletion_record_loses(client, zk):
    plain = CommitKeeper(client, BASE)
    zk.ensure_path(plain.deleted_path)
    racing = RacingKeeper(
        client,
        BASE,
        lambda: zk.create(plain.deleted_znode("what"), tombstone(version=2).serialize()),
    )
    with pytest.raises(ConcurrentCommitError):
        racing.save(make_commit(version=1))
    assert zk.exists(plain.znode("what")) is None
    assert plain.get_deletion("what") == tombstone(version=2)


def test_a_deletion_record_racing_a_create_loses(client, zk):
    # The stale writer creates the znode between the tombstone's reads and its transaction:
    # recording the deletion then would leave the stale commit in data/ under the record.
    plain = CommitKeeper(client, BASE)
    zk.ensure_path(plain.data_path)
    racing = RacingKeeper(
        client, BASE, lambda: zk.create(plain.znode("what"), make_commit(version=1).serialize())
    )
    with pytest.raises(ConcurrentCommitError):
        racing.save(tombstone(version=2))
    assert plain.get_deletion("what") is None
    # The next try (the publisher's next pass) deletes it and records the deletion.
    assert plain.save(tombstone(version=2)) is SaveResult.DELETED
    assert plain.get_deletion("what") == tombstone(version=2)
    assert zk.exists(plain.znode("what")) is None


def test_a_tombstone_that_loses_a_race_to_a_stale_create_tries_again(client, zk):
    # The pass's create lands between the tombstone's reads and its transaction (the pass got
    # there first, while v1 was still news to ZooKeeper): the keeper-publishing storage decides
    # again at once, instead of leaving v1 in data/ until the next pass.
    storage = MemoryCommitStorage()
    storage.save(make_commit(version=1))
    plain = CommitKeeper(client, BASE)
    zk.ensure_path(plain.data_path)
    races = [lambda: zk.create(plain.znode("what"), make_commit(version=1).serialize())]
    racing = RacingKeeper(client, BASE, lambda: races and races.pop()())
    keeper_publishing(storage, racing).save(tombstone(version=2))
    assert races == []
    assert zk.exists(plain.znode("what")) is None
    assert plain.get_deletion("what") == tombstone(version=2)


def test_data_holds_exactly_the_wire_format_and_records_stay_out_of_it(keeper, zk):
    # What a JVM Rainer reads: data/<key> and nothing else, byte for byte the original format.
    keeper.save(make_commit("kept", 1))
    keeper.save(make_commit("gone", 1))
    keeper.save(tombstone("gone", 2))
    keeper.save(tombstone("never", 1))
    keeper.save(make_commit("back", 1))
    keeper.save(tombstone("back", 2))
    keeper.save(make_commit("back", 3, b"[3]"))
    assert sorted(zk.get_children(keeper.data_path)) == ["back", "kept"]
    header = (
        b'{"key":"kept","version":1,"author":"nobody","comment":"nothing",'
        b'"mtime":"1970-01-01T00:00:00.002Z","empty":false}'
    )
    assert zk.get(keeper.znode("kept"))[0] == b'%d\n%s\n{"s":1}\n' % (len(header), header)
    assert zk.get(keeper.znode("back"))[0] == make_commit("back", 3, b"[3]").serialize()
    assert keeper.keys() == ["back", "kept"]
    assert sorted(keeper.heads()) == ["back", "kept"]
    with keeper.mirror() as mirror:
        assert sorted(mirror.current) == ["back", "kept"]
    # The records: tombstones in the same wire format, under deleted/.
    assert sorted(zk.get_children(keeper.deleted_path)) == ["gone", "never"]
    assert Commit.deserialize(zk.get(keeper.deleted_znode("gone"))[0]) == tombstone("gone", 2)
    assert zk.get(keeper.deleted_znode("never"))[0].endswith(b'"empty":true}\n\n')


def test_a_znode_a_jvm_writer_created_over_a_record_is_still_kept_in_line(keeper, zk):
    # A JVM Rainer on the same path knows nothing of deleted/: its znodes win as before.
    keeper.save(make_commit(version=1))
    keeper.save(tombstone(version=2))
    zk.create(keeper.znode("what"), make_commit(version=3, payload=b"[3]").serialize())
    assert keeper.save(make_commit(version=4)) is SaveResult.UPDATED
    assert keeper.save(tombstone(version=5)) is SaveResult.DELETED
    assert keeper.get_deletion("what") == tombstone(version=5)


# ---------------------------------------------------------------- publishers, restarts, outages


def test_restarted_keepers_mirrors_and_publishers_keep_the_deletion(keeper, zk, zk_chroot):
    storage = MemoryCommitStorage()
    publishing = keeper_publishing(storage, keeper)
    publishing.save(make_commit(version=1))
    stale = dict(storage.heads())
    publishing.save(tombstone(version=2))
    keeper.client.stop()  # the process that wrote it is gone

    behind = MemoryCommitStorage()  # e.g. a pass that read the heads before the tombstone
    behind.save(make_commit(version=1))
    with another_client(zk_chroot) as client:
        fresh = CommitKeeper(client, BASE)
        with fresh.mirror() as mirror:
            recorder = ViewRecorder()
            mirror.subscribe(recorder)
            assert "what" not in mirror.current
            with pytest.raises(ConcurrentCommitError):
                fresh.save(stale["what"])
            publisher = AutoPublisher(client, fresh, behind, mirror=mirror)
            try:
                counts = publisher.publish_all()
            finally:
                publisher.close()
            assert counts.refused == 1 and counts.written == 0
            assert recorder.showed("what") == []
        assert fresh.get("what") is None
        assert fresh.get_deletion("what") == tombstone(version=2)


def test_deletes_made_during_an_outage_are_recorded_by_the_next_pass(zk_chroot, zk, caplog):
    hosts, _, chroot = zk_chroot.partition("/")
    host, _, port = hosts.split(",")[0].rpartition(":")
    proxy = TcpProxy((host, int(port)))
    storage = MemoryCommitStorage()
    try:
        with another_client(f"{proxy.address}/{chroot}") as writer_client:
            writer = CommitKeeper(writer_client, BASE, timeout=0.5)
            publishing = keeper_publishing(storage, writer)
            proxy.cut()
            # Both saved in the database; neither reaches ZooKeeper.
            publishing.save(make_commit(version=1))
            stale = dict(storage.heads())
            publishing.save(tombstone(version=2))
            assert "the auto-publisher will retry" in caplog.text
            proxy.restore()

            with another_client(zk_chroot) as publisher_client:
                keeper = CommitKeeper(publisher_client, BASE)
                with keeper.mirror() as mirror:
                    recorder = ViewRecorder()
                    mirror.subscribe(recorder)
                    publisher = AutoPublisher(publisher_client, keeper, storage, mirror=mirror)
                    try:
                        # The key is missing from ZooKeeper and its head is a tombstone: the
                        # original skipped it, leaving nothing to stop an older commit.
                        counts = publisher.publish_all()
                        assert counts.unchanged == 1 and counts.written == 0
                        assert keeper.get_deletion("what") == tombstone(version=2)
                        # A writer still holding v1 (a pass that read the heads before the
                        # outage, the writer's own retry) cannot create it.
                        wait_until(lambda: writer_client.connected, what="the writer's reconnect")
                        with pytest.raises(ConcurrentCommitError):
                            writer.save(stale["what"])
                        again = publisher.publish_all()
                        assert again.unchanged == 1 and again.written == 0
                    finally:
                        publisher.close()
                    assert recorder.showed("what") == []
            assert zk.exists(writer.znode("what")) is None
    finally:
        proxy.close()


def test_a_pass_racing_a_hundred_tombstones_brings_none_back(keeper, zk, zk_chroot):
    # The fault run: a pass over heads it read when it started, while every key is deleted.
    count = 100
    storage = HookedHeadsStorage()
    keys = [f"key-{i:03d}" for i in range(count)]
    for key in keys:
        storage.save(make_commit(key, 1))
    publishing = keeper_publishing(storage, keeper)
    errors: list[BaseException] = []

    def delete_all() -> None:
        try:
            for key in reversed(keys):  # the pass goes forwards: they cross in the middle
                publishing.save(tombstone(key, 2))
        except BaseException as exc:  # noqa: BLE001 (reported by the test thread)
            errors.append(exc)

    deleter = threading.Thread(target=delete_all)
    storage.after_heads = deleter.start
    # The pass writes through its own client, as the elected publisher of another process.
    with another_client(zk_chroot) as publisher_client:
        publisher_keeper = CommitKeeper(publisher_client, BASE)
        with publisher_keeper.mirror() as mirror:
            recorder = ViewRecorder()
            mirror.subscribe(recorder)
            publisher = AutoPublisher(publisher_client, publisher_keeper, storage, mirror=mirror)
            try:
                first = publisher.publish_all()
                deleter.join(30)
                assert not deleter.is_alive() and errors == []
                assert zk.get_children(keeper.data_path) == []
                assert len(zk.get_children(keeper.deleted_path)) == count
                # Each key was shown at most once, before its tombstone: created by the pass
                # while v1 was still the head, then deleted, and never again.
                wait_until(lambda: len(mirror.current) == 0, what="the mirror to settle")
                for key in keys:
                    runs = 0
                    shown = False
                    for view in recorder.views:
                        if key in view and not shown:
                            runs += 1
                        shown = key in view
                    assert runs <= 1, key
                assert first.created + first.refused + first.unchanged == count
                second = publisher.publish_all()
                assert second.written == 0 and second.refused == 0
            finally:
                publisher.close()


def test_tombstones_without_a_record_are_recorded_once_then_skipped(keeper, zk):
    # As after upgrading from a version that kept no records: the keys are absent from data/.
    storage = MemoryCommitStorage()
    for i in range(20):
        storage.save(make_commit(f"k{i}", 1))
        storage.save(tombstone(f"k{i}", 2))
    publisher = AutoPublisher(keeper.client, keeper, storage)
    try:
        first = publisher.publish_all()
        assert first.unchanged == 20 and first.written == 0
        assert len(keeper.deletions()) == 20
        _, parent = zk.get(keeper.deleted_path)
        wait_until(lambda: len(publisher._deletions.current) == 20, what="the records' mirror")
        second = publisher.publish_all()
        assert second.unchanged == 20 and second.written == 0
        # Nothing was written: no record created, removed or changed.
        assert zk.get(keeper.deleted_path)[1].cversion == parent.cversion
        assert all(
            zk.get(keeper.deleted_znode(f"k{i}"))[1].version == 0 for i in range(20)
        )
    finally:
        publisher.close()
