"""Fixtures shared by the suite: storages over every backend, a real ZooKeeper, apps.

Services: ``RAINER_TEST_MYSQL_URL`` names a MySQL/MariaDB database the tests may create and
drop tables in; ``RAINER_TEST_ZK_HOSTS`` a ZooKeeper (without it, one is started from the
Debian ``zookeeper`` package). Under ``CI=true`` a missing service fails the test instead of
skipping it, so CI can never go green by skipping the interesting half of the suite.
"""

from __future__ import annotations

import os
import uuid

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def service_missing(message: str) -> None:
    """Skip locally, fail in CI."""
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing service is a failure)")
    pytest.skip(message)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (``item.rep_call``), so that a fixture can
    tell at teardown whether its test failed (the browser tests then keep a screenshot)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


# ---------------------------------------------------------------- MySQL / MariaDB


@pytest.fixture(scope="session")
def mysql_url() -> str:
    url = os.environ.get("RAINER_TEST_MYSQL_URL")
    if not url:
        service_missing("RAINER_TEST_MYSQL_URL is not set")
    import pymysql
    from playhouse.db_url import parse

    params = parse(url)
    try:
        pymysql.connect(
            host=params.get("host", "127.0.0.1"),
            port=int(params.get("port", 3306)),
            user=params.get("user", "root"),
            password=params.get("passwd", params.get("password", "")),
            database=params["database"],
            connect_timeout=5,
        ).close()
    except pymysql.MySQLError as exc:
        service_missing(f"MySQL at {url} is not answering: {exc}")
    return url


# ---------------------------------------------------------------- ZooKeeper


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory):
    """A ZooKeeper the session can use; ``.hosts`` and, when we started it, ``stop``/``start``."""
    hosts = os.environ.get("RAINER_TEST_ZK_HOSTS")
    if hosts:
        yield _ExternalZooKeeper(hosts)
        return
    from tests.zkserver import ZooKeeperServer

    server = ZooKeeperServer(str(tmp_path_factory.mktemp("zookeeper")))
    try:
        server.start()
    except Exception as exc:  # no java, no package: say so, then skip or fail
        service_missing(f"cannot start ZooKeeper: {exc}")
    yield server
    server.stop()


class _ExternalZooKeeper:
    def __init__(self, hosts: str) -> None:
        self.hosts = hosts


@pytest.fixture
def zk_chroot(zk_server):
    """A fresh chroot path in the session's ZooKeeper, deleted afterwards."""
    from kazoo.client import KazooClient

    chroot = "/rainer-test-" + uuid.uuid4().hex
    admin = KazooClient(hosts=zk_server.hosts, timeout=10)
    try:
        admin.start(timeout=15)
    except Exception as exc:
        service_missing(f"ZooKeeper at {zk_server.hosts} is not answering: {exc}")
    admin.ensure_path(chroot)
    yield zk_server.hosts + chroot
    try:
        if admin.connected:
            admin.delete(chroot, recursive=True)
    finally:
        admin.stop()
        admin.close()


@pytest.fixture
def zk(zk_chroot):
    """A started kazoo client chrooted at a fresh path."""
    from kazoo.client import KazooClient

    client = KazooClient(hosts=zk_chroot, timeout=10)
    client.start(timeout=15)
    client.ensure_path("/")
    yield client
    client.stop()
    client.close()


# ---------------------------------------------------------------- storages


def make_storage(kind: str, tmp_path, request):
    """A started storage of ``kind`` on a fresh table; dropped at the end of the test."""
    from rainer_server.storage.db import DbCommitStorage
    from rainer_server.storage.db import open_database
    from rainer_server.storage.memory import MemoryCommitStorage

    if kind == "memory":
        return MemoryCommitStorage()
    if kind == "sqlite":
        storage = DbCommitStorage(open_database(f"sqlite:///{tmp_path}/rainer.db"))
    else:
        url = request.getfixturevalue("mysql_url")
        storage = DbCommitStorage(open_database(url), table_name="t_" + uuid.uuid4().hex[:12])
    storage.start()

    def drop():
        storage.database.connect(reuse_if_open=True)
        storage.database.execute_sql(f"DROP TABLE IF EXISTS {storage.table_name}")
        storage.stop()

    request.addfinalizer(drop)
    return storage


STORAGE_KINDS = ["memory", "sqlite", pytest.param("mysql", marks=pytest.mark.mysql)]
DB_STORAGE_KINDS = ["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)]


@pytest.fixture(params=STORAGE_KINDS)
def storage(request, tmp_path):
    return make_storage(request.param, tmp_path, request)


@pytest.fixture(params=DB_STORAGE_KINDS)
def db_storage(request, tmp_path):
    return make_storage(request.param, tmp_path, request)


# ---------------------------------------------------------------- apps


@pytest.fixture(params=DB_STORAGE_KINDS)
def app_config(request, tmp_path):
    """Settings for an app over a fresh SQLite file or a fresh MySQL table."""
    if request.param == "sqlite":
        return {"RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/rainer.db"}
    table = "t_" + uuid.uuid4().hex[:12]
    url = request.getfixturevalue("mysql_url")

    def drop():
        from rainer_server.storage.db import open_database

        db = open_database(url)
        db.execute_sql(f"DROP TABLE IF EXISTS {table}")
        db.close()

    request.addfinalizer(drop)
    return {"RAINER_DATABASE_URL": url, "RAINER_TABLE": table}


@pytest.fixture
def app(app_config):
    from rainer_server import create_app

    app = create_app({"TESTING": True, **app_config})
    yield app
    app.extensions["rainer"].close()


@pytest.fixture
def client(app):
    return app.test_client()
