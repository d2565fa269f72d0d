"""/healthz and /readyz: outside the API prefix, ready only when the database answers and,
with ZooKeeper configured, the client is connected and this process's mirror is complete."""

from __future__ import annotations

import re
import threading
import time

import pytest

from rainer_server import create_app
from tests.tcpproxy import TcpProxy
from tests.test_server_zookeeper import wait_for
from tests.zkserver import free_port

AUTHOR = {"X-Rainer-Author": "alice"}
DEAD_MYSQL = "mysql://root@127.0.0.1:9/rainer"


def test_healthz_and_readyz_when_ready(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.get_json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.get_json() == {"status": "ok", "checks": {"database": "ok"}}
    assert r.headers["Cache-Control"] == "no-store"


def test_health_routes_are_not_under_the_api_prefix_and_keys_of_that_name_still_work(client):
    assert client.get("/diary/healthz").status_code == 404  # a key, not found
    for key in ("healthz", "readyz", "metrics"):
        assert client.post(f"/diary/{key}/1", data=b"[1]", headers=AUTHOR).status_code == 200
        assert client.get(f"/diary/{key}").data == b"[1]"
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_health_routes_win_over_keys_with_an_empty_prefix(app_config):
    app = create_app({**app_config, "RAINER_URL_PREFIX": ""})
    try:
        client = app.test_client()
        assert client.post("/somekey/1", data=b"{}", headers=AUTHOR).status_code == 200
        assert client.get("/somekey").data == b"{}"
        assert client.get("/healthz").get_json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
    finally:
        app.extensions["rainer"].close()


def test_readyz_is_503_while_the_database_is_unreachable():
    app = create_app({"RAINER_DATABASE_URL": DEAD_MYSQL})
    try:
        client = app.test_client()
        assert client.get("/healthz").status_code == 200  # alive, just not ready
        started = time.monotonic()
        r = client.get("/readyz")
        assert time.monotonic() - started < 5
        assert r.status_code == 503
        body = r.get_json()
        assert body["status"] == "not ready"
        assert body["checks"]["database"].startswith("unavailable: Database unavailable")
        assert "127.0.0.1" not in r.get_data(as_text=True) and "connect" not in r.get_data(as_text=True)
        assert set(body["checks"]) == {"database"}
    finally:
        app.extensions["rainer"].close()


def test_readyz_waits_for_zookeeper_and_the_mirror(tmp_path):
    dead_port = free_port()
    app = create_app(
        {"RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/r.db", "RAINER_ZK_HOSTS": f"127.0.0.1:{dead_port}"}
    )
    try:
        r = app.test_client().get("/readyz")
        assert r.status_code == 503
        assert r.get_json()["checks"] == {
            "database": "ok",
            "zookeeper": "not connected (LOST)",
            "mirror": "not initialized",
        }
    finally:
        app.extensions["rainer"].close()


@pytest.mark.zookeeper
def test_readyz_follows_zookeeper_going_down_and_up(zk_chroot, tmp_path):
    hosts, _, chroot = zk_chroot.partition("/")
    host, _, port = hosts.split(",")[0].rpartition(":")
    proxy = TcpProxy((host, int(port)))
    app = create_app(
        {
            "RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/r.db",
            "RAINER_ZK_HOSTS": f"{proxy.address}/{chroot}",
            "RAINER_ZK_SESSION_TIMEOUT": 4,
        }
    )
    client = app.test_client()

    def status():
        r = client.get("/readyz")
        return r.status_code, r.get_json()["checks"]

    try:
        ready = {"database": "ok", "zookeeper": "ok", "mirror": "ok"}
        wait_for(lambda: status() == (200, ready), 15, "ready")

        proxy.cut()
        # kazoo says "not connected" before it calls the mirror's state listener, which marks
        # it stale: wait for both.
        code, checks = wait_for(
            lambda: (s := status())[0] == 503 and s[1]["mirror"].startswith("stale since") and s,
            10,
            "not ready, with a stale mirror",
        )
        assert checks["zookeeper"].startswith("not connected")
        assert checks["database"] == "ok"
        # The mirror cannot see changes while disconnected: it says so, and since when...
        assert re.fullmatch(r"stale since 20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", checks["mirror"])
        assert client.get("/healthz").status_code == 200
        # ...and reads go to the database, which still sees every commit.
        saved = client.post("/diary/k/1", data=b"{}", headers={"X-Rainer-Author": "a"})
        assert saved.status_code == 200
        read = client.get("/diary/k")
        assert read.status_code == 200 and "X-Rainer-Cached" not in read.headers

        proxy.restore()
        wait_for(lambda: status() == (200, ready), 15, "ready again")
    finally:
        app.extensions["rainer"].close()
        proxy.close()


def test_readyz_waits_until_the_mirror_serves(zk_chroot, tmp_path, monkeypatch):
    """The mirror serves once the watch hub knows every head's index (read from the database,
    about a second at 100k keys): until then reads go to the database, and /readyz says so."""
    from rainer_server.web import watch

    indexing = threading.Event()
    real_begin = watch.WatchHub._begin

    def held_begin(hub):
        indexing.wait(30)
        real_begin(hub)

    monkeypatch.setattr(watch.WatchHub, "_begin", held_begin)
    app = create_app(
        {"RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/r.db", "RAINER_ZK_HOSTS": zk_chroot}
    )
    client = app.test_client()
    try:
        assert client.post("/diary/k/1", data=b"{}", headers=AUTHOR).status_code == 200

        def status():
            r = client.get("/readyz")
            return r.status_code, r.get_json()["checks"]

        indexed = {"database": "ok", "zookeeper": "ok", "mirror": "complete; indexing the heads"}
        wait_for(lambda: status() == (503, indexed), 15, "mirror complete, hub indexing")
        assert "X-Rainer-Cached" not in client.get("/diary/k").headers  # from the database
        indexing.set()
        ready = {"database": "ok", "zookeeper": "ok", "mirror": "ok"}
        wait_for(lambda: status() == (200, ready), 15, "ready")
        wait_for(lambda: client.get("/diary/k").headers.get("X-Rainer-Cached") == "Yes", 15,
                 "reads from the mirror")
    finally:
        indexing.set()
        app.extensions["rainer"].close()
