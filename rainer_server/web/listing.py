"""The JSON of ``GET /diary``: built from one fragment per commit, kept while the commit is.

The plain listing of a mirror (``whole``), the one asked for all the time, is kept in key
order as one fragment per key and a joined chunk (and its digest) per ``CHUNK_KEYS`` keys; the
mirror's change log names the keys that changed since, so after one change one fragment and
one chunk are made again, whatever the number of keys (at 100k keys, comparing every commit
with the one listed before cost 20x what it did at 10k: each was a cache miss).

Listings with payloads or a prefix cache a fragment per commit object instead: a mirror hands
out the same ``Commit`` object until its key changes, so that fragment is serialised once per
change of its key and serves every flag combination (the payload fields are spliced in).

Fragments are formatted directly rather than through ``json.dumps`` of a dict per commit:
the same JSON at a third of the cost, and without allocating 100k dicts, whose garbage
collection made a listing of 100k keys cost 20x one of 10k.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from bisect import bisect_left
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from json.encoder import encode_basestring

from rainer_server.commit import Commit
from rainer_server.commit import format_mtime

#: Fragments per chunk of a streamed listing: big enough that the join and the write
#: dominate, small enough that the first bytes leave early.
CHUNK_KEYS = 2000


def fragment(commit: Commit) -> bytes:
    """``"<key>":{<meta>}``: one member of the listing object, without payload fields."""
    key = encode_basestring(commit.key)
    return (
        f'{key}:{{"key":{key},"version":{commit.version:d},'
        f'"author":{encode_basestring(commit.author)},'
        f'"comment":{encode_basestring(commit.comment)},'
        f'"mtime":"{format_mtime(commit.mtime)}","empty":{"true" if commit.empty else "false"}}}'
    ).encode("utf-8")


def with_payload(member: bytes, commit: Commit, utf8: bool, b64: bool) -> bytes:
    """``member`` with the payload fields ``?payload_utf8``/``?payload_base64`` ask for."""
    if commit.payload is None or not (utf8 or b64):
        return member
    extra = []
    if utf8:
        text = encode_basestring(commit.payload.decode("utf-8", "replace"))
        extra.append(f'"payload_utf8":{text}')
    if b64:
        extra.append(f'"payload_base64":"{base64.b64encode(commit.payload).decode("ascii")}"')
    return member[:-1] + ("," + ",".join(extra) + "}").encode("utf-8")


class ListingFragments:
    """Per-process cache key -> fragment, valid while the key's commit is the same object.

    Two dicts rather than one of (commit, fragment) pairs: a tuple per key is an object the
    garbage collector tracks, and 100k of them made each collection during a listing cost
    more, so that a listing of 100k keys cost 15-20x one of 10k.
    """

    def __init__(self) -> None:
        self._commits: dict[str, Commit] = {}
        self._fragments: dict[str, bytes] = {}
        # Every key of the last whole listing, in order: most changes change a value, not
        # the set of keys, and sorting 100k keys cost a third of a listing after one change.
        self._sorted: list[str] = []
        # The plain listing of a mirror's view (no flags, no prefix: the one asked for all the
        # time), kept as parallel lists in key order and patched with the keys the mirror
        # says changed (``changed_since``): its JSON per ``CHUNK_KEYS`` keys, each starting
        # with a comma, is joined again only where a key changed.
        self._plain_lock = threading.Lock()
        self._plain_view: Mapping[str, Commit] | None = None
        self._plain_keys: list[str] = []
        self._plain_members: list[bytes] = []
        self._plain_parts: list[tuple[bytes, bytes]] = []

    def member(self, commit: Commit) -> bytes:
        key = commit.key
        if self._commits.get(key) is not commit:
            self._fragments[key] = fragment(commit)
            self._commits[key] = commit
        return self._fragments[key]

    def chunks(
        self,
        heads: Mapping[str, Commit],
        include_all: bool,
        utf8: bool,
        b64: bool,
        prefix: str = "",
        cache: bool = True,
    ) -> Iterator[bytes]:
        """The listing's JSON object in chunks of ``CHUNK_KEYS`` members, keys in order.

        :param cache: keep the fragments (``heads`` is a mirror's view, whose commits stay
            the same objects); ``False`` for heads read afresh from a database.
        """
        if cache and len(self._fragments) > 2 * len(heads) + 100:
            self._fragments.clear()  # mostly keys deleted since: rebuilt on demand
            self._commits.clear()
        member = self.member if cache else fragment
        if prefix:
            keys = sorted(key for key in heads if key.startswith(prefix))
        elif cache and len(self._sorted) == len(heads):
            keys = self._sorted  # the same keys, unless one was swapped for another
        else:
            keys = sorted(heads)
        built = _build(heads, keys, member, include_all, utf8, b64)
        if built is None:
            keys = sorted(heads)
            built = _build(heads, keys, member, include_all, utf8, b64)
        if cache and not prefix:
            self._sorted = keys
        assert built is not None  # every key was just read from ``heads``
        return iter(built)

    def whole(self, heads: Mapping[str, Commit]) -> tuple[list[bytes], str]:
        """The plain listing of ``heads``, a mirror's view (no tombstones, no payloads, no
        prefix), in chunks, and its ETag: the same in every process for the same listing,
        made from each chunk's digest so that a change hashes again only its chunk."""
        with self._plain_lock:
            changed = None
            changed_since = getattr(heads, "changed_since", None)
            if self._plain_view is not None and changed_since is not None:
                changed = changed_since(self._plain_view)
            if changed is None:
                keys = sorted(heads)
                members = [_listed(commit) for commit in map(heads.__getitem__, keys)]
                if None in members:  # tombstones hold no place: chunks depend on what is listed
                    keys = [key for key, member in zip(keys, members) if member is not None]
                    members = [member for member in members if member is not None]
                self._plain_keys = keys
                self._plain_members = members
                self._plain_parts = [
                    self._join(start) for start in range(0, len(keys), CHUNK_KEYS)
                ]
            elif changed:
                self._patch(heads, changed)
            self._plain_view = heads
            parts = list(self._plain_parts)
        tag = '"%s"' % hashlib.sha256(b"".join(d for _, d in parts)).hexdigest()[:32]
        if not parts:
            return [b"{}"], tag
        return [b"{" + parts[0][0][1:], *(part for part, _ in parts[1:]), b"}"], tag

    def _patch(self, heads: Mapping[str, Commit], changed: set[str]) -> None:
        keys, members = self._plain_keys, self._plain_members
        dirty: set[int] = set()
        moved = len(keys)  # the first position from which keys were inserted or removed
        for key in changed:
            commit = heads.get(key)
            at = bisect_left(keys, key)
            listed = at < len(keys) and keys[at] == key
            member = None if commit is None else _listed(commit)
            if member is None:
                if listed:
                    del keys[at], members[at]
                    moved = min(moved, at)
            elif listed:
                members[at] = member
                dirty.add(at // CHUNK_KEYS)
            else:
                keys.insert(at, key)
                members.insert(at, member)
                moved = min(moved, at)
        parts = self._plain_parts
        first_moved = moved // CHUNK_KEYS
        del parts[first_moved:]
        for chunk in sorted(dirty):
            if chunk < first_moved:
                parts[chunk] = self._join(chunk * CHUNK_KEYS)
        parts.extend(
            self._join(start)
            for start in range(first_moved * CHUNK_KEYS, len(keys), CHUNK_KEYS)
        )

    def _join(self, start: int) -> tuple[bytes, bytes]:
        """The members of the chunk from ``start``, each after a comma, and its digest."""
        part = b"," + b",".join(self._plain_members[start : start + CHUNK_KEYS])
        return part, hashlib.sha256(part).digest()


def _listed(commit: Commit) -> bytes | None:
    return None if commit.empty else fragment(commit)


def _build(
    heads: Mapping[str, Commit],
    keys: list[str],
    member: Callable[[Commit], bytes],
    include_all: bool,
    utf8: bool,
    b64: bool,
) -> list[bytes] | None:
    """The listing of ``keys`` (in order) in chunks; ``None`` when one of them is not in
    ``heads`` (then they are not its keys)."""
    payloads = utf8 or b64
    built = []
    opening = b"{"
    for start in range(0, len(keys), CHUNK_KEYS):
        members = []
        for key in keys[start : start + CHUNK_KEYS]:
            commit = heads.get(key)
            if commit is None:
                return None
            if include_all or not commit.empty:
                text = member(commit)
                members.append(with_payload(text, commit, utf8, b64) if payloads else text)
        if members:
            built.append(opening + b",".join(members))
            opening = b","
    built.append(b"{}" if opening == b"{" else b"}")
    return built


def body(chunks: Iterator[bytes]) -> bytes:
    return b"".join(chunks)


__all__ = ["ListingFragments", "fragment", "with_payload"]
