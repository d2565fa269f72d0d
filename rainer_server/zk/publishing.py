"""Keeper-publishing storage: save to the system of record, then publish to ZooKeeper.

The database is the system of record and ZooKeeper only a cache of each key's head, so a keeper
failure must never fail a save that the database accepted: it is logged and suppressed, and the
elected auto-publisher repairs ZooKeeper within a period.
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

log = logging.getLogger(__name__)

#: How many times a save that lost a compare-and-set is tried in all.
_ATTEMPTS = 3


class KeeperPublisher:
    """The post-save hook: ``keeper.save(commit)``, with every failure logged and swallowed.

    The wait is bounded by the keeper: it fails at once while disconnected, and gives up after
    ``keeper.timeout`` seconds otherwise, so a save never hangs on an unreachable ZooKeeper.
    """

    def __init__(self, keeper: CommitKeeper) -> None:
        self.keeper = keeper

    def __call__(self, commit: Commit) -> None:
        try:
            self._save(commit)
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

    def _save(self, commit: Commit) -> None:
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                self.keeper.save(commit)
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


def keeper_publishing(storage: CommitStorage, keeper: CommitKeeper) -> CommitStorage:
    """Wrap ``storage`` so that each successful save is then published to ``keeper``.

    Reads and everything else go to ``storage`` unchanged; ``.storage`` is the wrapped storage
    and ``.hook.keeper`` the keeper.
    """
    return with_post_save_hook(storage, KeeperPublisher(keeper))


__all__ = ["KeeperPublisher", "keeper_publishing"]
