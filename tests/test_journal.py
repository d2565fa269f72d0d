"""The journal's identity column and tamper-evident chain, on SQLite and MySQL."""

from __future__ import annotations

import dataclasses

from rainer_server.chain import GENESIS
from rainer_server.chain import link
from rainer_server.storage.db import DbCommitStorage
from tests.storage_contract import commit


def _save(storage, key, count, identity=""):
    for version in range(1, count + 1):
        payload = None if version == count and key.startswith("gone") else b'{"v": %d}' % version
        storage.save(dataclasses.replace(commit(key, version, payload), identity=identity))


def test_identity_is_kept_and_read_back(db_storage):
    saved = dataclasses.replace(commit("k", 1), identity="alice")
    db_storage.save(saved)
    assert db_storage.get("k").identity == "alice"
    assert db_storage.get("k", 1).identity == "alice"
    assert db_storage.history("k")[0].identity == "alice"
    assert db_storage.heads()["k"].identity == "alice"
    # Not part of the commit's equality: a mirror's copy (no identity) equals it.
    assert db_storage.get("k") == commit("k", 1)


def test_every_row_is_chained_and_verifies(db_storage):
    _save(db_storage, "a", 3, "alice")
    _save(db_storage, "gone", 2)
    assert list(db_storage.verify()) == []
    chains = dict(
        db_storage.database.execute_sql(
            f"SELECT version, chain FROM {db_storage.table_name} WHERE {_key_is(db_storage)}",
            ("a".encode(),),
        ).fetchall()
    )
    expected = GENESIS
    for version in (1, 2, 3):
        expected = link(expected, db_storage.get("a", version))
        assert chains[version] == expected


def _key_is(storage) -> str:
    quote = storage.database.quote or '""'
    return f"{quote[0]}key{quote[-1]} = {storage.database.param}"


def test_verify_names_the_first_row_an_sql_edit_touched(db_storage):
    _save(db_storage, "a", 4, "alice")
    _save(db_storage, "b", 2, "bob")
    table, param = db_storage.table_name, db_storage.database.param
    db_storage.database.execute_sql(
        f"UPDATE {table} SET payload = {param} WHERE {_key_is(db_storage)} AND version = 2",
        (b'{"v": 99}', b"a"),
    )
    assert list(db_storage.verify()) == [("a", 2, "chain mismatch")]
    db_storage.database.execute_sql(
        f"UPDATE {table} SET author = {param} WHERE {_key_is(db_storage)} AND version = 1",
        ("mallory", b"b"),
    )
    assert list(db_storage.verify()) == [("a", 2, "chain mismatch"), ("b", 1, "chain mismatch")]


def test_verify_finds_a_deleted_row_and_an_edited_identity(db_storage):
    _save(db_storage, "a", 3, "alice")
    _save(db_storage, "c", 2, "carol")
    table, param = db_storage.table_name, db_storage.database.param
    db_storage.database.execute_sql(
        f"DELETE FROM {table} WHERE {_key_is(db_storage)} AND version = 2", (b"a",)
    )
    db_storage.database.execute_sql(
        f"UPDATE {table} SET identity = {param} WHERE {_key_is(db_storage)} AND version = 2",
        ("someone-else", b"c"),
    )
    assert list(db_storage.verify()) == [("a", 2, "missing"), ("c", 2, "chain mismatch")]


def test_a_journal_from_an_earlier_version_is_migrated_keeping_every_row(db_storage):
    _save(db_storage, "a", 3)
    _save(db_storage, "gone", 2)
    table = db_storage.table_name
    before = sorted((c.key, c.version, c.payload) for k in ("a", "gone") for c in db_storage.history(k))
    # The layout an earlier build made: no identity, no chain.
    for column in ("chain", "identity"):
        db_storage.database.execute_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
    db_storage.stop()

    again = DbCommitStorage(db_storage.database, table)
    again.start()
    after = sorted((c.key, c.version, c.payload) for k in ("a", "gone") for c in again.history(k))
    assert after == before
    assert list(again.verify()) == []
    assert again.get("a").identity == ""
    # New commits chain on from the migrated rows.
    again.save(dataclasses.replace(commit("a", 4), identity="alice"))
    assert list(again.verify()) == []
    # Starting again changes nothing.
    again.start()
    assert list(again.verify()) == []


def test_startup_migrates_an_earlier_journal_before_any_request(app_config):
    from rainer_server import create_app
    from rainer_server.storage.db import open_database
    from rainer_server.web.context import get_rainer

    url = app_config["RAINER_DATABASE_URL"]
    table = app_config.get("RAINER_TABLE", "rainer")
    storage = DbCommitStorage(open_database(url), table)
    storage.start()
    _save(storage, "a", 3)
    for column in ("chain", "identity"):
        storage.database.execute_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
    storage.stop()

    app = create_app({"TESTING": True, **app_config})
    try:
        get_rainer(app).check_database()  # what rainer_server.wsgi does in gunicorn's master
        fresh = DbCommitStorage(open_database(url), table)
        columns = {c.name for c in fresh.database.get_columns(table)}
        assert {"identity", "chain"} <= columns
        assert list(fresh.verify()) == [] and fresh.get("a").version == 3
        fresh.stop()
    finally:
        app.extensions["rainer"].close()
