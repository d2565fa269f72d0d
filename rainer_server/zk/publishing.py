"""Keeper-publishing storage: save to the system of record, then publish to ZooKeeper.

The database is the system of record and ZooKeeper only a cache of each key's head, so a keeper
failure must never fail a save that the database accepted: it is logged and suppressed, and the
elected auto-publisher repairs ZooKeeper within a period.

In the service (``Rainers``) publishing runs off the request's critical path: a save queues its
commit and returns, and one thread per process publishes the queue in order. Tombstones are the
exception: they are published before the save returns, so a deletion that was acknowledged is
recorded in ZooKeeper, where it blocks every older commit. The guarantees are
the keeper's, not the queue's: every write is a compare-and-set, so a queued commit that went
stale can lose but never roll a key back; a commit lost with its process (a crash, a kill) is
published by the elected publisher's next pass, as one whose write failed always was.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from rainer_server.commit import Commit
from rainer_server.errors import ConcurrentCommitError
from rainer_server.errors import LostCompareAndSet
from rainer_server.errors import RainerError
from rainer_server.storage import CommitStorage
from rainer_server.storage import with_post_save_hook
from rainer_server.zk.keeper import CommitKeeper
from rainer_server.zk.mirror import CommitMirror

log = logging.getLogger(__name__)

#: How many times a save that lost a compare-and-set is tried in all.
_ATTEMPTS = 3

#: How long closing waits for the queue to drain (gunicorn's graceful timeout is longer).
CLOSE_TIMEOUT = 5.0


class KeeperPublisher:
    """The post-save hook: ``keeper.save(commit)``, with every failure logged and swallowed.

    The wait is bounded by the keeper: it fails at once while disconnected, and gives up after
    ``keeper.timeout`` seconds otherwise, so a save never hangs on an unreachable ZooKeeper.

    :param mirror: a mirror of the keeper's ``data/``: its znode versions let an update be one
        compare-and-set instead of a read and a write (``CommitKeeper.save``'s ``known``).
    :param background: queue each commit and return; a thread publishes the queue in order,
        only the newest queued commit of a key (an older one would be refused anyway).
        ``flush()`` waits for it, ``close()`` drains it and stops the thread.
    """

    def __init__(
        self, keeper: CommitKeeper, mirror: CommitMirror | None = None, background: bool = False
    ) -> None:
        self.keeper = keeper
        self.mirror = mirror
        self.background = background
        # Reentrant: a test can hold it to fill the queue before the thread takes anything.
        self._lock = threading.RLock()
        # key -> newest queued commit; a dict keeps the keys in the order first queued.
        self._pending: dict[str, Commit] = {}
        self._busy = False
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False

    def __call__(self, commit: Commit) -> None:
        if not self.background:
            self._publish(commit)
            return
        if commit.empty:
            # A tombstone is published before the save is answered: once a client is told a
            # key is deleted, ZooKeeper records the deletion (``deleted/<key>``), and no older
            # commit still queued or in flight anywhere can land on the key after that answer
            # (the record refuses it). Queued, an older version could have.
            with self._lock:
                queued = self._pending.get(commit.key)
                if queued is not None and queued.version < commit.version:
                    del self._pending[commit.key]
            self._publish(commit)
            return
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                queued = self._pending.get(commit.key)
                if queued is None or queued.version < commit.version:
                    self._pending[commit.key] = commit
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="rainer-keeper-publisher", daemon=True
                    )
                    self._thread.start()
                self._wake.notify_all()
        if closed:
            # Shutting down: published now, as without the queue, rather than dropped.
            self._publish(commit)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued commit has been published (or failed); ``False`` on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.wait(left)
        return True

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Publish what is queued (for up to ``timeout``), then stop the thread."""
        if not self.flush(timeout):
            with self._lock:
                left = len(self._pending)
            log.warning("Closing with %d commits not published: the auto-publisher will", left)
        with self._lock:
            self._closed = True
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return
                batch = list(self._pending.values())
                self._pending.clear()
                self._busy = True
            try:
                self._publish_batch(batch)
            finally:
                with self._lock:
                    self._busy = False
                    self._wake.notify_all()

    def _publish_batch(self, batch: list[Commit]) -> None:
        """Publish ``batch`` (one commit per key) in order, its updates pipelined.

        One at a time, a worker publishing a round trip per commit falls behind a busy
        service and its queue (and every mirror) lags by seconds. Updates the mirror knows
        the znode version of are all sent at once (ZooKeeper applies one session's requests
        in order); anything else waits for those, then goes through ``keeper.save``.
        """
        sent: list[tuple[Commit, Any]] = []
        for commit in batch:
            known = self.mirror.znode_version(commit.key) if self.mirror else None
            try:
                result = self.keeper.start_update(commit, known)
            except RainerError:
                result = None  # too big: save says so in the log
            if result is None:
                self._finish(sent)
                sent = []
                self._publish(commit)
            else:
                sent.append((commit, result))
        self._finish(sent)

    def _finish(self, sent: list[tuple[Commit, Any]]) -> None:
        deadline = time.monotonic() + self.keeper.timeout
        for commit, result in sent:
            try:
                self.keeper.wait_for(result, deadline)
            except Exception as exc:
                # Lost (the mirror was behind), or no answer in time: decided again on fresh
                # reads, with save's logging of what fails.
                log.debug("Publishing %s again after %r", commit.key, exc)
                self._publish(commit, trust_mirror=False)

    def _publish(self, commit: Commit, trust_mirror: bool = True) -> None:
        try:
            self._save(commit, trust_mirror)
        except ConcurrentCommitError as exc:
            log.warning("Failed to publish commit, will try again soon: %s: %s", commit.key, exc)
        except RainerError as exc:  # KeeperError (unreachable, too big), a key ZK refuses
            log.warning(
                "Failed to publish commit %s (version[%s]) to ZooKeeper, the auto-publisher "
                "will retry: %s",
                commit.key,
                commit.version,
                exc,
            )
        except Exception:
            # Still swallowed: the commit is saved, and an error here would tell the client
            # otherwise.
            log.exception("Failed to publish commit %s (version[%s])", commit.key, commit.version)

    def _save(self, commit: Commit, trust_mirror: bool = True) -> None:
        for attempt in range(1, _ATTEMPTS + 1):
            # Only the first try trusts the mirror: after a lost compare-and-set, fresh reads.
            trusted = self.mirror is not None and trust_mirror and attempt == 1
            known = self.mirror.znode_version(commit.key) if trusted else None
            try:
                self.keeper.save(commit, known=known)
                return
            except LostCompareAndSet:
                # Another writer of this key got in between our read and our write, e.g. a
                # publish pass holding a commit older than this one. This commit was the
                # newest a moment ago: decided again on fresh reads, it lands now instead of
                # a period later (a lost tombstone would leave that older commit visible).
                if attempt == _ATTEMPTS:
                    raise

    def __repr__(self) -> str:
        return f"KeeperPublisher({self.keeper!r})"


def keeper_publishing(
    storage: CommitStorage,
    keeper: CommitKeeper,
    *,
    mirror: CommitMirror | None = None,
    background: bool = False,
) -> CommitStorage:
    """Wrap ``storage`` so that each successful save is then published to ``keeper``.

    Reads and everything else go to ``storage`` unchanged; ``.storage`` is the wrapped storage
    and ``.hook`` the ``KeeperPublisher`` (``.hook.keeper`` the keeper). ``mirror`` and
    ``background``: see ``KeeperPublisher``.
    """
    return with_post_save_hook(storage, KeeperPublisher(keeper, mirror, background))


__all__ = ["KeeperPublisher", "keeper_publishing"]
