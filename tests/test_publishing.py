"""Publishing a save: one compare-and-set from the mirror's znode version, and what a crash
leaves (repaired by the elected publisher)."""

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


# ---------------------------------------------------------------- a crash


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
    publishing = keeper_publishing(storage, CommitKeeper(client, "/rainer"))
    print("ready", flush=True)
    sys.stdin.readline()
    for key in ("x", "y", "z"):
        publishing.save(Commit(key, 1, b"{}", "nobody", "", datetime.now(timezone.utc)))
    print("saved", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # a crash: no retry, no repair from this process
    """
)


def test_saves_a_crash_left_unpublished_are_repaired_by_the_publisher(
    zk_chroot, client, keeper, tmp_path
):
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
        # ZooKeeper stops answering the writer (connected, but silent): each of its saves
        # gives up publishing after the keeper's timeout, and then the process dies.
        proxy.pause()
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "saved"
        assert writer.wait(timeout=30) == -9
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
