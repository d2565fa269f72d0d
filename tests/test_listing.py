"""The listing's JSON (web/listing.py): one fragment per commit, the same JSON as the meta
mappings ``json.dumps`` made, streamed in chunks, and rebuilt only for commits that changed."""

from __future__ import annotations

import base64
import json
import random
from datetime import datetime
from datetime import timezone

import immutables
import pytest

from rainer_server.commit import Commit
from rainer_server.web import listing
from rainer_server.web.listing import ListingFragments
from rainer_server.zk.mirror import ChangeLog
from rainer_server.zk.mirror import MirrorView

MTIME = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)


def make_commit(key: str, version: int = 1, payload: bytes | None = b'{"s":1}', **kw) -> Commit:
    return Commit(key, version, payload, kw.get("author", "nobody"), kw.get("comment", ""), MTIME)


def expected(heads, include_all, utf8, b64, prefix=""):
    listing_ = {}
    for key in sorted(heads):
        commit = heads[key]
        if not key.startswith(prefix) or not (include_all or not commit.empty):
            continue
        meta = commit.meta
        if commit.payload is not None:
            if utf8:
                meta["payload_utf8"] = commit.payload.decode("utf-8", "replace")
            if b64:
                meta["payload_base64"] = base64.b64encode(commit.payload).decode("ascii")
        listing_[key] = meta
    return listing_


HEADS = {
    c.key: c
    for c in [
        make_commit("plain"),
        make_commit("é-ünïcode-ключ", 3, "ü\"\\\n\t\x01".encode(), author='a "quoted" \\ author',
                    comment="line\nbreak \u2028 \x7f"),
        make_commit("gone", 2, None),
        make_commit("bytes", 1, b"\xff\x00\xfe"),
        make_commit("pre.one"),
        make_commit("pre.two", 4, b"[]"),
    ]
}


@pytest.mark.parametrize("include_all", [False, True])
@pytest.mark.parametrize("utf8", [False, True])
@pytest.mark.parametrize("b64", [False, True])
@pytest.mark.parametrize("prefix", ["", "pre.", "nothing"])
def test_the_listing_is_the_json_of_the_meta_mappings(include_all, utf8, b64, prefix):
    fragments = ListingFragments()
    for cache in (True, False):
        body = b"".join(fragments.chunks(HEADS, include_all, utf8, b64, prefix, cache=cache))
        assert json.loads(body) == expected(HEADS, include_all, utf8, b64, prefix)
        # Keys in order, as before.
        assert list(json.loads(body)) == sorted(json.loads(body))


def test_a_big_listing_streams_in_chunks(monkeypatch):
    monkeypatch.setattr(listing, "CHUNK_KEYS", 10)
    heads = {f"k{i:03d}": make_commit(f"k{i:03d}") for i in range(95)}
    chunks = list(ListingFragments().chunks(heads, False, False, False))
    assert len(chunks) == 11  # 10 chunks of members and the closing brace
    assert json.loads(b"".join(chunks)) == expected(heads, False, False, False)
    assert list(ListingFragments().chunks({}, False, False, False)) == [b"{}"]


@pytest.fixture
def made(monkeypatch) -> list[str]:
    """The keys whose fragments are made from here on, in order."""
    keys: list[str] = []
    real = listing.fragment

    def counting(commit):
        keys.append(commit.key)
        return real(commit)

    monkeypatch.setattr(listing, "fragment", counting)
    return keys


def test_only_a_changed_commit_is_serialised_again(made):
    fragments = ListingFragments()
    heads = {f"k{i}": make_commit(f"k{i}") for i in range(5)}
    b"".join(fragments.chunks(heads, False, True, False))
    made.clear()
    heads = {**heads, "k2": make_commit("k2", 2)}
    body = b"".join(fragments.chunks(heads, False, True, True))
    assert made == ["k2"]  # and the other payload flags reuse the cached members
    assert json.loads(body) == expected(heads, False, True, True)


class Mirror:
    """A mirror's views as CommitMirror makes them: a persistent map and its change log."""

    def __init__(self, heads: dict[str, Commit]) -> None:
        self.log = ChangeLog(limit=8)
        self.commits = immutables.Map(heads)
        self.log.note_all()

    def set(self, commit: Commit) -> None:
        self.commits = self.commits.set(commit.key, commit)
        self.log.note(commit.key)

    def delete(self, key: str) -> None:
        self.commits = self.commits.delete(key)
        self.log.note(key)

    @property
    def view(self) -> MirrorView:
        return MirrorView(self.commits, self.log, self.log.sequence)


def test_a_mirror_listing_serialises_only_the_keys_the_mirror_changed(monkeypatch, made):
    monkeypatch.setattr(listing, "CHUNK_KEYS", 10)
    fragments = ListingFragments()
    mirror = Mirror({f"k{i:02d}": make_commit(f"k{i:02d}") for i in range(25)})

    tags: dict[bytes, str] = {}

    def listed() -> dict:
        view = mirror.view
        fresh_tag = ListingFragments().whole(view)[1]
        made.clear()
        chunks, tag = fragments.whole(view)
        body = json.loads(b"".join(chunks))
        assert list(body) == sorted(body)
        assert body == expected(dict(view.items()), False, False, False)
        # The same listing has the same tag whatever came before (in any other process),
        # and another listing another.
        assert tags.setdefault(b"".join(chunks), tag) == tag
        assert list(tags.values()).count(tag) == 1
        assert fresh_tag == tag
        return body

    listed()
    assert len(made) == 25
    listed()
    assert made == []  # the same view
    mirror.set(make_commit("k05", 2))
    assert listed()["k05"]["version"] == 2 and made == ["k05"]
    mirror.set(make_commit("k10a"))  # a new key between two chunks moves every later key
    mirror.delete("k00")
    mirror.set(make_commit("k24", 3, None))  # a tombstone is not listed
    body = listed()
    assert made == ["k10a"] and "k00" not in body and "k24" not in body
    for i in range(9):  # past the log's limit: every key is made again
        mirror.set(make_commit("k01", 2 + i))
    listed()
    assert len(made) == 24
    # Emptied, and filled again; an older view than the last listed one.
    older = mirror.view
    for key in list(mirror.commits):
        mirror.delete(key)
    assert listed() == {}
    assert json.loads(b"".join(fragments.whole(older)[0])) == expected(
        dict(older.items()), False, False, False
    )
    rng = random.Random(13)
    for step in range(300):
        key = f"r{rng.randrange(40):02d}"
        if rng.random() < 0.3 and key in mirror.commits:
            mirror.delete(key)
        else:
            mirror.set(make_commit(key, step + 1, None if rng.random() < 0.1 else b"1"))
        if rng.random() < 0.4:
            listed()
    listed()


def test_the_order_of_the_keys_is_kept_until_keys_come_or_go():
    fragments = ListingFragments()

    def listed(heads):
        return list(json.loads(b"".join(fragments.chunks(heads, True, False, False))))

    heads = {f"k{i}": make_commit(f"k{i}") for i in (3, 1, 2)}
    assert listed(heads) == ["k1", "k2", "k3"]
    kept = fragments._sorted
    assert listed({**heads, "k2": make_commit("k2", 2)}) == ["k1", "k2", "k3"]
    assert fragments._sorted is kept  # a value changed: no sort
    # As many keys as before, one of them another: the order is made again.
    swapped = {"k0": make_commit("k0"), "k1": heads["k1"], "k3": heads["k3"]}
    assert listed(swapped) == ["k0", "k1", "k3"]
    assert listed({**swapped, "k9": make_commit("k9")}) == ["k0", "k1", "k3", "k9"]
    assert listed({"k3": heads["k3"]}) == ["k3"]
    assert listed({}) == []
    # A prefix listing neither uses nor replaces the whole listing's order.
    assert list(json.loads(b"".join(fragments.chunks(swapped, True, False, False, "k0")))) == ["k0"]
    assert fragments._sorted == []
