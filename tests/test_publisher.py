"""AutoPublisher against a real ZooKeeper: passes, repairs, fencing, election, scale."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from datetime import timedelta
from datetime import timezone

import pytest
from kazoo.client import KazooClient

from rainer_server.commit import Commit
from rainer_server.zk.keeper import CommitKeeper
from rainer_server.zk.keeper import make_kazoo_client
from rainer_server.zk.publisher import AutoPublisher
from rainer_server.zk.publisher import default_identifier
from rainer_server.storage.memory import MemoryCommitStorage
from tests.zk_support import wait_until
from tests.zk_support import expire_session

pytestmark = pytest.mark.zookeeper

MTIME = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=2)
BASE = "/rainer"
PERIOD = 0.3


def make_commit(
    key: str = "what",
    version: int = 1,
    payload: bytes | None = b'{"s":"xxx"}',
    author: str = "nobody",
) -> Commit:
    return Commit(key, version, payload, author, "nothing", MTIME)


def save_history(storage: MemoryCommitStorage, *heads: Commit) -> None:
    """Save versions 1..head.version of each head (earlier versions with other payloads)."""
    for head in heads:
        for version in range(1, head.version):
            storage.save(make_commit(head.key, version, b'{"old":%d}' % version))
        storage.save(head)


@pytest.fixture
def clients(zk_chroot):
    """Factory of started clients on the test's chroot, all stopped afterwards."""
    made: list[KazooClient] = []

    def make() -> KazooClient:
        c = make_kazoo_client(zk_chroot, session_timeout=10.0)
        c.start(timeout=15)
        c.ensure_path("/")
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
        c.close()


@pytest.fixture
def client(clients) -> KazooClient:
    return clients()


@pytest.fixture
def keeper(client) -> CommitKeeper:
    return CommitKeeper(client, BASE)


@pytest.fixture
def storage() -> MemoryCommitStorage:
    return MemoryCommitStorage()


@pytest.fixture
def publishers():
    """Publishers closed at teardown even when a test fails."""
    made: list[AutoPublisher] = []
    yield made
    for publisher in made:
        publisher.close()


def test_identifier_is_host_and_pid():
    import os
    import socket

    assert default_identifier() == f"{socket.gethostname()}:{os.getpid()}"


def test_fuzz_bounds(keeper, storage):
    values = iter([0.0, 0.5, 0.999999])
    publisher = AutoPublisher(
        keeper.client, keeper, storage, period=90, fuzz=0.2, rng=lambda: next(values)
    )
    assert publisher.next_interval() == pytest.approx(72.0)
    assert publisher.next_interval() == pytest.approx(90.0)
    assert publisher.next_interval() == pytest.approx(108.0, abs=1e-3)
    assert publisher.election_path == f"{BASE}/election"
    with pytest.raises(ValueError):
        AutoPublisher(keeper.client, keeper, storage, period=0)


def test_publish_all_handles_every_case_key_by_key(keeper, storage, zk, caplog, publishers):
    keeper.max_znode_bytes = 10_000
    save_history(
        storage,
        make_commit("new", 1),
        make_commit("update", 2),
        make_commit("tomb", 2, None),
        make_commit("same", 1),
        make_commit("gone", 2, None),
        make_commit("newer", 1),
        make_commit("big", 1, b"x" * 20_000),
        make_commit("corrupt", 1),
        make_commit("private-use-\ue000", 1),  # a name ZooKeeper refuses
    )
    zk.ensure_path(keeper.data_path)
    for commit in (
        make_commit("update", 1, b'{"old":1}'),
        make_commit("tomb", 1, b'{"old":1}'),
        make_commit("same", 1),
    ):
        zk.create(keeper.znode(commit.key), commit.serialize())
    zk.create(keeper.znode("newer"), make_commit("newer", 3, b"[3]").serialize())
    zk.create(keeper.znode("corrupt"), b"garbage")

    with keeper.mirror() as mirror:
        publisher = AutoPublisher(keeper.client, keeper, storage, mirror=mirror)
        publishers.append(publisher)  # it opens a mirror of deleted/, closed with it
        with caplog.at_level(logging.WARNING, logger="rainer_server.zk.publisher"):
            counts = publisher.publish_all()
        assert (counts.created, counts.updated, counts.deleted) == (1, 2, 1)
        assert (counts.unchanged, counts.refused, counts.failed) == (2, 3, 0)
        assert not counts.aborted
        assert "Failed to publish commit, will try again soon: newer" in caplog.text
        assert "Cannot publish commit big" in caplog.text

        expected = {
            "new": make_commit("new", 1),
            "update": make_commit("update", 2),
            "same": make_commit("same", 1),
            "newer": make_commit("newer", 3, b"[3]"),  # never rolled back
            "corrupt": make_commit("corrupt", 1),
        }
        assert keeper.heads() == expected

        # Once the mirror has caught up, a second pass writes nothing.
        wait_until(
            lambda: dict(mirror.current) == expected and not mirror.unparseable, what="the mirror"
        )
        again = publisher.publish_all()
        assert again.written == 0 and again.unchanged == 6 and again.refused == 3
        assert publisher.passes == 2 and publisher.last_counts is again


def test_publish_all_without_a_mirror_still_works(keeper, storage, publishers):
    save_history(storage, make_commit("a", 2))
    publisher = AutoPublisher(keeper.client, keeper, storage, mirror=None)
    publishers.append(publisher)
    publisher._owns_mirror = False  # as if the mirror could not be opened
    counts = publisher.publish_all()
    assert counts.created == 1
    assert publisher.publish_all().unchanged == 1
    assert keeper.heads() == {"a": make_commit("a", 2)}


def test_fenced_pass_writes_nothing(keeper, storage):
    save_history(storage, make_commit("a"), make_commit("b"))
    publisher = AutoPublisher(keeper.client, keeper, storage)
    try:
        counts = publisher.publish_all(may_write=lambda: False)
        assert counts.aborted and counts.written == 0
        assert keeper.heads() == {}
    finally:
        publisher.close()


def test_a_pass_that_cannot_read_the_database_is_an_aborted_pass(keeper):
    from rainer_server.errors import StorageUnavailable
    from rainer_server.storage.db import DbCommitStorage
    from rainer_server.storage.db import open_database

    # Port 9 (discard) on loopback refuses at once.
    unreachable = DbCommitStorage(open_database("mysql://root@127.0.0.1:9/rainer"))
    publisher = AutoPublisher(keeper.client, keeper, unreachable)
    seen = []
    publisher.pass_listeners.append(seen.append)
    try:
        with pytest.raises(StorageUnavailable):
            publisher.publish_all()
        assert len(seen) == 1 and seen[0].aborted and seen[0].written == 0
        assert publisher.passes == 1 and publisher.last_counts is seen[0]
    finally:
        publisher.close()


def test_publishes_at_once_without_delay_and_leaves_on_close(keeper, storage, publishers):
    save_history(storage, make_commit("a", 3), make_commit("b", 1))
    publisher = AutoPublisher(keeper.client, keeper, storage, period=PERIOD, fuzz=0.2, delay=False)
    publishers.append(publisher)
    publisher.start()
    wait_until(lambda: keeper.heads() == storage.heads(), what="the first pass")
    assert publisher.is_leader
    assert keeper.client.Election(keeper.election_path).contenders() == [default_identifier()]
    publisher.close()
    assert not publisher.is_leader and not publisher.running
    assert keeper.client.Election(keeper.election_path).contenders() == []


def test_first_pass_waits_one_period_and_later_ones_are_fuzzed(keeper, storage, publishers):
    """With the clock and sleep injected, 90 s periods run in milliseconds. ZooKeeper is in
    line with the storage: the new leader only compares (one heads() read) and waits."""
    now = [1000.0]
    lock = threading.Lock()

    def clock() -> float:
        with lock:
            return now[0]

    def sleep(seconds: float) -> None:
        with lock:
            now[0] += seconds
        time.sleep(0)

    pass_times: list[float] = []

    class RecordingStorage(MemoryCommitStorage):
        def heads(self):
            pass_times.append(clock())
            return super().heads()

    recording = RecordingStorage()
    recording.save(make_commit("a"))
    keeper.save(make_commit("a"))
    publisher = AutoPublisher(
        keeper.client, keeper, recording, period=90, fuzz=0.2, delay=True, clock=clock, sleep=sleep
    )
    publishers.append(publisher)
    start = clock()
    publisher.start()
    wait_until(lambda: len(pass_times) >= 6, what="the comparison and five passes")
    publisher.close()
    compared, pass_times[:] = pass_times[0], pass_times[1:]
    assert compared == start and publisher.passes >= 5
    assert 72 <= pass_times[0] - start <= 108 + 0.2
    gaps = [b - a for a, b in zip(pass_times, pass_times[1:], strict=False)]
    assert all(72 - 0.2 <= gap <= 108 + 0.2 for gap in gaps), gaps
    assert len({round(gap, 1) for gap in gaps}) > 1  # actually fuzzed
    assert keeper.heads() == {"a": make_commit("a")}


def test_deleted_and_corrupted_znodes_are_repaired_within_a_period(keeper, storage, zk, publishers):
    save_history(storage, make_commit("a", 2), make_commit("b", 1), make_commit("c", 1))
    publisher = AutoPublisher(keeper.client, keeper, storage, period=PERIOD, fuzz=0.2, delay=True)
    publishers.append(publisher)
    publisher.start()
    wait_until(lambda: keeper.heads() == storage.heads(), what="the first pass")

    broken = time.monotonic()
    zk.delete(keeper.znode("a"))
    zk.set(keeper.znode("b"), b"\x00corrupt")
    wait_until(lambda: keeper.heads() == storage.heads(), what="the repair")
    elapsed = time.monotonic() - broken
    # One period plus fuzz, plus the mirror's notification latency; two periods when the
    # next pass read the mirror before it saw the damage (that pass skips the keys). Still far
    # below the default 90 s period a repair must not wait for.
    assert elapsed < 2 * PERIOD * 1.2 + 3.0, elapsed


def test_newer_znode_is_never_rolled_back(keeper, storage, zk, publishers, caplog):
    save_history(storage, make_commit("a", 2))
    zk.create(keeper.znode("a"), make_commit("a", 3, b"[3]").serialize(), makepath=True)
    _, before = zk.get(keeper.znode("a"))
    publisher = AutoPublisher(keeper.client, keeper, storage, period=0.1, fuzz=0.2, delay=False)
    publishers.append(publisher)
    with caplog.at_level(logging.WARNING, logger="rainer_server.zk.publisher"):
        publisher.start()
        wait_until(lambda: publisher.passes >= 3, what="three passes")
    data, after = zk.get(keeper.znode("a"))
    assert data == make_commit("a", 3, b"[3]").serialize()
    assert after.mzxid == before.mzxid
    assert publisher.last_counts.refused == 1
    assert "Failed to publish commit, will try again soon: a" in caplog.text


def test_two_publishers_exactly_one_leads_and_closing_it_hands_over(
    clients, storage, zk, publishers
):
    save_history(storage, make_commit("a"), make_commit("b", 2))
    made = []
    for name in ("first", "second"):
        keeper = CommitKeeper(clients(), BASE)
        publisher = AutoPublisher(
            keeper.client, keeper, storage, period=PERIOD, fuzz=0.2, delay=False, identifier=name
        )
        publishers.append(publisher)
        made.append(publisher)
    first, second = made
    first.start()
    wait_until(lambda: first.is_leader, what="the first publisher to lead")
    second.start()
    election = zk.Election(BASE + "/election")
    wait_until(lambda: election.contenders() == ["first", "second"], what="both contenders")
    # The second waits behind the first, over several periods.
    deadline = time.monotonic() + 3 * PERIOD
    while time.monotonic() < deadline:
        assert first.is_leader and not second.is_leader
        time.sleep(0.02)
    assert second.passes == 0

    first.close()
    wait_until(lambda: second.is_leader, what="the hand-over")
    assert not first.is_leader
    assert election.contenders() == ["second"]
    # The new leader repairs.
    zk.delete(CommitKeeper(zk, BASE).znode("a"))
    wait_until(
        lambda: CommitKeeper(zk, BASE).get("a") == make_commit("a"), what="the new leader's repair"
    )


def test_leader_session_expiry_stops_leading_then_rejoins_and_repairs(
    keeper, storage, zk, zk_chroot, publishers, caplog
):
    caplog.set_level(logging.INFO, logger="rainer_server.zk.publisher")
    save_history(storage, make_commit("a"))
    publisher = AutoPublisher(keeper.client, keeper, storage, period=PERIOD, fuzz=0.2, delay=False)
    publishers.append(publisher)
    publisher.start()
    wait_until(lambda: publisher.is_leader and keeper.get("a") is not None, what="leadership")

    expire_session(keeper.client, zk_chroot, wait_for_new_session=False)
    wait_until(
        lambda: "Stopped automatic commit publishing" in caplog.text, what="the leader to stop"
    )
    wait_until(lambda: publisher.is_leader, what="leadership after the new session")
    assert caplog.text.count("Starting automatic commit publishing") >= 2
    # Exactly one contender: the old session's node went with it.
    assert len(zk.Election(keeper.election_path).contenders()) == 1
    zk.delete(keeper.znode("a"))
    wait_until(lambda: keeper.get("a") == make_commit("a"), what="the repair after the new session")


def test_ten_thousand_unchanged_keys_make_no_writes(
    client, keeper, storage, zk, record_property, publishers
):
    count = 10_000
    commits = [make_commit(f"key-{i:05d}", 1, b'{"value":%d}' % i) for i in range(count)]
    for commit in commits:
        storage.save(commit)
    zk.ensure_path(keeper.data_path)
    # Batched creates: 10k single creates would cost seconds of test time.
    pending = []
    for start in range(0, count, 500):
        transaction = zk.transaction()
        for commit in commits[start : start + 500]:
            transaction.create(keeper.znode(commit.key), commit.serialize())
        pending.append(transaction.commit_async())
    for result in pending:
        assert all(r is not None and not isinstance(r, Exception) for r in result.get(timeout=30))

    started = time.monotonic()
    mirror = keeper.mirror(timeout=60)
    mirror_seconds = time.monotonic() - started
    try:
        assert len(mirror.current) == count
        _, parent_before = zk.get(keeper.data_path)
        publisher = AutoPublisher(client, keeper, storage, mirror=mirror)
        publishers.append(publisher)
        started = time.monotonic()
        counts = publisher.publish_all()
        seconds = time.monotonic() - started
    finally:
        mirror.close()
    record_property("ten_thousand_pass_seconds", seconds)
    record_property("ten_thousand_mirror_seconds", mirror_seconds)
    print(
        f"\n10k unchanged pass: {seconds * 1000:.1f} ms (mirror opened in {mirror_seconds:.2f} s)"
    )
    assert counts.unchanged == count and counts.written == 0 and counts.refused == 0
    assert seconds < 1.0

    # ZooKeeper's own evidence: no child created or deleted, no data version changed.
    _, parent_after = zk.get(keeper.data_path)
    assert parent_after.cversion == parent_before.cversion
    pending = []
    for start in range(0, count, 1000):
        transaction = zk.transaction()
        for commit in commits[start : start + 1000]:
            transaction.check(keeper.znode(commit.key), 0)
        pending.append(transaction.commit_async())
    for result in pending:
        assert all(r is True for r in result.get(timeout=30))

    # Batched deletes too: the chroot's recursive delete would take one round trip per znode.
    pending = []
    for start in range(0, count, 1000):
        transaction = zk.transaction()
        for commit in commits[start : start + 1000]:
            transaction.delete(keeper.znode(commit.key))
        pending.append(transaction.commit_async())
    for result in pending:
        result.get(timeout=30)


def test_leader_whose_election_node_is_deleted_steps_down_and_rejoins(
    keeper, storage, zk, publishers, caplog
):
    caplog.set_level(logging.INFO, logger="rainer_server.zk.publisher")
    save_history(storage, make_commit("a"))
    publisher = AutoPublisher(keeper.client, keeper, storage, period=0.1, fuzz=0.2, delay=False)
    publishers.append(publisher)
    publisher.start()
    wait_until(lambda: publisher.is_leader, what="leadership")
    (node,) = zk.get_children(keeper.election_path)
    zk.delete(f"{keeper.election_path}/{node}")  # an operator cleaning up
    wait_until(lambda: "Stopped automatic commit publishing" in caplog.text, what="the step-down")
    wait_until(
        lambda: publisher.is_leader and len(zk.get_children(keeper.election_path)) == 1,
        what="leadership with a new election node",
    )
    assert zk.get_children(keeper.election_path) != [node]


# ---------------------------------------------------------------- an unusable database


def failed_pass_lines(caplog) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "rainer_server.zk.publisher" and "Failed to publish commits" in r.message
    ]


def test_a_leader_without_its_database_logs_one_line_per_pass(keeper, publishers, caplog):
    from rainer_server.storage.db import DbCommitStorage
    from rainer_server.storage.db import open_database

    caplog.set_level(logging.DEBUG)
    # Port 9 (discard) on loopback refuses at once.
    unreachable = DbCommitStorage(open_database("mysql://root@127.0.0.1:9/rainer"))
    publisher = AutoPublisher(
        keeper.client, keeper, unreachable, period=0.05, fuzz=0.0, delay=False
    )
    publishers.append(publisher)
    publisher.start()
    wait_until(lambda: publisher.passes >= 3, what="three failed passes")
    publisher.close()
    lines = failed_pass_lines(caplog)
    assert len(lines) == publisher.passes
    assert all(r.levelno == logging.WARNING and "\n" not in r.getMessage() for r in lines)
    assert "Database unavailable" in lines[0].getMessage()
    # One line per pass in all: the storage leaves the reporting to the publisher.
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == lines
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "Traceback" not in caplog.text


def test_a_leader_starts_its_storage_before_its_first_pass(keeper, publishers, caplog, tmp_path):
    from rainer_server.storage.db import DbCommitStorage
    from rainer_server.storage.db import open_database

    caplog.set_level(logging.DEBUG)
    # A SQLite file whose table nobody created yet (the web app creates it on its first
    # request), in a directory that does not exist yet either.
    url = f"sqlite:///{tmp_path}/later/rainer.db"
    storage = DbCommitStorage(open_database(url))
    publisher = AutoPublisher(keeper.client, keeper, storage, period=0.05, fuzz=0.0, delay=False)
    publishers.append(publisher)
    passes = []
    publisher.pass_listeners.append(passes.append)
    publisher.start()
    # The lines, not passes: the leader logs a failed pass after the pass has counted itself.
    wait_until(lambda: len(failed_pass_lines(caplog)) >= 2, what="two failed passes")
    assert "unable to open database file" in failed_pass_lines(caplog)[0].message

    (tmp_path / "later").mkdir()
    wait_until(
        lambda: publisher.last_counts is not None and not publisher.last_counts.aborted,
        what="a pass once the file can be made",
    )
    writer = DbCommitStorage(open_database(url))  # the table is there: the publisher made it
    writer.save(make_commit("a"))
    wait_until(lambda: keeper.get("a") == make_commit("a"), what="the commit to be published")
    # A pass whose mirror did not show "a" yet tries to write it, and close() landing then
    # stops it: an aborted pass with a warning of its own and no "Failed" line. Passes that
    # start once the mirror shows "a" write nothing, so none can be stopped mid-way.
    wait_until(
        lambda: publisher._mirror is not None
        and publisher._mirror.current.get("a") == make_commit("a"),
        what="the publisher's mirror to show the commit",
    )
    mirrored = len(passes)  # the pass under way then ends as pass mirrored + 1
    wait_until(lambda: len(passes) > mirrored, what="the pass under way to end")
    publisher.close()
    writer.stop()
    storage.stop()
    lines = failed_pass_lines(caplog)
    assert all(r.levelno == logging.WARNING for r in lines)
    assert len(lines) == sum(1 for counts in passes if counts.aborted) >= 2
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == lines
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_a_pass_that_left_keys_behind_is_tried_again_within_seconds_not_a_period_later(
    keeper, publishers, tmp_path
):
    from rainer_server.storage.db import DbCommitStorage
    from rainer_server.storage.db import open_database

    (tmp_path / "db").mkdir()
    url = f"sqlite:///{tmp_path}/db/rainer.db"
    writer = DbCommitStorage(open_database(url))
    writer.start()
    writer.save(make_commit("a"))
    writer.stop()
    # The leader's first pass finds no database (its volume not mounted yet, say) ...
    (tmp_path / "db").rename(tmp_path / "away")
    storage = DbCommitStorage(open_database(url))
    publisher = AutoPublisher(keeper.client, keeper, storage, period=3600, fuzz=0.0, delay=False)
    publishers.append(publisher)
    publisher.start()
    # last_counts, not passes: a pass counts itself before it records its counts.
    wait_until(lambda: publisher.last_counts is not None, what="the first pass")
    assert publisher.last_counts.aborted and keeper.get("a") is None
    # ... which is back a moment later: the next pass comes within seconds, not in an hour.
    (tmp_path / "away").rename(tmp_path / "db")
    wait_until(lambda: keeper.get("a") == make_commit("a"), timeout=30,
               what="a pass soon after the failed one")
    wait_until(lambda: not publisher.last_counts.aborted, what="the pass to count itself")
    publisher.close()
    storage.stop()
