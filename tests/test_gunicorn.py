"""The service as deployed: gunicorn with config/gunicorn.conf.py, driven over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.zkserver import free_port

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.gunicorn


class Gunicorn:
    def __init__(self, env: dict[str, str], workers: int = 3) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/diary"
        self.log = open(Path(env.get("RAINER_TEST_LOG_DIR", "/tmp")) / f"gunicorn-{self.port}.log", "w+")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py",
                "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers), "wsgi:app",
            ],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.output()}")
            try:
                urllib.request.urlopen(self.url + "/", timeout=2).read()
                return
            except urllib.error.HTTPError:
                return  # answering, whatever it said
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"gunicorn not answering: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def live(app_config, tmp_path):
    server = Gunicorn({**app_config, "RAINER_TEST_LOG_DIR": str(tmp_path)})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def request(url, data=None, headers=None, method=None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_published_pyrainer_client_works_unchanged(live):
    from pyrainer.http import RainerClient

    client = RainerClient(live.url)
    assert client.list() == {}
    meta = client.post_commit(
        {"key": "svc", "version": 1, "author": "alice", "comment": "first"}, '{"threads": 4}'
    )
    assert meta["key"] == "svc" and meta["version"] == 1 and meta["empty"] is False
    client.post_commit({"key": "svc", "version": 2, "author": "bob", "comment": "more"}, '{"threads": 8}')
    client.post_commit({"key": "old", "version": 1, "author": "bob", "comment": ""}, "[]")
    client.post_commit({"key": "old", "version": 2, "author": "bob", "comment": "rm", "empty": True}, "")

    assert client.commit_uri("svc", 2) == live.url + "/svc/2"
    assert sorted(client.list()) == ["svc"]
    assert sorted(client.list(all=True)) == ["old", "svc"]
    full = client.list_full()
    assert full["svc"].value == b'{"threads": 8}' and full["svc"].version == 2
    assert client.get_value("svc") == b'{"threads": 8}'
    assert client.get_value("svc", 1) == b'{"threads": 4}'
    assert client.get_metadata("svc")["author"] == "bob"
    assert client.get_metadata("svc", 1)["comment"] == "first"
    commit = client.get_commit("svc", 1)
    assert commit.value == b'{"threads": 4}' and commit.author == "alice"
    tomb = client.get_commit("old")
    assert tomb.empty and tomb.value is None

    with pytest.raises(urllib.error.HTTPError) as info:
        client.post_commit({"key": "svc", "version": 2, "author": "eve", "comment": ""}, "{}")
    assert info.value.code == 409
    assert json.loads(info.value.read()) == {
        "conflict": {"key": "svc", "expectedVersion": 3, "providedVersion": 2}
    }
    with pytest.raises(urllib.error.HTTPError) as info:
        client.get_value("missing")
    assert info.value.code == 404


def test_racing_writers_exactly_one_wins_each_version(live):
    """Eight clients on three workers race for each of 15 versions of one key."""
    writers, versions = 8, 15
    barrier = threading.Barrier(writers)
    results: dict[int, list[int]] = {v: [] for v in range(1, versions + 1)}
    lock = threading.Lock()

    def writer(n: int) -> None:
        for version in range(1, versions + 1):
            barrier.wait(timeout=30)
            status, _, _ = request(
                f"{live.url}/race/{version}",
                data=b'{"writer": %d}' % n,
                headers={"X-Rainer-Author": f"w{n}", "Content-Type": "application/octet-stream"},
                method="POST",
            )
            with lock:
                results[version].append(status)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for version, statuses in results.items():
        assert sorted(statuses) == [200] + [409] * (writers - 1), (version, statuses)
    for version in range(1, versions + 1):
        status, headers, _ = request(f"{live.url}/race/{version}")
        assert status == 200 and headers["X-Rainer-Version"] == str(version)
    assert request(f"{live.url}/race/{versions + 1}")[0] == 404


def test_oversized_bodies_are_413_over_http(live):
    status, _, body = request(
        f"{live.url}/big/1", data=b"[" + b"1," * 300000 + b"1]", headers={"X-Rainer-Author": "a"}, method="POST"
    )
    assert status == 413 and b"Payload too large" in body
    assert request(f"{live.url}/big")[0] == 404


def test_bad_setting_stops_gunicorn_with_one_line(tmp_path):
    server = Gunicorn({"RAINER_MAX_PAYLOAD_BYTES": "lots", "RAINER_TEST_LOG_DIR": str(tmp_path)})
    try:
        assert server.process.wait(30) != 0
        output = server.output()
        assert "rainer: Invalid setting RAINER_MAX_PAYLOAD_BYTES: Not a valid integer." in output
        assert "Traceback" not in output
    finally:
        server.stop()


def test_unreachable_database_is_503_with_retry_after(tmp_path):
    server = Gunicorn(
        {"RAINER_DATABASE_URL": "mysql://root@127.0.0.1:9/rainer", "RAINER_TEST_LOG_DIR": str(tmp_path)},
        workers=1,
    )
    try:
        server.wait_ready()
        for url, data in ((server.url + "/", None), (server.url + "/k", None), (server.url + "/k/1", b"{}")):
            started = time.monotonic()
            status, headers, body = request(url, data=data, headers={"X-Rainer-Author": "a"})
            assert status == 503, (url, status, body)
            assert headers["Retry-After"] == "5"
            assert b"Database unavailable" in body and b"Traceback" not in body
            # The driver's text (host, port, errno) is for the log, not for clients.
            assert json.loads(body) == {"error": "Database unavailable"}
            assert time.monotonic() - started < 10
        status, _, body = request(server.url.rsplit("/", 1)[0] + "/readyz")
        assert status == 503 and b"127.0.0.1" not in body and b"Can't connect" not in body
        output = server.output()
        assert "Database unavailable at startup, starting anyway" in output
        assert "Can't connect to MySQL server on '127.0.0.1'" in output
    finally:
        server.stop()


def test_sqlite_takes_concurrent_writes_from_several_workers(tmp_path):
    """Distinct keys written at once through 3 workers on one SQLite file: no 'database is locked'."""
    server = Gunicorn(
        {"RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/shared.db", "RAINER_TEST_LOG_DIR": str(tmp_path)}
    )
    statuses: list[int] = []
    try:
        server.wait_ready()

        def writer(n: int) -> None:
            for i in range(25):
                status, _, _ = request(
                    f"{server.url}/k{n}-{i}/1", data=b"{}", headers={"X-Rainer-Author": "a"}, method="POST"
                )
                statuses.append(status)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert statuses.count(200) == 150, sorted(set(statuses))
        assert len(json.loads(request(server.url)[2])) == 150
    finally:
        server.stop()


def test_keys_that_are_not_utf8_are_400_over_http(live):
    # gunicorn hands the path's raw bytes to the app (werkzeug's test client does not).
    author = {"X-Rainer-Author": "a"}
    assert request(f"{live.url}/%EF%BF%BD/1", data=b"{}", headers=author, method="POST")[0] == 200
    for raw in ("%FF", "%ED%A0%80"):
        status, _, body = request(f"{live.url}/{raw}/1", data=b"{}", headers=author, method="POST")
        assert status == 400 and b"Key must be valid UTF-8" in body
        status, _, body = request(f"{live.url}/{raw}")
        assert status == 400 and b"Key must be valid UTF-8" in body
    status, _, body = request(f"{live.url}/k/01", data=b"{}", headers=author, method="POST")
    assert status == 400 and b"Invalid version '01'" in body
