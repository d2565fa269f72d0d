"""The auto-publisher: one elected process keeps ZooKeeper in line with the system of record.

Every process contends in a kazoo ``Election`` at ``<base>/election``; the leader publishes
every head of the storage to the keeper every ``period`` (± ``fuzz``). That repairs whatever the
keeper-publishing storage could not publish (ZooKeeper down, a lost race) and whatever someone
else broke (a deleted or corrupted znode).

Fencing: kazoo never interrupts a leader function (``Election.cancel()`` only cancels waiting),
so the leader watches the connection itself. A state listener (which must not block: it runs on
kazoo's connection thread) counts every SUSPENDED/LOST; the leader stops at the first one, and
checks the connection before each write. The election thread then re-joins once connected.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Mapping
from contextlib import AbstractContextManager
from collections.abc import Set as AbstractSet
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException
from kazoo.protocol.states import KazooState

from rainer_server.commit import Commit
from rainer_server.errors import CommitTooLarge
from rainer_server.errors import ConcurrentCommitError
from rainer_server.errors import KeeperError
from rainer_server.errors import LostCompareAndSet
from rainer_server.errors import RainerError
from rainer_server.errors import StorageUnavailable
from rainer_server.storage import CommitStorage
from rainer_server.zk.keeper import CommitKeeper
from rainer_server.zk.keeper import SaveResult
from rainer_server.zk.mirror import CommitMirror

log = logging.getLogger(__name__)

# Pause before re-joining after the election itself failed (e.g. the client was closed).
_REJOIN_PAUSE = 1.0
# A pass gives up after this many keys in a row failed on ZooKeeper itself.
_MAX_FAILURES_IN_A_ROW = 5
# After a pass that left keys unpublished (ZooKeeper failing or slow, the storage down), the
# next one comes this soon, then twice as late each time, up to a period: a fresh cluster
# whose first publish timed out is not left a period behind its storage.
_RETRY_FIRST = 1.0
# How long a pass waits for a fresh mirror's first complete view before going without it.
_MIRROR_WAIT = 30.0
# With an injected ``sleep``, waits are cut into slices this long so stop and connection loss
# are still noticed promptly.
_SLEEP_SLICE = 0.1
#: Keys whose heads one storage transaction locks during a batched pass.
LOCK_BATCH_KEYS = 1000


def default_identifier() -> str:
    """``"<hostname>:<pid>"``: what ``Election.contenders()`` shows for this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclasses.dataclass
class PublishCounts:
    """What one pass over the storage's heads did, key by key."""

    created: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    #: Keys the keeper refused: a newer or different commit in ZooKeeper, too big, invalid.
    refused: int = 0
    #: Keys that failed otherwise (ZooKeeper timeouts, unexpected errors).
    failed: int = 0
    #: The pass stopped early: leadership or the connection was lost, or the publisher stopped.
    aborted: bool = False
    #: Seconds the pass took (by the publisher's clock).
    duration: float = 0.0

    @property
    def written(self) -> int:
        return self.created + self.updated + self.deleted

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def publish_heads(
    keeper: CommitKeeper,
    heads: Mapping[str, Commit],
    counts: PublishCounts,
    *,
    published: Mapping[str, Commit] | None = None,
    deleted: Mapping[str, Commit] | None = None,
    unparseable: AbstractSet[str] = frozenset(),
    may_write: Callable[[], bool] = lambda: True,
    on_problem: Callable[[str, str, Exception], object] | None = None,
    on_key: Callable[[str], object] | None = None,
    lock_head: Callable[[str], AbstractContextManager[Commit | None]] | None = None,
) -> None:
    """Publish each of ``heads`` to ``keeper``, adding what happened to each key to ``counts``.

    The one place that decides what a failed key counts as (the elected publisher and
    ``flask rainer publish`` both use it): a newer or different commit in ZooKeeper, a commit
    too big or a key ZooKeeper refuses is *refused* (it repeats every pass until the storage
    catches up, which is the point); an unreachable or failing ZooKeeper is *failed*.

    :param published: what ZooKeeper is known to hold (a mirror's view, or ``keeper.heads()``);
        keys it already shows are skipped without a round trip. ``None``: read every znode.
    :param deleted: the deletions ZooKeeper is known to record (a ``deletions_mirror()``'s
        view, or ``keeper.deletions()``). A tombstone is skipped only when ``published`` lacks
        its key *and* this records it (or a newer one): a key merely absent from ``data/`` may
        never have had its deletion recorded (after an outage, on a first publish, after an
        upgrade), and then a writer holding an older commit could still create it.
        ``None``: every tombstone absent from ``published`` is saved (a read, and the record
        when it is missing).
    :param unparseable: keys whose znode exists but does not parse; always written.
    :param may_write: checked before each write; when false the pass stops (``aborted``).
    :param on_problem: called with ``(key, "refused" or "failed", error)`` for each such key.
    :param on_key: called with each key before it is handled (progress).
    :param lock_head: the storage's ``locked_head``: each write then publishes the key's head
        as of that moment, with the key's writers held off until ZooKeeper has it. ``heads``
        is a snapshot from the start of the pass; publishing it as is could bring back a key
        deleted since (its tombstone acknowledged by a writer that cannot reach ZooKeeper).
    """
    failures_in_a_row = 0
    for key, commit in heads.items():
        if on_key is not None:
            on_key(key)
        if published is not None and key not in unparseable:
            # A mirror may lag a little; a write it hides is made on the next pass.
            known = published.get(key)
            if known == commit or (
                known is None and commit.empty and _recorded(deleted, key, commit.version)
            ):
                counts.unchanged += 1
                continue
        if _stopping(may_write, failures_in_a_row, counts):
            return
        try:
            result = _save(keeper, key, commit, lock_head)
        except ConcurrentCommitError as exc:
            outcome, error = "refused", exc
            log.warning("Failed to publish commit, will try again soon: %s: %s", key, exc)
        except CommitTooLarge as exc:
            outcome, error = "refused", exc
            log.error("Cannot publish commit %s: %s", key, exc)
        except (KeeperError, StorageUnavailable) as exc:
            outcome, error = "failed", exc
            log.warning("Failed to publish commit %s: %s", key, _one_line(exc))
        except RainerError as exc:
            outcome, error = "refused", exc
            log.warning("Failed to publish commit %s: %s", key, exc)
        except Exception as exc:
            outcome, error = "failed", exc
            log.exception("Failed to publish commit %s", key)
        else:
            # SaveResult values are the names of the matching counters.
            setattr(counts, result.value, getattr(counts, result.value) + 1)
            failures_in_a_row = 0
            continue
        setattr(counts, outcome, getattr(counts, outcome) + 1)
        failures_in_a_row = failures_in_a_row + 1 if outcome == "failed" else 0
        if on_problem is not None:
            on_problem(key, outcome, error)


def publish_heads_batched(
    keeper: CommitKeeper,
    heads: Mapping[str, Commit],
    counts: PublishCounts,
    *,
    lock_heads: Callable[[Collection[str]], AbstractContextManager[Mapping[str, Commit]]],
    published: Mapping[str, Commit] | None = None,
    deleted: Mapping[str, Commit] | None = None,
    unparseable: AbstractSet[str] = frozenset(),
    may_write: Callable[[], bool] = lambda: True,
    on_problem: Callable[[str, str, Exception], object] | None = None,
    on_key: Callable[[str], object] | None = None,
    batch_keys: int = LOCK_BATCH_KEYS,
) -> None:
    """``publish_heads`` with the storage locked a batch of keys at a time, and the keys
    ZooKeeper is known to lack created many per transaction (``keeper.create_many``).

    The same guarantees: each key's head is read under the storage's lock and published
    before the lock is released, so a tombstone committed during the pass waits and is
    published after, never under, an older head; every write is conditional, so no version
    goes back and a recorded deletion is never undone. A key is created in bulk only when
    ``published`` lacks it, it is not ``unparseable`` and ``deleted`` records no deletion
    of it; every other key that needs a write (and each key of a bulk transaction that
    failed on a znode's state) goes through ``keeper.save`` as in ``publish_heads``.

    :param lock_heads: the storage's ``locked_heads``.
    :param batch_keys: keys per storage transaction: their writers wait until the batch is
        in ZooKeeper (~0.1 s for 1000 keys).
    Other parameters: as ``publish_heads``.
    """
    work: list[str] = []
    for key, commit in heads.items():
        if on_key is not None:
            on_key(key)
        known = published is not None and key not in unparseable
        if known and _shown(published, deleted, key, commit):  # type: ignore[arg-type]
            counts.unchanged += 1
        else:
            work.append(key)
    # Key order: the order locked_heads locks rows in, so two publishers queue, not deadlock.
    work.sort()
    failures_in_a_row = 0
    for start in range(0, len(work), batch_keys):
        if _stopping(may_write, failures_in_a_row, counts):
            return
        batch = work[start : start + batch_keys]
        try:
            with lock_heads(batch) as locked:
                failures_in_a_row = _publish_locked(
                    keeper,
                    # A key without a head any more keeps the pass's (as _save does).
                    {key: _or(locked.get(key), heads[key]) for key in batch},
                    counts,
                    published=published,
                    deleted=deleted,
                    unparseable=unparseable,
                    may_write=may_write,
                    on_problem=on_problem,
                    failures_in_a_row=failures_in_a_row,
                )
        except StorageUnavailable as exc:
            # The storage's own failure: nothing of the batch was written under its lock
            # (ZooKeeper writes made before a failed COMMIT are conditional and stay right).
            log.warning("Failed to publish %d commits: %s", len(batch), _one_line(exc))
            counts.failed += len(batch)
            failures_in_a_row += 1
            if on_problem is not None:
                for key in batch:
                    on_problem(key, "failed", exc)
        if counts.aborted:
            return


def _publish_locked(
    keeper: CommitKeeper,
    heads: Mapping[str, Commit],
    counts: PublishCounts,
    *,
    published: Mapping[str, Commit] | None,
    deleted: Mapping[str, Commit] | None,
    unparseable: AbstractSet[str],
    may_write: Callable[[], bool],
    on_problem: Callable[[str, str, Exception], object] | None,
    failures_in_a_row: int,
) -> int:
    """One locked batch of ``publish_heads_batched``; return the failures in a row after it."""
    creates: list[Commit] = []
    singles: dict[str, Commit] = {}
    for key, head in heads.items():
        if published is not None and key not in unparseable:
            if _shown(published, deleted, key, head):
                counts.unchanged += 1
                continue
            absent = key not in published and deleted is not None and key not in deleted
            if absent and not head.empty:
                creates.append(head)
                continue
        singles[key] = head
    if creates:
        outcome = keeper.create_many(creates, may_write=may_write)
        # One transaction's failure is every one of its keys': logged once, not per key.
        logged: set[int] = set()
        for head in creates:
            error = outcome.get(head.key)
            if error is None:
                counts.created += 1
                failures_in_a_row = 0
            elif isinstance(error, LostCompareAndSet):
                singles[head.key] = head  # decided on fresh reads below
            else:
                refused = isinstance(error, CommitTooLarge)
                if refused:
                    log.error("Cannot publish commit %s: %s", head.key, error)
                elif id(error) not in logged:
                    logged.add(id(error))
                    shared = sum(1 for other in outcome.values() if other is error)
                    log.warning(
                        "Failed to publish commit %s%s: %s",
                        head.key,
                        f" and {shared - 1} more" if shared > 1 else "",
                        _one_line(error),
                    )
                outcome_name = "refused" if refused else "failed"
                setattr(counts, outcome_name, getattr(counts, outcome_name) + 1)
                failures_in_a_row = 0 if refused else failures_in_a_row + 1
                if on_problem is not None:
                    on_problem(head.key, outcome_name, error)
        if failures_in_a_row >= _MAX_FAILURES_IN_A_ROW:
            counts.aborted = True
            log.warning("Stopped publishing commits: ZooKeeper keeps failing")
            return failures_in_a_row
    if singles:
        failed_before = counts.failed
        # Under this batch's lock already: no lock per key.
        publish_heads(
            keeper, singles, counts, may_write=may_write, on_problem=on_problem
        )
        failures_in_a_row = failures_in_a_row + 1 if counts.failed > failed_before else 0
    return failures_in_a_row


def _or(head: Commit | None, fallback: Commit) -> Commit:
    return fallback if head is None else head


def _shown(
    published: Mapping[str, Commit], deleted: Mapping[str, Commit] | None, key: str, commit: Commit
) -> bool:
    """Whether ZooKeeper is known to show ``commit`` already (what ``publish_heads`` skips)."""
    known = published.get(key)
    return known == commit or (
        known is None and commit.empty and _recorded(deleted, key, commit.version)
    )


def _save(
    keeper: CommitKeeper,
    key: str,
    commit: Commit,
    lock_head: Callable[[str], AbstractContextManager[Commit | None]] | None,
) -> SaveResult:
    if lock_head is None:
        return keeper.save(commit)
    with lock_head(key) as head:
        return keeper.save(commit if head is None else head)


def _stopping(
    may_write: Callable[[], bool], failures_in_a_row: int, counts: PublishCounts
) -> bool:
    """Whether a pass must stop before its next write (and says why, once): no longer leader
    or connected, or connected but not answering, where each key would wait out the keeper's
    timeout."""
    if not may_write():
        log.warning("Stopped publishing commits: no longer leader or connected")
    elif failures_in_a_row >= _MAX_FAILURES_IN_A_ROW:
        log.warning("Stopped publishing commits: ZooKeeper keeps failing")
    else:
        return False
    counts.aborted = True
    return True


def _recorded(deleted: Mapping[str, Commit] | None, key: str, version: int) -> bool:
    """Whether ``deleted`` shows ``key``'s deletion at ``version`` or later."""
    if deleted is None:
        return False
    record = deleted.get(key)
    return record is not None and record.version >= version


def _one_line(exc: Exception) -> str:
    # Our own errors say what happened; anything else also needs its type to be found.
    # A storage's detail (the driver's reason) is for the log, where this goes.
    detail = getattr(exc, "detail", None)
    text = " ".join((f"{exc}: {detail}" if detail else str(exc)).split())
    return text if isinstance(exc, RainerError) and text else f"{type(exc).__name__}: {text}"


class AutoPublisher:
    """Publish every head of ``storage`` to ``keeper`` while leading the election.

    :param client: the kazoo client the keeper uses (the publisher neither starts nor stops it).
    :param keeper: where commits are published.
    :param storage: the system of record (the underlying storage, not the keeper-publishing one).
    :param election_path: the election znode; defaults to the keeper's ``<base>/election``.
    :param period: seconds between passes.
    :param fuzz: each wait is ``period`` times a random factor in ``[1 - fuzz, 1 + fuzz]``, so
        that the publishers of several clusters sharing a ZooKeeper do not pulse together.
    :param delay: wait one period before the first pass of each leadership term.
    :param identifier: this contender's name; defaults to ``"<hostname>:<pid>"``.
    :param mirror: a mirror of ``keeper`` to compare against (not closed by the publisher);
        by default the publisher opens its own on first use and closes it in ``close()``.
        Either way it opens a ``deletions_mirror()`` on its first pass (tombstones are
        compared with that) and closes it in ``close()``.
    :param clock: monotonic seconds; injectable for tests.
    :param sleep: when given, waits between passes call it (in slices of at most 0.1 s) instead
        of waiting on an event; injectable for tests together with ``clock``.
    :param rng: returns a float in ``[0, 1)`` for the fuzz; injectable for tests.
    :param join_timeout: how long ``close()`` waits for the election thread.
    """

    def __init__(
        self,
        client: KazooClient,
        keeper: CommitKeeper,
        storage: CommitStorage,
        election_path: str | None = None,
        *,
        period: float = 90.0,
        fuzz: float = 0.2,
        delay: bool = True,
        identifier: str | None = None,
        mirror: CommitMirror | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
        rng: Callable[[], float] = random.random,
        join_timeout: float = 10.0,
    ) -> None:
        if period <= 0:
            raise ValueError("period must be positive")
        if not 0 <= fuzz < 1:
            raise ValueError("fuzz must be in [0, 1)")
        self.client = client
        self.keeper = keeper
        self.storage = storage
        self.election_path = election_path or keeper.election_path
        self.period = float(period)
        self.fuzz = float(fuzz)
        self.delay = delay
        self.identifier = identifier or default_identifier()
        self.join_timeout = join_timeout
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._mirror = mirror
        self._owns_mirror = mirror is None
        self._deletions: CommitMirror | None = None
        self._storage_started = False
        self._election = client.Election(self.election_path, self.identifier)
        # Guards the connection bookkeeping below; the state listener takes it only briefly.
        self._cond = threading.Condition()
        self._connected = False
        self._losses = 0  # SUSPENDED/LOST transitions seen: a leader term is valid while unchanged
        # A loss since the last pass started: the next term's first pass runs at once.
        self._repair_due = False
        self._stopping = False
        self._leading = False
        self._thread: threading.Thread | None = None
        self._pass_lock = threading.Lock()
        #: Keys whose heads one storage transaction locks in a pass (storages that can).
        self.lock_batch_keys = LOCK_BATCH_KEYS
        #: Completed passes (leader passes and ``publish_all`` calls alike).
        self.passes = 0
        #: The counts of the last pass, or ``None`` before the first.
        self.last_counts: PublishCounts | None = None
        #: ``clock()`` at the end of the last pass.
        self.last_pass: float | None = None
        #: Called with each pass's ``PublishCounts`` when it ends, on the publishing thread.
        self.pass_listeners: list[Callable[[PublishCounts], object]] = []
        #: Called with ``True`` when this publisher starts leading and ``False`` when it stops.
        self.leader_listeners: list[Callable[[bool], object]] = []

    def __repr__(self) -> str:
        return f"AutoPublisher({self.election_path!r}, {self.identifier!r}, leader={self._leading})"

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_leader(self) -> bool:
        """Whether this publisher is leading (publishing) right now."""
        return self._leading

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Join the election on a background thread; returns at once."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("AutoPublisher cannot be restarted after close()")
            if self._thread is not None:
                return
            self.client.add_listener(self._on_state)
            # Read after adding the listener, so no transition slips between the two.
            self._connected = self.client.state == KazooState.CONNECTED
            self._thread = threading.Thread(
                target=self._run, name=f"rainer-auto-publisher[{self.election_path}]", daemon=True
            )
        self._thread.start()

    def close(self) -> None:
        """Stop publishing, leave the election, and wait for the thread."""
        with self._cond:
            if self._stopping and self._thread is None:
                return
            self._stopping = True
            self._cond.notify_all()
        # Cancels a contender still waiting; a leader notices _stopping between keys.
        self._election.cancel()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.join_timeout)
            if thread.is_alive():
                log.warning(
                    "Auto-publisher for %s did not stop within %s s",
                    self.election_path,
                    self.join_timeout,
                )
        self.client.remove_listener(self._on_state)
        if self._owns_mirror and self._mirror is not None:
            self._mirror.close()
            self._mirror = None
        if self._deletions is not None:
            self._deletions.close()
            self._deletions = None

    stop = close

    def __enter__(self) -> AutoPublisher:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ publishing

    def publish_all(self, may_write: Callable[[], bool] | None = None) -> PublishCounts:
        """Publish every head of the storage once; return what happened to each key.

        Keys whose commit the mirror already shows, and tombstones whose deletion the
        deletions mirror already shows, are skipped without touching ZooKeeper, so an
        unchanged pass makes no writes. A key the keeper refuses is logged and skipped.

        :param may_write: checked before each write; when it turns false the pass stops
            (``aborted``). Defaults to "the client is connected".
        """
        fence = may_write or (lambda: self.client.connected)
        failure: Exception | None = None
        with self._pass_lock:
            started = self._clock()
            counts = PublishCounts()
            try:
                if not self._storage_started:
                    # The web app starts the storage on its first request, which may come
                    # after this pass (a fresh SQLite file has no table until then).
                    self.storage.start()
                    self._storage_started = True
                heads = self.storage.heads()
                mirror = self._get_mirror(fence)
                deletions = self._get_deletions(fence)
                known = {
                    "published": mirror.current if mirror is not None else None,
                    "deleted": deletions.current if deletions is not None else None,
                    "unparseable": mirror.unparseable if mirror is not None else frozenset(),
                }
                lock_heads = getattr(self.storage, "locked_heads", None)
                if lock_heads is not None:
                    publish_heads_batched(
                        self.keeper,
                        heads,
                        counts,
                        lock_heads=lock_heads,
                        may_write=fence,
                        batch_keys=self.lock_batch_keys,
                        **known,
                    )
                else:
                    publish_heads(
                        self.keeper,
                        heads,
                        counts,
                        may_write=fence,
                        lock_head=getattr(self.storage, "locked_head", None),
                        **known,
                    )
            except Exception as exc:
                # E.g. the database is down: an aborted pass, which listeners (metrics) see too.
                counts.aborted = True
                failure = exc
            finally:
                counts.duration = self._clock() - started
                self.passes += 1
                self.last_counts = counts
                self.last_pass = self._clock()
        self._notify(self.pass_listeners, counts)
        if failure is not None:
            raise failure
        level = (
            logging.INFO
            if counts.written or counts.refused or counts.failed or counts.aborted
            else logging.DEBUG
        )
        log.log(
            level,
            "Published commits to %s in %.3f s: %d created, %d updated, %d deleted, %d unchanged, "
            "%d refused, %d failed%s",
            self.keeper.data_path,
            counts.duration,
            counts.created,
            counts.updated,
            counts.deleted,
            counts.unchanged,
            counts.refused,
            counts.failed,
            " (aborted)" if counts.aborted else "",
        )
        return counts

    def drift(self, may_write: Callable[[], bool] | None = None) -> int:
        """How many heads of the storage ZooKeeper does not show, by the mirrors (what a pass
        would write or refuse); every head when a mirror cannot be had. No writes.

        :param may_write: the mirrors are waited for while this holds; defaults to "the client
            is connected".
        """
        fence = may_write or (lambda: self.client.connected)
        if not self._storage_started:
            self.storage.start()
            self._storage_started = True
        heads = self.storage.heads()
        mirror = self._get_mirror(fence)
        deletions = self._get_deletions(fence)
        if mirror is None or deletions is None:
            return len(heads)
        published, deleted, unparseable = mirror.current, deletions.current, mirror.unparseable
        return sum(
            1
            for key, commit in heads.items()
            if key in unparseable or not _shown(published, deleted, key, commit)
        )

    def _drifted(self, term: int) -> bool:
        """Whether a new leader should publish at once rather than after a period."""
        try:
            differing = self.drift(lambda: self._may_lead(term))
        except Exception as exc:
            # The pass will meet the same failure and report it; better tried now than later.
            log.warning("Cannot compare ZooKeeper with the storage: %s", _one_line(exc))
            return True
        if differing:
            log.info(
                "ZooKeeper differs from the storage in %d keys: publishing now", differing
            )
        return differing > 0

    def _get_mirror(self, fence: Callable[[], bool]) -> CommitMirror | None:
        """The mirror to compare against, or ``None`` to read each znode instead.

        The publisher's own mirror is opened on first use and kept: a leader only waits for it
        while still allowed to write, so losing ZooKeeper meanwhile cannot wedge the leader.
        """
        if self._mirror is None or self._mirror.closed:
            if not self._owns_mirror:
                return None
            self._mirror = self.keeper.mirror(wait=False)
        return self._initialized(self._mirror, fence)

    def _get_deletions(self, fence: Callable[[], bool]) -> CommitMirror | None:
        """The mirror of deletion records, opened on first use, or ``None`` to read each one."""
        if self._deletions is None:
            self._deletions = self.keeper.deletions_mirror(wait=False)
        return self._initialized(self._deletions, fence)

    @staticmethod
    def _initialized(mirror: CommitMirror, fence: Callable[[], bool]) -> CommitMirror | None:
        # A leader only waits while still allowed to write, so losing ZooKeeper meanwhile
        # cannot wedge it.
        deadline = time.monotonic() + _MIRROR_WAIT
        while not mirror.wait_initialized(_SLEEP_SLICE):
            if not fence() or time.monotonic() > deadline:
                # Still correct without it, only slower: keeper.save reads each znode first.
                log.warning("Publishing without a mirror of %s (not initialized)", mirror.data_path)
                return None
        return mirror

    def next_interval(self) -> float:
        """Seconds until the next pass: ``period`` ± up to ``fuzz`` of it."""
        return self.period * (1.0 + self.fuzz * (2.0 * self._rng() - 1.0))

    # ------------------------------------------------------------------ election

    def _on_state(self, state: str) -> None:
        # Runs on kazoo's connection thread: record and wake, nothing else.
        with self._cond:
            if state == KazooState.CONNECTED:
                self._connected = True
            else:
                self._connected = False
                self._losses += 1
                self._repair_due = True
            self._cond.notify_all()

    def _run(self) -> None:
        log.info(
            "Joining commit publisher election at %s as %s", self.election_path, self.identifier
        )
        while True:
            with self._cond:
                # Contending while disconnected would only pile up retries inside the recipe.
                self._cond.wait_for(lambda: self._stopping or self._connected)
                if self._stopping:
                    break
            try:
                self._election.run(self._lead)
            except Exception:
                log.exception(
                    "Commit publisher election at %s failed; re-joining", self.election_path
                )
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, _REJOIN_PAUSE)
        log.info("Left commit publisher election at %s", self.election_path)

    def _lead(self) -> None:
        with self._cond:
            term = self._losses
            if self._stopping or not self._connected:
                return
        if not self._owns_election_node():
            # Do not spin on a broken term: pause before the election thread re-joins.
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, _REJOIN_PAUSE)
            return
        log.info(
            "Starting automatic commit publishing: period = %s s + %s fuzz (%s)",
            self.period,
            self.fuzz,
            self.identifier,
        )
        self._leading = True
        self._notify(self.leader_listeners, True)
        try:
            # Leading a fresh cluster, one whose ZooKeeper was emptied or fell behind, or one
            # back from an outage: a whole period of stale or missing znodes is what the delay
            # would cost.
            first = not self.delay or self._repair_after_outage() or self._drifted(term)
            retry = 0.0  # seconds until a pass that left keys behind is tried again
            while True:
                pause = min(retry, self.next_interval()) if retry else self.next_interval()
                if not first and self._wait(pause, term):
                    break
                first = False
                # Someone may have deleted our election node (an operator cleaning up): then
                # another contender leads already. One read per period keeps that honest.
                if not self._may_lead(term) or not self._owns_election_node():
                    break
                self._repair_due = False  # a loss from now on calls for another pass
                try:
                    counts = self.publish_all(lambda: self._may_lead(term))
                    # Refused keys (too large) stay refused: only failures call for a retry.
                    left_behind = counts.failed or counts.aborted
                except Exception as exc:
                    # The storage may be down or its table missing: stay leader and try again,
                    # with one line per pass (a traceback per retry of an outage would bury
                    # everything else in the log).
                    left_behind = True
                    log.warning(
                        "Failed to publish commits to %s (will try again): %s",
                        self.keeper.data_path,
                        _one_line(exc),
                    )
                retry = min(max(_RETRY_FIRST, 2 * retry), self.period) if left_behind else 0.0
                if left_behind and retry < self.period:
                    log.info("Publishing to %s again in %.0f s", self.keeper.data_path, retry)
        finally:
            self._leading = False
            self._notify(self.leader_listeners, False)
            log.info("Stopped automatic commit publishing (%s)", self.identifier)

    def _repair_after_outage(self) -> bool:
        """Whether this term starts after a connection loss (then its first pass is at once).

        While ZooKeeper was out, writers saved to the storage without reaching it, and a
        write that timed out may have landed when quorum returned: waiting a period would
        leave ZooKeeper behind the storage for that long.
        """
        if self._repair_due:
            log.info("Publishing at once: ZooKeeper was out since the last pass")
        return self._repair_due

    @staticmethod
    def _notify(listeners: list[Callable[[Any], object]], value: Any) -> None:
        # Listeners observe (metrics); one that fails must not stop publishing.
        for listener in list(listeners):
            try:
                listener(value)
            except Exception:
                log.exception("Auto-publisher listener %r failed", listener)

    def _may_lead(self, term: int) -> bool:
        # Read without the lock: plain attribute reads, and a stale answer only delays the stop
        # by one key, whose write is still a compare-and-set.
        return (
            not self._stopping
            and self._connected
            and self._losses == term
            and self.client.state == KazooState.CONNECTED
        )

    def _owns_election_node(self) -> bool:
        """Whether our election znode is still there and owned by the current session.

        A session can be lost and replaced between winning the lock and entering the leader
        function; the old session's ephemeral node is then gone (or about to be), and leading on
        it would make two leaders.
        """
        lock = self._election.lock
        if not lock.node:
            return False
        try:
            # Bounded: a synchronous call would block until reconnected.
            stat = self.client.exists_async(f"{lock.path}/{lock.node}").get(
                timeout=self.keeper.timeout
            )
        except (KazooException, self.client.handler.timeout_exception) as exc:
            log.warning("Cannot check the election node: %r", exc)
            return False
        session_id = self.client.client_id[0] if self.client.client_id else None
        return stat is not None and stat.ephemeralOwner == session_id

    def _wait(self, seconds: float, term: int) -> bool:
        """Wait ``seconds``; return True early (and at the end) when leadership is over."""
        if self._sleep is None:
            with self._cond:
                return self._cond.wait_for(lambda: not self._may_lead(term), seconds)
        deadline = self._clock() + seconds
        while self._may_lead(term):
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            self._sleep(min(remaining, _SLEEP_SLICE))
        return True


__all__ = [
    "AutoPublisher",
    "PublishCounts",
    "default_identifier",
    "publish_heads",
    "publish_heads_batched",
]
