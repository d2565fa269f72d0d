"""Rainers and the keeper-publishing storage, including ZooKeeper outages.

The outage tests stop, freeze and restart a ZooKeeper of their own, so that the session's
shared server is never disturbed.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from datetime import datetime
from datetime import timedelta
from datetime import timezone

import pytest

from rainer_server.commit import Commit
from rainer_server.errors import CommitOrderingError
from rainer_server.zk.keeper import make_kazoo_client
from rainer_server.zk.publisher import default_identifier
from rainer_server.zk.rainers import Rainers
from rainer_server.storage.memory import MemoryCommitStorage
from rainer_server.zk.publishing import keeper_publishing
from tests.zk_support import wait_until
from tests.zk_support import started_client

pytestmark = pytest.mark.zookeeper

MTIME = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=2)
BASE = "/rainer"
PERIOD = 0.3
SAVE_BOUND = 2.5  # "about 2 s": the keeper's 2 s timeout plus scheduling slack


def make_commit(
    key: str = "what", version: int = 1, payload: bytes | None = b'{"s":"xxx"}'
) -> Commit:
    return Commit(key, version, payload, "nobody", "nothing", MTIME)



def freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until every one of its threads is actually stopped."""
    os.kill(pid, signal.SIGSTOP)

    def stopped() -> bool:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
            states = [
                open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[0]
                for t in tasks
            ]
        except OSError:
            return False
        return all(state in ("T", "t") for state in states)

    wait_until(stopped, what="the server to freeze")


def timed_save(storage, commit: Commit) -> float:
    started = time.monotonic()
    storage.save(commit)
    return time.monotonic() - started


@pytest.fixture
def client(zk_chroot):
    yield from started_client(zk_chroot)


@pytest.fixture
def rainers(client):
    r = Rainers.create(client, BASE, MemoryCommitStorage(), period=PERIOD, fuzz=0.2, delay=False)
    yield r
    r.stop()


def test_create_wires_the_pieces(rainers, client):
    underlying = rainers.storage.storage
    assert isinstance(underlying, MemoryCommitStorage)
    assert rainers.auto_publisher.storage is underlying  # publishes the system of record
    assert rainers.auto_publisher.keeper is rainers.keeper
    assert rainers.keeper.base_path == BASE
    assert rainers.auto_publisher.election_path == BASE + "/election"

    # Writes through the keeper-publishing storage reach ZooKeeper at once (no publisher yet).
    rainers.storage.save(make_commit("a", 1))
    assert underlying.get("a") == make_commit("a", 1)
    assert rainers.keeper.get("a") == make_commit("a", 1)
    rainers.storage.save(make_commit("a", 2, b"[2]"))
    assert rainers.keeper.get("a") == make_commit("a", 2, b"[2]")
    rainers.storage.save(make_commit("a", 3, None))
    assert rainers.keeper.get("a") is None
    assert rainers.storage.get("a", 2) == make_commit("a", 2, b"[2]")  # reads: the storage


def test_start_publishes_what_bypassed_the_keeper_and_stop_leaves(rainers, client):
    rainers.storage.storage.save(make_commit("direct", 1))  # straight into the database
    assert rainers.keeper.get("direct") is None
    rainers.start()
    wait_until(lambda: rainers.keeper.get("direct") == make_commit("direct"), what="the publisher")
    assert rainers.auto_publisher.is_leader
    assert client.Election(BASE + "/election").contenders() == [default_identifier()]
    rainers.stop()
    assert not rainers.auto_publisher.is_leader
    assert client.Election(BASE + "/election").contenders() == []


def test_keeper_refusals_are_logged_and_suppressed(rainers, zk, caplog):
    zk.create(rainers.keeper.znode("a"), make_commit("a", 5, b"[5]").serialize(), makepath=True)
    with caplog.at_level(logging.WARNING, logger="rainer_server.storage.publishing"):
        rainers.storage.save(make_commit("a", 1))
    assert rainers.storage.get("a") == make_commit("a", 1)  # the database took it
    assert rainers.keeper.get("a") == make_commit("a", 5, b"[5]")  # ZooKeeper kept the newer
    assert "Failed to publish commit, will try again soon: a" in caplog.text


def test_storage_errors_propagate_and_nothing_is_published(rainers):
    with pytest.raises(CommitOrderingError):
        rainers.storage.save(make_commit("a", 2))
    assert rainers.keeper.get("a") is None


def test_keeper_publishing_fails_fast_without_a_connection(zk_chroot, caplog):
    from rainer_server.zk.keeper import CommitKeeper

    never_started = make_kazoo_client(zk_chroot)
    # A window long enough that the second save's bound, loose for a loaded machine, still
    # tells failing at once from waiting the window out again.
    keeper = CommitKeeper(never_started, BASE, timeout=1.0)
    storage = keeper_publishing(MemoryCommitStorage(), keeper)
    with caplog.at_level(logging.WARNING, logger="rainer_server.storage.publishing"):
        # The first save waits out the keeper's first-connect window, bounded by its timeout.
        assert timed_save(storage, make_commit()) < 2.0
        assert timed_save(storage, make_commit(version=2)) < 0.5
    assert storage.get("what") == make_commit(version=2)
    assert "the auto-publisher will retry" in caplog.text
    never_started.close()


# ---------------------------------------------------------------- outages (own ZooKeeper)


@pytest.fixture(scope="module")
def own_zk(tmp_path_factory):
    from tests.conftest import service_missing
    from tests.zkserver import ZooKeeperServer

    server = ZooKeeperServer(tmp_path_factory.mktemp("zk-outage"))
    try:
        server.start()
    except Exception as exc:
        service_missing(f"cannot start a dedicated ZooKeeper: {exc}")
    yield server
    server.stop()


@pytest.fixture
def own_rainers(own_zk):
    own_zk.start()  # a previous test may have left it stopped
    c = make_kazoo_client(own_zk.hosts, session_timeout=10.0)
    c.start(timeout=15)
    base = "/outage-" + uuid.uuid4().hex
    r = Rainers.create(c, base, MemoryCommitStorage(), period=PERIOD, fuzz=0.2, delay=True)
    r.start()
    yield r
    if own_zk.pid is not None:
        os.kill(own_zk.pid, signal.SIGCONT)
    own_zk.start()
    r.stop()
    c.stop()
    c.close()


def test_saves_succeed_while_zookeeper_is_down_and_the_publisher_repairs(
    own_zk, own_rainers, caplog
):
    r = own_rainers
    client = r.keeper.client
    r.storage.save(make_commit("a", 1))
    assert r.keeper.get("a") == make_commit("a", 1)
    wait_until(lambda: r.auto_publisher.is_leader, what="leadership")

    own_zk.stop()
    wait_until(lambda: not client.connected, what="the client to notice")
    wait_until(lambda: not r.auto_publisher.is_leader, what="the leader to stop on SUSPENDED")
    with caplog.at_level(logging.WARNING, logger="rainer_server.storage.publishing"):
        for commit in (
            make_commit("a", 2, b"[2]"),
            make_commit("b", 1),
            make_commit("a", 3, b"[3]"),
        ):
            assert timed_save(r.storage, commit) < SAVE_BOUND
    assert "the auto-publisher will retry" in caplog.text
    assert r.storage.get("a").version == 3 and r.storage.get("b") is not None

    # After start() returns: it blocks until the JVM answers, which under load can take
    # longer than the whole bound and is not what the bound is about.
    own_zk.start()
    restarted = time.monotonic()
    wait_until(
        lambda: (
            client.connected
            and r.keeper.get("a") == make_commit("a", 3, b"[3]")
            and r.keeper.get("b") == make_commit("b", 1)
        ),
        timeout=15,
        what="the publisher to repair ZooKeeper",
    )
    converged = time.monotonic() - restarted
    # Reconnect (backoff capped at ~1 s) + at most one fuzzed period + re-election.
    assert converged < PERIOD * 1.2 + 5.0, converged
    # The keys whose saves failed may be repaired on reconnecting (DriftRepair) before the
    # election is won again: leadership is waited for, not assumed.
    wait_until(lambda: r.auto_publisher.is_leader, timeout=15, what="leadership again")


def test_a_save_does_not_hang_on_an_unresponsive_zookeeper(own_zk, own_rainers, caplog):
    r = own_rainers
    r.storage.save(make_commit("a", 1))
    # A frozen server keeps its TCP connections open: the client still believes it is connected
    # until the session's read timeout, so only the keeper's bounded wait protects the save.
    freeze(own_zk.pid)
    try:
        assert r.keeper.client.connected
        with caplog.at_level(logging.WARNING, logger="rainer_server.storage.publishing"):
            assert timed_save(r.storage, make_commit("a", 2, b"[2]")) < SAVE_BOUND
        assert r.storage.get("a").version == 2
        assert "did not answer" in caplog.text or "Not connected" in caplog.text
    finally:
        os.kill(own_zk.pid, signal.SIGCONT)
    wait_until(
        lambda: r.keeper.client.connected and r.keeper.get("a") == make_commit("a", 2, b"[2]"),
        timeout=15,
        what="ZooKeeper to catch up",
    )
