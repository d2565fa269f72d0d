"""Rainer apps for bench_core.py that differ from ``wsgi:app`` in one measured respect.

- ``rainer_nocache``: the real service with its list cache disabled, so every ``GET /diary``
  pays ``storage.heads()`` and serialisation, as the first list after any write does.
- ``rainer_proto``: prototypes of proposed fixes (``--prototypes``), chosen by the
  comma-separated ``BENCH_PATCHES``: ``get`` makes ``DbCommitStorage.get`` execute a SQL string
  built once per storage instead of rebuilding the peewee query on every call; ``save`` does
  the same for the three statements of ``DbCommitStorage._insert`` (same transaction, same
  statements, same order); ``save2`` changes the write transaction to
  ``BEGIN; UPDATE <old head> SET is_head = 0 WHERE key = K AND version = V - 1 AND is_head = 1;
  INSERT; COMMIT``: the UPDATE's row count is the ordering check (its row lock serialises
  writers of one key; a new key relies on the primary key as today), so the happy path needs
  no ``SELECT MAX`` (one statement fewer; version 1 skips the UPDATE too). The head is read
  only to word a 409. Not a change to the package: the class is patched in the gunicorn
  process of that scenario only (or in pytest via ``-p bench_patch_plugin``).
"""

from __future__ import annotations

import os
import sys
from datetime import timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from rainer_server import create_app  # noqa: E402


class _NeverStores(dict):
    def __setitem__(self, key, value):
        pass


def _make_nocache():
    app = create_app()
    app.extensions["rainer"].list_cache = _NeverStores()
    return app


def _patch_precompiled_get():
    from rainer_server.commit import MAX_VERSION
    from rainer_server.commit import Commit
    from rainer_server.storage.db import DbCommitStorage

    def compiled(self, with_version):
        cache = self.__dict__.setdefault("_proto_sql", {})
        if with_version not in cache:
            row = self._row
            query = row.select(*self._fields).where(row.key == "k")
            if with_version:
                query = query.where(row.version == 1)
            else:
                query = query.order_by(row.version.desc()).limit(1)
            sql, params = query.sql()
            # The head query's LIMIT is a parameter too: [key, 1]; by version: [key, 1].
            assert params == [b"k", 1], params
            cache[with_version] = sql
        return cache[with_version]

    def get(self, key, version=None):
        if version is not None and not 1 <= version <= MAX_VERSION:
            return None
        sql = compiled(self, version is not None)
        params = (key.encode("utf-8"), 1 if version is None else version)
        row = self._run(lambda: self.database.execute_sql(sql, params).fetchone())
        if row is None:
            return None
        key_b, number, author, comment, mtime, is_empty, payload = row
        if isinstance(mtime, str):  # SQLite
            mtime = self._row.mtime.python_value(mtime)
        return Commit(
            bytes(key_b).decode("utf-8") if not isinstance(key_b, str) else key_b,
            number,
            None if is_empty else bytes(payload or b""),
            author,
            comment,
            mtime.replace(tzinfo=timezone.utc),
        )

    DbCommitStorage.get = get


def _patch_precompiled_save():
    import peewee

    from rainer_server.storage import check_next_version
    from rainer_server.storage.db import DbCommitStorage

    def compiled(self):
        cache = self.__dict__.get("_proto_save_sql")
        if cache is None:
            row = self._row
            select_sql, params = (
                row.select(peewee.fn.MAX(row.version)).where(row.key == "k").sql()
            )
            assert params == [b"k"], params
            insert_sql, params = row.insert(
                key="k", version=1, author="a", comment="c", mtime=None,
                is_empty=False, is_head=True, payload=b"p",
            ).sql()
            assert params == [b"k", 1, "a", "c", None, False, True, b"p"], params
            update_sql, params = (
                row.update(is_head=False).where((row.key == "k") & (row.version == 7)).sql()
            )
            assert params == [False, b"k", 7], params
            cache = self.__dict__["_proto_save_sql"] = (select_sql, insert_sql, update_sql)
        return cache

    def _insert(self, commit):
        select_sql, insert_sql, update_sql = compiled(self)
        execute = self.database.execute_sql
        key = commit.key.encode("utf-8")
        with self.database.atomic(**({"lock_type": "IMMEDIATE"} if self._is_sqlite else {})):
            head = execute(select_sql, (key,)).fetchone()[0] or 0
            check_next_version(commit, head)
            execute(insert_sql, (
                key, commit.version, commit.author, commit.comment,
                self._row.mtime.db_value(commit.mtime), commit.empty, True, commit.payload,
            ))
            if head:
                execute(update_sql, (False, key, head))

    DbCommitStorage._insert = _insert


def _patch_conditional_update_save():
    """Prototype: the ordering check folded into the UPDATE of the old head."""
    from peewee import IntegrityError
    from peewee import OperationalError

    from rainer_server.storage.db import _LOST_RACE_CODES
    from rainer_server.storage.db import DbCommitStorage
    from rainer_server.storage.db import _error_code

    class _NotNext(Exception):
        pass

    def compiled(self):
        cache = self.__dict__.get("_proto_save2_sql")
        if cache is None:
            row = self._row
            insert_sql, params = row.insert(
                key="k", version=1, author="a", comment="c", mtime=None,
                is_empty=False, is_head=True, payload=b"p",
            ).sql()
            assert params == [b"k", 1, "a", "c", None, False, True, b"p"], params
            update_sql, params = row.update(is_head=False).where(
                (row.key == "k") & (row.version == 7) & (row.is_head == True)  # noqa: E712
            ).sql()
            assert params == [False, b"k", 7, True], params
            cache = self.__dict__["_proto_save2_sql"] = (insert_sql, update_sql)
        return cache

    def _insert(self, commit):
        insert_sql, update_sql = compiled(self)
        execute = self.database.execute_sql
        key = commit.key.encode("utf-8")
        with self.database.atomic(**({"lock_type": "IMMEDIATE"} if self._is_sqlite else {})):
            if commit.version > 1:
                # Locks the old head's row: a racing writer of the same version waits here,
                # then finds is_head = 0 and loses. Matches nothing unless v-1 is the head.
                if execute(update_sql, (False, key, commit.version - 1, True)).rowcount != 1:
                    raise _NotNext()
            execute(insert_sql, (
                key, commit.version, commit.author, commit.comment,
                self._row.mtime.db_value(commit.mtime), commit.empty, True, commit.payload,
            ))

    def save(self, commit):
        retried = False

        def attempt():
            nonlocal retried
            try:
                self._insert(commit)
            except (IntegrityError, _NotNext) as exc:
                # A lost race or a version that is not next; or a retry of a save whose
                # COMMIT reply was lost with the connection (then the commit is there).
                if retried and self.get(commit.key, commit.version) == commit:
                    return
                raise self._ordering_error(commit) from exc
            except OperationalError as exc:
                if _error_code(exc) in _LOST_RACE_CODES:
                    raise self._ordering_error(commit) from exc
                retried = True
                raise

        self._run(attempt)

    DbCommitStorage._insert = _insert
    DbCommitStorage.save = save


def apply_patches(patches) -> None:
    if "get" in patches:
        _patch_precompiled_get()
    if "save" in patches:
        _patch_precompiled_save()
    if "save2" in patches:
        _patch_conditional_update_save()


def _make_proto():
    apply_patches(set(filter(None, os.environ.get("BENCH_PATCHES", "").split(","))))
    return create_app()


rainer_nocache = _make_nocache()
rainer_proto = _make_proto()
