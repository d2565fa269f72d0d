"""Keeper-publishing storage: save to the system of record, then publish to ZooKeeper.

The database is the system of record and ZooKeeper only a cache of each key's head, so a keeper
failure must never fail a save that the database accepted: it is logged and suppressed, and the
elected auto-publisher repairs ZooKeeper within a period.

A save answers once ZooKeeper has the commit too (or failed to take it). Publishing from a
queue after answering was faster, but under a partition the fault suite saw an older commit
still queued on one host land after another host had answered that the key was deleted (and
could not reach ZooKeeper to record it): a delete reappearing. Concurrent saves of a process
still share ZooKeeper's work: their compare-and-sets go as one transaction (the keeper's).
"""

from __future__ import annotations

import logging

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

class KeeperPublisher:
    """The post-save hook: ``keeper.save(commit)``, with every failure logged and swallowed.

    The wait is bounded by the keeper: it fails at once while disconnected, and gives up after
    ``keeper.timeout`` seconds otherwise, so a save never hangs on an unreachable ZooKeeper.

    :param mirror: a mirror of the keeper's ``data/``: its znode versions let an update be one
        compare-and-set instead of a read and a write (``CommitKeeper.save``'s ``known``).
    """

    def __init__(self, keeper: CommitKeeper, mirror: CommitMirror | None = None) -> None:
        self.keeper = keeper
        self.mirror = mirror

    def __call__(self, commit: Commit) -> None:
        self._publish(commit)

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
) -> CommitStorage:
    """Wrap ``storage`` so that each successful save is then published to ``keeper``.

    Reads and everything else go to ``storage`` unchanged; ``.storage`` is the wrapped storage
    and ``.hook`` the ``KeeperPublisher`` (``.hook.keeper`` the keeper). ``mirror``: see
    ``KeeperPublisher``.
    """
    return with_post_save_hook(storage, KeeperPublisher(keeper, mirror))


__all__ = ["KeeperPublisher", "keeper_publishing"]
