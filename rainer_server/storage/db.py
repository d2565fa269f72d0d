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
import heapq
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterator
from datetime import datetime
from datetime import timezone
from typing import Any
from typing import TypeVar
from urllib.parse import urlparse

import gevent
import gevent.lock
import peewee
import pymysql.connections
from pymysql.constants import CLIENT
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
from playhouse.pool import MaxConnectionsExceeded
from playhouse.pool import PoolConnection
from playhouse.pool import PooledMySQLDatabase
from playhouse.pool import PooledSqliteDatabase

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

#: Seconds one database operation of a gevent worker may take, every phase counted: the wait
#: for a pooled connection, the TCP connect, the handshake and the statements
#: (``RAINER_DATABASE_TIMEOUT``). A hung server (a SIGSTOP, a full disk, a stuck failover)
#: still completes TCP connects into its backlog and then never answers, so only a bound on
#: the whole operation turns it into a 503 in time.
DEFAULT_OPERATION_TIMEOUT = 2.0
#: Reads of every head or of the whole journal grow with it: they get this long instead.
BULK_OPERATION_TIMEOUT = 30.0
# Socket timeouts well below gunicorn's worker timeout (30 s), so an unreachable database
# becomes a 503 the client can retry instead of a killed worker: all a sync worker has (it
# runs no timer beside its request); a gevent worker's operations are bounded tighter still.
# The URL's query string overrides them.
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
# Keys per SELECT ... IN (...) of locked_heads.
_LOCK_CHUNK = 500
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
# Under gevent (gunicorn's gevent worker) every request runs in its own greenlet, and peewee
# keeps a connection per greenlet: without a pool each request would open a connection and
# never close it. The pool lends one per request (returned when the request ends) and makes
# a waiting greenlet queue cooperatively when all are lent. Query-string parameters
# (``max_connections``, ``timeout``) override these.
_POOL_PARAMS = {"max_connections": 16, "timeout": 10}
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


def open_database(
    url: str, operation_timeout: float = DEFAULT_OPERATION_TIMEOUT
) -> peewee.Database:
    """Make a peewee database for ``url`` (``sqlite:///path`` or ``mysql://user:pw@host/db``).

    Opens no connection: peewee connects on first use. Under gevent, each operation on a
    MySQL database (``run_on``) ends after ``operation_timeout`` seconds, whatever it waits for.

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
    else:
        # A save sends its statements as two packets (DbCommitStorage._insert_mysql). Every
        # value in them is escaped by PyMySQL as in any single statement.
        extra["client_flag"] = int(given.get("client_flag", 0)) | CLIENT.MULTI_STATEMENTS
    try:
        database = connect(url, **extra)
    except RuntimeError as exc:  # peewee's "unrecognized scheme"
        raise ValueError(str(exc)) from None
    if not cooperative() or isinstance(database, peewee_pool_types()):
        return database
    pool_params = {k: v for k, v in _POOL_PARAMS.items() if k not in given}
    params = {**database.connect_params, **pool_params}
    if family == "sqlite":
        # A pooled connection serves one request at a time, but not always on the thread
        # that opened it.
        params["check_same_thread"] = False
        pooled: peewee.Database = _PooledSqlite(database.database, pragmas=_SQLITE_PRAGMAS, **params)
        # The pool's ``timeout`` is how long to wait for a free connection; SQLite's (the busy
        # handler) has the same name, so it is set apart.
        pooled._timeout = database._timeout
    else:
        pooled = _PooledMySQL(database.database, **params)
        pooled.operation_timeout = operation_timeout
    return pooled


def cooperative() -> bool:
    """Whether this process runs under gevent's monkey-patching (gunicorn's gevent worker)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def peewee_pool_types() -> tuple[type, ...]:
    return (PooledMySQLDatabase, PooledSqliteDatabase)


class _CooperativePool:
    """The loan and return of peewee's pools, cut to what one loan per request needs.

    Mixed in before a peewee pool class; only ever used under gevent (``open_database``).
    Each request is a new greenlet, so its connection state (a greenlet-local) is always
    fresh, and no other greenlet shares it: peewee's ``connect`` and ``close`` reset it again
    and take the database's lock on every loan, about a third of a loan's cost. The pool's
    own bookkeeping (its lock, the heap, waking a waiter) is left as peewee has it, and so
    is ``_initialize_connection`` on every loan.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # gevent's own (compiled) lock rather than the patched ``threading.RLock``, which
        # falls back to the pure-Python implementation: two of them per loan.
        self._pool_lock = gevent.lock.RLock()
        self._pool_available = threading.Condition(self._pool_lock)
        #: Greenlets waiting for a connection to come back to the pool (every one is lent).
        self.queued: set[Any] = set()

    def connect(self, reuse_if_open: bool = False) -> bool:
        state = self._state  # type: ignore[attr-defined]
        if not state.closed:
            if reuse_if_open:
                return False
            raise OperationalError("Connection already opened.")
        # No timeout: fail at once when every connection is lent (peewee's default too).
        deadline = time.monotonic() + (self._wait_timeout or 0)  # type: ignore[attr-defined]
        while True:
            try:
                with peewee.__exception_wrapper__:
                    conn = self._connect()  # type: ignore[attr-defined]
                break
            except MaxConnectionsExceeded:
                # Every connection is lent: queue until one comes back (as peewee does).
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MaxConnectionsExceeded(
                        "Max connections exceeded, timed out attempting to connect."
                    ) from None
                available = self._pool_available  # type: ignore[attr-defined]
                me = gevent.getcurrent()
                self.queued.add(me)
                try:
                    with available:
                        available.wait(timeout=min(remaining, 1.0))
                finally:
                    self.queued.discard(me)
        state.set_connection(conn)
        with peewee.__exception_wrapper__:
            if self.server_version is None:  # type: ignore[attr-defined]
                self._set_server_version(conn)  # type: ignore[attr-defined]
            self._initialize_connection(conn)  # type: ignore[attr-defined]
        return True

    def close(self) -> bool:
        state = self._state  # type: ignore[attr-defined]
        if state.closed:
            return False
        if state.transactions:
            raise OperationalError("Attempting to close database while transaction is open.")
        conn, state.conn, state.closed = state.conn, None, True
        with peewee.__exception_wrapper__:
            self._close(conn)  # type: ignore[attr-defined]
        return True


class _PooledMySQL(_CooperativePool, PooledMySQLDatabase):
    """peewee's MySQL pool, without its round trips on every loan.

    peewee pings each connection it lends and rolls back each one returned; with one loan per
    request that doubled a primary-key read. A connection the server dropped is found by the
    query itself, and ``run_on`` retries once on a fresh one.
    """

    #: Seconds one operation may take under gevent (``open_database`` sets it).
    operation_timeout: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # peewee holds this database-wide lock while it opens a connection (TCP connect and
        # handshake): under gevent, one handshake with a hung server held every other
        # greenlet's connect and close, a request's end included. What it guards, the
        # connection state, is per greenlet already.
        self._lock = _NoLock()
        # Connections being opened outside the pool's lock (``_connect``), counted against
        # max_connections.
        self._opening = 0
        # Shared by every database of this process on the same server (the journal's, the
        # token store's): a request that checks a token first must not wait out the hang
        # twice.
        params = self.connect_params
        server = (params.get("host"), params.get("port"), params.get("unix_socket"))
        self._hang = _HANGS.setdefault(server, _Hang())

    @property
    def hung_since(self) -> float | None:
        """Since when (monotonic) an operation last ran out of time with no success since."""
        return self._hang.since

    @hung_since.setter
    def hung_since(self, value: float | None) -> None:
        self._hang.since = value

    @property
    def prober(self) -> Any:
        """The greenlet finding out whether the server answers again (``_probe``)."""
        return self._hang.prober

    @prober.setter
    def prober(self, value: Any) -> None:
        self._hang.prober = value

    def _connect(self) -> Any:
        # peewee's pool opens a new connection under its own lock, with the same effect as the
        # database's lock above; here the lock covers the bookkeeping only.
        with self._pool_lock:
            while self._connections:
                entry = heapq.heappop(self._connections)
                timestamp, conn = entry[0], entry[-1]
                if self._is_closed(conn):
                    continue
                if self._stale_timeout and self._is_stale(timestamp):
                    self._close_raw(conn)
                    continue
                self._in_use[self.conn_key(conn)] = PoolConnection(timestamp, conn, time.time())
                return conn
            if self._max_connections and (
                len(self._in_use) + self._opening >= self._max_connections
            ):
                raise MaxConnectionsExceeded("Exceeded maximum connections.")
            self._opening += 1
        try:
            conn = _Connection(database=self.database, autocommit=True, **self.connect_params)
        except BaseException:
            with self._pool_lock:
                self._opening -= 1
                self._pool_available.notify()  # the slot is free again
            raise
        with self._pool_lock:
            self._opening -= 1
            now = time.time()
            self._in_use[self.conn_key(conn)] = PoolConnection(now, conn, now)
        return conn

    def _is_closed(self, conn: Any) -> bool:
        return not conn.open

    def _can_reuse(self, conn: Any) -> bool:
        # PyMySQL knows from the last reply whether a transaction is open: ask only then.
        if conn.server_status & 0x0001:  # SERVER_STATUS_IN_TRANS
            # A request's teardown returns the connection: a hung server must not hold it.
            deadline = _Deadline.arm(self, self.operation_timeout, conn)
            try:
                conn.rollback()
            except Exception:
                return False
            finally:
                if deadline is not None:
                    deadline.cancel()
        return True


class _Connection(pymysql.connections.Connection):
    """PyMySQL's connection, with one TLS context per process for its default ("preferred")
    mode. PyMySQL makes a context per connection, and loading the system's CA certificates
    takes tens of milliseconds of CPU (95 ms on the loaded test machine) during which a gevent
    worker answers nothing: while a hung database was probed every two seconds, that alone
    pushed every other request's p99 past 100 ms. Given TLS options still get a context each.
    """

    def _create_ssl_ctx(self, sslp: Any) -> Any:
        global _preferred_tls
        if sslp:
            return super()._create_ssl_ctx(sslp)
        if _preferred_tls is None:
            _preferred_tls = super()._create_ssl_ctx(sslp)
        return _preferred_tls


#: The TLS context of connections without TLS options (``_Connection``), made once.
_preferred_tls: Any = None


class _Hang:
    """Whether a database server looks hung to this process (see ``run_on``)."""

    __slots__ = ("since", "prober")

    def __init__(self) -> None:
        self.since: float | None = None
        self.prober: Any = None


#: (host, port, socket) -> its ``_Hang``, for every MySQL database this process opened.
_HANGS: dict[tuple[Any, Any, Any], _Hang] = {}


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _Expired(BaseException):
    """Thrown into a greenlet whose database operation ran out of time before it had a
    connection (a BaseException, as gevent's Timeout: no ``except Exception`` on the way
    may take it for the driver's error and retry)."""


class _Deadline:
    """The end of one database operation of a gevent worker (see ``run_on``).

    When it passes, a greenlet still waiting for a connection (the pool, the TCP connect, the
    handshake) has ``_Expired`` thrown into it; one with a connection has that connection's
    socket shut down, so the statement fails at once with a lost connection, and so does
    whatever cleanup follows (a ROLLBACK), instead of waiting for a server that reads nothing.
    Either way the database is marked hung (``run_on`` then fails fast, see there) and a
    greenlet starts finding out when it answers again (``_probe``); except for a greenlet
    still queued for one of the pool's connections: that is this worker's own congestion (every
    connection lent), not a sign of the server, and its request alone gets the 503.
    """

    __slots__ = ("database", "connection", "expired", "_greenlet", "_timer")

    def __init__(self, database: Any, seconds: float, connection: Any = None) -> None:
        self.database = database
        self.connection = connection
        self.expired = False
        self._greenlet = gevent.getcurrent()
        self._timer = gevent.get_hub().loop.timer(seconds)
        self._timer.start(self._expire)

    @classmethod
    def arm(cls, database: Any, seconds: float | None, connection: Any = None) -> _Deadline | None:
        """A running deadline, or ``None`` where there is none to keep: no limit, SQLite (its
        calls block the whole process; no timer could run meanwhile), no gevent."""
        if not seconds or not isinstance(database, _PooledMySQL) or not cooperative():
            return None
        return cls(database, seconds, connection)

    def holding(self, connection: Any) -> None:
        """The operation has its connection: from now on the deadline cuts that."""
        self.connection = connection

    def cancel(self) -> None:
        self._timer.stop()
        self._timer.close()

    def _expire(self) -> None:
        self.expired = True
        database = self.database
        if self._greenlet in database.queued:
            self._greenlet.throw(_Expired())
            return
        if database.hung_since is None:
            database.hung_since = time.monotonic()
        if database.prober is None or database.prober.dead:
            database.prober = gevent.spawn(_probe, database)
        sock = getattr(self.connection, "_sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed: the operation has failed on its own
        else:
            self._greenlet.throw(_Expired())


class _PooledSqlite(_CooperativePool, PooledSqliteDatabase):
    """peewee's SQLite pool (its checks are local calls already)."""


def release(database: peewee.Database) -> None:
    """End this greenlet's use of a pooled ``database``: its connection goes back to the pool.

    A plain (unpooled) database keeps its connection: it belongs to a real thread, which
    reuses it for its next request, as a sync worker does.
    """
    if isinstance(database, peewee_pool_types()) and not database.is_closed():
        database.close()


def close_all(database: peewee.Database) -> None:
    """Close every connection ``database`` holds, pooled ones included (before a fork)."""
    if isinstance(database, peewee_pool_types()):
        database.close_all()
    elif not database.is_closed():
        database.close()


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
        close_all(database)
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
        # The global order of commits (see Commit.index); NULL only on rows an earlier version
        # wrote, until start() numbers them.
        commit_index = peewee.BigIntegerField(null=True)

        class Meta:
            # A save moves the old head's row out of the heads (a primary-key update); the
            # unique (key, version) index is what refuses a duplicate version.
            primary_key = peewee.CompositeKey("is_head", "key", "version")
            indexes = (
                (("key", "version"), True),
                (("is_head", "version"), False),
                (("commit_index",), True),
            )

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
            self._row.commit_index,
        )
        self._is_sqlite = isinstance(database, peewee.SqliteDatabase)
        quote = database.quote or '""'
        self._counter_table = f"{table_name}_index"
        counter = f"{quote[0]}{self._counter_table}{quote[-1]}"
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
            "last_index": _sql(row.select(peewee.fn.MAX(row.commit_index))),
            # SQLite: BEGIN IMMEDIATE already orders the writers; the next index is read in it.
            "next_index_sqlite": (
                f"SELECT COALESCE(MAX(commit_index), 0) + 1 FROM {quote[0]}{table_name}{quote[-1]}"
            ),
            # MySQL: the counter row's lock, taken last before the INSERT and held to COMMIT,
            # orders the writers, so index order is the order commits become visible (an
            # AUTO_INCREMENT is not: two transactions take 10 and 11 and 11 may commit first).
            # LAST_INSERT_ID(expr) hands the new value back in the OK packet: no extra query.
            "next_index_mysql": f"UPDATE {counter} SET n = LAST_INSERT_ID(n + 1) WHERE id = 1",
        }
        if not self._is_sqlite:
            # A MySQL save in at most two round trips, each one multi-statement packet: the
            # server runs a packet's statements back to back, so the counter's row lock lives
            # from its UPDATE to the COMMIT of the same packet, never across a client's round
            # trip or a busy worker's scheduling, and concurrent saves share the log flush.
            # The INSERT takes its index from that UPDATE; NULL if the UPDATE matched no row
            # (LAST_INSERT_ID() would hand back this connection's previous index: it is reset
            # first), and _insert_mysql then numbers it as start() does.
            #
            # Nothing in a packet may depend on what the server tells the client: when the
            # client is gone (a deadline shut its socket while the server was stopped), the
            # server still runs the packet, and ROW_COUNT() then reads -1 (the failed send is
            # the last statement's diagnostics). A packet that retired the head and, reading
            # ROW_COUNT(), skipped the INSERT before its COMMIT left a key without a head in
            # the hung-database fault run. So the retiring UPDATE ends the first packet (the
            # client decides), and the second reads only LAST_INSERT_ID().
            insert_sql = _sql(row.insert({
                **{getattr(row, name): None for name in _INSERT_COLUMNS[:-1]},
                row.commit_index: SQL("NULLIF(LAST_INSERT_ID(), 0)"),
            }))
            numbered_insert = (
                f"DO LAST_INSERT_ID(0); {self._sql['next_index_mysql']}; {insert_sql}; COMMIT"
            )
            self._sql.update({
                "begin_retire_chain":
                    f"BEGIN; {self._sql['retire_head']}; {self._sql['chain_of']}",
                "numbered_insert": numbered_insert,
                "begin_numbered_insert": f"BEGIN; {numbered_insert}",
            })
        feed = row.select(*self._fields).where(row.commit_index > 0)
        self._feed_sql = {
            False: _sql(feed.order_by(row.commit_index).limit(1)),
            True: _sql(
                feed.where((row.key >= "a") & (row.key < "b")).order_by(row.commit_index).limit(1)
            ),
            "from": _sql(feed.where(row.key >= "a").order_by(row.commit_index).limit(1)),
        }
        self._to_db_mtime = row.mtime.db_value
        self._from_db_mtime = row.mtime.python_value

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create the journal table and its index when missing; bring a journal made by an
        earlier version up to date (new columns added, every row kept)."""
        # Statements unbounded: a migration may rightly take minutes (getting the connection
        # is bounded still).
        run_on(self.database, lambda: self._row.create_table(safe=True), statements=False)
        run_on(self.database, self._migrate_locked, statements=False)

    def _migrate_locked(self) -> None:
        # Every worker of every host starts the storage: one migrates, the others wait and
        # then find nothing to do (two numbering the same rows would give them two indexes).
        if self._is_sqlite:
            with self.database.atomic(lock_type="IMMEDIATE"):
                self._migrate()
            return
        name = f"rainer-migrate-{self.database.database}.{self.table_name}"[:64]
        got = self.database.execute_sql("SELECT GET_LOCK(%s, 600)", (name,)).fetchone()
        if not got or got[0] != 1:
            raise StorageUnavailable(UNAVAILABLE)
        try:
            self._migrate()
        finally:
            self.database.execute_sql("SELECT RELEASE_LOCK(%s)", (name,))

    def _migrate(self) -> None:
        columns = {c.name for c in self.database.get_columns(self.table_name)}
        row = self._row
        for field in (row.identity, row.chain, row.commit_index):
            if field.column_name not in columns:
                log.warning("Adding column %s to journal table %s", field.column_name, self.table_name)
                ddl = f"ALTER TABLE {self._quoted_table()} ADD COLUMN {self._column_ddl(field)}"
                self.database.execute_sql(ddl)
        # Chains of rows written before chains existed: one pass over the journal in key,
        # version order, each link computed from the previous row's, the missing ones written
        # in batches (a journal of 500k rows migrates in one pass, not a query per row).
        row = self._row
        if row.select(row.key).where(row.chain.is_null()).limit(1).exists():
            self._chain_rows()
        self._number_rows()

    def _chain_rows(self) -> None:
        row = self._row
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

    def _number_rows(self) -> None:
        """Give every row without an index one (rows of a journal made before indexes, or
        written by an earlier version during a rolling upgrade), after every numbered row;
        then make sure the index and, on MySQL, the counter exist."""
        row = self._row
        execute = self.database.execute_sql
        counter = self._quoted(self._counter_table)
        if self._numbered():
            return
        with self.database.atomic():
            if not self._is_sqlite:
                execute(
                    f"CREATE TABLE IF NOT EXISTS {counter} "
                    "(id INTEGER NOT NULL PRIMARY KEY, n BIGINT NOT NULL)"
                )
                execute(
                    f"INSERT IGNORE INTO {counter} (id, n) SELECT 1, "
                    f"COALESCE(MAX(commit_index), 0) FROM {self._quoted_table()}"
                )
                # Locks the counter: no save numbers a commit while these rows are numbered.
                (last,) = execute(f"SELECT n FROM {counter} WHERE id = 1 FOR UPDATE").fetchone()
            else:
                last = execute(self._sql["last_index"]).fetchone()[0] or 0
            query = row.select(row.key, row.version, row.mtime).where(row.commit_index.is_null())
            unnumbered = [
                (bytes(k).decode("utf-8") if not isinstance(k, str) else k, v, row.mtime.python_value(m))
                for k, v, m in query.tuples()
            ]
            if unnumbered:
                log.warning(
                    "Numbering %d commits of %s in the global index", len(unnumbered), self.table_name
                )
                ordered = _history_order(unnumbered)
                numbers = [
                    (last + n, key.encode("utf-8"), version)
                    for n, (key, version) in enumerate(ordered, 1)
                ]
                if self._is_sqlite:
                    update = row.update(commit_index=0).where((row.key == "k") & (row.version == 1))
                    self.database.cursor().executemany(_sql(update), numbers)
                else:
                    self._number_in_one_update(numbers)
                last += len(ordered)
                if not self._is_sqlite:
                    execute(f"UPDATE {counter} SET n = %s WHERE id = 1", (last,))
        indexes = {index.name for index in self.database.get_indexes(self.table_name)}
        wanted = peewee.ModelIndex(row, (row.commit_index,), unique=True)
        if wanted._name not in indexes:
            log.warning("Adding the index %s to %s", wanted._name, self.table_name)
            self.database.execute(self._row._schema._create_index(wanted, safe=False))

    def _number_in_one_update(self, numbers: list[tuple[int, bytes, int]]) -> None:
        """MySQL: set ``commit_index`` of each (index, key, version) through a temporary table
        and one joined UPDATE. An UPDATE per row took 7 minutes for a journal of 500k rows
        (a round trip each: PyMySQL batches only INSERTs); this way the whole start took 16 s."""
        execute = self.database.execute_sql
        numbering = self._quoted("rainer_numbering")
        execute(
            f"CREATE TEMPORARY TABLE {numbering} (n BIGINT NOT NULL, `key` VARBINARY(255) "
            "NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (`key`, version))"
        )
        try:
            cursor = self.database.cursor()
            for start in range(0, len(numbers), _MIGRATION_BATCH):
                cursor.executemany(
                    f"INSERT INTO {numbering} (n, `key`, version) VALUES (%s, %s, %s)",
                    numbers[start : start + _MIGRATION_BATCH],
                )
            execute(
                f"UPDATE {self._quoted_table()} AS t JOIN {numbering} AS m "
                "ON t.`key` = m.`key` AND t.version = m.version SET t.commit_index = m.n"
            )
        finally:
            execute(f"DROP TEMPORARY TABLE {numbering}")

    def _numbered(self) -> bool:
        """Whether every row has its index and the counter and index exist: the start of every
        worker asks, so without taking a lock (locking reads here deadlocked with saves)."""
        unnumbered = self._row.select(SQL("1")).where(self._row.commit_index.is_null()).limit(1)
        if unnumbered.exists():
            return False
        indexes = {index.name for index in self.database.get_indexes(self.table_name)}
        if peewee.ModelIndex(self._row, (self._row.commit_index,), unique=True)._name not in indexes:
            return False
        if self._is_sqlite:
            return True
        try:
            found = self.database.execute_sql(
                f"SELECT n FROM {self._quoted(self._counter_table)} WHERE id = 1"
            ).fetchone()
        except peewee.ProgrammingError:  # no counter table yet (MySQL error 1146)
            return False
        return found is not None

    def _quoted(self, name: str) -> str:
        quote = self.database.quote or '""'
        return f"{quote[0]}{name}{quote[-1]}"

    def _quoted_table(self) -> str:
        quote = self.database.quote or '""'
        return f"{quote[0]}{self.table_name}{quote[-1]}"

    def _column_ddl(self, field: Field) -> str:
        context = self.database.get_sql_context()
        sql, params = context.sql(field.ddl(context)).query()
        assert not params, "column DDL takes no parameters"
        return sql

    def stop(self) -> None:
        close_all(self.database)

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

    def last_index(self) -> int:
        """The index of the newest commit (0 when there is none): one lookup in its index."""
        sql = self._sql["last_index"]
        found = self._run(lambda: self.database.execute_sql(sql).fetchone())
        return int(found[0] or 0) if found else 0

    def changes(self, since: int, limit: int = 1000, prefix: str = "") -> list[Commit]:
        """Commits with an index above ``since``, oldest first, at most ``limit``, of keys
        starting with ``prefix``; tombstones included. Walks the index's order, so a page
        costs the rows it returns (plus, with a prefix, the rows of other keys it passes)."""
        params: tuple[Any, ...] = (max(0, since),)
        if prefix:
            low = prefix.encode("utf-8")
            high = _prefix_end(low)
            if high is None:
                sql, params = self._feed_sql["from"], (*params, low)
            else:
                sql, params = self._feed_sql[True], (*params, low, high)
        else:
            sql = self._feed_sql[False]
        params = (*params, max(1, limit))
        rows = self._run(lambda: self.database.execute_sql(sql, params).fetchall())
        return [self._to_commit(row) for row in rows]

    def _heads(self, include_empty: bool) -> dict[str, Commit]:
        if include_empty:
            sql, params = self._sql["heads"], (True,)
        else:
            sql, params = self._sql["heads_non_empty"], (True, False)
        rows = self._run(lambda: self.database.execute_sql(sql, params).fetchall(), bulk=True)
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
        database = self.database
        limit = getattr(database, "operation_timeout", None)
        # The statements are bounded as ``run_on``'s are; the caller's block (a ZooKeeper
        # write) is not the database's time.
        deadline = _Deadline.arm(database, limit, database.connection())
        try:
            with database.atomic(**({"lock_type": "IMMEDIATE"} if self._is_sqlite else {})):
                row = database.execute_sql(
                    self._sql["lock_head"], (True, key.encode("utf-8"))
                ).fetchone()
                if deadline is not None:
                    deadline.cancel()
                try:
                    yield None if row is None else self._to_commit(row)
                finally:
                    # Then the COMMIT (or ROLLBACK) on leaving the block.
                    deadline = _Deadline.arm(database, limit, database.connection())
            _answered(database)
        except (OperationalError, InterfaceError) as exc:
            _discard_connection(database)
            raise StorageUnavailable(UNAVAILABLE, detail=_describe(exc)) from exc
        finally:
            if deadline is not None:
                deadline.cancel()

    @contextlib.contextmanager
    def locked_heads(self, keys: Collection[str]) -> Iterator[dict[str, Commit]]:
        """The heads of ``keys`` as of now (keys without one left out), their writers held off
        until the block ends: ``locked_head`` for many keys in one transaction.

        A first publish of 10k keys then costs a few transactions instead of 10k. The rows
        are locked in key order, so two publishers (the elected one and ``flask rainer
        publish``) queue rather than deadlock. SQLite's BEGIN IMMEDIATE holds every writer
        off for the block, as ``locked_head`` does.

        :raises StorageUnavailable: when the database cannot be reached.
        """
        self._run(lambda: None)  # connected, or reconnected once
        row = self._row
        encoded = sorted(key.encode("utf-8") for key in keys)
        try:
            with self.database.atomic(**({"lock_type": "IMMEDIATE"} if self._is_sqlite else {})):
                heads: dict[str, Commit] = {}
                # Bounded IN lists: SQLite allows 32766 parameters, MySQL's packet is finite.
                for start in range(0, len(encoded), _LOCK_CHUNK):
                    chunk = encoded[start : start + _LOCK_CHUNK]
                    query = (
                        row.select(*self._fields)
                        .where((row.is_head == True) & row.key.in_(chunk))  # noqa: E712
                        .order_by(row.key)
                        .for_update(not self._is_sqlite)
                    )
                    for found in self.database.execute_sql(*query.sql()).fetchall():
                        commit = self._to_commit(found)
                        heads[commit.key] = commit
                yield heads
        except (OperationalError, InterfaceError) as exc:
            _discard_connection(self.database)
            raise StorageUnavailable(UNAVAILABLE, detail=_describe(exc)) from exc

    # ------------------------------------------------------------------ writes

    def save(self, commit: Commit) -> Commit:
        """Append ``commit``; return it as kept, with its ``index``."""
        retried = False

        def attempt() -> Commit:
            nonlocal retried
            for deadlocks in range(_DEADLOCK_RETRIES + 1):
                try:
                    return self._insert(commit)
                except (IntegrityError, _NotNextVersion) as exc:
                    # Not the next version, or a lost race; or the retry of a save whose COMMIT
                    # reply was lost with the connection, in which case the commit is stored.
                    if retried:
                        stored = self.get(commit.key, commit.version)
                        if stored == commit:
                            return stored
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
            raise AssertionError("unreachable")

        kept = self._run(attempt)
        # What follows a save may wait long (its publishing to ZooKeeper): under gevent the
        # connection goes back to the pool now, not when the request ends, so the pool is
        # sized by database work alone. Under load with ZooKeeper, POSTs holding theirs
        # through the publish made others wait past the database timeout: 503s.
        if not self.database.in_transaction():
            release(self.database)
        return kept

    def _insert(self, commit: Commit) -> Commit:
        if not self._is_sqlite:
            return self._insert_mysql(commit)
        execute = self.database.execute_sql
        key = commit.key.encode("utf-8")
        # BEGIN IMMEDIATE takes the write lock up front, so two writers queue on the busy
        # handler instead of both reading, then one failing with "database is locked"; it
        # also orders the writers, so the next index is read in it.
        with self.database.atomic(lock_type="IMMEDIATE"):
            previous = GENESIS
            if commit.version > 1:
                retired = execute(self._sql["retire_head"], (False, True, key, commit.version - 1))
                if retired.rowcount != 1:
                    raise _NotNextVersion()
                found = execute(self._sql["chain_of"], (key, commit.version - 1)).fetchone()
                previous = (found[0] if found else None) or GENESIS
            index = execute(self._sql["next_index_sqlite"]).fetchone()[0]
            execute(self._sql["insert"], (
                key, commit.version, commit.author, commit.comment,
                self._to_db_mtime(commit.mtime), commit.empty, True, commit.payload,
                commit.identity, link(previous, commit), index,
            ))
        return commit.with_deserialization(self.deserialization).with_index(index)

    def _insert_mysql(self, commit: Commit) -> Commit:
        # No SELECT ... FOR UPDATE (it deadlocks on new keys under REPEATABLE READ): the
        # retiring UPDATE is the version check, and for version 1 the unique index is.
        key = commit.key.encode("utf-8")
        cursor = self.database.cursor()
        try:
            with peewee.__exception_wrapper__:
                previous = GENESIS
                if commit.version > 1:
                    cursor.execute(
                        self._sql["begin_retire_chain"],
                        (False, True, key, commit.version - 1, key, commit.version - 1),
                    )
                    cursor.nextset()  # past BEGIN's reply, to the retiring UPDATE's
                    retired = cursor.rowcount
                    cursor.nextset()
                    # The retiring UPDATE locked that row: its chain cannot change under us.
                    found = cursor.fetchone()
                    if retired != 1:
                        raise _NotNextVersion()
                    previous = (found[0] if found else None) or GENESIS
                    sql = self._sql["numbered_insert"]
                else:
                    sql = self._sql["begin_numbered_insert"]
                cursor.execute(sql, (
                    key, commit.version, commit.author, commit.comment,
                    self._to_db_mtime(commit.mtime), commit.empty, True, commit.payload,
                    commit.identity, link(previous, commit),
                ))
                if commit.version == 1:
                    cursor.nextset()  # past BEGIN's reply
                cursor.nextset()  # past the reset's, to the counter's UPDATE's
                counted, index = cursor.rowcount, cursor.lastrowid
                while cursor.nextset():  # the INSERT's and the COMMIT's replies
                    pass
        except BaseException:
            self._roll_back(cursor)
            raise
        if counted != 1:
            # Stored, with no index: the counter row is gone (start() makes it). Number the
            # row as start() does, which puts the counter back.
            log.error("The commit index counter of %s was missing; numbering %s version %s",
                      self.table_name, commit.key, commit.version)
            self._migrate_locked()
            row = self.database.execute_sql(
                self._sql["get_version"], (key, commit.version)
            ).fetchone()
            index = self._to_commit(row).index
        return commit.with_deserialization(self.deserialization).with_index(index)

    def _roll_back(self, cursor: Any) -> None:
        """End the transaction a failed save left open (a failed statement of a multi-statement
        packet ends the packet, so its COMMIT never ran)."""
        connection = cursor.connection
        if connection is None or not connection.open:
            return
        try:
            if connection.server_status & 0x0001:  # SERVER_STATUS_IN_TRANS
                connection.rollback()
        except Exception:  # the connection is broken; run_on discards it
            log.debug("Rollback after a failed save failed", exc_info=True)

    def _ordering_error(self, commit: Commit) -> CommitOrderingError:
        head = self.get(commit.key)
        return CommitOrderingError(commit.key, (head.version if head else 0) + 1, commit.version)

    # ------------------------------------------------------------------ plumbing

    def _run(self, operation: Callable[[], T], bulk: bool = False) -> T:
        limit = None
        if bulk:
            # Every head, the whole journal: as long as the journal makes it, but not forever.
            limit = max(BULK_OPERATION_TIMEOUT, getattr(self.database, "operation_timeout", 0) or 0)
        return run_on(self.database, operation, limit)

    def _to_commit(self, row: tuple) -> Commit:
        key, version, author, comment, mtime, is_empty, payload, identity, index = row
        return Commit(
            bytes(key).decode("utf-8") if not isinstance(key, str) else key,
            version,
            None if is_empty else bytes(payload),
            author,
            comment,
            self._from_db_mtime(mtime),
            identity=identity or "",
            index=index,
            deserialization=self.deserialization,
        )

    # ------------------------------------------------------------------ tamper evidence

    def verify(self) -> Iterator[tuple[str, int, str]]:
        """Recompute every key's chain; yield ``(key, version, problem)`` for each key's first
        row that does not match (nothing when the journal is intact). Streams the table in
        key, version order."""
        row = self._row
        query = row.select(*self._fields, row.chain).order_by(row.key, row.version)
        rows = self._run(lambda: self.database.execute_sql(*query.sql()).fetchall(), bulk=True)
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


def run_on(
    database: peewee.Database,
    operation: Callable[[], T],
    limit: float | None = None,
    statements: bool = True,
) -> T:
    """Run ``operation`` on this thread's connection to ``database``, reconnecting once if it
    went stale.

    Under gevent, a MySQL operation ends after ``limit`` seconds (default: the database's
    ``operation_timeout``), from the wait for a pooled connection to the last statement;
    ``statements=False`` bounds only getting the connection (a migration may rightly take
    long). Once an operation has run out of time, the database counts as hung until it
    answers again (``_probe`` asks in the background): meanwhile every operation of the
    process fails at once, so that nothing queues behind a stuck server, no request pays the
    wait twice, and none holds a connection it cannot use.

    :raises StorageUnavailable: when the database cannot be reached, fails, or did not answer
        in time.
    """
    is_sqlite = isinstance(database, peewee.SqliteDatabase)
    # A pooled connection may have been idle in the pool when the server dropped it: as stale
    # as one this thread kept open, and worth the same one retry on a fresh one.
    pooled = isinstance(database, peewee_pool_types())
    seconds = limit if limit is not None else getattr(database, "operation_timeout", None)
    hung_since = getattr(database, "hung_since", None)
    if hung_since is not None and database.prober is not gevent.getcurrent():
        if database.prober is None or database.prober.dead:  # never left without one
            database.prober = gevent.spawn(_probe, database)
        raise StorageUnavailable(
            UNAVAILABLE, detail=f"not answering for {time.monotonic() - hung_since:.1f} s"
        )
    return _run_bounded(database, operation, seconds, statements, is_sqlite, pooled)


#: Seconds between two probes of a hung database that fail at once (say it went from hung to
#: refusing connections); a probe that waits out its deadline is followed at once.
_PROBE_PAUSE = 0.2


def _probe(database: _PooledMySQL) -> None:
    """Ask a hung ``database`` for ``SELECT 1``, each try bounded as any operation, until it
    answers: the first answer ends the hang for every request of the process. A try still
    waiting when the server resumes gets its answer then, so recovery is immediate."""
    while database.hung_since is not None:
        started = time.monotonic()
        try:
            run_on(database, lambda: database.execute_sql("SELECT 1").fetchone())
        except StorageUnavailable:
            pass
        except Exception:  # whatever it was, the next try may tell; never stop asking
            log.debug("Probing the hung database failed", exc_info=True)
        finally:
            release(database)
        if database.hung_since is not None:
            gevent.sleep(max(0.0, _PROBE_PAUSE - (time.monotonic() - started)))


def _run_bounded(
    database: peewee.Database,
    operation: Callable[[], T],
    seconds: float | None,
    statements: bool,
    is_sqlite: bool,
    pooled: bool,
) -> T:
    for attempt in (1, 2):
        was_open = pooled or not database.is_closed()
        deadline = _Deadline.arm(database, seconds)
        try:
            database.connect(reuse_if_open=True)
            if deadline is not None:
                if statements:
                    deadline.holding(database.connection())
                else:
                    deadline.cancel()
                    deadline = None
            result = operation()
            _answered(database)
            return result
        except _Expired:
            # Still waiting for a connection when the time ran out: whatever the driver had
            # half made is gone with the exception (PyMySQL closes its socket).
            log.debug("%s: no connection within %s s", UNAVAILABLE, seconds)
            _discard_connection(database)
            raise StorageUnavailable(
                UNAVAILABLE, detail=f"no connection within {seconds} s (hung?)"
            ) from None
        except MaxConnectionsExceeded:
            # Every pooled connection stayed lent for the pool's whole timeout: overloaded.
            log.warning("%s: every pooled connection is in use", UNAVAILABLE)
            raise StorageUnavailable(UNAVAILABLE) from None
        except (OperationalError, InterfaceError) as exc:
            _discard_connection(database)
            if deadline is not None and deadline.expired:
                # Not a stale connection: the server did not answer in time. A retry would
                # only wait again.
                log.debug("%s: no answer within %s s", UNAVAILABLE, seconds)
                raise StorageUnavailable(
                    UNAVAILABLE, detail=f"no answer within {seconds} s (hung?)"
                ) from exc
            if (
                not is_sqlite
                and was_open
                and attempt == 1
                and _error_code(exc) in _DISCONNECT_CODES
            ):
                log.info("Database connection lost (%s); reconnecting", _one_line(exc))
                if pooled:
                    # What dropped this one (a restart, a failover) dropped its idle siblings
                    # too: the retry must not be lent another of them.
                    database.close_idle()
                continue
            # Not a warning here: whoever catches the error reports it once, with the detail
            # (the HTTP 503 handler, the readiness check, the publisher's pass, an admin
            # command); a second line per failure from here only doubled an outage's noise.
            log.debug("%s: %s", UNAVAILABLE, _describe(exc))
            raise StorageUnavailable(UNAVAILABLE, detail=_describe(exc)) from exc
        finally:
            if deadline is not None:
                deadline.cancel()
    raise AssertionError("unreachable")


def _answered(database: peewee.Database) -> None:
    """An operation succeeded: the database is not hung (any more)."""
    if getattr(database, "hung_since", None) is not None:
        log.info("Database answering again after %.1f s", time.monotonic() - database.hung_since)
        database.hung_since = None


def _discard_connection(database: peewee.Database) -> None:
    try:
        if isinstance(database, peewee_pool_types()):
            database.manual_close()  # not back into the pool
        else:
            database.close()
    except Exception:  # closing a broken connection may fail too; it is gone either way
        log.debug("Ignoring error while closing a broken connection", exc_info=True)
        database._state.reset()


class _NotNextVersion(Exception):
    """The version before the commit's is not the key's head (or the key has no head)."""


# The column order of the "insert" statement and of its parameters.
_INSERT_COLUMNS = (
    "key", "version", "author", "comment", "mtime", "is_empty", "is_head", "payload",
    "identity", "chain", "commit_index",
)


def _prefix_end(prefix: bytes) -> bytes | None:
    """The least byte string above every string starting with ``prefix`` (``None``: none)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes((trimmed[-1] + 1,))


def _history_order(rows: list[tuple[str, int, datetime]]) -> list[tuple[str, int]]:
    """(key, version) of journal rows in the order to number them: by time, yet each key's
    versions in version order even where an imported time runs backwards (a row sorts at the
    latest time of its key's history so far), ties by key and version: deterministic."""
    rows = sorted(rows, key=lambda r: (r[0].encode("utf-8"), r[1]))
    placed = []
    latest: dict[str, datetime] = {}
    for key, version, mtime in rows:
        at = max(mtime, latest.get(key, mtime))
        latest[key] = at
        placed.append((at, key.encode("utf-8"), version, key))
    placed.sort()
    return [(key, version) for _at, _k, version, key in placed]


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
