"""A hung MySQL server under a gevent worker: every phase of a database operation is bounded.

A hung server (SIGSTOP, a stuck failover) still completes TCP connects, into its backlog, and
then answers nothing. ``FaultProxy.partition()`` in front of the test MariaDB does the same:
connections are accepted, every byte is dropped. The storage runs in a child process patched
by gevent as a gunicorn gevent worker is (the deadline exists only there); this process
drives the proxy between the child's steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

import pytest

from tests.faults.netproxy import FaultProxy

pytestmark = pytest.mark.mysql

ROOT = Path(__file__).resolve().parents[1]
#: The child's RAINER_DATABASE_TIMEOUT: short, so that the test is.
LIMIT = 0.5

CHILD = r"""
from gevent import monkey

monkey.patch_all()

import json
import sys
import time
from datetime import datetime
from datetime import timezone

import gevent

from rainer_server.commit import Commit
from rainer_server.errors import StorageUnavailable
from rainer_server.storage.db import DbCommitStorage
from rainer_server.storage.db import close_all
from rainer_server.storage.db import open_database
from rainer_server.storage.db import release
from rainer_server.storage.db import run_on

url, table, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
results = {}


def ask(command):
    print(command, flush=True)
    if sys.stdin.readline().strip() != "ok":
        raise SystemExit(f"no ok for {command}")


def timed(name, operation):
    started = time.monotonic()
    try:
        operation()
        outcome = "ok"
    except StorageUnavailable as exc:
        outcome = f"503: {exc.detail}"
    finally:
        release(storage.database)
    results.setdefault(name, []).append([outcome, round(time.monotonic() - started, 3)])


storage = DbCommitStorage(open_database(url, limit), table)
storage.start()
storage.save(Commit("k", 1, b"{}", "alice", "", datetime(2024, 1, 1, tzinfo=timezone.utc)))
release(storage.database)


def healed(name):
    # After the proxy forwards again: seconds until an operation succeeds.
    ask("heal")
    started = time.monotonic()
    while time.monotonic() - started < 10:
        try:
            storage.get("k")
            break
        except StorageUnavailable:
            gevent.sleep(0.01)
        finally:
            release(storage.database)
    results[name] = round(time.monotonic() - started, 3)


def locked():
    with storage.locked_head("k"):
        pass


# A query on a pooled connection that was open before the server hung.
ask("partition")
timed("query", lambda: storage.get("k"))
# Ten at once while the database counts as hung: all fail at once.
jobs = [gevent.spawn(timed, "concurrent", lambda: storage.get("k")) for _ in range(10)]
gevent.joinall(jobs)
# So does another database of the process on the same server (the token store's).
other = open_database(url, limit)
timed("other_database", lambda: run_on(other, lambda: other.execute_sql("SELECT 1")))
healed("recovered_query")
timed("after", lambda: storage.get("k"))
# A fresh connection: the TCP connect succeeds, the handshake hangs.
close_all(storage.database)
ask("partition")
timed("handshake", lambda: storage.get("k"))
healed("recovered_handshake")
# The publisher's locked read of a head, on a pooled connection open before the hang.
ask("partition")
timed("locked_head", locked)
healed("recovered_locked_head")
# Every pooled connection lent to a request stuck elsewhere: the wait for one is bounded too.
database = open_database(url + "?max_connections=1&timeout=30", limit)
busy = gevent.spawn(run_on, database, lambda: gevent.sleep(3 * limit), 10 * limit)
gevent.sleep(0.1)
started = time.monotonic()
try:
    run_on(database, lambda: database.execute_sql("SELECT 1").fetchone())
    outcome = "ok"
except StorageUnavailable as exc:
    outcome = f"503: {exc.detail}"
results["pool_wait"] = [[outcome, round(time.monotonic() - started, 3)]]
busy.join()
print("RESULT " + json.dumps(results), flush=True)
"""


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


@pytest.fixture
def proxied(mysql_url):
    parts = urlsplit(mysql_url)
    proxy = FaultProxy((parts.hostname or "127.0.0.1", parts.port or 3306), "db")
    table = "t_" + uuid.uuid4().hex[:12]
    yield proxy, _via(mysql_url, proxy.port), table
    proxy.close()
    from rainer_server.storage.db import open_database

    db = open_database(mysql_url)
    db.execute_sql(f"DROP TABLE IF EXISTS {table}")
    db.execute_sql(f"DROP TABLE IF EXISTS {table}_index")
    db.close()


def test_every_phase_of_a_database_call_is_bounded_and_a_hung_database_fails_fast(proxied):
    proxy, url, table = proxied
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, table, str(LIMIT)], cwd=ROOT, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    results = None
    try:
        for line in child.stdout:
            command = line.strip()
            if command == "partition":
                proxy.partition()
            elif command == "heal":
                proxy.heal()
            elif command.startswith("RESULT "):
                results = json.loads(command[len("RESULT "):])
                break
            else:
                continue
            child.stdin.write("ok\n")
            child.stdin.flush()
        child.wait(60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert results is not None, child.stderr.read()
    margin = 0.4  # a loaded 2-core machine
    # Each phase: a 503 (StorageUnavailable) after the limit, not after the 10 s read timeout.
    for phase, detail in (("query", "no answer"), ("handshake", "no connection"),
                          ("locked_head", "Lost connection")):
        [(outcome, took)] = results[phase]
        assert outcome.startswith("503") and detail in outcome, (phase, outcome)
        assert took <= LIMIT + margin, (phase, took)
    # While hung: every operation answers at once (a greenlet finds out in the background).
    assert len(results["concurrent"]) == 10
    for outcome, took in results["concurrent"] + results["other_database"]:
        assert "not answering" in outcome and took <= 0.1, results
    # Healed: the service follows within a probe or two (the proxy drops the probe's
    # connection when it heals, so the next probe, 0.2 s later, is the one that answers).
    for phase in ("query", "handshake", "locked_head"):
        assert results[f"recovered_{phase}"] <= LIMIT + margin, results
    assert results["after"][0][0] == "ok", results["after"]
    # No free pooled connection: bounded by the limit, not by the pool's own 30 s.
    [(outcome, took)] = results["pool_wait"]
    assert outcome.startswith("503"), outcome
    assert LIMIT - 0.05 <= took <= LIMIT + margin, took


OVERLOAD_CHILD = r"""
from gevent import monkey

monkey.patch_all()

import json
import sys
import time

import gevent

from rainer_server.errors import StorageUnavailable
from rainer_server.storage.db import open_database
from rainer_server.storage.db import release
from rainer_server.storage.db import run_on

url, limit = sys.argv[1], float(sys.argv[2])
database = open_database(url, limit)
select = lambda: database.execute_sql("SELECT 1").fetchone()  # noqa: E731
holding = gevent.event.Event()
results = {}


def hold():
    run_on(database, select)  # and keep the pool's only connection, as a long request does
    holding.set()
    gevent.sleep(limit * 3)
    release(database)


def queued():
    holding.wait()
    started = time.monotonic()
    try:
        run_on(database, select)
        results["queued"] = "ok"
    except StorageUnavailable as exc:
        results["queued"] = f"503: {exc.detail}"
    finally:
        release(database)
    results["queued_s"] = time.monotonic() - started
    results["hung_after_queued"] = database.hung_since is not None


gevent.joinall([gevent.spawn(hold), gevent.spawn(queued)])
started = time.monotonic()
run_on(database, select)
release(database)
results["after_s"] = time.monotonic() - started
print("RESULT " + json.dumps(results), flush=True)
"""


def test_waiting_for_a_pooled_connection_is_congestion_not_a_hung_database(mysql_url):
    # One pooled connection, held by one greenlet past the operation timeout: the greenlet
    # queued for it gets a 503 of its own, and nothing else changes (a hung database would
    # turn every later operation into a 503 until a probe answers).
    separator = "&" if "?" in mysql_url else "?"
    url = f"{mysql_url}{separator}max_connections=1&timeout=60"
    out = subprocess.run(
        [sys.executable, "-c", OVERLOAD_CHILD, url, str(LIMIT)], cwd=ROOT, text=True,
        capture_output=True, timeout=60,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout + out.stderr
    results = json.loads(lines[-1][len("RESULT "):])
    assert results["queued"].startswith("503")
    assert LIMIT * 0.8 <= results["queued_s"] < LIMIT * 2.5
    assert results["hung_after_queued"] is False
    assert results["after_s"] < LIMIT
