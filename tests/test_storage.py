"""The storage contract over memory, SQLite and MySQL, plus what only the DB storages do."""

from __future__ import annotations

import threading
import time

import pytest

from rainer_server.errors import ConfigurationError
from rainer_server.errors import StorageUnavailable
from rainer_server.storage import with_post_save_hook
from rainer_server.storage import with_pre_save_hook
from rainer_server.storage.db import DbCommitStorage
from rainer_server.storage.db import check_database
from rainer_server.storage.db import open_database
from tests.storage_contract import *  # noqa: F401,F403 (the contract's test functions)
from tests.storage_contract import commit
from tests.storage_contract import save_versions
from tests.zkserver import free_port


def test_heads_token_counts_commits(storage):
    assert storage.heads_token() == 0
    save_versions(storage, "a", 3)
    save_versions(storage, "b", 2)
    assert storage.heads_token() == 5
    storage.save(commit("a", 4, None))
    assert storage.heads_token() == 6


def test_post_save_hook_runs_only_after_success(storage):
    seen = []
    hooked = with_post_save_hook(storage, seen.append)
    c = commit("k", 1)
    hooked.save(c)
    with pytest.raises(Exception):
        hooked.save(commit("k", 5))
    assert seen == [c]
    assert hooked.get("k") == c and hooked.heads() == {"k": c}


def test_pre_save_hook_can_veto(storage):
    def refuse(c):
        raise ValueError("no")

    with pytest.raises(ValueError):
        with_pre_save_hook(storage, refuse).save(commit("k", 1))
    assert storage.get("k") is None


def test_journal_is_queryable_in_sql(db_storage):
    save_versions(db_storage, "audit", 2)
    db_storage.save(commit("audit", 3, None, author="bob", comment="delete it"))
    db = db_storage.database
    quoted_key = db.quote[0] + "key" + db.quote[1]
    rows = db.execute_sql(
        f"SELECT version, author, comment, is_empty, is_head FROM {db_storage.table_name} "
        f"WHERE {quoted_key} = {db.param} ORDER BY version",
        (b"audit",),
    ).fetchall()
    assert [tuple(r) for r in rows] == [
        (1, "alice", "change 1", 0, 0),
        (2, "alice", "change 2", 0, 0),
        (3, "bob", "delete it", 1, 1),
    ]


def test_start_is_idempotent(db_storage):
    save_versions(db_storage, "k", 1)
    db_storage.start()
    assert db_storage.get("k").version == 1


def test_unreachable_mysql_is_storage_unavailable(caplog):
    # Port 9 (discard) on loopback refuses at once: the storage must say "unavailable", fast.
    storage = DbCommitStorage(open_database("mysql://root@127.0.0.1:9/rainer"))
    with pytest.raises(StorageUnavailable) as info:
        storage.get("k")
    assert "\n" not in str(info.value)
    # What clients may see: no host, port or driver text. The log has those.
    assert str(info.value) == "Database unavailable"
    # The driver's reason travels with the error, for the log line of whoever handles it.
    assert "Can't connect to MySQL server on '127.0.0.1'" in info.value.detail


# peewee hands PyMySQL the password as "passwd", which it calls deprecated.
@pytest.mark.filterwarnings("ignore:'passwd' is deprecated:DeprecationWarning")
def test_check_database_tells_refusals_from_outages(tmp_path):
    assert check_database(f"sqlite:///{tmp_path}/ok.db") is None
    with pytest.raises(ConfigurationError) as info:
        check_database(f"sqlite:///{tmp_path}/missing/dir/x.db")
    assert str(info.value) == "unable to open database file"
    down = check_database(f"mysql://root:pw-31337@127.0.0.1:{free_port()}/rainer")
    assert down is not None and "(MySQL error 2003)" in down and "pw-31337" not in down


@pytest.mark.mysql
def test_check_database_refuses_an_unknown_mysql_database(mysql_url):
    assert check_database(mysql_url) is None
    with pytest.raises(ConfigurationError) as info:
        check_database(mysql_url.rsplit("/", 1)[0] + "/rainer_no_such_database")
    assert str(info.value) == "Unknown database 'rainer_no_such_database' (MySQL error 1049)"


@pytest.mark.mysql
def test_mysql_reconnects_after_the_connection_is_killed(mysql_url, tmp_path, request):
    from tests.conftest import make_storage

    storage = make_storage("mysql", tmp_path, request)
    save_versions(storage, "k", 1)
    killer = open_database(mysql_url)
    connection_id = storage.database.execute_sql("SELECT CONNECTION_ID()").fetchone()[0]
    killer.execute_sql(f"KILL {int(connection_id)}")
    killer.close()
    # Both a read and a write go through on a fresh connection, transparently.
    assert storage.get("k").version == 1
    killer = open_database(mysql_url)
    connection_id = storage.database.execute_sql("SELECT CONNECTION_ID()").fetchone()[0]
    killer.execute_sql(f"KILL {int(connection_id)}")
    killer.close()
    storage.save(commit("k", 2))
    assert storage.get("k").version == 2


def test_bad_database_urls_are_value_errors():
    for url in ("postgres://x/y", "mysql://db", "nonsense"):
        with pytest.raises(ValueError):
            open_database(url)


@pytest.mark.mysql
def test_mysql_save_chosen_as_deadlock_victim_is_retried_not_refused(mysql_url, tmp_path, request):
    """A deadlock is no proof that the commit is late: the save runs again and succeeds."""
    import pymysql

    from tests.conftest import make_storage

    storage = make_storage("mysql", tmp_path, request)
    save_versions(storage, "k", 1)
    params = open_database(mysql_url).connect_params
    other = pymysql.connect(database=open_database(mysql_url).database, **params)
    request.addfinalizer(other.close)
    table = storage.table_name
    cursor = other.cursor()
    cursor.execute("BEGIN")
    # Heavier than the save (InnoDB rolls back the transaction that changed fewer rows).
    for n in range(20):
        cursor.execute(
            f"INSERT INTO {table} (`key`, version, author, comment, mtime, is_empty, is_head, "
            "payload) VALUES (%s, 1, 'x', 'x', '2014-01-01', 0, 1, '')", (f"heavy-{n}".encode(),)
        )
    # A gap lock where the save's new head row goes: the save's INSERT waits for it...
    cursor.execute(
        f"SELECT * FROM {table} WHERE is_head = 1 AND `key` = %s AND version = 2 FOR UPDATE",
        (b"k",),
    )
    outcome = []

    def save() -> None:
        try:
            storage.save(commit("k", 2))
            outcome.append("saved")
        except Exception as exc:  # reported below
            outcome.append(exc)

    saver = threading.Thread(target=save)
    saver.start()
    time.sleep(0.5)  # the save holds the old head's row and waits at its INSERT
    # ...and this waits for the save's row: a deadlock, and the save is the victim.
    cursor.execute(
        f"UPDATE {table} SET comment = 'y' WHERE is_head = 1 AND `key` = %s AND version = 1",
        (b"k",),
    )
    time.sleep(0.2)  # the retried save now waits for this transaction
    other.rollback()
    saver.join(timeout=10)
    assert outcome == ["saved"]
    assert storage.get("k") == commit("k", 2)
    assert [c.version for c in storage.history("k")] == [2, 1]


# ---------------------------------------------------------------------- pages of heads


PAGE_KEYS = ["a", "a%b", "a_b", "ab", "Ab", "b.1", "b.2", "b.10", "é", "web.pool", "web.pools"]


def _page_storage(storage):
    for key in PAGE_KEYS:
        storage.save(Commit(key, 1, b'{"k": "%s"}' % key.encode(), "alice", "", T0))
    storage.save(Commit("b.2", 2, None, "bob", "gone", T0))
    return storage


def _keys(page):
    return [row.key for row in page.rows]


def test_pages_of_heads_in_byte_order(storage):
    from rainer_server.storage import page_of_heads
    from rainer_server.storage import paged_heads

    _page_storage(storage)
    byte_order = sorted((k for k in PAGE_KEYS if k != "b.2"), key=lambda k: k.encode())
    first = page_of_heads(storage, limit=4)
    assert _keys(first) == byte_order[:4] and first.has_next and not first.has_previous
    second = page_of_heads(storage, after=first.rows[-1].key, limit=4)
    assert _keys(second) == byte_order[4:8] and second.has_next and second.has_previous
    last = page_of_heads(storage, after=second.rows[-1].key, limit=4)
    assert _keys(last) == byte_order[8:] and not last.has_next
    back = page_of_heads(storage, before=last.rows[0].key, limit=4)
    assert _keys(back) == _keys(second) and back.has_previous and back.has_next
    start = page_of_heads(storage, before=second.rows[0].key, limit=4)
    assert _keys(start) == _keys(first) and not start.has_previous
    # Sizes and metas, never payloads; tombstones on request.
    row = first.rows[0]
    assert (row.key, row.version, row.author, row.mtime, row.size) == ("Ab", 1, "alice", T0, 11)
    with_deleted = page_of_heads(storage, prefix="b.", include_empty=True)
    assert _keys(with_deleted) == ["b.1", "b.10", "b.2"]
    assert with_deleted.rows[2].empty and with_deleted.rows[2].version == 2
    assert paged_heads(storage).heads_count("", "", False) == len(PAGE_KEYS) - 1
    assert paged_heads(storage).heads_count("", "", True) == len(PAGE_KEYS)


def test_pages_of_heads_filter_byte_for_byte(storage):
    from rainer_server.storage import page_of_heads
    from rainer_server.storage import paged_heads

    _page_storage(storage)
    assert _keys(page_of_heads(storage, prefix="a")) == ["a", "a%b", "a_b", "ab"]
    assert _keys(page_of_heads(storage, prefix="a%")) == ["a%b"]  # not a wildcard
    assert _keys(page_of_heads(storage, prefix="a_")) == ["a_b"]
    assert _keys(page_of_heads(storage, prefix="A")) == ["Ab"]  # case matters
    assert _keys(page_of_heads(storage, prefix="web.pool")) == ["web.pool", "web.pools"]
    assert _keys(page_of_heads(storage, prefix="é")) == ["é"]
    assert _keys(page_of_heads(storage, contains="b.1")) == ["b.1", "b.10"]
    assert _keys(page_of_heads(storage, contains="B")) == []
    assert _keys(page_of_heads(storage, contains="%")) == ["a%b"]
    assert _keys(page_of_heads(storage, prefix="web", contains="s")) == ["web.pools"]
    assert paged_heads(storage).heads_count("b.", "", False) == 2
    assert paged_heads(storage).heads_count("", "pool", False) == 2


def test_pages_of_heads_leave_out_what_the_caller_may_not_read(storage):
    from rainer_server.storage import page_of_heads

    _page_storage(storage)
    for n in range(300):
        storage.save(Commit(f"hidden.{n:03d}", 1, b"1", "alice", "", T0))
    visible = lambda key: not key.startswith("hidden.")  # noqa: E731
    first = page_of_heads(storage, limit=3, visible=visible, prefix="h")
    assert first.rows == [] and not first.has_next
    page = page_of_heads(storage, limit=5, visible=visible, after="b.2")
    assert _keys(page) == ["web.pool", "web.pools", "é"] and not page.has_next
    back = page_of_heads(storage, limit=2, visible=visible, before="web.pools")
    assert _keys(back) == ["b.10", "web.pool"] and back.has_previous
