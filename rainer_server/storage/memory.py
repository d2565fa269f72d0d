"""The in-memory storage: the reference semantics, for tests and embedding."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Collection
from collections.abc import Iterator

from rainer_server.commit import Commit
from rainer_server.payloads import KeyValueDeserialization
from rainer_server.storage import check_next_version
from rainer_server.storage import prefix_filter


class MemoryCommitStorage:
    """Every commit of every key in a dict, behind one lock.

    :param deserialization: how the commits read from it make their ``value``; a commit is
        kept read this way, so each one is deserialized once however often it is read.
    """

    def __init__(self, *, deserialization: KeyValueDeserialization | None = None) -> None:
        self.deserialization = deserialization
        # Reentrant: a caller holding locked_head may still read.
        self._lock = threading.RLock()
        self._history: dict[str, list[Commit]] = {}
        # Every commit in index order (index i at position i - 1): the feed.
        self._journal: list[Commit] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def heads(self) -> dict[str, Commit]:
        with self._lock:
            return {key: commits[-1] for key, commits in self._history.items()}

    def heads_non_empty(self) -> dict[str, Commit]:
        return {key: commit for key, commit in self.heads().items() if not commit.empty}

    def get(self, key: str, version: int | None = None) -> Commit | None:
        with self._lock:
            commits = self._history.get(key)
            if not commits:
                return None
            if version is None:
                return commits[-1]
            return commits[version - 1] if 1 <= version <= len(commits) else None

    def heads_token(self) -> int:
        """A number that changes whenever any head changes: the total count of commits."""
        with self._lock:
            return sum(len(commits) for commits in self._history.values())

    def history(self, key: str, limit: int = 100, before: int | None = None) -> list[Commit]:
        """Commits of ``key`` newest first, at most ``limit``, only versions below ``before``."""
        with self._lock:
            commits = self._history.get(key, [])
            end = len(commits) if before is None else max(0, min(before - 1, len(commits)))
            return commits[max(0, end - limit) : end][::-1]

    @contextlib.contextmanager
    def locked_head(self, key: str) -> Iterator[Commit | None]:
        """The head of ``key``, every writer held off until the block ends (see
        ``DbCommitStorage.locked_head``)."""
        with self._lock:
            commits = self._history.get(key)
            yield commits[-1] if commits else None

    @contextlib.contextmanager
    def locked_heads(self, keys: Collection[str]) -> Iterator[dict[str, Commit]]:
        """The heads of ``keys`` (keys without one left out), every writer held off until the
        block ends (see ``DbCommitStorage.locked_heads``)."""
        with self._lock:
            yield {key: self._history[key][-1] for key in keys if self._history.get(key)}

    def last_index(self) -> int:
        with self._lock:
            return len(self._journal)

    def changes(self, since: int, limit: int = 1000, prefix: str = "") -> list[Commit]:
        wanted = prefix_filter(prefix)
        with self._lock:
            found = []
            for commit in self._journal[max(0, since) :]:
                if wanted(commit.key):
                    found.append(commit)
                    if len(found) >= limit:
                        break
            return found

    def save(self, commit: Commit) -> Commit:
        # As a database would: what is read back has this storage's deserialization, whatever
        # the saved object carried.
        commit = commit.with_deserialization(self.deserialization)
        with self._lock:
            commits = self._history.setdefault(commit.key, [])
            check_next_version(commit, len(commits))
            # Numbered under the lock that orders the saves: index order is commit order.
            commit = commit.with_index(len(self._journal) + 1)
            commits.append(commit)
            self._journal.append(commit)
        return commit
