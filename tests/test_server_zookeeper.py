"""The service with ZooKeeper configured: publishing writes, mirror-backed reads, and one
elected publisher among gunicorn workers that survives SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rainer_server import Commit
from rainer_server import create_app
from rainer_server.storage.db import DbCommitStorage
from rainer_server.storage.db import open_database
from tests.test_gunicorn import ROOT
from tests.test_gunicorn import Gunicorn
from tests.test_gunicorn import request
from tests.zkserver import free_port

pytestmark = pytest.mark.zookeeper

AUTHOR = {"X-Rainer-Author": "alice"}


def wait_for(condition, timeout=10.0, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {message}")


@pytest.fixture
def zk_app(zk_chroot, tmp_path):
    app = create_app(
        {
            "RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/zk.db",
            "RAINER_ZK_HOSTS": zk_chroot,
            "RAINER_ZK_SESSION_TIMEOUT": 4,
            "RAINER_PUBLISH_PERIOD": 0.5,
        }
    )
    yield app
    app.extensions["rainer"].close()


def jvm_znode(key: str, version: int, payload: bytes, with_empty: bool = False) -> bytes:
    # The original's Jackson output of a Scala Map: compact, keys in hash order.
    header = (
        '{"mtime":"1970-01-01T00:00:00.002Z","comment":"from the JVM","author":"scala",'
        f'"version":{version},"key":"{key}"' + (',"empty":false}' if with_empty else "}")
    ).encode()
    return b"%d\n%s\n%s\n" % (len(header), header, payload)


def test_writes_reach_zookeeper_and_reads_come_from_the_mirror(zk_app, zk):
    client = zk_app.test_client()
    r = client.post("/diary/svc/1", data=b'{"threads": 4}', headers=AUTHOR)
    assert r.status_code == 200
    # Published from the process's queue, right after the answer.
    wait_for(lambda: zk.exists("/rainer/data/svc"), message="svc published")
    data, _ = zk.get("/rainer/data/svc")
    assert Commit.deserialize(data).payload == b'{"threads": 4}'

    rainer = zk_app.extensions["rainer"]
    wait_for(lambda: rainer.cached_view() is not None, message="mirror")
    wait_for(lambda: "svc" in rainer.mirror.current, message="svc in mirror")
    # The listing is cached once the watch hub, told of the view after the mirror shows it,
    # finds every head mirrored: a moment later.
    wait_for(
        lambda: client.get("/diary").headers.get("X-Rainer-Cached") == "Yes",
        message="the listing from the mirror",
    )
    for url in ("/diary", "/diary/svc", "/diary/svc/meta"):
        r = client.get(url)
        assert r.status_code == 200 and r.headers.get("X-Rainer-Cached") == "Yes", url
    r = client.get("/diary/svc")
    assert r.data == b'{"threads": 4}' and r.headers["Content-Length"] == "14"
    r = client.head("/diary/svc")
    assert r.status_code == 200 and r.data == b"" and r.headers["X-Rainer-Cached"] == "Yes"
    assert r.headers["Content-Length"] == "14" and r.headers["X-Rainer-Version"] == "1"
    for url in ("/diary?all=yes", "/diary/svc/1", "/diary/svc/1/meta", "/diary/svc/history"):
        r = client.get(url)
        assert r.status_code == 200 and "X-Rainer-Cached" not in r.headers, url


def test_commits_written_by_a_jvm_rainer_are_served(zk_app, zk):
    client = zk_app.test_client()
    zk.ensure_path("/rainer/data")
    zk.create("/rainer/data/from-jvm", jvm_znode("from-jvm", 7, b'{"x":1}'))
    zk.create("/rainer/data/also-jvm", jvm_znode("also-jvm", 2, b"[]", with_empty=True))
    rainer = zk_app.extensions["rainer"]
    wait_for(lambda: rainer.cached_view() is not None and "also-jvm" in rainer.mirror.current)
    listing = client.get("/diary").get_json()
    assert listing["from-jvm"]["version"] == 7 and listing["from-jvm"]["author"] == "scala"
    r = client.get("/diary/from-jvm")
    assert r.data == b'{"x":1}' and r.headers["X-Rainer-Version"] == "7"
    assert r.headers["X-Rainer-Cached"] == "Yes"
    # The mirror follows changes made by anyone.
    zk.set("/rainer/data/from-jvm", jvm_znode("from-jvm", 8, b'{"x":2}'))
    wait_for(lambda: client.get("/diary/from-jvm").data == b'{"x":2}', message="update")
    zk.delete("/rainer/data/also-jvm")
    wait_for(lambda: "also-jvm" not in client.get("/diary").get_json(), message="delete")


def test_a_new_key_is_readable_at_once_even_before_the_mirror_sees_it(zk_app):
    client = zk_app.test_client()
    rainer = zk_app.extensions["rainer"]
    client.get("/diary")
    wait_for(lambda: rainer.cached_view() is not None, message="mirror")
    for version in range(1, 6):
        assert client.post(f"/diary/fresh/{version}", data=b"{}", headers=AUTHOR).status_code == 200
        assert client.get("/diary/fresh/meta").get_json()["version"] >= version - 1


def mirror_backed(app, client, key: str) -> None:
    rainer = app.extensions["rainer"]
    client.get("/diary")
    wait_for(lambda: rainer.cached_view() is not None and key in rainer.mirror.current,
             message=f"{key} in the mirror")


def test_mirror_reads_without_flask_answer_exactly_as_the_flask_view(zk_app):
    client = zk_app.test_client()
    body = '"é"'.encode()
    assert client.post("/diary/caf%C3%A9/1", data=body, headers=AUTHOR).status_code == 200
    mirror_backed(zk_app, client, "café")
    fast = client.get("/diary/caf%C3%A9")
    flask = client.get("/diary/caf%C3%A9?via=flask")  # a query string goes through Flask
    assert fast.status_code == flask.status_code == 200
    assert fast.data == flask.data == body
    # X-Accel-Expires names the second each answer was made in: the same, or the next.
    made = [int(r.headers["X-Accel-Expires"].removeprefix("@")) for r in (fast, flask)]
    assert 0 <= made[1] - made[0] <= 1, made
    assert sorted(h for h in fast.headers.items() if h[0] != "X-Accel-Expires") == sorted(
        h for h in flask.headers.items() if h[0] != "X-Accel-Expires"
    )
    assert fast.headers["Cache-Control"] == "public, max-age=1"
    assert fast.headers["X-Rainer-Cached"] == "Yes" and fast.headers["X-Rainer-Key"] == "caf%C3%A9"
    assert fast.headers["X-Rainer-Header-Encoding"] == "percent"
    # Counted under the route, as Flask-served requests are.
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'route="/diary/<key>",status="200"' in metrics
    # Whatever the mirror cannot answer still gets Flask's answer.
    assert client.get("/diary/missing").status_code == 404
    assert client.get("/diary/%2E%2E").status_code in (400, 404)


def test_request_hooks_see_mirror_reads_too(zk_app):
    @zk_app.after_request
    def stamp(response):
        response.headers["X-Hooked"] = "yes"
        return response

    client = zk_app.test_client()
    assert client.post("/diary/hooked/1", data=b"{}", headers=AUTHOR).status_code == 200
    mirror_backed(zk_app, client, "hooked")
    r = client.get("/diary/hooked")
    assert r.headers["X-Rainer-Cached"] == "Yes" and r.headers["X-Hooked"] == "yes"


def test_a_key_named_like_an_operational_route_does_not_shadow_it(zk_chroot, tmp_path):
    app = create_app(
        {
            "RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/root.db",
            "RAINER_ZK_HOSTS": zk_chroot,
            "RAINER_URL_PREFIX": "",
        }
    )
    try:
        client = app.test_client()
        assert client.post("/healthz/1", data=b"{}", headers=AUTHOR).status_code == 200
        assert client.post("/other/1", data=b"{}", headers=AUTHOR).status_code == 200
        mirror_backed(app, client, "healthz")
        wait_for(lambda: "other" in app.extensions["rainer"].mirror.current, message="other")
        assert client.get("/healthz").get_json()["status"] == "ok"
        assert client.get("/other").headers["X-Rainer-Cached"] == "Yes"
    finally:
        app.extensions["rainer"].close()


def test_writes_succeed_quickly_while_zookeeper_is_unreachable(tmp_path):
    dead_port = free_port()
    app = create_app(
        {
            "RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/nozk.db",
            "RAINER_ZK_HOSTS": f"127.0.0.1:{dead_port}",
        }
    )
    try:
        client = app.test_client()
        started = time.monotonic()
        assert client.post("/diary/k/1", data=b"{}", headers=AUTHOR).status_code == 200
        assert client.post("/diary/k/2", data=b"[]", headers=AUTHOR).status_code == 200
        assert time.monotonic() - started < 5
        r = client.get("/diary/k")
        assert r.data == b"[]" and "X-Rainer-Cached" not in r.headers
        assert list(client.get("/diary").get_json()) == ["k"]
    finally:
        app.extensions["rainer"].close()


@pytest.mark.gunicorn
def test_one_publisher_among_gunicorn_workers_and_sigkill_hands_over(zk_chroot, zk, tmp_path):
    server = Gunicorn(
        {
            "RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/cluster.db",
            "RAINER_ZK_HOSTS": zk_chroot,
            "RAINER_ZK_SESSION_TIMEOUT": "4",
            "RAINER_PUBLISH_PERIOD": "1",
            "RAINER_PUBLISH_FUZZ": "0.1",
            "RAINER_TEST_LOG_DIR": str(tmp_path),
        },
        workers=3,
    )
    try:
        server.wait_ready()
        election = zk.Election("/rainer/election")
        contenders = wait_for(lambda: len(election.contenders()) == 3 and election.contenders(), 20, "3 contenders")
        worker_pids = {int(c.rsplit(":", 1)[1]) for c in contenders}
        assert len(worker_pids) == 3 and server.process.pid not in worker_pids

        status, _, _ = request(server.url + "/svc/1", data=b'{"v":1}', headers=AUTHOR, method="POST")
        assert status == 200
        wait_for(lambda: zk.exists("/rainer/data/svc"), 10, "svc published")
        # The leader repairs a znode deleted behind its back.
        zk.delete("/rainer/data/svc")
        wait_for(lambda: zk.exists("/rainer/data/svc"), 10, "repair by the first leader")

        leader_pid = int(election.contenders()[0].rsplit(":", 1)[1])
        os.kill(leader_pid, signal.SIGKILL)
        # Its ephemeral node goes when its session expires; another worker then leads.
        new_leader = wait_for(
            lambda: (c := election.contenders()) and int(c[0].rsplit(":", 1)[1]) != leader_pid and c[0],
            20,
            "a new leader",
        )
        assert int(new_leader.rsplit(":", 1)[1]) in worker_pids
        zk.delete("/rainer/data/svc")
        wait_for(lambda: zk.exists("/rainer/data/svc"), 10, "repair by the new leader")
        data, _ = zk.get("/rainer/data/svc")
        assert Commit.deserialize(data).payload == b'{"v":1}'
    finally:
        server.stop()
    # worker_exit left the election cleanly: no contender waits for a session timeout.
    wait_for(lambda: election.contenders() == [], 3, "contenders gone after SIGTERM")


@pytest.mark.gunicorn
def test_a_gevent_worker_starts_zookeeper_over_a_thousand_keys_every_time(zk_chroot, zk, tmp_path):
    """One gevent worker reading 1,200 znodes at start: the burst of requests from many
    greenlets at once once made kazoo drop its connection ("Connection has been closed"), and
    the mirror and the election never started in 3 starts out of 4. Several starts in a row,
    each must end with the mirror complete and the worker contending."""
    keys = 1200
    zk.ensure_path("/rainer/data")
    created = [
        zk.create_async(f"/rainer/data/k{i:04d}", jvm_znode(f"k{i:04d}", 1, b'{"i":%d}' % i))
        for i in range(keys)
    ]
    for result in created:
        result.get(timeout=30)
    # The journal holds them too, so the first leader compares every head with its znode.
    storage = DbCommitStorage(open_database(f"sqlite:///{tmp_path}/gevent.db"))
    storage.start()
    with storage.database.atomic():
        for i in range(keys):
            storage.save(Commit.deserialize(jvm_znode(f"k{i:04d}", 1, b'{"i":%d}' % i)))
    storage.stop()
    election = zk.Election("/rainer/election")
    env = {
        "RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/gevent.db",
        "RAINER_ZK_HOSTS": zk_chroot,
        "RAINER_ZK_SESSION_TIMEOUT": "4",
        "RAINER_WORKER_CLASS": "gevent",
        "RAINER_TEST_LOG_DIR": str(tmp_path),
    }
    for start in range(4):
        server = Gunicorn(env, workers=1)
        try:
            server.wait_ready()

            def ready():
                status, _, body = request(server.url.removesuffix("/diary") + "/readyz")
                return status == 200 and json.loads(body)

            try:
                wait_for(ready, 20, f"/readyz (start {start + 1})")
                wait_for(lambda: len(election.contenders()) == 1, 10, f"a contender (start {start + 1})")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the server said:\n{server.output()[-3000:]}") from None
            status, _, body = request(server.url + "/k0999")
            assert status == 200 and body == b'{"i":999}'
        finally:
            server.stop()
        wait_for(lambda: election.contenders() == [], 10, "the contender gone")


# Run in a child process: gevent's monkey-patching must come before anything else is imported.
BURST_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import collections, sys, time
import gevent
from rainer_server.zk.keeper import make_kazoo_client

client = make_kazoo_client(sys.argv[1])
client.start(timeout=15)
results = []

def burst(n):
    # Never yields between calls: each greenlet fills kazoo's wake-up socket in turn.
    for i in range(n):
        results.append(client.exists_async(f"/burst-{i}"))

gevent.joinall([gevent.spawn(burst, 500) for _ in range(4)])
deadline = time.monotonic() + 20
while time.monotonic() < deadline and not all(r.ready() for r in results):
    gevent.sleep(0.05)
outcomes = collections.Counter(
    ("ok" if r.successful() else type(r.exception).__name__) if r.ready() else "unanswered"
    for r in results
)
print(dict(outcomes))
"""


def test_greenlets_sending_zookeeper_requests_at_once_all_get_answers(zk_chroot):
    """What broke a gevent worker's start over a thousand keys: kazoo wakes its connection by
    writing a byte to a socket per request; once that socket's buffer is full, a second
    greenlet writing meets gevent's "socket already used by another greenlet", which kazoo
    turns into "Connection has been closed" for that request (or leaves it unanswered)."""
    result = subprocess.run(
        [sys.executable, "-c", BURST_SCRIPT, zk_chroot],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'ok': 2000}", result.stdout + result.stderr
