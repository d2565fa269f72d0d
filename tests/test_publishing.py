"""Publishing off the request path: one compare-and-set from the mirror's znode version, an
ordered per-process queue, and what a crash leaves (repaired by the elected publisher)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import datetime
from datetime import timedelta
from datetime import timezone
from pathlib import Path

import pytest

from rainer_server.commit import Commit
from rainer_server.errors import ConcurrentCommitError
from rainer_server.storage.db import DbCommitStorage
from rainer_server.storage.db import open_database
from rainer_server.zk.keeper import CommitKeeper
from rainer_server.zk.keeper import SaveResult
from rainer_server.zk.publisher import AutoPublisher
from rainer_server.zk.publishing import keeper_publishing
from tests.tcpproxy import TcpProxy
from tests.zk_support import started_client
from tests.zk_support import wait_until

pytestmark = pytest.mark.zookeeper

MTIME = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=2)
BASE = "/rainer"
ROOT = Path(__file__).resolve().parent.parent


def make_commit(key: str = "what", version: int = 1, payload: bytes | None = None) -> Commit:
    if payload is None:
        payload = b'{"v":%d}' % version
    return Commit(key, version, payload, "nobody", "nothing", MTIME)


def tombstone(key: str = "what", version: int = 2) -> Commit:
    return Commit(key, version, None, "nobody", "nothing", MTIME)


@pytest.fixture
def client(zk_chroot):
    yield from started_client(zk_chroot)


@pytest.fixture
def keeper(client) -> CommitKeeper:
    return CommitKeeper(client, BASE)


@pytest.fixture
def storage(tmp_path):
    storage = DbCommitStorage(open_database(f"sqlite:///{tmp_path}/journal.db"), "rainer")
    storage.start()
    yield storage
    storage.stop()


class Reads:
    """Counts the reads a keeper's client sends (the real client, only counted)."""

    def __init__(self, client) -> None:
        self.count = 0
        self._get_async = client.get_async
        client.get_async = self

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self._get_async(*args, **kwargs)


def in_mirror(mirror, commit: Commit) -> bool:
    return mirror.current.get(commit.key) == commit


# ---------------------------------------------------------------- compare-and-set


def test_an_update_is_one_write_from_the_mirrors_version(keeper, client, zk_chroot):
    keeper.save(make_commit(version=1))
    # The mirror on a client of its own: only the keeper's reads are counted.
    other = next(mirror_client := started_client(zk_chroot))
    with CommitKeeper(other, BASE).mirror() as mirror:
        wait_until(lambda: in_mirror(mirror, make_commit(version=1)), what="v1 mirrored")
        known = mirror.znode_version("what")
        assert known is not None and known[0] == make_commit(version=1)
        reads = Reads(client)
        assert keeper.save(make_commit(version=2), known=known) is SaveResult.UPDATED
        assert reads.count == 0  # no read of data/ nor of deleted/
        assert keeper.get("what") == make_commit(version=2)
        wait_until(lambda: in_mirror(mirror, make_commit(version=2)), what="v2 mirrored")
        assert mirror.znode_version("what")[1] == known[1] + 1
    next(mirror_client, None)  # stops the mirror's client


def test_a_mirror_behind_falls_back_to_reading(keeper, client):
    keeper.save(make_commit(version=1))
    stale = (make_commit(version=1), client.get(keeper.znode("what"))[1].version)
    keeper.save(make_commit(version=2))  # another writer, unseen by the stale view
    reads = Reads(client)
    # Newer than what ZooKeeper holds: lands after the failed compare-and-set and fresh reads.
    assert keeper.save(make_commit(version=3), known=stale) is SaveResult.UPDATED
    assert reads.count == 2  # data/<key> and deleted/<key>
    assert keeper.get("what") == make_commit(version=3)
    # Older than what ZooKeeper holds: refused, never a rollback.
    keeper.save(make_commit(version=5))
    with pytest.raises(ConcurrentCommitError):
        keeper.save(make_commit(version=4), known=stale)
    assert keeper.get("what") == make_commit(version=5)


def test_a_mirror_behind_a_deletion_does_not_bring_the_key_back(keeper, client):
    keeper.save(make_commit(version=1))
    stale = (make_commit(version=1), client.get(keeper.znode("what"))[1].version)
    keeper.save(tombstone(version=3))
    with pytest.raises(ConcurrentCommitError):
        keeper.save(make_commit(version=2), known=stale)
    assert client.exists(keeper.znode("what")) is None
    # A version after the tombstone is the key committed again.
    assert keeper.save(make_commit(version=4), known=stale) is SaveResult.CREATED
    assert keeper.get("what") == make_commit(version=4)
    assert keeper.get_deletion("what") is None


def test_a_mirror_ahead_is_not_overwritten(keeper, client):
    keeper.save(make_commit(version=1))
    keeper.save(make_commit(version=2))
    ahead = (make_commit(version=2), client.get(keeper.znode("what"))[1].version)
    # The mirror already shows a newer version than this (stale) commit: no blind write.
    with pytest.raises(ConcurrentCommitError):
        keeper.save(make_commit(version=2, payload=b'{"other":1}'), known=ahead)
    assert keeper.save(make_commit(version=2), known=ahead) is SaveResult.UNCHANGED
    assert keeper.get("what") == make_commit(version=2)


# ---------------------------------------------------------------- the queue


def test_the_queue_publishes_every_head_in_order(keeper, storage):
    with keeper.mirror() as mirror:
        publishing = keeper_publishing(storage, keeper, mirror=mirror, background=True)
        for version in range(1, 6):
            for key in ("a", "b", "c"):
                publishing.save(make_commit(key, version))
        assert publishing.hook.flush(timeout=10)
        assert keeper.heads() == storage.heads()
        for key in ("a", "b", "c"):
            wait_until(lambda key=key: in_mirror(mirror, make_commit(key, 5)), what="mirrored")
        # Later updates start from the mirror's versions.
        publishing.save(make_commit("a", 6))
        publishing.save(tombstone("b", 6))
        publishing.hook.close()
        assert keeper.get("a") == make_commit("a", 6)
        assert keeper.get("b") is None and keeper.get_deletion("b") == tombstone("b", 6)
        # Closed: a late save is still published, synchronously.
        publishing.save(make_commit("c", 6))
        assert keeper.get("c") == make_commit("c", 6)


def test_the_queue_keeps_only_the_newest_commit_of_a_key(keeper, storage):
    publishing = keeper_publishing(storage, keeper, background=True)
    hook = publishing.hook
    with hook._lock:  # the thread cannot take anything while the queue is being filled
        for version in range(1, 4):
            storage.save(make_commit("k", version))
            hook(make_commit("k", version))
        hook(make_commit("k", 2))  # an older one queued late does not replace the newer
        assert list(hook._pending.values()) == [make_commit("k", 3)]
    assert hook.flush(timeout=10)
    assert keeper.get("k") == make_commit("k", 3)
    hook.close()


CRASHING_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[3])
    from datetime import datetime, timezone
    from rainer_server.commit import Commit
    from rainer_server.storage.db import DbCommitStorage, open_database
    from rainer_server.zk.keeper import CommitKeeper, make_kazoo_client
    from rainer_server.zk.publishing import keeper_publishing

    client = make_kazoo_client(sys.argv[1])
    client.start(timeout=15)
    storage = DbCommitStorage(open_database(sys.argv[2]), "rainer")
    storage.start()
    publishing = keeper_publishing(storage, CommitKeeper(client, "/rainer"), background=True)
    print("ready", flush=True)
    sys.stdin.readline()
    for key in ("x", "y", "z"):
        publishing.save(Commit(key, 1, b"{}", "nobody", "", datetime.now(timezone.utc)))
    print("saved", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # a crash: the queue dies with the process
    """
)


def test_a_queue_lost_in_a_crash_is_repaired_by_the_publisher(zk_chroot, client, keeper, tmp_path):
    host, chroot = zk_chroot.split("/", 1)
    proxy = TcpProxy((host.split(":")[0], int(host.split(":")[1])))
    db_url = f"sqlite:///{tmp_path}/crash.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, f"{proxy.address}/{chroot}", db_url, str(ROOT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        # ZooKeeper stops answering the writer (connected, but silent): its queue cannot drain.
        proxy.pause()
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "saved"
        assert writer.wait(timeout=10) == -9
    finally:
        if writer.poll() is None:
            writer.kill()
        proxy.cut()  # whatever the writer sent is dropped with the connection
        proxy.resume()
    storage = DbCommitStorage(open_database(db_url), "rainer")
    storage.start()
    try:
        assert sorted(storage.heads()) == ["x", "y", "z"]
        assert keeper.heads() == {}  # saved, never published
        publisher = AutoPublisher(client, keeper, storage)
        try:
            counts = publisher.publish_all()
        finally:
            publisher.close()
        assert counts.created == 3
        assert keeper.heads() == storage.heads()
    finally:
        storage.stop()


class Snapshot:
    """A mirror's znode versions frozen at one moment (then left behind by other writers)."""

    def __init__(self, versions: dict) -> None:
        self.versions = versions

    def znode_version(self, key: str):
        return self.versions.get(key)


def test_a_pipelined_batch_with_a_mirror_behind_publishes_on_fresh_reads(keeper, client, storage):
    for key in ("a", "b"):
        keeper.save(make_commit(key, 1))
    behind = Snapshot({key: (make_commit(key, 1), client.get(keeper.znode(key))[1].version)
                       for key in ("a", "b")})
    keeper.save(make_commit("a", 2))  # another writer: "a" moved on, unseen by the snapshot
    keeper.save(make_commit("b", 5))  # ...and "b" is newer than what this process queues
    publishing = keeper_publishing(storage, keeper, mirror=behind, background=True)
    hook = publishing.hook
    with hook._lock:  # one batch: both sent before either answer is read
        hook(make_commit("a", 3))
        hook(make_commit("b", 4))
        hook(make_commit("c", 1))  # unknown to the mirror: keeper.save after the batch
    assert hook.flush(timeout=10)
    assert keeper.get("a") == make_commit("a", 3)
    assert keeper.get("b") == make_commit("b", 5)  # refused: never a rollback
    assert keeper.get("c") == make_commit("c", 1)
    hook.close()
