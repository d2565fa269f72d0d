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

    def save(self, commit: Commit) -> None:
        """Append ``commit``.

        :raises CommitOrderingError: unless ``commit.version`` is the head version + 1.
        """


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


class _PreSaveHookStorage(_HookedStorage):
    def save(self, commit: Commit) -> None:
        self.hook(commit)
        self.storage.save(commit)


class _PostSaveHookStorage(_HookedStorage):
    def save(self, commit: Commit) -> None:
        self.storage.save(commit)
        self.hook(commit)


def with_pre_save_hook(storage: CommitStorage, hook: Callable[[Commit], object]) -> CommitStorage:
    """Wrap ``storage`` so that ``hook(commit)`` runs before each save; if it raises, nothing is saved."""
    return _PreSaveHookStorage(storage, hook)


def with_post_save_hook(storage: CommitStorage, hook: Callable[[Commit], object]) -> CommitStorage:
    """Wrap ``storage`` so that ``hook(commit)`` runs after each *successful* save."""
    return _PostSaveHookStorage(storage, hook)
