"""Storage of commits: the protocol every system of record implements, and its wrappers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from datetime import datetime
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


# ---------------------------------------------------------------------- pages of heads


@dataclasses.dataclass(frozen=True, slots=True)
class HeadSummary:
    """A key's newest commit without its payload: what a table of keys shows."""

    key: str
    version: int
    author: str
    mtime: datetime
    #: The payload's length in bytes; ``None`` for a tombstone.
    size: int | None

    @property
    def empty(self) -> bool:
        return self.size is None

    @classmethod
    def of(cls, commit: Commit) -> HeadSummary:
        size = None if commit.payload is None else len(commit.payload)
        return cls(commit.key, commit.version, commit.author, commit.mtime, size)


@dataclasses.dataclass(frozen=True)
class HeadsPage:
    """One page of heads in key order (byte order of the UTF-8 keys)."""

    rows: list[HeadSummary]
    #: Whether there are keys before the first row and after the last one.
    has_previous: bool
    has_next: bool


@runtime_checkable
class PagedHeads(Protocol):
    """A storage that can list heads a page at a time without reading them all (the journal
    table does, from its primary key); any other storage is paged by ``heads()``."""

    def heads_page(
        self,
        prefix: str,
        contains: str,
        include_empty: bool,
        after: str | None,
        before: str | None,
        limit: int,
    ) -> list[HeadSummary]:
        """At most ``limit`` heads in key order whose key starts with ``prefix`` and holds
        ``contains``, only keys above ``after``, or else the last ones below ``before``."""

    def heads_count(self, prefix: str, contains: str, include_empty: bool) -> int:
        """How many heads ``heads_page`` would go through."""


def _key_bytes(key: str) -> bytes:
    return key.encode("utf-8")


def _matches(key: str, prefix: str, contains: str) -> bool:
    return key.startswith(prefix) and contains in key


class _HeadsOfStorage:
    """``PagedHeads`` over any storage: every head read and sorted, for each page."""

    def __init__(self, storage: CommitStorage) -> None:
        self.storage = storage

    def _sorted(self, prefix: str, contains: str, include_empty: bool) -> list[Commit]:
        heads = self.storage.heads() if include_empty else self.storage.heads_non_empty()
        found = [c for k, c in heads.items() if _matches(k, prefix, contains)]
        return sorted(found, key=lambda c: _key_bytes(c.key))

    def heads_page(
        self,
        prefix: str,
        contains: str,
        include_empty: bool,
        after: str | None,
        before: str | None,
        limit: int,
    ) -> list[HeadSummary]:
        commits = self._sorted(prefix, contains, include_empty)
        if after is not None:
            commits = [c for c in commits if _key_bytes(c.key) > _key_bytes(after)]
            return [HeadSummary.of(c) for c in commits[:limit]]
        if before is not None:
            commits = [c for c in commits if _key_bytes(c.key) < _key_bytes(before)]
            return [HeadSummary.of(c) for c in commits[-limit:]] if limit else []
        return [HeadSummary.of(c) for c in commits[:limit]]

    def heads_count(self, prefix: str, contains: str, include_empty: bool) -> int:
        return len(self._sorted(prefix, contains, include_empty))


def paged_heads(storage: CommitStorage) -> PagedHeads:
    """``storage`` itself when it pages heads, else a pager reading ``heads()``."""
    return storage if isinstance(storage, PagedHeads) else _HeadsOfStorage(storage)


def page_of_heads(
    storage: CommitStorage,
    *,
    prefix: str = "",
    contains: str = "",
    include_empty: bool = False,
    after: str | None = None,
    before: str | None = None,
    limit: int = 50,
    visible: Callable[[str], bool] | None = None,
) -> HeadsPage:
    """A page of at most ``limit`` heads, in key order, after the key ``after`` (or the page
    ending before ``before``), leaving out keys ``visible`` says no to (access control).

    Reads what one page needs, not every head, from a storage that pages (``PagedHeads``).
    """
    pager = paged_heads(storage)
    backwards = before is not None and after is None
    cursor = before if backwards else after
    wanted = limit + 1  # one more than a page: is there another page?
    rows: list[HeadSummary] = []
    while len(rows) < wanted:
        # Filtering may drop rows: ask for more than missing, but never unboundedly many.
        asked = wanted - len(rows) if visible is None else max(wanted, 200)
        if backwards:
            batch = pager.heads_page(prefix, contains, include_empty, None, cursor, asked)
        else:
            batch = pager.heads_page(prefix, contains, include_empty, cursor, None, asked)
        kept = [row for row in batch if visible is None or visible(row.key)]
        if backwards:
            rows = kept + rows
            cursor = batch[0].key if batch else cursor
        else:
            rows += kept
            cursor = batch[-1].key if batch else cursor
        if len(batch) < asked:
            break
    if backwards:
        more = len(rows) > limit
        return HeadsPage(rows[-limit:] if limit else [], has_previous=more, has_next=True)
    more = len(rows) > limit
    return HeadsPage(rows[:limit], has_previous=after is not None, has_next=more)
