"""Typed payloads: the formats, Commit.from_value and commit.value, and readers built with a
deserialization (storages, keeper and mirror on a real ZooKeeper, the HTTP client)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import threading
from datetime import datetime
from datetime import timezone
from typing import Any

import pytest
from marshmallow import Schema
from marshmallow import fields
from marshmallow import post_load
from marshmallow import validate

from rainer_server import create_app
from rainer_server.client import HttpCommitStorage
from rainer_server.client import RainerClient
from rainer_server.client import RemoteCommit
from rainer_server.commit import Commit
from rainer_server.errors import ConfigurationError
from rainer_server.errors import PayloadDeserializationError
from rainer_server.errors import PayloadRejected
from rainer_server.payloads import BytesPayloads
from rainer_server.payloads import JsonPayloads
from rainer_server.payloads import KeyValueDeserialization
from rainer_server.payloads import KeyValueSerialization
from rainer_server.payloads import Payloads
from rainer_server.payloads import SchemaPayloads
from rainer_server.payloads import TextPayloads
from rainer_server.payloads import YamlPayloads
from rainer_server.payloads import make_payloads
from rainer_server.storage.db import DbCommitStorage
from rainer_server.storage.db import open_database
from rainer_server.storage.memory import MemoryCommitStorage
from rainer_server.zk.keeper import CommitKeeper
from rainer_server.zk.rainers import Rainers
from tests.live import live_server  # noqa: F401 (fixture)
from tests.zk_support import started_client
from tests.zk_support import wait_until

T0 = datetime(2014, 1, 2, 3, 4, 5, 6000, tzinfo=timezone.utc)


@dataclasses.dataclass
class Pipeline:
    name: str
    workers: int


class PipelineSchema(Schema):
    name = fields.String(required=True)
    workers = fields.Integer(required=True)

    @post_load
    def _make(self, data: dict[str, Any], **kwargs: Any) -> Pipeline:
        return Pipeline(**data)


class Counting:
    """A real format underneath that counts its deserializations (by key)."""

    def __init__(self, base: Payloads) -> None:
        self.base = base
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def deserialize(self, key: str, data: bytes) -> Any:
        with self._lock:
            self.calls.append(key)
        return self.base.deserialize(key, data)

    def serialize(self, key: str, value: Any) -> bytes:
        return self.base.serialize(key, value)


def typed_pipelines() -> SchemaPayloads:
    return SchemaPayloads(JsonPayloads(), {"pipelines.*": PipelineSchema})


# ---------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "payloads, value",
    [
        (JsonPayloads(), {"size": 10, "hosts": ["a", "é"], "ratio": 0.5, "on": None}),
        (YamlPayloads(), {"size": 10, "hosts": ["a", "é"], "nested": {"on": True}}),
        (TextPayloads(), "pool size\nten ☃\n"),
        (BytesPayloads(), b"\xff\x00\x01"),
    ],
)
def test_each_format_round_trips_a_value(payloads, value):
    data = payloads.serialize("k", value)
    assert isinstance(data, bytes)
    assert payloads.deserialize("k", data) == value
    assert isinstance(payloads, KeyValueDeserialization)
    assert isinstance(payloads, KeyValueSerialization)


def test_formats_read_what_humans_write():
    # Bytes are never rewritten: comments, layout and key order are the author's.
    assert YamlPayloads().deserialize("k", b"# pool\nsize: 10  # per host\n") == {"size": 10}
    assert JsonPayloads().deserialize("k", b' {"b": 1,\n "a": 2} ') == {"b": 1, "a": 2}
    assert TextPayloads().deserialize("k", "h\u00e9".encode()) == "h\u00e9"


@pytest.mark.parametrize(
    "payloads, data, reason",
    [
        (JsonPayloads(), b"NaN", "NaN is not valid JSON"),
        (JsonPayloads(), b'{"x": -Infinity}', "-Infinity is not valid JSON"),
        (JsonPayloads(), b"\xff", "not UTF-8: invalid start byte at byte 0"),
        (JsonPayloads(), b"[1, 2", "Expecting"),
        (YamlPayloads(), b"a: [1\n", "expected ',' or ']'"),
        (YamlPayloads(), b"!!python/object/apply:os.system ['true']\n", "could not determine"),
        (TextPayloads(), b"ok\xff", "not UTF-8: invalid start byte at byte 2"),
    ],
)
def test_deserialize_refuses_with_the_servers_reason(payloads, data, reason):
    with pytest.raises(PayloadRejected) as info:
        payloads.deserialize("k", data)
    assert reason in info.value.reason
    assert str(info.value) == f"Malformed input: {info.value.reason}"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "payloads, value",
    [
        (JsonPayloads(), float("nan")),
        (JsonPayloads(), {"x": {1, 2}}),
        (YamlPayloads(), object()),
        (TextPayloads(), 5),
        (TextPayloads(), "\ud800"),
        (BytesPayloads(), "text"),
    ],
)
def test_serialize_refuses_values_the_format_cannot_write(payloads, value):
    with pytest.raises(PayloadRejected):
        payloads.serialize("k", value)


def test_schemas_apply_per_key_pattern():
    payloads = typed_pipelines()
    assert payloads.deserialize("pipelines.ingest", b'{"name": "ingest", "workers": 3}') == (
        Pipeline("ingest", 3)
    )
    # Keys no glob matches are the base format's values, unchecked by the schema.
    assert payloads.deserialize("other", b'{"workers": "many"}') == {"workers": "many"}
    with pytest.raises(PayloadRejected) as info:
        payloads.deserialize("pipelines.ingest", b'{"name": "ingest", "workers": "many"}')
    assert info.value.reason == "does not match schema for pipelines.*"
    assert info.value.messages == {"workers": ["Not a valid integer."]}
    with pytest.raises(PayloadRejected, match=r"pipelines\.\* payloads must be objects"):
        payloads.deserialize("pipelines.ingest", b"[1]")

    data = payloads.serialize("pipelines.ingest", Pipeline("ingest", 3))
    assert json.loads(data) == {"name": "ingest", "workers": 3}
    assert payloads.serialize("other", [1]) == b"[1]"
    with pytest.raises(PayloadRejected) as info:
        payloads.serialize("pipelines.ingest", {"name": "ingest"})
    assert info.value.messages == {"workers": ["Missing data for required field."]}


def test_every_matching_schema_must_accept_and_the_first_gives_the_value():
    class Strict(Schema):
        name = fields.String(required=True)
        workers = fields.Integer(required=True, validate=validate.Range(max=9))

    payloads = SchemaPayloads(YamlPayloads(), {"pipelines.*": PipelineSchema(), "*": Strict})
    assert payloads.deserialize("pipelines.a", b"name: a\nworkers: 3\n") == Pipeline("a", 3)
    with pytest.raises(PayloadRejected) as info:
        payloads.deserialize("pipelines.a", b"name: a\nworkers: 30\n")
    assert info.value.reason == "does not match schema for *"


def test_make_payloads_builds_the_configured_format():
    assert type(make_payloads()) is JsonPayloads
    assert [type(make_payloads(name)) for name in ("yaml", "text", "bytes")] == [
        YamlPayloads,
        TextPayloads,
        BytesPayloads,
    ]
    typed = make_payloads("yaml", {"pipelines.*": "tests.test_payloads:PipelineSchema"})
    assert isinstance(typed, SchemaPayloads) and type(typed.base) is YamlPayloads
    assert typed.deserialize("pipelines.a", b"{name: a, workers: 2}") == Pipeline("a", 2)
    with pytest.raises(ConfigurationError, match="RAINER_PAYLOAD_FORMAT"):
        make_payloads("xml")
    with pytest.raises(ConfigurationError, match="cannot import tests.nothing:Here"):
        make_payloads("json", {"*": "tests.nothing:Here"})
    with pytest.raises(ConfigurationError, match="is not a marshmallow Schema"):
        make_payloads("json", {"*": "tests.test_payloads:Pipeline"})


def test_the_server_validates_with_the_same_objects(tmp_path):
    app = create_app(
        {
            "RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/v.db",
            "RAINER_PAYLOAD_FORMAT": "yaml",
            "RAINER_PAYLOAD_SCHEMAS": {"pipelines.*": "tests.test_payloads:PipelineSchema"},
        }
    )
    payloads = app.extensions["rainer"].payloads
    assert isinstance(payloads, SchemaPayloads) and type(payloads.base) is YamlPayloads
    client = app.test_client()
    headers = {"X-Rainer-Author": "alice"}
    bad = b"name: a\nworkers: many\n"
    with pytest.raises(PayloadRejected) as info:
        payloads.deserialize("pipelines.a", bad)
    answer = client.post("/diary/pipelines.a/1", data=bad, headers=headers)
    assert answer.status_code == 400
    assert answer.get_json() == {"error": str(info.value), "messages": info.value.messages}
    good = payloads.serialize("pipelines.a", Pipeline("a", 4))
    assert client.post("/diary/pipelines.a/1", data=good, headers=headers).status_code == 200
    assert payloads.deserialize("pipelines.a", client.get("/diary/pipelines.a").data) == (
        Pipeline("a", 4)
    )
    app.extensions["rainer"].close()


# ---------------------------------------------------------------------- commits


def test_from_value_serializes_and_reads_the_value_back():
    payloads = JsonPayloads()
    c = Commit.from_value(
        "web.pool", 1, {"size": 10}, "alice", "first", T0, serialization=payloads
    )
    assert c.payload == b'{"size": 10}' and not c.empty
    assert c.value == {"size": 10}
    assert c.deserialization is payloads
    # The deserialization is how this reader sees the commit, not part of it.
    plain = Commit("web.pool", 1, b'{"size": 10}', "alice", "first", T0)
    assert c == plain and hash(c) == hash(plain) and repr(c) == repr(plain)
    assert {c: 1}[plain] == 1
    assert plain.value == b'{"size": 10}'  # no deserialization: the payload bytes


def test_from_value_defaults_mtime_to_now_and_none_is_a_tombstone():
    before = datetime.now(timezone.utc).replace(microsecond=0)
    c = Commit.from_value("k", 2, None, "bob", "rm", serialization=JsonPayloads())
    assert c.empty and c.payload is None and c.value is None
    assert c.mtime >= before


def test_from_value_with_a_serialization_only_keeps_bytes():
    class Upper:
        def serialize(self, key: str, value: Any) -> bytes:
            return value.upper().encode()

    c = Commit.from_value("k", 1, "abc", "me", "", T0, serialization=Upper())
    assert c.deserialization is None and c.payload == b"ABC" and c.value == b"ABC"


def test_from_value_refuses_what_cannot_be_written():
    with pytest.raises(PayloadRejected, match="cannot write as JSON"):
        Commit.from_value("k", 1, {"x": float("inf")}, "me", "", T0, serialization=JsonPayloads())


def test_value_is_deserialized_once_and_cached():
    counting = Counting(JsonPayloads())
    c = Commit("k", 1, b'{"a": [1, 2]}', "me", "", T0, deserialization=counting)
    assert counting.calls == []  # nothing at construction
    first = c.value
    assert first == {"a": [1, 2]}
    assert c.value is first and c.value is first
    assert counting.calls == ["k"]


def test_racing_first_reads_deserialize_once():
    counting = Counting(JsonPayloads())
    c = Commit("k", 1, b'{"a": 1}', "me", "", T0, deserialization=counting)
    barrier = threading.Barrier(8)
    seen: list[Any] = []

    def read() -> None:
        barrier.wait()
        seen.append(c.value)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(seen) == 8 and all(v is seen[0] for v in seen)
    assert counting.calls == ["k"]


def test_a_bad_payload_raises_a_typed_error_only_when_its_value_is_read():
    counting = Counting(JsonPayloads())
    c = Commit("k", 3, b"{nope", "me", "", T0, deserialization=counting)  # no error here
    assert c.payload == b"{nope" and c.meta["version"] == 3
    for _ in range(2):
        with pytest.raises(PayloadDeserializationError) as info:
            c.value
        assert (info.value.key, info.value.version) == ("k", 3)
        assert isinstance(info.value.__cause__, PayloadRejected)
        assert str(info.value).startswith("Cannot deserialize the payload of k version 3: ")
    assert counting.calls == ["k"]  # the failure is cached too


def test_schema_errors_and_foreign_exceptions_become_the_typed_error():
    c = Commit(
        "pipelines.a", 1, b'{"name": "a"}', "me", "", T0, deserialization=typed_pipelines()
    )
    with pytest.raises(PayloadDeserializationError) as info:
        c.value
    assert info.value.messages == {"workers": ["Missing data for required field."]}
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.key, copy.version, copy.messages) == ("pipelines.a", 1, info.value.messages)

    class Picky:
        def deserialize(self, key: str, data: bytes) -> Any:
            return json.loads(data)["needed"]

    with pytest.raises(PayloadDeserializationError) as info:
        Commit("k", 1, b"{}", "me", "", T0, deserialization=Picky()).value
    assert isinstance(info.value.__cause__, KeyError) and "'needed'" in info.value.reason


def test_a_tombstones_value_is_none_without_deserializing():
    counting = Counting(JsonPayloads())
    c = Commit("k", 2, None, "me", "rm", T0, deserialization=counting)
    assert c.value is None and counting.calls == []


def test_with_deserialization():
    payloads = YamlPayloads()
    plain = Commit("k", 1, b"a: 1\n", "me", "", T0)
    typed = plain.with_deserialization(payloads)
    assert typed == plain and typed.value == {"a": 1} and plain.value == b"a: 1\n"
    assert typed.with_deserialization(payloads) is typed
    assert typed.with_deserialization(None).value == b"a: 1\n"


def test_the_wire_format_carries_no_value():
    c = Commit.from_value("k", 1, {"a": 1}, "me", "", T0, serialization=JsonPayloads())
    c.value  # cached on the object; not written anywhere
    assert c.serialize() == Commit("k", 1, b'{"a": 1}', "me", "", T0).serialize()
    again = Commit.deserialize(c.serialize(), JsonPayloads())
    assert again == c and again.value == {"a": 1}
    assert Commit.deserialize(c.serialize()).value == b'{"a": 1}'


# ---------------------------------------------------------------------- storages


@pytest.fixture
def counting() -> Counting:
    return Counting(typed_pipelines())


@pytest.fixture
def typed_storage(storage, counting):
    """The ``storage`` fixture's backend (memory, SQLite, MySQL), read with ``counting``."""
    if isinstance(storage, MemoryCommitStorage):
        return MemoryCommitStorage(deserialization=counting)
    return DbCommitStorage(storage.database, storage.table_name, deserialization=counting)


def test_a_storage_built_with_a_deserialization_reads_values(typed_storage, counting):
    payloads = typed_pipelines()
    typed_storage.save(
        Commit.from_value("pipelines.a", 1, Pipeline("a", 2), "me", "", T0, serialization=payloads)
    )
    typed_storage.save(
        Commit.from_value("pipelines.a", 2, Pipeline("a", 5), "me", "", T0, serialization=payloads)
    )
    typed_storage.save(Commit("plain", 1, b'{"any": "json"}', "me", "", T0))
    typed_storage.save(Commit("gone", 1, b"[]", "me", "", T0))
    typed_storage.save(Commit("gone", 2, None, "me", "rm", T0))
    # A payload this reader's schema refuses (the storage stores any bytes).
    typed_storage.save(Commit("pipelines.bad", 1, b'{"name": "bad"}', "me", "", T0))
    assert counting.calls == []  # saving deserializes nothing

    # Listing never deserializes, so a bad payload cannot break it.
    heads = typed_storage.heads()
    assert sorted(heads) == ["gone", "pipelines.a", "pipelines.bad", "plain"]
    assert sorted(typed_storage.heads_non_empty()) == ["pipelines.a", "pipelines.bad", "plain"]
    assert [c.version for c in typed_storage.history("pipelines.a")] == [2, 1]
    assert counting.calls == []

    assert heads["pipelines.a"].value == Pipeline("a", 5)
    assert heads["plain"].value == {"any": "json"}
    assert heads["gone"].value is None
    assert typed_storage.get("pipelines.a").value == Pipeline("a", 5)
    assert typed_storage.get("pipelines.a", 1).value == Pipeline("a", 2)
    assert [c.value for c in typed_storage.history("pipelines.a")] == [
        Pipeline("a", 5),
        Pipeline("a", 2),
    ]
    with pytest.raises(PayloadDeserializationError) as info:
        typed_storage.get("pipelines.bad").value
    assert info.value.key == "pipelines.bad"
    assert info.value.messages == {"workers": ["Missing data for required field."]}

    # A commit object deserializes once, however often its value is read; the memory storage
    # hands out the objects it keeps, so there it is once for every reader.
    calls = len(counting.calls)
    head = typed_storage.get("plain")
    assert head.value is head.value
    kept = isinstance(typed_storage, MemoryCommitStorage)
    assert len(counting.calls) == calls + (0 if kept else 1)


def test_a_storage_without_a_deserialization_reads_bytes(storage):
    storage.save(Commit.from_value("k", 1, {"a": 1}, "me", "", T0, serialization=JsonPayloads()))
    assert storage.get("k").deserialization is None
    assert storage.get("k").value == b'{"a": 1}'
    assert storage.heads()["k"].value == b'{"a": 1}'


# ---------------------------------------------------------------------- ZooKeeper


@pytest.fixture
def zk_client(zk_chroot):
    yield from started_client(zk_chroot)


@pytest.mark.zookeeper
def test_keeper_and_a_live_mirror_of_values(zk_client, counting):
    payloads = typed_pipelines()
    keeper = CommitKeeper(zk_client, "/typed", deserialization=counting)

    def save(key: str, version: int, value: Any) -> None:
        keeper.save(Commit.from_value(key, version, value, "me", "", T0, serialization=payloads))

    save("pipelines.a", 1, Pipeline("a", 1))
    save("plain", 1, {"n": 1})
    assert keeper.get("pipelines.a").value == Pipeline("a", 1)
    assert keeper.heads()["plain"].value == {"n": 1}

    with keeper.mirror() as mirror:
        values = mirror.values()
        calls = len(counting.calls)
        assert values["pipelines.a"] == Pipeline("a", 1)
        assert dict(values.items()) == {"pipelines.a": Pipeline("a", 1), "plain": {"n": 1}}

        # Live: the same mapping follows changes, additions and deletions.
        save("pipelines.a", 2, Pipeline("a", 2))
        wait_until(lambda: values.get("pipelines.a") == Pipeline("a", 2), what="the update")
        save("pipelines.b", 1, Pipeline("b", 7))
        wait_until(lambda: "pipelines.b" in values, what="the new key")
        assert values["pipelines.b"] == Pipeline("b", 7)
        save("plain", 2, None)
        wait_until(lambda: "plain" not in values, what="the deletion")
        assert sorted(values) == ["pipelines.a", "pipelines.b"] and len(values) == 2

        # Each commit was deserialized once, when first read, not at every change.
        assert counting.calls[calls:].count("pipelines.a") == 2  # versions 1 and 2
        assert counting.calls[calls:].count("pipelines.b") == 1
        assert counting.calls[calls:].count("plain") == 1  # then deleted by its tombstone

        # A payload this reader refuses is mirrored and listed; reading its value fails.
        keeper.save(Commit("pipelines.bad", 1, b'{"name": "bad"}', "me", "", T0))
        wait_until(lambda: "pipelines.bad" in mirror.current, what="the bad key")
        assert sorted(values.keys()) == ["pipelines.a", "pipelines.b", "pipelines.bad"]
        assert "pipelines.bad" in values and len(values) == 3
        with pytest.raises(PayloadDeserializationError):
            values["pipelines.bad"]
        unchanged = mirror.current["pipelines.a"]
        assert values["pipelines.a"] is unchanged.value


@pytest.mark.zookeeper
def test_rainers_builder_with_values(zk_client, tmp_path):
    """The README's library example (on SQLite)."""
    payloads = typed_pipelines()
    database = open_database(f"sqlite:///{tmp_path}/rainer.db")
    rainers = Rainers.create(
        zk_client,
        "/rainer",
        DbCommitStorage(database, "rainer", deserialization=payloads),
        deserialization=payloads,
    )
    rainers.start()
    try:
        assert rainers.keeper.deserialization is payloads
        rainers.storage.save(
            Commit.from_value(
                "pipelines.ingest", 1, Pipeline("ingest", 4), "alice", "Creating ingest",
                serialization=payloads,
            )
        )
        assert rainers.storage.get("pipelines.ingest").value == Pipeline("ingest", 4)
        with rainers.keeper.mirror() as mirror:
            pipelines = mirror.values()
            assert pipelines["pipelines.ingest"] == Pipeline("ingest", 4)
            rainers.storage.save(
                Commit.from_value(
                    "pipelines.ingest", 2, Pipeline("ingest", 6), "bob", "More workers",
                    serialization=payloads,
                )
            )
            wait_until(
                lambda: pipelines["pipelines.ingest"] == Pipeline("ingest", 6),
                what="the mirror to follow the save",
            )
    finally:
        rainers.stop()


# ---------------------------------------------------------------------- the HTTP client


def test_client_with_a_deserialization_against_a_live_server(live_server):  # noqa: F811
    raw = RainerClient(live_server.url)
    typed = RainerClient(live_server.url, deserialization=typed_pipelines())

    def post(key: str, version: int, payload: bytes | None) -> None:
        raw.post_commit({"key": key, "version": version, "author": "a"}, payload)

    post("pipelines.a", 1, b'{"name": "a", "workers": 1}')
    post("pipelines.a", 2, b'{"name": "a", "workers": 2}')
    post("plain", 1, b'{"n": 1}')
    post("plain", 2, None)
    # JSON to the server (its format), but not a pipeline to this reader.
    post("pipelines.bad", 1, b'{"workers": "x"}')

    # Without a deserialization a value is the payload bytes, as pyrainer's.
    assert raw.get_commit("pipelines.a").value == b'{"name": "a", "workers": 2}'

    head = typed.get_commit("pipelines.a")
    assert isinstance(head, RemoteCommit) and head.value == Pipeline("a", 2)
    assert head == raw.get_commit("pipelines.a")
    assert typed.get_commit("pipelines.a", 1).value == Pipeline("a", 1)
    assert typed.get_value("pipelines.a") == b'{"name": "a", "workers": 2}'  # always bytes
    full = typed.list_full(all=True)  # listing a refused payload is fine
    assert sorted(full) == ["pipelines.a", "pipelines.bad", "plain"]
    assert full["pipelines.a"].value == Pipeline("a", 2) and full["plain"].value is None
    with pytest.raises(PayloadDeserializationError) as info:
        full["pipelines.bad"].value
    assert info.value.messages["workers"] == ["Not a valid integer."]
    assert [c.value for c in typed.iter_history("pipelines.a")] == [
        Pipeline("a", 2),
        Pipeline("a", 1),
    ]


def test_http_storage_with_a_deserialization(live_server):  # noqa: F811
    payloads = typed_pipelines()
    storage = HttpCommitStorage(live_server.url, deserialization=payloads)
    saved = Commit.from_value(
        "pipelines.a", 1, Pipeline("a", 3), "alice", "first", T0, serialization=payloads
    )
    storage.save(saved)
    got = storage.get("pipelines.a")
    assert type(got) is Commit and got == saved and got.value == Pipeline("a", 3)
    assert storage.heads()["pipelines.a"].value == Pipeline("a", 3)
    assert [c.value for c in storage.history("pipelines.a")] == [Pipeline("a", 3)]
    assert HttpCommitStorage(live_server.url).get("pipelines.a").value == saved.payload
