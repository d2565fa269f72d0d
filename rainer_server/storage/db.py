"""The relational storage: one journal table on MySQL/MariaDB or SQLite, through peewee.

The table keeps one row per commit, in columns (not the original's blob of everything) so
that audit questions ("who changed what, when") are plain SQL. An ``is_head`` flag marks each
key's newest row and leads the primary key, so InnoDB's clustered index stores all heads
together, ahead of the history: listing heads reads the same pages whether keys have one
version or fifty, even when the history no longer fits in the buffer pool.

The hot statements are rendered to SQL once per storage and executed directly: building a
peewee query costs more than a primary-key lookup on a warm MySQL.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from collections.abc import Iterator
from datetime import datetime
from datetime import timezone
from typing import Any
from typing import TypeVar
from urllib.parse import urlparse

import peewee
from peewee import BooleanField
from peewee import Field
from peewee import IntegerField
from peewee import InterfaceError
from peewee import IntegrityError
from peewee import Model
from peewee import OperationalError
from peewee import SQL
from peewee import TextField
from playhouse.db_url import connect
from playhouse.db_url import parse

from rainer_server.chain import GENESIS
from rainer_server.chain import link
from rainer_server.commit import MAX_VERSION
from rainer_server.commit import Commit
from rainer_server.errors import CommitOrderingError
from rainer_server.errors import ConfigurationError
from rainer_server.errors import InvalidCommit
from rainer_server.errors import StorageUnavailable
from rainer_server.payloads import KeyValueDeserialization
from rainer_server.storage import HeadSummary

log = logging.getLogger(__name__)

T = TypeVar("T")

# Timeouts well below gunicorn's worker timeout (30 s), so an unreachable database becomes a
# 503 the client can retry instead of a killed worker. The URL's query string overrides them.
_DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "mysql": {"connect_timeout": 3, "read_timeout": 10, "write_timeout": 10, "charset": "utf8mb4"},
    # sqlite3's timeout is its busy handler: writers from several workers wait for the lock
    # instead of failing with "database is locked".
    "sqlite": {"timeout": 10},
}
_SQLITE_PRAGMAS = {
    # WAL lets readers run beside the single writer; FULL sync because a configuration
    # service must not lose an acknowledged change on power loss.
    "journal_mode": "wal",
    "synchronous": "full",
    "foreign_keys": 1,
}
# MySQL client errors that mean "the connection is gone", after which one retry on a fresh
# connection is safe: server restarts, wait_timeout, network blips.
_DISCONNECT_CODES = {0, 2006, 2013, 2014, 2045, 2055, 4031}
# InnoDB deadlock / lock wait timeout: a lost race, the same as a duplicate version, once a
# deadlocked save has been retried _DEADLOCK_RETRIES times.
_DEADLOCK = 1213
_LOST_RACE_CODES = {1205, _DEADLOCK}
_DEADLOCK_RETRIES = 3
#: Rows whose chain one statement batch of a migration writes.
_MIGRATION_BATCH = 2000
# MySQL errors at connect that no retry cures: access denied to the database (1044), for the
# user (1045, and MariaDB's 1698 for a user it will not let in without a password), the host
# may not connect at all (1130), unknown database (1049). Anything else (2003 refused, 2005
# unknown host, 2013 lost, timeouts) may pass: the server is down, starting, or unreachable.
_REFUSED_CODES = {1044, 1045, 1049, 1130, 1698}
# SQLite errors at connect that may pass: the file is busy or locked by another process. Any
# other (can't open, not a database, read-only) is the setting's fault, not an outage.
_SQLITE_TRANSIENT_CODES = {5, 6}
# What clients see of a database failure: the driver's text names hosts, ports and users,
# which belong in the log only.
UNAVAILABLE = "Database unavailable"


class _WithoutParameters(logging.Filter):
    """peewee logs each statement with its parameters at DEBUG: payloads, which may hold
    secrets, and token digests. Keep the statement, drop the values."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, tuple) and len(record.msg) == 2:
            record.msg = (record.msg[0], "[parameters not logged]")
        return True


logging.getLogger("peewee").addFilter(_WithoutParameters())


def open_database(url: str) -> peewee.Database:
    """Make a peewee database for ``url`` (``sqlite:///path`` or ``mysql://user:pw@host/db``).

    Opens no connection: peewee connects on first use.

    :raises ValueError: when the URL has an unknown scheme or no database name.
    """
    scheme = urlparse(url).scheme
    family = "mysql" if scheme.startswith("mysql") else "sqlite" if "sqlite" in scheme else None
    if family is None:
        raise ValueError(f"unsupported database URL scheme {scheme!r} (use sqlite or mysql)")
    given = parse(url)
    extra = {k: v for k, v in _DEFAULT_PARAMS[family].items() if k not in given}
    if family == "sqlite":
        extra["pragmas"] = _SQLITE_PRAGMAS
    try:
        return connect(url, **extra)
    except RuntimeError as exc:  # peewee's "unrecognized scheme"
        raise ValueError(str(exc)) from None


def check_database(url: str) -> str | None:
    """Connect to ``url`` once and close again, to tell a database that refuses the setting
    from one that cannot be reached right now. Leaves no connection open (safe before a fork).

    :returns: ``None`` when the database answers; else, in one line, why it cannot be reached
        now (the driver's words: for the log, not for clients).
    :raises ConfigurationError: when the database answers but refuses for good (unknown
        database, access denied; an SQLite file that cannot be opened), or the URL cannot be
        opened at all.
    """
    try:
        database = open_database(url)
    except ValueError:
        # Not the message: peewee's repeats the URL, and with it the password.
        raise ConfigurationError("not a database URL this server can open") from None
    try:
        database.connect()
    except (OperationalError, InterfaceError) as exc:
        if _refused(exc):
            raise ConfigurationError(_describe(exc)) from None
        return _describe(exc)
    finally:
        if not database.is_closed():
            database.close()
    return None


def _refused(exc: Exception) -> bool:
    code = _error_code(exc)
    if code is not None:
        return code in _REFUSED_CODES
    sqlite_code = getattr(getattr(exc, "orig", None), "sqlite_errorcode", None)
    return sqlite_code is not None and sqlite_code not in _SQLITE_TRANSIENT_CODES


def _describe(exc: Exception) -> str:
    code = _error_code(exc)
    return _one_line(exc) + (f" (MySQL error {code})" if code else "")


class _KeyField(Field):
    # Binary, so keys compare byte for byte: MySQL's default collations would make "a", "A",
    # "a " and "á" one key.
    field_type = "VARBINARY(255)"

    def db_value(self, value: str | bytes | None) -> bytes | None:
        # Bytes are compared as they are: a bound of a key range need not be a key.
        if value is None or isinstance(value, bytes):
            return value
        return value.encode("utf-8")

    def python_value(self, value: bytes | str | None) -> str | None:
        if value is None or isinstance(value, str):
            return value
        return bytes(value).decode("utf-8")


class _PayloadField(Field):
    # MEDIUMBLOB holds 16 MiB on MySQL (a BLOB only 64 KiB); SQLite reads it as a BLOB.
    field_type = "MEDIUMBLOB"

    def db_value(self, value: bytes | None) -> bytes | None:
        return value

    def python_value(self, value: Any) -> bytes | None:
        return None if value is None else bytes(value)


class _MtimeField(Field):
    # DATETIME(3) in UTC on MySQL (queryable, millisecond precision as in the wire format);
    # SQLite keeps the same text, which sorts and compares correctly.
    field_type = "DATETIME(3)"

    def db_value(self, value: datetime | None) -> str | None:
        if value is None:
            return None
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]

    def python_value(self, value: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=timezone.utc)


class _ChainField(Field):
    # A SHA-256 in hex: fixed width, ASCII.
    field_type = "CHAR(64)"


def _make_row_model(database: peewee.Database, table_name: str) -> type[Model]:
    class CommitRow(Model):
        key = _KeyField()
        version = IntegerField()
        author = TextField()
        comment = TextField()
        mtime = _MtimeField()
        is_empty = BooleanField()
        is_head = BooleanField()
        payload = _PayloadField(null=True)
        # Who really wrote the row (the authenticated caller; "" without authentication),
        # and the tamper-evident hash chained over the key's history (rainer_server.chain).
        identity = peewee.CharField(max_length=255, default="", constraints=[SQL("DEFAULT ''")])
        chain = _ChainField(null=True)

        class Meta:
            # A save moves the old head's row out of the heads (a primary-key update); the
            # unique (key, version) index is what refuses a duplicate version.
            primary_key = peewee.CompositeKey("is_head", "key", "version")
            indexes = ((("key", "version"), True), (("is_head", "version"), False))

    CommitRow._meta.database = database
    CommitRow._meta.set_table_name(table_name)
    return CommitRow


class DbCommitStorage:
    """Commits in a relational table (spec §3), safe for many processes writing at once.

    :param database: from ``open_database(url)``.
    :param table_name: the journal table.
    :param deserialization: how the commits read from it make their ``value``.
    """

    def __init__(
        self,
        database: peewee.Database,
        table_name: str = "rainer",
        *,
        deserialization: KeyValueDeserialization | None = None,
    ) -> None:
        self.database = database
        self.deserialization = deserialization
        self.table_name = table_name
        self._row = _make_row_model(database, table_name)
        self._fields = (
            self._row.key,
            self._row.version,
            self._row.author,
            self._row.comment,
            self._row.mtime,
            self._row.is_empty,
            self._row.payload,
            self._row.identity,
        )
        self._is_sqlite = isinstance(database, peewee.SqliteDatabase)
        row = self._row
        heads = row.select(*self._fields).where(row.is_head == True)  # noqa: E712
        _head_of_key = row.select(*self._fields).where(
            (row.is_head == True) & (row.key == "k")  # noqa: E712
        )
        # Parameters, in order: get_head (key), get_version (key, version), heads (-),
        # heads_non_empty (-), insert (the _INSERT_COLUMNS), retire_head (key, version).
        self._sql = {
            "get_head": _sql(row.select(*self._fields).where(
                (row.is_head == True) & (row.key == "k"))),  # noqa: E712
            "get_version": _sql(row.select(*self._fields).where(
                (row.key == "k") & (row.version == 1))),
            "heads": _sql(heads),
            "heads_non_empty": _sql(heads.where(row.is_empty == False)),  # noqa: E712
            "insert": _sql(row.insert({getattr(row, name): None for name in _INSERT_COLUMNS})),
            # Matches only while version is the head: its row lock queues a racing writer of
            # the same key, who then matches nothing and gets a 409.
            "retire_head": _sql(row.update(is_head=False).where(
                (row.is_head == True) & (row.key == "k") & (row.version == 1))),  # noqa: E712
            "chain_of": _sql(row.select(row.chain).where((row.key == "k") & (row.version == 1))),
            # FOR UPDATE on MySQL; SQLite's BEGIN IMMEDIATE already holds every writer off.
            "lock_head": _sql(_head_of_key.for_update(not self._is_sqlite)),
        }
        self._to_db_mtime = row.mtime.db_value
        self._from_db_mtime = row.mtime.python_value

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create the journal table and its index when missing; bring a journal made by an
        earlier version up to date (new columns added, every row kept)."""
        self._run(lambda: self._row.create_table(safe=True))
        self._run(self._migrate)

    def _migrate(self) -> None:
        columns = {c.name for c in self.database.get_columns(self.table_name)}
        row = self._row
        for field in (row.identity, row.chain):
            if field.column_name not in columns:
                log.warning("Adding column %s to journal table %s", field.column_name, self.table_name)
                ddl = f"ALTER TABLE {self._quoted_table()} ADD COLUMN {self._column_ddl(field)}"
                self.database.execute_sql(ddl)
        # Chains of rows written before chains existed: one pass over the journal in key,
        # version order, each link computed from the previous row's, the missing ones written
        # in batches (a journal of 500k rows migrates in one pass, not a query per row).
        row = self._row
        has_missing = row.select(row.key).where(row.chain.is_null()).limit(1).exists()
        if not has_missing:
            return
        log.warning("Computing the tamper-evident chain of the rows in %s", self.table_name)
        query = row.select(*self._fields, row.chain).order_by(row.key, row.version)
        rows = self.database.execute_sql(*query.sql()).fetchall()
        update = _sql(row.update(chain="c").where((row.key == "k") & (row.version == 1)))
        pending: list[tuple[str, bytes, int]] = []
        current_key, previous, written = None, GENESIS, 0
        for values in rows:
            commit = self._to_commit(values[:-1])
            if commit.key != current_key:
                current_key, previous = commit.key, GENESIS
            if values[-1] is None:
                previous = link(previous, commit)
                pending.append((previous, commit.key.encode("utf-8"), commit.version))
            else:
                previous = values[-1]
            if len(pending) >= _MIGRATION_BATCH:
                written += self._write_chains(update, pending)
        written += self._write_chains(update, pending)
        log.warning("Chained %d rows of %s", written, self.table_name)

    def _write_chains(self, update: str, pending: list[tuple[str, bytes, int]]) -> int:
        count = len(pending)
        if pending:
            with self.database.atomic():
                cursor = self.database.cursor()
                cursor.executemany(update, pending)
            pending.clear()
        return count

    def _quoted_table(self) -> str:
        quote = self.database.quote or '""'
        return f"{quote[0]}{self.table_name}{quote[-1]}"

    def _column_ddl(self, field: Field) -> str:
        context = self.database.get_sql_context()
        sql, params = context.sql(field.ddl(context)).query()
        assert not params, "column DDL takes no parameters"
        return sql

    def stop(self) -> None:
        if not self.database.is_closed():
            self.database.close()

    # ------------------------------------------------------------------ reads

    def get(self, key: str, version: int | None = None) -> Commit | None:
        if version is None:
            sql, params = self._sql["get_head"], (True, key.encode("utf-8"))
        elif 1 <= version <= MAX_VERSION:
            sql, params = self._sql["get_version"], (key.encode("utf-8"), version)
        else:
            return None  # never stored, and SQLite cannot even bind integers past 2**63
        row = self._run(lambda: self.database.execute_sql(sql, params).fetchone())
        return None if row is None else self._to_commit(row)

    def heads(self) -> dict[str, Commit]:
        return self._heads(include_empty=True)

    def heads_non_empty(self) -> dict[str, Commit]:
        return self._heads(include_empty=False)

    def heads_token(self) -> int:
        """A number that changes whenever any head changes: the total count of commits.

        Each save moves one key's head version up by exactly one, so the sum of head versions
        grows by one per commit; it reads only the ``(is_head, version)`` index.
        """
        query = self._row.select(peewee.fn.COALESCE(peewee.fn.SUM(self._row.version), 0)).where(
            self._row.is_head == True  # noqa: E712 (peewee expression)
        )
        return int(self._run(query.scalar))

    def history(self, key: str, limit: int = 100, before: int | None = None) -> list[Commit]:
        """Commits of ``key`` newest first, at most ``limit``, only versions below ``before``."""
        query = self._row.select(*self._fields).where(self._row.key == key)
        if before is not None:
            query = query.where(self._row.version < min(before, MAX_VERSION + 1))
        query = query.order_by(self._row.version.desc()).limit(limit)
        rows = self._run(lambda: self.database.execute_sql(*query.sql()).fetchall())
        return [self._to_commit(row) for row in rows]

    def heads_page(
        self,
        prefix: str,
        contains: str,
        include_empty: bool,
        after: str | None,
        before: str | None,
        limit: int,
    ) -> list[HeadSummary]:
        """At most ``limit`` heads in key order (byte order), read from the front of the
        primary key: a page costs the same with 100 keys or 100,000. Payload sizes, not
        payloads."""
        row = self._row
        query = (
            row.select(row.key, row.version, row.author, row.mtime, peewee.fn.LENGTH(row.payload))
            .where(self._heads_where(prefix, contains, include_empty))
        )
        if after is not None:
            query = query.where(row.key > after).order_by(row.key).limit(limit)
        elif before is not None:
            query = query.where(row.key < before).order_by(row.key.desc()).limit(limit)
        else:
            query = query.order_by(row.key).limit(limit)
        rows = list(self._run(lambda: self.database.execute_sql(*query.sql()).fetchall()))
        if before is not None and after is None:
            rows.reverse()
        return [
            HeadSummary(
                bytes(key).decode("utf-8") if not isinstance(key, str) else key,
                version,
                author,
                self._from_db_mtime(mtime),
                None if size is None else int(size),
            )
            for key, version, author, mtime, size in rows
        ]

    def heads_count(self, prefix: str, contains: str, include_empty: bool) -> int:
        query = self._row.select(peewee.fn.COUNT(SQL("*"))).where(
            self._heads_where(prefix, contains, include_empty)
        )
        return int(self._run(query.scalar))

    def _heads_where(self, prefix: str, contains: str, include_empty: bool) -> Any:
        row = self._row
        condition = row.is_head == True  # noqa: E712 (peewee expression)
        if not include_empty:
            condition &= row.is_empty == False  # noqa: E712
        if prefix:
            # A range of the primary key, byte for byte (LIKE would be case-insensitive on
            # SQLite and read "%" and "_" as wildcards). No UTF-8 byte is 0xff, so every key
            # starting with the prefix sorts below prefix + 0xff.
            encoded = prefix.encode("utf-8")
            condition &= (row.key >= prefix) & (row.key < encoded + b"\xff")
        if contains:
            # INSTR compares bytes on both databases (the key column is binary).
            condition &= peewee.fn.INSTR(row.key, contains.encode("utf-8")) > 0
        return condition

    def _heads(self, include_empty: bool) -> dict[str, Commit]:
        if include_empty:
            sql, params = self._sql["heads"], (True,)
        else:
            sql, params = self._sql["heads_non_empty"], (True, False)
        rows = self._run(lambda: self.database.execute_sql(sql, params).fetchall())
        return {commit.key: commit for commit in map(self._to_commit, rows)}

    @contextlib.contextmanager
    def locked_head(self, key: str) -> Iterator[Commit | None]:
        """The head of ``key`` as of now, its writers held off until the block ends.

        The publisher writes a head to ZooKeeper inside this block: a commit that lands
        meanwhile waits, so it is acknowledged only after the znode write, and its own
        publish (or the next pass) comes after it. Without the lock, a pass could publish
        the head it read a moment before a tombstone and bring the key back.

        :raises StorageUnavailable: when the database cannot be reached.
        """
        self._run(lambda: None)  # connected, or reconnected once
        try:
            with self.database.atomic(**({"lock_type": "IMMEDIATE"} if self._is_sqlite else {})):
                row = self.database.execute_sql(
                    self._sql["lock_head"], (True, key.encode("utf-8"))
                ).fetchone()
                yield None if row is None else self._to_commit(row)
        except (OperationalError, InterfaceError) as exc:
            _discard_connection(self.database)
            raise StorageUnavailable(UNAVAILABLE, detail=_describe(exc)) from exc

    # ------------------------------------------------------------------ writes

    def save(self, commit: Commit) -> None:
        retried = False

        def attempt() -> None:
            nonlocal retried
            for deadlocks in range(_DEADLOCK_RETRIES + 1):
                try:
                    self._insert(commit)
                    return
                except (IntegrityError, _NotNextVersion) as exc:
                    # Not the next version, or a lost race; or the retry of a save whose COMMIT
                    # reply was lost with the connection, in which case the commit is stored.
                    if retried and self.get(commit.key, commit.version) == commit:
                        return
                    raise self._ordering_error(commit) from exc
                except OperationalError as exc:
                    code = _error_code(exc)
                    if code == _DEADLOCK and deadlocks < _DEADLOCK_RETRIES:
                        # Writers of *different* keys deadlock too (next-key locks of the
                        # unique index's duplicate check). InnoDB rolled this one back, so
                        # running it again is safe, and it decides whether it really is late.
                        log.debug("Deadlock saving %s version %s; retrying", commit.key,
                                  commit.version)
                        continue
                    if code in _LOST_RACE_CODES:
                        raise self._ordering_error(commit) from exc
                    retried = True
                    raise

        self._run(attempt)

    def _insert(self, commit: Commit) -> None:
        execute = self.database.execute_sql
        key = commit.key.encode("utf-8")
        # SQLite: BEGIN IMMEDIATE takes the write lock up front, so two writers queue on the
        # busy handler instead of both reading, then one failing with "database is locked".
        # MySQL: no SELECT ... FOR UPDATE (it deadlocks on new keys under REPEATABLE READ); the
        # retiring UPDATE is the version check, and for version 1 the unique index is.
        with self.database.atomic(**({"lock_type": "IMMEDIATE"} if self._is_sqlite else {})):
            previous = GENESIS
            if commit.version > 1:
                retired = execute(self._sql["retire_head"], (False, True, key, commit.version - 1))
                if retired.rowcount != 1:
                    raise _NotNextVersion()
                # The retiring UPDATE locked that row: its chain cannot change under us.
                found = execute(self._sql["chain_of"], (key, commit.version - 1)).fetchone()
                previous = (found[0] if found else None) or GENESIS
            execute(self._sql["insert"], (
                key, commit.version, commit.author, commit.comment,
                self._to_db_mtime(commit.mtime), commit.empty, True, commit.payload,
                commit.identity, link(previous, commit),
            ))

    def _ordering_error(self, commit: Commit) -> CommitOrderingError:
        head = self.get(commit.key)
        return CommitOrderingError(commit.key, (head.version if head else 0) + 1, commit.version)

    # ------------------------------------------------------------------ plumbing

    def _run(self, operation: Callable[[], T]) -> T:
        return run_on(self.database, operation)

    def _to_commit(self, row: tuple) -> Commit:
        key, version, author, comment, mtime, is_empty, payload, identity = row
        return Commit(
            bytes(key).decode("utf-8") if not isinstance(key, str) else key,
            version,
            None if is_empty else bytes(payload),
            author,
            comment,
            self._from_db_mtime(mtime),
            identity=identity or "",
            deserialization=self.deserialization,
        )

    # ------------------------------------------------------------------ tamper evidence

    def verify(self) -> Iterator[tuple[str, int, str]]:
        """Recompute every key's chain; yield ``(key, version, problem)`` for each key's first
        row that does not match (nothing when the journal is intact). Streams the table in
        key, version order."""
        row = self._row
        query = row.select(*self._fields, row.chain).order_by(row.key, row.version)
        rows = self._run(lambda: self.database.execute_sql(*query.sql()).fetchall())
        current_key: str | None = None
        previous = GENESIS
        broken = False
        expected_version = 1
        for values in rows:
            commit = self._to_commit(values[:-1])
            if commit.key != current_key:
                current_key, previous, broken, expected_version = commit.key, GENESIS, False, 1
            if broken:
                continue
            if commit.version != expected_version:
                broken = True
                yield commit.key, expected_version, "missing"
                continue
            expected = link(previous, commit)
            if values[-1] != expected:
                broken = True
                yield commit.key, commit.version, "chain mismatch"
                continue
            previous = expected
            expected_version += 1


def run_on(database: peewee.Database, operation: Callable[[], T]) -> T:
    """Run ``operation`` on this thread's connection to ``database``, reconnecting once if it
    went stale.

    :raises StorageUnavailable: when the database cannot be reached or fails.
    """
    is_sqlite = isinstance(database, peewee.SqliteDatabase)
    for attempt in (1, 2):
        was_open = not database.is_closed()
        try:
            database.connect(reuse_if_open=True)
            return operation()
        except (OperationalError, InterfaceError) as exc:
            _discard_connection(database)
            if (
                not is_sqlite
                and was_open
                and attempt == 1
                and _error_code(exc) in _DISCONNECT_CODES
            ):
                log.info("Database connection lost (%s); reconnecting", _one_line(exc))
                continue
            # Not a warning here: whoever catches the error reports it once, with the detail
            # (the HTTP 503 handler, the readiness check, the publisher's pass, an admin
            # command); a second line per failure from here only doubled an outage's noise.
            log.debug("%s: %s", UNAVAILABLE, _describe(exc))
            raise StorageUnavailable(UNAVAILABLE, detail=_describe(exc)) from exc
    raise AssertionError("unreachable")


def _discard_connection(database: peewee.Database) -> None:
    try:
        database.close()
    except Exception:  # closing a broken connection may fail too; it is gone either way
        log.debug("Ignoring error while closing a broken connection", exc_info=True)
        database._state.reset()


class _NotNextVersion(Exception):
    """The version before the commit's is not the key's head (or the key has no head)."""


# The column order of the "insert" statement and of its parameters.
_INSERT_COLUMNS = (
    "key", "version", "author", "comment", "mtime", "is_empty", "is_head", "payload",
    "identity", "chain",
)


def _sql(query: peewee.Query) -> str:
    """``query`` rendered once in its database's dialect; executed later with fresh parameters."""
    return query.sql()[0]


def _error_code(exc: Exception) -> int | None:
    code = exc.args[0] if exc.args else None
    return code if isinstance(code, int) else None


def _one_line(exc: Exception) -> str:
    text = str(exc.args[-1] if exc.args else exc) or type(exc).__name__
    return " ".join(text.split())


# ---------------------------------------------------------------------- the original's table

_SQL_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


def read_legacy_table(
    database: peewee.Database, table: str
) -> tuple[list[Commit], dict[str, list[str]]]:
    """Every commit of an original Scala Rainer table, and the problems of the rows that are not.

    The table holds ``name``, ``version``, ``payload`` (the whole commit in the wire format)
    and ``is_empty``. A row that does not parse, or disagrees with its columns, makes its key
    a problem (the importer then writes nothing of that key).

    :raises ValueError: when ``table`` is not a plain SQL name or cannot be read.
    """
    if not _SQL_IDENTIFIER.match(table):
        raise ValueError("must be a plain SQL table name")
    quote = database.quote or '""'
    name = f"{quote[0]}{table}{quote[-1]}"
    try:
        database.connect(reuse_if_open=True)
        rows = database.execute_sql(
            f"SELECT name, version, payload, is_empty FROM {name} ORDER BY name, version"
        ).fetchall()
    except peewee.DatabaseError as exc:
        raise ValueError(f"cannot read legacy table {table!r}: {_one_line(exc)}") from None
    finally:
        database.close()
    commits: list[Commit] = []
    problems: dict[str, list[str]] = {}
    for raw_name, version, blob, is_empty in rows:
        key = raw_name if isinstance(raw_name, str) else bytes(raw_name).decode("utf-8", "replace")
        where = f"legacy row ({key!r}, {version})"
        try:
            commit = Commit.deserialize(bytes(blob or b""))
        except InvalidCommit as exc:
            problems.setdefault(key, []).append(f"{where}: {exc}")
            continue
        if (commit.key, commit.version) != (key, version):
            problems.setdefault(key, []).append(
                f"{where}: holds the commit of ({commit.key!r}, {commit.version})"
            )
        elif bool(is_empty) != commit.empty:
            problems.setdefault(key, []).append(
                f"{where}: is_empty={int(bool(is_empty))} but the commit says empty={commit.empty}"
            )
        else:
            commits.append(commit)
    return commits, problems
