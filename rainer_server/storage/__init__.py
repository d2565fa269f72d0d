"""Storage of commits: the protocol every system of record implements, and its wrappers."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Protocol
from typing import runtime_checkable

from rainer_server.commit import Commit
from rainer_server.errors import CommitOrderingError


@runtime_checkable
class CommitStorage(Protocol):
    """A journal of commits: every version of every key, versions contiguous from 1."""

    def start(self) -> None:
        """Prepare the storage (e.g. create the table when missing)."""

    def stop(self) -> None:
        """Release what ``start`` acquired."""

    def heads(self) -> Mapping[str, Commit]:
        """Key -> highest commit, tombstones included."""

    def heads_non_empty(self) -> Mapping[str, Commit]:
        """Key -> highest commit, keys whose head is a tombstone left out."""

    def heads_token(self) -> int:
        """A cheap number that changes whenever any head changes (revalidates cached lists)."""

    def get(self, key: str, version: int | None = None) -> Commit | None:
        """The highest commit of ``key``, or its commit at ``version``; ``None`` if absent."""

    def history(self, key: str, limit: int = 100, before: int | None = None) -> list[Commit]:
        """Commits of ``key`` newest first, at most ``limit``, only versions below ``before``."""

    def save(self, commit: Commit) -> Commit | None:
        """Append ``commit``; return it as kept (with its ``index``) where the storage keeps one.

        :raises CommitOrderingError: unless ``commit.version`` is the head version + 1.
        """


@runtime_checkable
class CommitFeed(Protocol):
    """A storage that numbers its commits in one global order (the *index*).

    Indexes strictly increase in the order commits become visible: once a reader has seen
    index N, no commit with an index <= N can appear later. So ``changes(N)`` hands a reader
    everything after N exactly once, in order, from any N (the journal keeps every version).
    """

    def last_index(self) -> int:
        """The index of the newest commit (0 when there is none)."""

    def changes(self, since: int, limit: int = 1000, prefix: str = "") -> list[Commit]:
        """Commits with an index above ``since``, in index order, at most ``limit``, only keys
        starting with ``prefix``; tombstones included, each with its ``index``."""


def prefix_filter(prefix: str) -> Callable[[str], bool]:
    """A test of keys for ``prefix`` ("": every key)."""
    if not prefix:
        return lambda key: True
    return lambda key: key.startswith(prefix)


def check_next_version(commit: Commit, head_version: int) -> None:
    """Refuse ``commit`` unless it is exactly the next version after ``head_version`` (0: none)."""
    if commit.version != head_version + 1:
        raise CommitOrderingError(commit.key, head_version + 1, commit.version)


class _HookedStorage:
    """Delegates everything to ``storage``; subclasses wrap ``save``."""

    def __init__(self, storage: CommitStorage, hook: Callable[[Commit], object]) -> None:
        self.storage = storage
        self.hook = hook

    def start(self) -> None:
        self.storage.start()

    def stop(self) -> None:
        self.storage.stop()

    def heads(self) -> Mapping[str, Commit]:
        return self.storage.heads()

    def heads_non_empty(self) -> Mapping[str, Commit]:
        return self.storage.heads_non_empty()

    def heads_token(self) -> int:
        return self.storage.heads_token()

    def get(self, key: str, version: int | None = None) -> Commit | None:
        return self.storage.get(key, version)

    def history(self, key: str, limit: int = 100, before: int | None = None) -> list[Commit]:
        return self.storage.history(key, limit, before)

    # A feed when the wrapped storage is one (AttributeError otherwise, as for any storage
    # without a feed).
    def last_index(self) -> int:
        return self.storage.last_index()  # type: ignore[attr-defined]

    def changes(self, since: int, limit: int = 1000, prefix: str = "") -> list[Commit]:
        return self.storage.changes(since, limit, prefix)  # type: ignore[attr-defined]


class _PreSaveHookStorage(_HookedStorage):
    def save(self, commit: Commit) -> Commit | None:
        self.hook(commit)
        return self.storage.save(commit)


class _PostSaveHookStorage(_HookedStorage):
    def save(self, commit: Commit) -> Commit | None:
        kept = self.storage.save(commit)
        self.hook(commit)
        return kept


def with_pre_save_hook(storage: CommitStorage, hook: Callable[[Commit], object]) -> CommitStorage:
    """Wrap ``storage`` so that ``hook(commit)`` runs before each save; if it raises, nothing is saved."""
    return _PreSaveHookStorage(storage, hook)


def with_post_save_hook(storage: CommitStorage, hook: Callable[[Commit], object]) -> CommitStorage:
    """Wrap ``storage`` so that ``hook(commit)`` runs after each *successful* save."""
    return _PostSaveHookStorage(storage, hook)
