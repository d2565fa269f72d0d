"""The keeper: each key's latest non-empty commit in ZooKeeper (``<base>/data/<key>``).

ZooKeeper is a cache of the system of record, never the record itself: every write here is a
compare-and-set on the znode's stat version, so a slow or stale writer can lose a race but can
never roll a key back. Layout and parsing: ``zk.znode``; live views: ``zk.mirror``.

Deletes stay deleted: a tombstone that removes ``data/<key>`` records itself in
``deleted/<key>`` in the same multi-op transaction, and ``data/<key>`` is only ever created in
a transaction that checks that record. So a writer holding an older commit (a publish pass
that read its heads before the tombstone, a write queued in kazoo during an outage) cannot
bring the key back, not even for a moment. The original had no such record (its documented
limit); its readers only read ``data/`` and never see ``deleted/``.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import BadArgumentsError
from kazoo.exceptions import BadVersionError
from kazoo.exceptions import KazooException
from kazoo.exceptions import NodeExistsError
from kazoo.exceptions import NoNodeError
from kazoo.exceptions import RolledBackError
from kazoo.exceptions import RuntimeInconsistency
from kazoo.retry import KazooRetry

from rainer_server.commit import Commit
from rainer_server.errors import CommitTooLarge
from rainer_server.errors import ConcurrentCommitError
from rainer_server.errors import InvalidCommit
from rainer_server.errors import KeeperError
from rainer_server.errors import LostCompareAndSet
from rainer_server.payloads import KeyValueDeserialization
from rainer_server.zk.connection import SerialKazooClient
from rainer_server.zk.mirror import CommitMirror
from rainer_server.zk.znode import describe_size
from rainer_server.zk.znode import join
from rainer_server.zk.znode import parse_znode

log = logging.getLogger(__name__)

#: ZooKeeper refuses packets over ``jute.maxbuffer`` (1 MiB - 1 by default) by *dropping the
#: connection*, which would suspend every recipe on the client. Refusing a bit below that limit
#: turns one oversized commit into one logged error instead of a reconnect storm.
DEFAULT_MAX_ZNODE_BYTES = 1_000_000

#: How long one keeper call may wait on ZooKeeper. Writers (the keeper-publishing storage) must
#: not hang on an unreachable ensemble: the auto-publisher repairs whatever they skip.
DEFAULT_TIMEOUT = 2.0

#: ``create_many``: keys per transaction (3 operations each), and transactions sent before
#: the first answer is awaited. kazoo spends ~0.3 ms of Python per request whatever its size,
#: so a first publish of 10k keys costs a few dozen requests instead of 20k; a transaction is
#: all or nothing, so a key that must be decided alone costs its batch's keys one retry.
KEYS_PER_TRANSACTION = 200
TRANSACTIONS_IN_FLIGHT = 8
# Well below jute.maxbuffer (1 MiB): the server drops the connection of a bigger request.
_BATCH_BYTES = 512 * 1024


def make_kazoo_client(hosts: str, session_timeout: float = 10.0, **kwargs: Any) -> KazooClient:
    """Build (but do not start) a ``KazooClient`` whose retries back off to at most ~1 s.

    kazoo's default reconnect backoff grows to an hour; after an outage a keeper would then
    stay disconnected long after ZooKeeper is back. Capped at about a second, a keeper
    converges within one publish period plus a few seconds.

    :param hosts: kazoo hosts string, optionally with a chroot (``"zk1:2181,zk2:2181/rainer"``).
    :param session_timeout: the ZooKeeper session timeout in seconds.
    :param kwargs: passed on to ``KazooClient``.
    """
    # Infinite tries, like kazoo's defaults: recipes (watches, the election) must survive any
    # outage. Only the delay between tries changes. Jitter <= 0.2 keeps a try within ~1.2 s.
    connection_retry = KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_jitter=0.2, max_delay=1.0)
    command_retry = KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_jitter=0.2, max_delay=1.0)
    # Serialised submission: several greenlets of a gevent worker may send at once.
    return SerialKazooClient(
        hosts=hosts,
        timeout=session_timeout,
        connection_retry=connection_retry,
        command_retry=command_retry,
        **kwargs,
    )


class SaveResult(str, enum.Enum):
    """What ``CommitKeeper.save`` did to the znode."""

    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    UNCHANGED = "unchanged"


class CommitKeeper:
    """ZooKeeper storage and notification of each key's most current commit.

    Not a ``CommitStorage``: it keeps no history, and empty or unparseable commits are not
    kept in ``data/`` (a deleted key's tombstone is recorded under ``deleted/``).

    :param client: a kazoo client; the keeper neither starts nor stops it.
    :param base_path: the keeper's root (``/rainer``); ``data/``, ``deleted/`` and
        ``election/`` live below.
    :param timeout: the longest one call waits on ZooKeeper, in seconds.
    :param max_znode_bytes: commits that serialize larger than this are refused.
    :param deserialization: how the commits it reads, and its mirrors', make their ``value``.
    """

    def __init__(
        self,
        client: KazooClient,
        base_path: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_znode_bytes: int = DEFAULT_MAX_ZNODE_BYTES,
        deserialization: KeyValueDeserialization | None = None,
    ) -> None:
        self.client = client
        self.deserialization = deserialization
        self.base_path = "/" + base_path.strip("/") if base_path.strip("/") else "/"
        self.data_path = join(self.base_path, "data")
        self.deleted_path = join(self.base_path, "deleted")
        self.election_path = join(self.base_path, "election")
        self.timeout = timeout
        self.max_znode_bytes = max_znode_bytes
        # A worker's first writes race its client's first connection (started in the
        # background): until then, calls wait for it, at most ``timeout`` after this point.
        self._first_connect_deadline = time.monotonic() + timeout
        #: Called with a key whose save failed on ZooKeeper itself (unreachable, timed out,
        #: connection lost): ZooKeeper may now hold less than the storage, or a write whose
        #: outcome is unknown may still land. ``zk.repair.DriftRepair`` re-checks such keys.
        self.suspect_listeners: list[Callable[[str], object]] = []
        self._sets = _SetCombiner(self)

    def __repr__(self) -> str:
        return f"CommitKeeper({self.base_path!r})"

    def znode(self, key: str) -> str:
        """The path of ``key``'s znode."""
        return join(self.data_path, key)

    def deleted_znode(self, key: str) -> str:
        """The path of ``key``'s deletion record (present while ``key`` is deleted)."""
        return join(self.deleted_path, key)

    # ------------------------------------------------------------------ reads

    def get(self, key: str) -> Commit | None:
        """The commit in ``key``'s znode, or ``None`` when there is none.

        :raises InvalidCommit: when the znode exists but does not parse (as the original did).
        :raises KeeperError: when ZooKeeper cannot be reached in time.
        """
        deadline = self._start()
        data, _stat = self._read_znode(self.znode(key), deadline)
        return None if data is None else parse_znode(key, data, self.deserialization)

    def keys(self) -> list[str]:
        """Every key with a znode, sorted (unparseable ones included)."""
        deadline = self._start()
        try:
            children = self.wait_for(self.client.get_children_async(self.data_path), deadline)
        except NoNodeError:
            return []
        return sorted(children)

    def heads(self) -> dict[str, Commit]:
        """A point-in-time map key -> commit of every parseable znode.

        Unlike ``get``, an unparseable znode is logged and left out (as the mirror does), so one
        corrupt key cannot hide all the others.
        """
        return self._read_all(self.data_path, self.znode, self.keys())

    def get_deletion(self, key: str) -> Commit | None:
        """The tombstone recorded for ``key`` while it is deleted, or ``None``.

        :raises InvalidCommit: when the record exists but does not parse.
        :raises KeeperError: when ZooKeeper cannot be reached in time.
        """
        deadline = self._start()
        data, _stat = self._read_znode(self.deleted_znode(key), deadline)
        return None if data is None else parse_znode(key, data)

    def deletions(self) -> dict[str, Commit]:
        """A point-in-time map key -> recorded tombstone of every deleted key."""
        deadline = self._start()
        try:
            children = self.wait_for(self.client.get_children_async(self.deleted_path), deadline)
        except NoNodeError:
            return {}
        return self._read_all(self.deleted_path, self.deleted_znode, sorted(children))

    def _read_all(
        self, parent: str, path_of: Callable[[str], str], keys: list[str]
    ) -> dict[str, Commit]:
        # Pipelined: every read is in flight at once, so 10k keys cost one round trip plus
        # kazoo's per-request overhead rather than 10k round trips.
        pending = [(key, self.client.get_async(path_of(key))) for key in keys]
        commits: dict[str, Commit] = {}
        for key, result in pending:
            try:
                # A deadline per answer, not per call: 10k answers may take longer than one
                # timeout, but a silent ZooKeeper is still noticed within one.
                data, _stat = self.wait_for(result, time.monotonic() + self.timeout)
            except NoNodeError:
                continue  # deleted since it was listed
            try:
                commits[key] = parse_znode(key, data, self.deserialization)
            except InvalidCommit as exc:
                log.error(
                    "Commit with bad serialization: %s: %s, data = %s (under %s)",
                    key,
                    exc,
                    describe_size(data),
                    parent,
                )
        return commits

    def mirror(self, timeout: float | None = 30.0, wait: bool = True) -> CommitMirror:
        """Open a live view of every znode under ``data/``, complete when returned.

        Close it (or use it as a context manager) when no longer needed.

        :param timeout: how long to wait for the first complete view; ``None`` waits forever.
        :param wait: ``False`` returns at once; ``initialized`` then tells when it is complete.
        :raises KeeperError: when the view is not complete in time (the mirror is closed).
        """
        return self._open_mirror(CommitMirror(self), timeout, wait)

    def deletions_mirror(self, timeout: float | None = 30.0, wait: bool = True) -> CommitMirror:
        """Open a live view of the deletion records under ``deleted/`` (key -> tombstone).

        What the elected publisher compares tombstones with, as it compares commits with a
        ``mirror()``. Same parameters and errors as ``mirror()``.
        """
        mirror = CommitMirror(_DeletionRecords(self), noun="Deletion")
        return self._open_mirror(mirror, timeout, wait)

    @staticmethod
    def _open_mirror(mirror: CommitMirror, timeout: float | None, wait: bool) -> CommitMirror:
        mirror.start()
        if wait and not mirror.wait_initialized(timeout):
            mirror.close()
            raise KeeperError(f"Mirror of {mirror.data_path} not initialized within {timeout} s")
        return mirror

    # ------------------------------------------------------------------ writes

    def save(self, commit: Commit, known: tuple[Commit, int] | None = None) -> SaveResult:
        """``_save(commit, known)``; a failure on ZooKeeper itself makes the key a suspect (see
        ``suspect_listeners``)."""
        try:
            return self._save(commit, known)
        except CommitTooLarge:
            raise  # refused by us, the same every time: nothing to re-check
        except KeeperError:
            self._suspect(commit.key)
            raise

    def _suspect(self, key: str) -> None:
        for listener in list(self.suspect_listeners):
            try:
                listener(key)
            except Exception:
                log.exception("Keeper suspect listener %r failed", listener)

    def _save(self, commit: Commit, known: tuple[Commit, int] | None = None) -> SaveResult:
        """Publish ``commit`` to its znode according to spec §5's table, keeping deletes.

        Never rolls a key back: a commit whose version is not above the znode's (and which is
        not the very same commit) is refused. Beyond the original: while ``deleted/<key>``
        records a tombstone, a commit of the same or an older version is refused too, and a
        tombstone of a key without a znode is still recorded (the result is then
        ``UNCHANGED``: ``data/`` did not change).

        One round trip to read (the znode and its deletion record, pipelined), one to write.
        With ``known``, an update is one round trip: a compare-and-set on that stat version.

        :param known: ``(commit, stat version)`` of the znode as a mirror last read it
            (``CommitMirror.znode_version``). When ``commit`` is a newer non-empty version of
            that commit, it is written with that stat version as the expectation; if the
            mirror was behind (the znode changed, or was deleted), the write fails and
            ``save`` decides on fresh reads as without ``known``. A znode that exists is not
            deleted, so ``deleted/<key>`` needs no check. ZooKeeper restarts the stat version
            of a znode deleted and created again; the mirror forgets a key's version when it
            sees the delete, so an expectation could only match such a new znode if the
            mirror had missed both the tombstone and the re-creation: the same kind of window
            a read-then-write has between its read and its write.
        :raises ConcurrentCommitError: on a refused rollback, and as ``LostCompareAndSet`` on
            a lost compare-and-set (trying again decides anew).
        :raises KeeperError: when ZooKeeper cannot be reached in time, or the commit is too big.
        :raises InvalidCommit: when ZooKeeper refuses the key as a znode name.
        """
        key = commit.key
        path = self.znode(key)
        deadline = self._start()
        if known is not None:
            existing, znode_version = known
            if not commit.empty and existing.key == key and commit.version > existing.version:
                payload = self._serialize(commit)
                try:
                    try:
                        self._sets.set(path, payload, znode_version, deadline)
                    except _RolledBack:
                        # Another save's set failed in the same transaction: this one alone.
                        self._transact(
                            [("set", path, payload, znode_version)], deadline, commit, existing
                        )
                except (LostCompareAndSet, BadVersionError, NoNodeError):
                    log.debug("Mirror behind on %s: reading the znode to publish it", key)
                else:
                    log.debug(
                        "Updated commit %s (from version[%s] to version[%s] znode[%s])",
                        key,
                        existing.version,
                        commit.version,
                        path,
                    )
                    return SaveResult.UPDATED
        record = _Record(self, key, self.client.get_async(self.deleted_znode(key)))
        data, stat = self._read_znode(path, deadline)
        record.wait(deadline)

        if data is None:
            return self._save_absent(commit, record, deadline)

        try:
            existing: Commit | None = parse_znode(key, data)
        except InvalidCommit:
            existing = None

        if existing is None:
            log.warning(
                "Replacing corrupt commit %s (from version[unknown] to version[%s] znode[%s])",
                key,
                commit.version,
                path,
            )
            if commit.empty:
                self._transact(
                    [("delete", path, stat.version), *record.keep(commit)], deadline, commit, None
                )
                return SaveResult.DELETED
            payload = self._serialize(commit)
            self._transact([("set", path, payload, stat.version)], deadline, commit, None)
            return SaveResult.UPDATED

        if commit.empty and commit.version > existing.version:
            log.info("Removing commit[%s] (znode[%s])", key, path)
            self._transact(
                [("delete", path, stat.version), *record.keep(commit)], deadline, commit, existing
            )
            return SaveResult.DELETED
        if commit == existing:
            log.debug("No change to commit[%s] (version[%s] znode[%s])", key, commit.version, path)
            return SaveResult.UNCHANGED
        if commit.version > existing.version:
            payload = self._serialize(commit)
            # DEBUG, as every per-commit line: the commit itself is logged once, where it is
            # saved.
            log.debug(
                "Updating commit %s (from version[%s] to version[%s] znode[%s])",
                key,
                existing.version,
                commit.version,
                path,
            )
            self._transact([("set", path, payload, stat.version)], deadline, commit, existing)
            return SaveResult.UPDATED
        # Same or older version with different content: publishing it would be a rollback, or
        # would overwrite a commit that some other writer got in first.
        raise ConcurrentCommitError(
            key,
            "Refusing to update commit %s (from version[%s] to version[%s] znode[%s])"
            % (key, existing.version, commit.version, path),
        )

    def _save_absent(self, commit: Commit, record: _Record, deadline: float) -> SaveResult:
        """``save`` when ``data/<key>`` is absent: create it, or record a deletion."""
        key = commit.key
        path = self.znode(key)
        deleted = record.commit
        if deleted is not None and deleted.version >= commit.version:
            if commit.empty:
                log.debug(
                    "Deletion of commit %s already recorded (version[%s] znode[%s])",
                    key,
                    deleted.version,
                    record.path,
                )
                return SaveResult.UNCHANGED
            raise ConcurrentCommitError(
                key,
                "Refusing to create commit %s (version[%s] znode[%s]): deleted at version[%s]"
                % (key, commit.version, path, deleted.version),
            )
        if commit.empty:
            # Recorded even though there is nothing to delete: a writer holding an older commit
            # (a pass that read its heads before this tombstone) must not create it later.
            # The create-and-delete of the znode asserts, in the same transaction, that it is
            # still absent: it would fail if such a writer had created it since our read.
            log.info(
                "Recording deletion of commit %s (version[%s] znode[%s])",
                key,
                commit.version,
                record.path,
            )
            self._transact(
                [("create", path, b""), ("delete", path, -1), *record.keep(commit)],
                deadline,
                commit,
                None,
            )
            return SaveResult.UNCHANGED
        payload = self._serialize(commit)
        log.debug("Creating commit %s (version[%s] znode[%s])", key, commit.version, path)
        self._transact([*record.clear(), ("create", path, payload)], deadline, commit, None)
        return SaveResult.CREATED

    def create_many(
        self,
        commits: Sequence[Commit],
        *,
        may_write: Callable[[], bool] = lambda: True,
    ) -> dict[str, Exception | None]:
        """Create the znodes of ``commits`` (non-empty, believed absent), many per transaction.

        What a first publish does with ``save`` one key at a time (read, then a 3-op
        transaction), without the reads and with a few hundred keys per transaction and
        ``TRANSACTIONS_IN_FLIGHT`` transactions pipelined: each key's operations are those of
        ``save`` creating an absent znode (``deleted/<key>`` created and deleted, which
        asserts that no deletion is recorded, then ``data/<key>`` created), so a key whose
        znode or deletion record exists makes its whole transaction fail and nothing of it
        is written. Those keys come back as ``LostCompareAndSet``: the caller decides them
        with ``save``, which reads first.

        :param may_write: checked before each transaction is sent; once false, the keys not
            sent come back as ``KeeperError``.
        :returns: key -> ``None`` (created) or the error: ``LostCompareAndSet`` (a transaction
            failed on a znode's state or a name ZooKeeper refuses), ``CommitTooLarge``,
            ``KeeperError`` (not sent, no answer in time, or ZooKeeper failed).
        """
        outcome: dict[str, Exception | None] = {}
        batches: list[list[tuple[Commit, bytes]]] = [[]]
        size = 0
        for commit in commits:
            try:
                payload = self._serialize(commit)
            except CommitTooLarge as exc:
                outcome[commit.key] = exc
                continue
            # Bounded by bytes too: a request over jute.maxbuffer drops the connection.
            full = len(batches[-1]) >= KEYS_PER_TRANSACTION or size + len(payload) > _BATCH_BYTES
            if full and batches[-1]:
                batches.append([])
                size = 0
            batches[-1].append((commit, payload))
            # Its three operations: the paths (UTF-8) and ~20 bytes of framing each.
            paths = self.znode(commit.key) + 2 * self.deleted_znode(commit.key)
            size += len(payload) + len(paths.encode("utf-8")) + 64
        batches = [batch for batch in batches if batch]
        if not batches:
            return outcome
        try:
            deadline = self._start()
            for parent in (self.data_path, self.deleted_path):
                # Transactions cannot make parents (a fresh ZooKeeper).
                self.wait_for(self.client.ensure_path_async(parent), deadline)
        except KeeperError as exc:
            return {**outcome, **{c.key: exc for batch in batches for c, _ in batch}}
        pending: collections.deque[tuple[list[tuple[Commit, bytes]], Any]] = collections.deque()
        failed: KeeperError | None = None
        for batch in batches:
            if failed is None and not may_write():
                failed = KeeperError("Stopped publishing: no longer allowed to write")
            if failed is not None:
                outcome.update((commit.key, failed) for commit, _ in batch)
                continue
            transaction = self.client.transaction()
            for commit, payload in batch:
                record = self.deleted_znode(commit.key)
                transaction.create(record, b"")
                transaction.delete(record, -1)
                transaction.create(self.znode(commit.key), payload)
            pending.append((batch, transaction.commit_async()))
            while len(pending) >= TRANSACTIONS_IN_FLIGHT:
                failed = self._created(*pending.popleft(), outcome) or failed
        while pending:
            failed = self._created(*pending.popleft(), outcome) or failed
        return outcome

    def _created(
        self, batch: list[tuple[Commit, bytes]], result: Any, outcome: dict[str, Exception | None]
    ) -> KeeperError | None:
        """Record what one ``create_many`` transaction did; return its failure when ZooKeeper
        itself failed (so no more are sent)."""
        try:
            # A deadline per answer, as in _read_all: a silent ZooKeeper is noticed within one.
            results = self.wait_for(result, time.monotonic() + self.timeout)
        except (KeeperError, InvalidCommit, NoNodeError, NodeExistsError, BadVersionError) as exc:
            error = (
                exc if isinstance(exc, KeeperError) else KeeperError(f"ZooKeeper error: {exc!r}")
            )
            outcome.update((commit.key, error) for commit, _ in batch)
            return error
        failure = next(
            (
                result
                for result in results
                if isinstance(result, Exception)
                and not isinstance(result, (RolledBackError, RuntimeInconsistency))
            ),
            None,
        )
        if failure is None:
            for commit, _ in batch:
                log.debug("Created commit %s (version[%s])", commit.key, commit.version)
                outcome[commit.key] = None
            log.info(
                "Created %d commits in one transaction (%s ... %s)",
                len(batch),
                batch[0][0].key,
                batch[-1][0].key,
            )
            return None
        if isinstance(failure, (NodeExistsError, NoNodeError, BadVersionError, BadArgumentsError)):
            # Some key of the batch exists, is recorded deleted, or is not a valid name: each
            # key is then decided on its own.
            for commit, _ in batch:
                outcome[commit.key] = LostCompareAndSet(
                    commit.key, f"A transaction of {len(batch)} creates failed: {failure!r}"
                )
            return None
        error = KeeperError(f"ZooKeeper error: {failure!r}")
        outcome.update((commit.key, error) for commit, _ in batch)
        return error

    # ------------------------------------------------------------------ plumbing

    def _start(self) -> float:
        # kazoo queues requests while disconnected and its synchronous calls then block until
        # the connection is back. Failing fast here (and bounding every wait below) is what
        # keeps a writer from hanging on an unreachable ensemble.
        while not self.client.connected and time.monotonic() < self._first_connect_deadline:
            time.sleep(0.01)
        if not self.client.connected:
            raise KeeperError(f"Not connected to ZooKeeper (state {self.client.state})")
        return time.monotonic() + self.timeout

    def wait_for(self, result: Any, deadline: float) -> Any:
        """Wait for an async kazoo result until ``deadline``, translating kazoo's failures."""
        try:
            return result.get(timeout=max(0.0, deadline - time.monotonic()))
        except (NoNodeError, NodeExistsError, BadVersionError):
            raise  # the callers give these a meaning
        except BadArgumentsError as exc:
            raise _refused_name(exc) from exc
        except self.client.handler.timeout_exception as exc:
            raise KeeperError(f"ZooKeeper did not answer within {self.timeout} s") from exc
        except KazooException as exc:
            raise KeeperError(f"ZooKeeper error: {exc!r}") from exc

    def _read_znode(self, path: str, deadline: float) -> tuple[bytes | None, Any]:
        """``(data, stat)`` of ``path``, or ``(None, None)`` when absent."""
        try:
            data, stat = self.wait_for(self.client.get_async(path), deadline)
        except NoNodeError:
            return None, None
        return data, stat

    def _serialize(self, commit: Commit) -> bytes:
        payload = commit.serialize()
        if len(payload) > self.max_znode_bytes:
            raise CommitTooLarge(commit.key, commit.version, len(payload), self.max_znode_bytes)
        return payload

    def _concurrent(
        self, commit: Commit, existing: Commit | None, exc: Exception
    ) -> LostCompareAndSet:
        return LostCompareAndSet(
            commit.key,
            "Concurrent modification when trying to update commit: %s "
            "(from version[%s] to version[%s] znode[%s]): %r"
            % (
                commit.key,
                "unknown" if existing is None else existing.version,
                commit.version,
                self.znode(commit.key),
                exc,
            ),
        )

    def _transact(
        self,
        operations: list[tuple[Any, ...]],
        deadline: float,
        commit: Commit,
        existing: Commit | None,
    ) -> None:
        """Apply ``operations`` (``(kind, path, *args)``, kind a kazoo transaction method) at once.

        Every operation is conditional (a create, or a stat version), so retrying after a
        missing parent is harmless. A transaction whose outcome is unknown (timed out, or the
        connection dropped) is defused before ``KeeperError`` is raised: see ``_defuse``.
        """
        for attempt in (1, 2):
            transaction = self.client.transaction()
            for kind, path, *args in operations:
                getattr(transaction, _OPERATIONS[kind])(path, *args)
            results = self._commit(transaction, deadline)
            failure = next(
                (
                    (kind, result)
                    for (kind, *_), result in zip(operations, results, strict=False)
                    if isinstance(result, Exception)
                    and not isinstance(result, (RolledBackError, RuntimeInconsistency))
                ),
                None,
            )
            if failure is None:
                return
            kind, error = failure
            if kind == "create" and isinstance(error, NoNodeError) and attempt == 1:
                # Transactions cannot make parents: data/ or deleted/ does not exist yet (a
                # fresh ZooKeeper, an operator's deleteall). Create both, then try again.
                for parent in (self.data_path, self.deleted_path):
                    self.wait_for(self.client.ensure_path_async(parent), deadline)
                continue
            if isinstance(error, (BadVersionError, NodeExistsError, NoNodeError)):
                raise self._concurrent(commit, existing, error) from error
            if isinstance(error, BadArgumentsError):
                raise _refused_name(error) from error
            raise KeeperError(f"ZooKeeper error: {error!r}") from error
        raise KeeperError(f"Cannot create {self.data_path} and {self.deleted_path}")

    def _commit(self, transaction: Any, deadline: float) -> list[Any]:
        """Send ``transaction`` and wait for its results until ``deadline``; one whose outcome
        is unknown (timed out, connection dropped) is defused (``_defuse``) first.

        :raises KeeperError: when not connected, or no answer came in time.
        """
        if not self.client.connected:
            # Dropped since our reads: kazoo would queue the write and send it whenever it
            # reconnects, after the storage may have moved on. Under gevent nothing runs
            # between this check and the queueing; with threads, a write queued in that
            # instant is defused if it is still queued when the wait gives up.
            raise KeeperError(f"Not connected to ZooKeeper (state {self.client.state})")
        try:
            return self.wait_for(transaction.commit_async(), deadline)
        except KeeperError:
            self._defuse(transaction)
            raise

    def _defuse(self, transaction: Any) -> None:
        """Make ``transaction`` fail on the server if kazoo has not sent it yet.

        kazoo queues a request made while the connection is down (or dropping) and sends it
        first thing after reconnecting, maybe many seconds later. Its compare-and-set may
        still match then, because nobody could write meanwhile, so a commit the storage has
        since replaced (by a tombstone, say) would be published after that newer commit was
        acknowledged. Each operation is replaced, last to first, by a check no znode passes:
        whatever the connection thread serializes, before, during or after this, is the
        original transaction (it was being sent already) or one that fails as a whole.
        Whatever was sent already is left to ``DriftRepair``: the caller marks the key a
        suspect.
        """
        # Built by kazoo, so that the path carries the client's chroot.
        probe = self.client.transaction()
        probe.check(self.data_path, _NO_VERSION)
        failing = probe.operations[0]
        operations = transaction.operations  # the very list the queued request holds
        for index in range(len(operations) - 1, -1, -1):
            operations[index] = failing


class _Record:
    """A key's deletion record (``deleted/<key>``) as ``save`` read it, and the transaction
    operations that keep it right."""

    def __init__(self, keeper: CommitKeeper, key: str, result: Any) -> None:
        self.keeper = keeper
        self.key = key
        self.path = keeper.deleted_znode(key)
        self._result = result
        self.data: bytes | None = None
        self.stat: Any = None
        #: The recorded tombstone; ``None`` when there is no record or it does not parse.
        self.commit: Commit | None = None

    def wait(self, deadline: float) -> None:
        try:
            self.data, self.stat = self.keeper.wait_for(self._result, deadline)
        except NoNodeError:
            return
        try:
            self.commit = parse_znode(self.key, self.data)
        except InvalidCommit as exc:
            # Only someone else writes such a thing: it is replaced or removed as a corrupt
            # znode of data/ would be.
            log.warning(
                "Ignoring corrupt deletion record %s: %s, data = %s",
                self.path,
                exc,
                describe_size(self.data),
            )

    def keep(self, tombstone: Commit) -> list[tuple[Any, ...]]:
        """Operations recording ``tombstone``, unless a newer one is recorded already."""
        if self.data is None:
            return [("create", self.path, self.keeper._serialize(tombstone))]
        if self.commit is not None and self.commit.version >= tombstone.version:
            return [("check", self.path, self.stat.version)]
        return [("set", self.path, self.keeper._serialize(tombstone), self.stat.version)]

    def clear(self) -> list[tuple[Any, ...]]:
        """Operations removing the record, or asserting that there is none (a create and a
        delete: ZooKeeper has no "check absent")."""
        if self.data is None:
            return [("create", self.path, b""), ("delete", self.path, -1)]
        return [("delete", self.path, self.stat.version)]


class _RolledBack(Exception):
    """A combined set that was not applied because another set of its transaction failed."""


class _PendingSet:
    __slots__ = ("path", "payload", "version", "deadline", "wake", "leads", "finished", "error")

    def __init__(self, path: str, payload: bytes, version: int, deadline: float) -> None:
        self.path = path
        self.payload = payload
        self.version = version
        self.deadline = deadline
        #: Set when the set is answered (``finished``) or its saver is to send (``leads``).
        self.wake = threading.Event()
        self.leads = False
        self.finished = False
        self.error: BaseException | None = None


class _SetCombiner:
    """The compare-and-sets of a process's concurrent saves, sent as one transaction.

    Group commit, as a database does for its log: the first save finding no transaction in
    flight sends its set at once; saves arriving meanwhile queue, and when that transaction
    is answered the first of them sends every queued set in one. ZooKeeper then makes one
    proposal and one log write for the lot instead of one each (a third of a POST's CPU on a
    busy machine went to ZooKeeper itself), and nothing waits for a timer. A transaction is
    all or nothing: the set that failed gets its error, the others ``_RolledBack`` (their
    saves send them alone).
    """

    #: Sets per transaction; their bytes are bounded by ``_BATCH_BYTES`` too.
    MAX_SETS = 100

    def __init__(self, keeper: CommitKeeper) -> None:
        self.keeper = keeper
        self._lock = threading.Lock()
        self._queue: list[_PendingSet] = []
        # Whether a saver is sending (or was just made the next sender): the queue then
        # waits for it, never for nobody.
        self._sending = False

    def set(self, path: str, payload: bytes, version: int, deadline: float) -> None:
        """Set ``path`` to ``payload`` if its stat version is ``version``.

        :raises BadVersionError: or ``NoNodeError``: the compare-and-set was lost.
        :raises _RolledBack: another set of the same transaction failed; this one was not made.
        :raises KeeperError: ZooKeeper did not answer in time, or is not connected.
        """
        pending = _PendingSet(path, payload, version, deadline)
        with self._lock:
            self._queue.append(pending)
            if not self._sending:
                self._sending = pending.leads = True
        if not pending.leads and not pending.wake.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                gave_up = not pending.leads and not pending.finished
                if gave_up:
                    self._queue.remove(pending)
            if gave_up:
                raise KeeperError(f"ZooKeeper did not answer within {self.keeper.timeout} s")
        if not pending.finished:
            self._send()  # this saver leads: its set is first in the queue
        if pending.error is not None:
            raise pending.error

    def _send(self) -> None:
        batch: list[_PendingSet] = []
        with self._lock:
            size = 0
            while self._queue and len(batch) < self.MAX_SETS:
                size += len(self._queue[0].payload) + len(self._queue[0].path)
                if batch and size > _BATCH_BYTES:
                    break
                batch.append(self._queue.pop(0))
        try:
            self._apply(batch)
        except BaseException as exc:  # every saver of the batch must be answered
            for pending in batch:
                if pending.error is None:
                    pending.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._lock:
                for pending in batch:
                    pending.finished = True
                    pending.wake.set()
                if self._queue:
                    self._queue[0].leads = True
                    self._queue[0].wake.set()
                else:
                    self._sending = False

    def _apply(self, batch: list[_PendingSet]) -> None:
        keeper = self.keeper
        deadline = min(pending.deadline for pending in batch)
        transaction = keeper.client.transaction()
        for pending in batch:
            transaction.set_data(pending.path, pending.payload, pending.version)
        results = keeper._commit(transaction, deadline)
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, (RolledBackError, RuntimeInconsistency)):
                pending.error = _RolledBack()
            elif isinstance(result, BadArgumentsError):
                pending.error = _refused_name(result)
            elif isinstance(result, (BadVersionError, NoNodeError)):
                pending.error = result
            elif isinstance(result, Exception):
                pending.error = KeeperError(f"ZooKeeper error: {result!r}")


class _DeletionRecords:
    """The keeper seen as a ``ZnodeSource`` of ``deleted/``, for a mirror of the records."""

    def __init__(self, keeper: CommitKeeper) -> None:
        self.client = keeper.client
        self.data_path = keeper.deleted_path
        self.timeout = keeper.timeout
        self.znode = keeper.deleted_znode
        self.wait_for = keeper.wait_for
        # Tombstones carry no payload: nothing to deserialize.
        self.deserialization = None


#: A stat version no znode has (-1 means "any"): a check against it always fails.
_NO_VERSION = -2

_OPERATIONS = {"create": "create", "delete": "delete", "set": "set_data", "check": "check"}


def _refused_name(exc: Exception) -> InvalidCommit:
    # ZooKeeper refuses some names our keys allow (e.g. U+E000-U+F8FF, U+FFF0-U+FFFF): a
    # problem of that key, not of ZooKeeper.
    return InvalidCommit(f"ZooKeeper refuses this key or data: {exc!r}")


__all__ = [
    "DEFAULT_MAX_ZNODE_BYTES",
    "DEFAULT_TIMEOUT",
    "CommitKeeper",
    "SaveResult",
    "make_kazoo_client",
]
