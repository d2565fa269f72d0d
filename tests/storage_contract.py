"""The CommitStorage contract (spec §3), run against every storage.

A test module imports these functions (``from tests.storage_contract import *``) and provides
a ``storage`` fixture yielding a started, empty storage.
"""

from __future__ import annotations

import threading
from datetime import datetime
from datetime import timezone

import pytest

from rainer_server.commit import Commit
from rainer_server.errors import CommitOrderingError

T0 = datetime(2014, 1, 2, 3, 4, 5, 6000, tzinfo=timezone.utc)


def commit(key: str, version: int, payload: bytes | None = b'{"a":1}', **kw) -> Commit:
    return Commit(
        key,
        version,
        payload,
        kw.get("author", "alice"),
        kw.get("comment", f"change {version}"),
        kw.get("mtime", T0),
    )


def save_versions(storage, key: str, count: int) -> list[Commit]:
    commits = [commit(key, v, b'{"v":%d}' % v) for v in range(1, count + 1)]
    for c in commits:
        storage.save(c)
    return commits


def test_empty_storage(storage):
    assert storage.heads() == {}
    assert storage.heads_non_empty() == {}
    assert storage.get("missing") is None
    assert storage.get("missing", 1) is None


def test_save_then_get_returns_an_equal_commit(storage):
    c = commit("hello", 1, b'{"x": [1, 2]}  # kept as sent\n', comment="multi\nline")
    storage.save(c)
    assert storage.get("hello") == c
    assert storage.get("hello", 1) == c
    assert storage.get("hello", 2) is None
    assert storage.get("hello", 0) is None


def test_every_version_is_kept(storage):
    commits = save_versions(storage, "k", 5)
    for c in commits:
        assert storage.get("k", c.version) == c
    assert storage.get("k") == commits[-1]
    assert storage.heads() == {"k": commits[-1]}


def test_first_version_must_be_one(storage):
    with pytest.raises(CommitOrderingError) as info:
        storage.save(commit("k", 2))
    assert (info.value.key, info.value.expected_version, info.value.provided_version) == ("k", 1, 2)
    assert storage.get("k") is None


def test_version_gap_and_repeat_are_refused(storage):
    save_versions(storage, "k", 2)
    for bad in (1, 2, 4, 100):
        with pytest.raises(CommitOrderingError) as info:
            storage.save(commit("k", bad, b'{"bad":true}'))
        assert info.value.expected_version == 3
        assert info.value.provided_version == bad
    assert storage.get("k").version == 2
    assert storage.get("k", 2).payload == b'{"v":2}'


def test_keys_have_independent_histories(storage):
    a = save_versions(storage, "a", 3)
    b = save_versions(storage, "b", 1)
    assert storage.heads() == {"a": a[-1], "b": b[-1]}


def test_tombstones(storage):
    save_versions(storage, "gone", 1)
    save_versions(storage, "kept", 1)
    tomb = commit("gone", 2, None)
    assert tomb.empty
    storage.save(tomb)
    assert storage.get("gone") == tomb
    assert storage.get("gone").payload is None
    assert storage.get("gone", 1).payload == b'{"v":1}'
    assert set(storage.heads()) == {"gone", "kept"}
    assert set(storage.heads_non_empty()) == {"kept"}
    # A key can come back after a tombstone; its history continues.
    back = commit("gone", 3, b'{"back":1}')
    storage.save(back)
    assert storage.heads_non_empty()["gone"] == back


def test_empty_payload_is_not_a_tombstone(storage):
    c = commit("blank", 1, b"")
    storage.save(c)
    got = storage.get("blank")
    assert got.payload == b"" and not got.empty


def test_keys_compare_byte_for_byte(storage):
    keys = ["a", "A", "a ", "é", "e", "e\u0301"]
    for i, key in enumerate(keys):
        storage.save(commit(key, 1, b'{"i":%d}' % i))
    heads = storage.heads()
    assert sorted(heads) == sorted(keys)
    for i, key in enumerate(keys):
        assert storage.get(key).payload == b'{"i":%d}' % i


def test_long_keys_and_binary_payloads(storage):
    key = "k" * 127 + "é" * 64  # 255 bytes of UTF-8
    payload = bytes(range(256)) * 100
    storage.save(commit(key, 1, payload))
    assert storage.get(key).payload == payload


def test_mtime_and_metadata_round_trip(storage):
    c = commit("m", 1, author="Zoë <zoe@example.com>", comment="", mtime=T0)
    storage.save(c)
    got = storage.get("m")
    assert got.mtime == T0.replace(microsecond=6000)
    assert got.author == "Zoë <zoe@example.com>" and got.comment == ""
    assert got.meta["mtime"] == "2014-01-02T03:04:05.006Z"


def test_concurrent_saves_of_one_version_exactly_one_wins(storage):
    save_versions(storage, "race", 1)
    barrier = threading.Barrier(8)
    outcomes: list[object] = []

    def writer(n: int) -> None:
        barrier.wait()
        try:
            storage.save(commit("race", 2, b'{"writer":%d}' % n))
            outcomes.append(n)
        except CommitOrderingError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [o for o in outcomes if isinstance(o, int)]
    losers = [o for o in outcomes if isinstance(o, CommitOrderingError)]
    assert len(winners) == 1 and len(losers) == 7
    assert all(e.expected_version == 3 and e.provided_version == 2 for e in losers)
    assert storage.get("race").payload == b'{"writer":%d}' % winners[0]
    assert storage.get("race", 3) is None


def test_concurrent_writers_keep_history_contiguous(storage):
    """Writers racing on one key, each retrying with the next version: no gaps, no duplicates."""
    per_writer = 10
    stop_at = 4 * per_writer

    def writer(n: int) -> None:
        wins = 0
        while wins < per_writer:
            head = storage.get("hot")
            version = (head.version if head else 0) + 1
            if version > stop_at:
                return
            try:
                storage.save(commit("hot", version, b'{"w":%d}' % n, author=f"w{n}"))
                wins += 1
            except CommitOrderingError:
                pass

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert storage.get("hot").version == stop_at
    assert [storage.get("hot", v).version for v in range(1, stop_at + 1)] == list(
        range(1, stop_at + 1)
    )


def test_concurrent_saves_on_new_keys_all_succeed(storage):
    """Distinct new keys in parallel never conflict (MySQL gap locks must not deadlock them)."""
    errors: list[Exception] = []

    def writer(n: int) -> None:
        try:
            for i in range(10):
                storage.save(commit(f"new-{n}-{i}", 1))
        except Exception as exc:  # any failure here is the bug under test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(storage.heads()) == 60


def test_history_newest_first_with_paging(storage):
    commits = save_versions(storage, "h", 7)
    storage.save(commit("h", 8, None))
    assert [c.version for c in storage.history("h")] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert [c.version for c in storage.history("h", limit=3)] == [8, 7, 6]
    assert [c.version for c in storage.history("h", limit=3, before=6)] == [5, 4, 3]
    assert storage.history("h", before=1) == []
    assert storage.history("missing") == []
    assert storage.history("h", limit=1, before=2) == [commits[0]]
