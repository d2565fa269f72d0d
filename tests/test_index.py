"""The global commit index: every storage numbers commits in the order they become visible,
and the feed (``changes``) hands a follower every commit after its index exactly once."""

from __future__ import annotations

import dataclasses
import multiprocessing
import threading
import time
import uuid
from datetime import timedelta

import pytest

from rainer_server.chain import GENESIS
from rainer_server.commit import Commit
from rainer_server.errors import CommitOrderingError
from rainer_server.storage.db import DbCommitStorage
from rainer_server.storage.db import open_database
from tests.conftest import make_storage
from tests.storage_contract import T0
from tests.storage_contract import commit


def test_indexes_follow_the_saves_and_are_not_part_of_equality(storage):
    assert storage.last_index() == 0
    assert storage.changes(0) == []
    kept = [storage.save(commit("a", 1)), storage.save(commit("b", 1)), storage.save(commit("a", 2))]
    assert [c.index for c in kept] == [1, 2, 3]
    assert storage.last_index() == 3
    assert storage.get("a").index == 3
    assert storage.get("a", 1).index == 1
    assert {k: c.index for k, c in storage.heads().items()} == {"a": 3, "b": 2}
    assert [c.index for c in storage.history("a")] == [3, 1]
    # The index is the journal's, not the commit's: a commit equals itself without it.
    assert storage.get("a") == commit("a", 2)
    assert "index" not in storage.get("a").meta


def test_the_feed_is_in_index_order_with_tombstones_limits_and_prefixes(storage):
    storage.save(commit("pay.a", 1))
    storage.save(commit("web.a", 1))
    storage.save(commit("pay.b", 1))
    storage.save(commit("pay.a", 2, None))
    storage.save(commit("pay", 1))
    feed = storage.changes(0)
    assert [(c.key, c.version, c.index) for c in feed] == [
        ("pay.a", 1, 1), ("web.a", 1, 2), ("pay.b", 1, 3), ("pay.a", 2, 4), ("pay", 1, 5),
    ]
    assert feed[3].empty
    assert [c.index for c in storage.changes(2, limit=2)] == [3, 4]
    assert [c.index for c in storage.changes(5)] == []
    assert [(c.key, c.index) for c in storage.changes(0, prefix="pay.")] == [
        ("pay.a", 1), ("pay.b", 3), ("pay.a", 4),
    ]
    assert [c.index for c in storage.changes(1, prefix="pay.", limit=1)] == [3]
    assert storage.changes(0, prefix="zzz") == []


def test_prefixes_compare_bytes(storage):
    for key in ("a\u00ff", "a\u00ffb", "a\U0010ffff", "b"):
        storage.save(commit(key, 1))
    assert [c.key for c in storage.changes(0, prefix="a\u00ff")] == ["a\u00ff", "a\u00ffb"]
    assert [c.key for c in storage.changes(0, prefix="a\U0010ffff")] == ["a\U0010ffff"]


def test_a_refused_save_takes_no_index(storage):
    storage.save(commit("k", 1))
    with pytest.raises(CommitOrderingError):
        storage.save(commit("k", 3))
    assert storage.save(commit("k", 2)).index == 2


def test_racing_threads_get_distinct_indexes_in_each_keys_version_order(storage):
    errors = []

    def writer(n: int) -> None:
        try:
            for version in range(1, 11):
                storage.save(commit(f"w{n}", version))
                while True:  # a shared key too, racing for each version
                    head = storage.get("shared")
                    try:
                        storage.save(commit("shared", (head.version if head else 0) + 1))
                        break
                    except CommitOrderingError:
                        continue
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    feed = storage.changes(0, limit=1000)
    assert [c.index for c in feed] == list(range(1, 81))
    _assert_versions_contiguous(feed)


def _assert_versions_contiguous(feed: list[Commit]) -> None:
    seen: dict[str, int] = {}
    for c in feed:
        assert c.version == seen.get(c.key, 0) + 1, f"{c.key} {c.version} after {seen.get(c.key)}"
        seen[c.key] = c.version


# ---------------------------------------------------------------------- racing processes


def _writer_process(url: str, table: str, name: str, count: int, acks) -> None:
    storage = DbCommitStorage(open_database(url), table)
    storage.start()
    for n in range(count):
        # Alternating: a key of its own (new keys, version 1) and the shared keys.
        key = f"{name}.{n}" if n % 2 else f"shared.{n % 3}"
        while True:
            head = storage.get(key)
            try:
                kept = storage.save(commit(key, (head.version if head else 0) + 1))
            except CommitOrderingError:
                continue
            acks.put((kept.key, kept.version, kept.index))
            break
    acks.put(None)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def test_a_feed_follower_sees_every_acknowledged_commit_once_in_order(kind, tmp_path, request):
    """Several processes commit to shared and new keys; a reader follows the feed meanwhile,
    each time from the last index it was given. It must see every acknowledged commit exactly
    once, in index order, each key's versions contiguous (no commit turns up late below an
    index already handed out)."""
    from tests.conftest import make_storage

    storage = make_storage(kind, tmp_path, request)
    url = f"sqlite:///{tmp_path}/rainer.db" if kind == "sqlite" else request.getfixturevalue("mysql_url")
    context = multiprocessing.get_context("spawn")
    acks = context.Queue()
    writers = [
        context.Process(target=_writer_process, args=(url, storage.table_name, f"p{n}", 60, acks))
        for n in range(3)
    ]
    for writer in writers:
        writer.start()
    seen: list[Commit] = []
    position = 0
    done = 0
    acknowledged = set()
    deadline = time.monotonic() + 120
    while done < len(writers) or len(seen) < len(acknowledged):
        assert time.monotonic() < deadline, "writers or follower stuck"
        page = storage.changes(position, limit=7)
        for c in page:
            assert c.index > position
            position = c.index
            seen.append(c)
        while not acks.empty():
            ack = acks.get()
            if ack is None:
                done += 1
            else:
                acknowledged.add(ack)
    for writer in writers:
        writer.join(30)
        assert writer.exitcode == 0
    assert storage.changes(position) == []
    triples = [(c.key, c.version, c.index) for c in seen]
    assert len(triples) == len(set(triples)) == 180
    assert set(triples) == acknowledged
    assert [c.index for c in seen] == sorted(c.index for c in seen)
    _assert_versions_contiguous(seen)


# ---------------------------------------------------------------------- migration


def test_an_unindexed_journal_is_numbered_in_history_order(db_storage):
    table = db_storage.table_name
    # Times as an import leaves them: "b" v2 says it is older than its own v1.
    rows = [("a", 1, 0), ("b", 1, 5), ("a", 2, 10), ("b", 2, 1), ("c", 1, 3)]
    for key, version, minutes in rows:
        db_storage.save(commit(key, version, mtime=T0 + timedelta(minutes=minutes)))
    quote = db_storage.database.quote[0]
    db_storage.database.execute_sql(f"UPDATE {table} SET commit_index = NULL")
    if not isinstance(db_storage.database, type(open_database("sqlite://"))):
        db_storage.database.execute_sql(f"DROP TABLE {quote}{table}_index{quote}")
    db_storage.stop()

    again = DbCommitStorage(db_storage.database, table)
    again.start()
    order = [(c.key, c.version) for c in again.changes(0)]
    # By time, each key's versions in order: b v2 sorts at b v1's time.
    assert order == [("a", 1), ("c", 1), ("b", 1), ("b", 2), ("a", 2)]
    assert [c.index for c in again.changes(0)] == [1, 2, 3, 4, 5]
    assert list(again.verify()) == []  # the chain does not include the index
    assert again.save(commit("c", 2)).index == 6
    again.start()
    assert again.last_index() == 6


def test_rows_written_without_an_index_are_numbered_after_the_rest(db_storage):
    db_storage.save(commit("a", 1))
    db_storage.save(commit("a", 2))
    # An earlier build, during a rolling upgrade, writes version 3 without an index.
    db_storage.database.execute_sql(
        f"UPDATE {db_storage.table_name} SET commit_index = NULL WHERE version = 2"
    )
    db_storage.stop()
    again = DbCommitStorage(db_storage.database, db_storage.table_name)
    again.start()
    numbered = [(c.version, c.index) for c in again.changes(0)]
    assert [v for v, _ in numbered] == [1, 2] and numbered[1][1] > 1
    assert again.save(commit("a", 3)).index == numbered[1][1] + 1


def test_indexes_survive_a_restart_and_new_storages_on_the_same_table(db_storage):
    db_storage.save(commit("a", 1))
    other = DbCommitStorage(db_storage.database, db_storage.table_name)
    other.start()
    assert other.save(commit("b", 1)).index == 2
    assert db_storage.save(commit("a", 2)).index == 3


def test_a_journal_row_keeps_its_chain_value_with_an_index(db_storage):
    kept = db_storage.save(dataclasses.replace(commit("a", 1), identity="alice"))
    assert kept.index == 1 and kept.identity == "alice"
    assert list(db_storage.verify()) == []
    assert GENESIS == ""


@pytest.fixture
def mysql_storage(request, tmp_path):
    return make_storage("mysql", tmp_path, request)


@pytest.mark.mysql
def test_a_save_with_the_counter_row_gone_is_kept_numbered_and_puts_the_counter_back(
    mysql_storage,
):
    # A save's packet commits even when its counter UPDATE matched nothing: the row must be
    # numbered after the rest, never given the connection's previous index.
    storage = mysql_storage
    storage.save(commit("a", 1))
    storage.save(commit("b", 1))
    storage.database.execute_sql(f"DELETE FROM `{storage.table_name}_index`")
    kept = storage.save(commit("a", 2))
    assert kept.index == 3
    assert [(c.key, c.version, c.index) for c in storage.changes(0)] == [
        ("a", 1, 1), ("b", 1, 2), ("a", 2, 3),
    ]
    assert storage.save(commit("c", 1)).index == 4
    assert list(storage.verify()) == []


@pytest.mark.mysql
def test_a_refused_mysql_save_leaves_no_transaction_open(mysql_storage):
    storage = mysql_storage
    storage.save(commit("a", 1))
    for late in (commit("a", 1), commit("a", 3)):  # the unique index, the retiring UPDATE
        with pytest.raises(CommitOrderingError):
            storage.save(late)
        assert not storage.database.connection().server_status & 0x0001  # SERVER_STATUS_IN_TRANS
    assert storage.save(commit("a", 2)).index == 2


@pytest.mark.mysql
def test_a_pooled_save_gives_its_connection_back_before_what_follows_it(mysql_url, request):
    # Under gevent each request borrows a pooled connection. A save's hook (publishing to
    # ZooKeeper) may wait long: it must not hold the connection meanwhile, or under load the
    # other requests wait past the database timeout for one (503s).
    from rainer_server.storage import with_post_save_hook

    database = open_database(mysql_url.replace("mysql://", "mysql+pool://", 1) + "?max_connections=4")
    storage = DbCommitStorage(database, table_name="t_" + uuid.uuid4().hex[:12])
    storage.start()
    request.addfinalizer(lambda: run_drop(storage))
    lent_during_hook = []
    hooked = with_post_save_hook(storage, lambda c: lent_during_hook.append(len(database._in_use)))
    hooked.save(commit("a", 1))
    hooked.save(commit("a", 2))
    assert lent_during_hook == [0, 0]
    assert storage.get("a").version == 2


def run_drop(storage):
    storage.database.connect(reuse_if_open=True)
    storage.database.execute_sql(f"DROP TABLE IF EXISTS {storage.table_name}")
    storage.database.execute_sql(f"DROP TABLE IF EXISTS {storage.table_name}_index")
    storage.stop()
