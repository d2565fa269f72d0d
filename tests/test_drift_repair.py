"""Repair on reconnect against a real ZooKeeper: a write that lands after an outage, or one
that never got through, is put right from the storage as soon as the client is back, not a
publish period later (issue 12)."""

from __future__ import annotations

from datetime import datetime
from datetime import timezone

import pytest
from kazoo.exceptions import BadVersionError
from kazoo.exceptions import RolledBackError

from rainer_server.commit import Commit
from rainer_server.storage.memory import MemoryCommitStorage
from rainer_server.zk.keeper import CommitKeeper
from rainer_server.zk.keeper import make_kazoo_client
from rainer_server.zk.publisher import AutoPublisher
from rainer_server.zk.publishing import keeper_publishing
from rainer_server.zk.repair import DriftRepair
from rainer_server.zk.znode import parse_znode
from tests.tcpproxy import TcpProxy
from tests.zk_support import wait_until

pytestmark = pytest.mark.zookeeper

MTIME = datetime(2026, 1, 1, tzinfo=timezone.utc)
BASE = "/drift"


def commit(key: str, version: int, payload: bytes | None = b'{"v":1}') -> Commit:
    return Commit(key, version, payload, "tester", f"v{version}", MTIME)


@pytest.fixture
def proxied(zk_chroot):
    """A client that reaches ZooKeeper through a proxy the test cuts, and its state log."""
    hosts, _, chroot = zk_chroot.partition("/")
    host, _, port = hosts.split(",")[0].rpartition(":")
    proxy = TcpProxy((host, int(port)))
    client = make_kazoo_client(f"{proxy.address}/{chroot}", session_timeout=10)
    client.start(timeout=10)
    states: list[str] = []
    client.add_listener(states.append)
    yield proxy, client, states
    proxy.cut()
    client.stop()
    client.close()


def znode_version(other, key: str) -> int | None:
    path = f"{BASE}/data/{key}"
    if not other.exists(path):
        return None
    data, _ = other.get(path)
    return parse_znode(key, data).version


def cut(proxy, client, states) -> None:
    proxy.cut()
    wait_until(lambda: "SUSPENDED" in states, what="the connection to drop")
    assert not client.connected


def test_keys_written_during_an_outage_are_repaired_as_soon_as_the_client_reconnects(
    proxied, zk
):
    proxy, client, states = proxied
    keeper = CommitKeeper(client, BASE, timeout=1.0)
    underlying = MemoryCommitStorage()
    storage = keeper_publishing(underlying, keeper)
    repair = DriftRepair(client, keeper, underlying, retry=0.2)
    repair.start()
    try:
        for key in ("moved", "deleted"):
            storage.save(commit(key, 1))
        assert znode_version(zk, "moved") == znode_version(zk, "deleted") == 1

        cut(proxy, client, states)
        # Saved while ZooKeeper is out of reach: acknowledged by the storage, not published.
        for version in (2, 3, 4):
            storage.save(commit("moved", version))
        storage.save(commit("deleted", 2))
        storage.save(commit("deleted", 3, payload=None))
        # Waited for, not read at once: until the repair's own state listener (called after
        # the test's, or before) has run, its thread may be holding the suspects it took.
        wait_until(lambda: repair.suspects == {"moved", "deleted"}, what="both keys suspected")
        # What a new ZooKeeper leader does with a write logged before the outage: it commits
        # it when quorum returns, over a znode nobody else could change meanwhile.
        other = CommitKeeper(zk, BASE)
        other.save(commit("moved", 2))
        other.save(commit("deleted", 2))
        assert znode_version(zk, "deleted") == 2  # the deleted key is back in ZooKeeper

        proxy.restore()
        # No publish pass anywhere: only the repair on reconnect can put these right.
        wait_until(
            lambda: znode_version(zk, "moved") == 4 and znode_version(zk, "deleted") is None,
            timeout=30,
            what="ZooKeeper to catch up with the storage after the reconnect",
        )
        assert zk.exists(f"{BASE}/deleted/deleted") is not None  # the deletion is recorded
        wait_until(lambda: not repair.suspects, what="no suspects left")
    finally:
        repair.close()


def test_a_keeper_write_queued_while_disconnected_is_defused_before_it_is_sent(proxied, zk):
    # kazoo sends a request queued during an outage first thing after reconnecting: its
    # compare-and-set would still match, long after the storage moved on.
    proxy, client, states = proxied
    keeper = CommitKeeper(client, BASE, timeout=1.0)
    keeper.save(commit("k", 1))
    _, stat = client.get(keeper.znode("k"))
    cut(proxy, client, states)

    transaction = client.transaction()
    transaction.set_data(keeper.znode("k"), commit("k", 2).serialize(), stat.version)
    queued = transaction.commit_async()
    keeper._defuse(transaction)  # what _transact does when the wait gives up

    proxy.restore()
    results = queued.get(timeout=15)
    assert isinstance(results[0], BadVersionError)
    assert all(isinstance(r, (BadVersionError, RolledBackError)) for r in results)
    assert znode_version(zk, "k") == 1


def test_a_save_that_fails_on_zookeeper_tells_the_suspect_listeners(proxied):
    proxy, client, states = proxied
    keeper = CommitKeeper(client, BASE, timeout=1.0)
    seen: list[str] = []
    keeper.suspect_listeners.append(seen.append)
    keeper.save(commit("k", 1))
    assert seen == []
    cut(proxy, client, states)
    with pytest.raises(Exception):
        keeper.save(commit("k", 2))
    assert seen == ["k"]


def test_a_leader_back_from_a_connection_loss_publishes_at_once_not_a_period_later(proxied, zk):
    proxy, client, states = proxied
    keeper = CommitKeeper(client, BASE, timeout=1.0)
    storage = MemoryCommitStorage()
    storage.save(commit("k", 1))
    keeper.save(commit("k", 1))
    # A period far longer than the test, first pass one period after winning: only a pass
    # at once after the loss can publish.
    publisher = AutoPublisher(client, keeper, storage, period=3600, fuzz=0.0, delay=True)
    publisher.start()
    try:
        wait_until(lambda: publisher.is_leader, timeout=30, what="leadership")
        cut(proxy, client, states)
        wait_until(lambda: not publisher.is_leader, what="the leader to step down")
        storage.save(commit("k", 2))  # by a process that died before publishing it
        proxy.restore()
        # Deadlines generous for a loaded machine, and still far below the period.
        # The pass counts itself after its writes, and records its counts after that: wait
        # for the znode and the counts, not only the znode or the count.
        wait_until(
            lambda: znode_version(zk, "k") == 2 and publisher.last_counts is not None,
            timeout=30,
            what="a pass right after the reconnect",
        )
        assert publisher.passes == 1
        assert publisher.last_counts.updated == 1
    finally:
        publisher.close()
