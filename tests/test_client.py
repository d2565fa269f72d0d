"""``RainerClient`` and ``HttpCommitStorage`` against live servers, and beside pyrainer 0.26."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from datetime import datetime
from datetime import timezone

import pytest

from rainer_server.client import HttpCommitStorage
from rainer_server.client import RainerBadRequest
from rainer_server.client import RainerClient
from rainer_server.client import RainerConnectionError
from rainer_server.client import RainerHTTPError
from rainer_server.client import RainerUnavailable
from rainer_server.client import RemoteCommit
from rainer_server.commit import Commit
from rainer_server.errors import CommitNotFound
from rainer_server.errors import CommitOrderingError
from rainer_server.errors import InvalidCommit
from rainer_server.errors import StorageUnavailable
from tests.live import live_server  # noqa: F401 (fixture)
from tests.live import run_rainer
from tests.live import sqlite_live_server  # noqa: F401 (fixture)
from tests.live import start_live_server
from tests.storage_contract import *  # noqa: F403 (the shared contract suite)
from tests.storage_contract import T0
from tests.storage_contract import commit
from tests.test_gunicorn import Gunicorn
from tests.zkserver import free_port


@pytest.fixture
def storage(app_config):
    """The contract suite's storage: HTTP to a live server over SQLite or MySQL."""
    # Any bytes: the contract stores binary payloads and JSON with comments.
    server = start_live_server({**app_config, "RAINER_PAYLOAD_FORMAT": "bytes"})
    yield HttpCommitStorage(server.url)
    server.stop()


@pytest.fixture
def api(live_server):  # noqa: F811
    return RainerClient(live_server.url)


def test_awkward_text_fields_round_trip_exactly(storage):
    """Line breaks, '%', control characters and any Unicode survive the headers both ways."""
    texts = ["multi\nline\r\nend", "100% kept, %41 literal", "tab\tand\x01", "naïve ☃ Zoë", "plain"]
    for version, text in enumerate(texts, start=1):
        c = commit("awkward", version, comment=text, author=text)
        storage.save(c)
        assert storage.get("awkward") == c
        assert storage.get("awkward", version) == c



def test_heads_token_follows_commits(storage):
    assert storage.heads_token() == 0
    storage.save(commit("a", 1))
    storage.save(commit("a", 2, None))
    storage.save(commit("b", 1))
    assert storage.heads_token() == 3


# ---------------------------------------------------------------------- import hygiene


def test_client_and_cli_import_without_the_server_stack():
    code = (
        "import sys, rainer_server.client, rainer_server.cli\n"
        "print(sorted(m for m in ('flask', 'werkzeug', 'peewee', 'pymysql', 'kazoo', 'marshmallow')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---------------------------------------------------------------------- the client's API


def test_pyrainer_shapes(api, live_server):  # noqa: F811
    assert api.list() == {}
    meta = api.post_commit(
        {"key": "svc", "version": 1, "author": "alice", "comment": "first"}, '{"n": 1}'
    )
    assert meta["key"] == "svc" and meta["version"] == 1 and meta["empty"] is False
    api.post_commit({"key": "svc", "version": 2, "author": "bob", "comment": ""}, b'{"n": 2}')
    api.post_commit({"key": "old", "version": 1, "author": "bob", "comment": ""}, b"[]")
    api.post_commit(
        {"key": "old", "version": 2, "author": "bob", "comment": "rm", "empty": "True"}, ""
    )

    assert api.commit_uri("svc") == live_server.url + "/svc"
    assert api.commit_uri("svc", 2) == live_server.url + "/svc/2"
    assert sorted(api.list()) == ["svc"]
    assert sorted(api.list(all=True)) == ["old", "svc"]
    assert api.list()["svc"]["author"] == "bob"
    full = api.list_full(all=True)
    assert full["svc"].value == b'{"n": 2}' and full["old"].value is None and full["old"].empty
    assert api.get_value("svc") == b'{"n": 2}'
    assert api.get_value("svc", 1) == b'{"n": 1}'
    assert api.get_value("old") == b""
    assert api.get_metadata("svc", 1)["comment"] == "first"
    head = api.get_commit("svc")
    assert isinstance(head, RemoteCommit) and head.version == 2 and head.value == b'{"n": 2}'
    assert head.meta == api.get_metadata("svc")
    tomb = api.get_commit("old")
    assert tomb.empty and tomb.value is None and tomb.comment == "rm"


def test_history_pages(api):
    for v in range(1, 8):
        api.post_commit(
            {"key": "h", "version": v, "author": "a", "comment": f"c{v}"}, b'{"v":%d}' % v
        )
    api.post_commit({"key": "h", "version": 8, "author": "a", "empty": True}, None)
    assert [m["version"] for m in api.history("h")] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert [m["version"] for m in api.history("h", limit=3, before=6)] == [5, 4, 3]
    assert "payload_base64" not in api.history("h", limit=1)[0]
    page = api.history_full("h", limit=2, before=3)
    assert [(c.version, c.value) for c in page] == [(2, b'{"v":2}'), (1, b'{"v":1}')]
    walked = list(api.iter_history("h", page_size=3))
    assert [c.version for c in walked] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert walked[0].empty and walked[1].comment == "c7"
    assert [c.version for c in api.iter_history("h", before=3, page_size=1)] == [2, 1]
    with pytest.raises(CommitNotFound):
        api.history("none")


def test_unusual_keys_and_headers_round_trip(api):
    key = "a b?c#d%e é+:@"
    mtime = datetime(2014, 1, 2, 3, 4, 5, 6000, tzinfo=timezone.utc)
    for i, (author, comment) in enumerate(
        [("Zoë <zoe@example.com>", "naïve ☃"), ("50% off", "100%25 literal %41"), ("tab\there", "")]
    ):
        meta = api.post_commit(
            {"key": key, "version": i + 1, "author": author, "comment": comment, "mtime": mtime},
            b"{}",
        )
        assert (meta["author"], meta["comment"]) == (author, comment)
        got = api.get_commit(key)
        assert (got.key, got.author, got.comment, got.mtime) == (key, author, comment, mtime)
    assert list(api.list()) == [key]
    assert api.commit_uri(key).endswith("/a%20b%3Fc%23d%25e%20%C3%A9+:@")


def test_remote_commits_equal_plain_commits(api):
    api.post_commit({"key": "k", "version": 1, "author": "a", "comment": "c", "mtime": T0}, b"{}")
    remote = api.get_commit("k")
    plain = Commit("k", 1, b"{}", "a", "c", T0)
    assert remote == plain and plain == remote and hash(remote) == hash(plain)
    assert type(remote.to_commit()) is Commit


# ---------------------------------------------------------------------- errors


def test_conflicts_are_ordering_errors(api):
    api.post_commit({"key": "k", "version": 1, "author": "a"}, b"{}")
    with pytest.raises(CommitOrderingError) as info:
        api.post_commit({"key": "k", "version": 1, "author": "b"}, b"{}")
    assert (info.value.key, info.value.expected_version, info.value.provided_version) == ("k", 2, 1)
    with pytest.raises(CommitOrderingError) as info:
        api.post_commit({"key": "k", "version": 5, "author": "b"}, b"{}")
    assert (info.value.expected_version, info.value.provided_version) == (2, 5)


def test_missing_keys_are_not_found(api):
    api.post_commit({"key": "k", "version": 1, "author": "a"}, b"{}")
    for call in (
        lambda: api.get_commit("nope"),
        lambda: api.get_value("nope"),
        lambda: api.get_metadata("nope"),
    ):
        with pytest.raises(CommitNotFound) as info:
            call()
        assert info.value.key == "nope"
    with pytest.raises(CommitNotFound) as info:
        api.get_commit("k", 2)
    assert (info.value.key, info.value.version) == ("k", 2)


def test_bad_requests_carry_status_and_message(api):
    with pytest.raises(RainerBadRequest) as info:
        api.post_commit({"key": "k", "version": 1, "author": "a"}, b"not json")
    assert info.value.status == 400 and info.value.message.startswith("Malformed input")
    assert isinstance(info.value, InvalidCommit)
    with pytest.raises(RainerHTTPError) as info:
        api.post_commit({"key": "k", "version": 1}, b"{}")
    assert info.value.message == "Missing header: X-Rainer-Author"


def test_wrong_base_url_is_not_a_missing_key(live_server):  # noqa: F811
    client = RainerClient(live_server.url.rsplit("/", 1)[0] + "/wrong")
    with pytest.raises(RainerHTTPError) as info:
        client.get_value("k")
    assert info.value.status == 404 and not isinstance(info.value, CommitNotFound)
    assert "API root" in str(info.value)


def test_unavailable_storage_is_503(tmp_path):
    server = start_live_server({"RAINER_DATABASE_URL": "mysql://root@127.0.0.1:9/rainer"})
    try:
        with pytest.raises(RainerUnavailable) as info:
            RainerClient(server.url).list()
        assert info.value.status == 503 and isinstance(info.value, StorageUnavailable)
        assert "Database unavailable" in info.value.message
    finally:
        server.stop()


def test_connection_failures_name_the_url():
    port = free_port()
    url = f"http://127.0.0.1:{port}/diary"
    with pytest.raises(RainerConnectionError) as info:
        RainerClient(url).list()
    assert url in str(info.value) and "refused" in str(info.value)


def test_silent_servers_time_out_naming_the_url():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/diary"
        with pytest.raises(RainerConnectionError) as info:
            RainerClient(url, timeout=0.3).get_value("k")
    assert url in str(info.value) and "0.3 s" in str(info.value)


def test_non_json_answers_are_errors_not_crashes():
    class Handler(threading.Thread):
        def run(self):
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>hi</html>")
            conn.close()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        Handler(daemon=True).start()
        with pytest.raises(RainerHTTPError, match="expected JSON, got text/html"):
            RainerClient(f"http://127.0.0.1:{listener.getsockname()[1]}").list()


def test_base_url_must_be_http():
    with pytest.raises(ValueError):
        RainerClient("config:8080/diary")


# ---------------------------------------------------------------------- beside pyrainer


@pytest.fixture
def gunicorn(app_config, tmp_path):
    server = Gunicorn({**app_config, "RAINER_TEST_LOG_DIR": str(tmp_path)}, workers=2)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_pyrainer_and_our_client_agree_on_one_server(gunicorn):
    from pyrainer.http import RainerClient as PyRainerClient

    theirs = PyRainerClient(gunicorn.url)
    ours = RainerClient(gunicorn.url)
    theirs.post_commit({"key": "svc", "version": 1, "author": "alice", "comment": "py"}, '{"n": 1}')
    ours.post_commit(
        {"key": "svc", "version": 2, "author": "Zoë", "comment": "ours ☃"}, b'{"n": 2}'
    )
    theirs.post_commit({"key": "gone", "version": 1, "author": "a", "comment": ""}, "[]")
    ours.post_commit(
        {"key": "gone", "version": 2, "author": "a", "comment": "", "empty": True}, None
    )

    assert ours.commit_uri("svc", 2) == theirs.commit_uri("svc", 2)
    for everything in (False, True):
        assert ours.list(all=everything) == theirs.list(all=everything)
    # pyrainer keeps payload_base64 in its metas, and its list_full cannot decode tombstones.
    assert {k: (c.meta, c.value) for k, c in ours.list_full().items()} == {
        k: ({f: v for f, v in c.meta.items() if f != "payload_base64"}, c.value)
        for k, c in theirs.list_full().items()
    }
    for key, version in (("svc", None), ("svc", 1), ("svc", 2), ("gone", None), ("gone", 1)):
        assert ours.get_metadata(key, version) == theirs.get_metadata(key, version)
        assert ours.get_value(key, version) == theirs.get_value(key, version)
        mine, published = ours.get_commit(key, version), theirs.get_commit(key, version)
        assert (mine.meta, mine.value) == (published.meta, published.value)
    assert (
        ours.get_metadata("svc")["author"] == "Zoë" and ours.get_commit("svc").comment == "ours ☃"
    )
    assert [m["version"] for m in ours.history("svc")] == [2, 1]

    # The same conflict: pyrainer sees the HTTP error, we see the typed one.
    with pytest.raises(Exception) as info:
        theirs.post_commit({"key": "svc", "version": 2, "author": "eve", "comment": ""}, "{}")
    assert info.value.code == 409
    assert json.loads(info.value.read())["conflict"]["expectedVersion"] == 3
    with pytest.raises(CommitOrderingError) as typed:
        ours.post_commit({"key": "svc", "version": 2, "author": "eve"}, "{}")
    assert typed.value.expected_version == 3


# ---------------------------------------------------------------------- riding out a blip


class _FakeTime:
    """A clock that only moves when the client sleeps: retries without waiting for real."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def unavailable_server(tmp_path):
    """A live server whose database refuses connections: every storage-bound answer is 503."""
    from tests.zkserver import free_port

    server = start_live_server({"RAINER_DATABASE_URL": f"mysql://root@127.0.0.1:{free_port()}/x"})
    yield server
    server.stop()


def test_reads_retry_on_503_honouring_retry_after_then_give_up_in_one_line(unavailable_server):
    client = RainerClient(unavailable_server.url, retry_for=12)
    fake = _FakeTime()
    client._clock, client._sleep = fake.clock, fake.sleep
    with pytest.raises(RainerUnavailable) as info:
        client.get_value("k")
    # The server says Retry-After: 5; the last wait is cut to the 12 s budget.
    assert fake.slept == [5.0, 5.0, 2.0]
    assert "gave up after 4 tries in 12 s" in str(info.value)
    assert "\n" not in str(info.value)
    assert sum(r.startswith("GET ") for r in unavailable_server.requests) == 4


def test_writes_are_never_retried(unavailable_server):
    client = RainerClient(unavailable_server.url, retry_for=12)
    fake = _FakeTime()
    client._clock, client._sleep = fake.clock, fake.sleep
    with pytest.raises(RainerUnavailable):
        client.post_commit({"key": "k", "version": 1, "author": "a"}, b"{}")
    assert fake.slept == []
    assert [r for r in unavailable_server.requests if r.startswith("POST ")] == ["POST /diary/k/1"]


def test_reads_ride_out_a_refused_connection(sqlite_live_server):
    from tests.tcpproxy import TcpProxy

    host, port = sqlite_live_server.server.server_address[:2]
    proxy = TcpProxy((host, port))
    url = f"http://{proxy.address}/diary"
    RainerClient(url).post_commit({"key": "k", "version": 1, "author": "a"}, b'{"n": 1}')
    proxy.cut()  # the server "restarts": nothing listens on its port
    client = RainerClient(url, retry_for=30)
    tried = threading.Event()
    real_sleep = client._sleep

    def sleep(seconds: float) -> None:
        tried.set()
        real_sleep(min(seconds, 0.05))

    client._sleep = sleep
    answers: list[bytes] = []
    reader = threading.Thread(target=lambda: answers.append(client.get_value("k")))
    reader.start()
    try:
        assert tried.wait(10), "the read never retried"
    finally:
        proxy.restore()
    reader.join(30)
    assert answers == [b'{"n": 1}']
    proxy.cut()


def test_the_command_gives_up_in_one_line(unavailable_server):
    result = run_rainer("--retry-for", "1", "show", "k", url=unavailable_server.url)
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "gave up after" in lines[0] and "Database unavailable" in lines[0]
