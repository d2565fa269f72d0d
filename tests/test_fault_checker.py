"""The fault suite's own parts, without a cluster: the checker judges made-up histories
exactly, and the fault proxy partitions, holds and moves connections as the scenarios need."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.faults.checker import check
from tests.faults.checker import convergence_gap
from tests.faults.history import digest
from tests.faults.netproxy import FaultProxy


def write(key, version, payload, t0, t1, status=200, client="w0", empty=False):
    return {"c": client, "op": "write", "t": "nginx", "k": key, "v": version, "s": status,
            "h": digest(None if empty else payload), "e": empty, "t0": t0, "t1": t1}


def read(key, version, t0, client="r0", target="A", status=200, cached=True):
    entry = {"c": client, "op": "read", "t": target, "k": key, "s": status, "t0": t0,
             "t1": t0 + 0.001}
    if status in (200, 404):
        entry["v"] = version
        entry["cached"] = cached
    return entry


def row(key, version, payload, head=False, empty=False):
    return {"k": key, "v": version, "e": empty, "head": head,
            "h": digest(None if empty else payload)}


def znode(key, version, payload, mtime=0.0):
    return {"k": key, "v": version, "e": False, "h": digest(payload), "mtime": mtime, "mzxid": 1}


def test_a_clean_history_has_nothing_to_report():
    entries = [write("k", 1, b"a", 1.0, 1.1), write("k", 2, b"b", 2.0, 2.1),
               read("k", 1, 1.5), read("k", 2, 2.5)]
    journal = [row("k", 1, b"a"), row("k", 2, b"b", head=True)]
    r = check("clean", entries, journal, {"k": znode("k", 2, b"b")})
    assert r.acknowledged == 2
    assert (r.lost, r.duplicated, r.gaps, r.resurrected, r.decreases, r.drift) == ([],) * 6
    assert r.max_staleness == 0 and r.server_errors == 0


def test_lost_means_missing_or_stored_with_another_payload():
    entries = [write("k", 1, b"a", 1.0, 1.1), write("k", 2, b"b", 2.0, 2.1),
               write("k", 3, b"c", 3.0, 3.1), write("k", 4, b"d", 4.0, 4.1, status=503)]
    journal = [row("k", 1, b"a"), row("k", 2, b"other", head=True)]
    r = check("lost", entries, journal, {})
    assert r.acknowledged == 3
    assert [(item["k"], item["v"]) for item in r.lost] == [("k", 2), ("k", 3)]
    assert r.server_errors == 1 and r.server_errors_by == {"write 503": 1}


def test_an_unacknowledged_commit_in_the_journal_is_not_an_error():
    entries = [write("k", 1, b"a", 1.0, 1.1, status=502)]
    r = check("ambiguous", entries, [row("k", 1, b"a", head=True)], {"k": znode("k", 1, b"a")})
    assert r.acknowledged == 0 and not r.lost and not r.drift


def test_duplicates_gaps_and_two_heads():
    entries = [write("k", 1, b"a", 1.0, 1.1, client="w0"),
               write("k", 1, b"b", 1.0, 1.2, client="w1")]
    journal = [row("k", 1, b"a"), row("k", 1, b"b", head=True),
               row("g", 1, b"x"), row("g", 3, b"z", head=True),
               row("h", 1, b"x", head=True), row("h", 2, b"y", head=True)]
    r = check("dup", entries, journal, {})
    assert {(d["k"], d["v"]) for d in r.duplicated} == {("k", 1)}
    assert len(r.duplicated) == 2  # acknowledged twice, and stored twice
    gaps = {g["k"]: g for g in r.gaps}
    assert gaps["g"]["missing"] == [2] and gaps["h"]["heads"] == [1, 2]


def test_resurrected_deletes_at_the_end_and_during_the_run():
    entries = [write("k", 1, b"a", 1.0, 1.1), write("k", 2, b"", 2.0, 2.1, empty=True)]
    journal = [row("k", 1, b"a"), row("k", 2, b"", head=True, empty=True)]
    # The znode of version 1 was written (mtime) after the tombstone was acknowledged.
    observations = [{"k": "k", "v": 1, "h": digest(b"a"), "mtime": 1.05, "mzxid": 1, "seen": 1.2},
                    {"k": "k", "v": None, "seen": 2.2},
                    {"k": "k", "v": 1, "h": digest(b"a"), "mtime": 3.0, "mzxid": 7, "seen": 3.1}]
    r = check("resurrect", entries, journal, {"k": znode("k", 1, b"a", mtime=3.0)}, observations)
    assert [item.get("at") for item in r.resurrected] == ["end", None]
    assert r.resurrected[1]["written"] == 3.0 and r.resurrected[1]["newer_is_tombstone"]
    assert r.drift == [{"k": "k", "state": "not deleted", "journal": 2, "znode": 1}]


def test_stale_publishes_and_znode_rollbacks_are_not_resurrections():
    entries = [write("k", 1, b"a", 1.0, 1.1), write("k", 2, b"b", 2.0, 2.1),
               write("k", 3, b"c", 3.0, 3.1)]
    journal = [row("k", 1, b"a"), row("k", 2, b"b"), row("k", 3, b"c", head=True)]
    observations = [
        # version 1 published after 2 was acknowledged: late, but forward
        {"k": "k", "v": 1, "h": digest(b"a"), "mtime": 2.5, "mzxid": 9, "seen": 2.6},
        {"k": "k", "v": 3, "h": digest(b"c"), "mtime": 3.05, "mzxid": 10, "seen": 3.2},
        # and back to 2: a rollback, which compare-and-set must never allow
        {"k": "k", "v": 2, "h": digest(b"b"), "mtime": 3.3, "mzxid": 11, "seen": 3.4},
    ]
    r = check("late", entries, journal, {"k": znode("k", 2, b"b")}, observations)
    assert not r.resurrected
    assert [item["znode"] for item in r.stale_publishes] == [1, 2]
    assert [(item["from"], item["to"]) for item in r.znode_rollbacks] == [(3, 2)]


def test_staleness_is_measured_from_the_oldest_newer_ack():
    entries = [write("k", 1, b"a", 1.0, 1.0), write("k", 2, b"b", 2.0, 2.0),
               write("k", 3, b"c", 3.0, 3.0),
               read("k", 1, 3.5, target="A"),   # stale since the ack of 2: 1.5 s
               read("k", 3, 3.6, target="A"),
               read("k", 2, 3.7, target="B", client="r1"),  # stale since the ack of 3: 0.7 s
               read("k", 0, 0.5, target="B", client="r2", status=404)]  # before any ack
    journal = [row("k", 1, b"a"), row("k", 2, b"b"), row("k", 3, b"c", head=True)]
    r = check("stale", entries, journal, {"k": znode("k", 3, b"c")})
    assert r.stale_reads == 2
    assert r.max_staleness == pytest.approx(1.5)
    assert r.staleness_by_target == {"A": 1.5, "B": 0.7}
    assert r.worst_stale_read["newer_acked"] == 2


def test_version_decreases_are_per_client_and_key():
    entries = [read("k", 3, 1.0), read("k", 2, 1.1), read("k", 3, 1.2),
               read("k", 1, 1.3, client="r1"), read("j", 5, 1.4)]
    r = check("decrease", entries, [], {})
    assert [(d["from"], d["to"]) for d in r.decreases] == [(3, 2)]
    assert r.decreases_by_target == {"A": 1}


def test_drift_states():
    journal = [row("missing", 1, b"a", head=True), row("behind", 2, b"b", head=True),
               row("same", 1, b"s", head=True), row("differs", 1, b"d", head=True)]
    znodes = {"behind": znode("behind", 1, b"a"), "same": znode("same", 1, b"s"),
              "differs": znode("differs", 1, b"X"), "unknown": znode("unknown", 1, b"u")}
    r = check("drift", [], journal, znodes)
    assert {d["k"]: d["state"] for d in r.drift} == {
        "missing": "missing", "behind": "behind", "differs": "differs", "unknown": "unknown"}


def test_convergence_gap_compares_heads_znodes_and_mirror_listings():
    journal = [row("a", 1, b"x"), row("a", 2, b"y", head=True),
               row("d", 1, b"", head=True, empty=True)]
    assert convergence_gap(journal, {"a": znode("a", 2, b"y")}, [{"a": 2}, {"a": 2}]) == []
    assert convergence_gap(journal, {"a": znode("a", 1, b"x")}, [{"a": 2}]) == [
        "znodes differ on ['a']"]
    assert convergence_gap(journal, {"a": znode("a", 2, b"y")}, [None, {"a": 2, "d": 1}]) == [
        "listing 0 not from the mirror", "listing 1 differs on ['d']"]


# ---------------------------------------------------------------------- the fault proxy


class EchoServer:
    """A loopback echo server; ``connections`` counts the connections it accepted."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.socket.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)


@pytest.fixture
def echo_server():
    server = EchoServer()
    yield server
    server.socket.close()


def roundtrip(port, data=b"ping", timeout=2.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        return conn.recv(4096)


def test_proxy_forwards_and_partition_swallows_silently(echo_server):
    proxy = FaultProxy(("127.0.0.1", echo_server.port))
    try:
        assert roundtrip(proxy.port) == b"ping"
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=0.3)
        held.sendall(b"before")
        assert held.recv(100) == b"before"
        proxy.partition()
        held.sendall(b"lost")
        with pytest.raises(socket.timeout):  # no answer, and no reset either
            held.recv(100)
        with pytest.raises(socket.timeout):  # new connections are accepted, then nothing
            roundtrip(proxy.port, timeout=0.3)
        proxy.heal()
        assert held.recv(100) == b""  # healing closes what the partition swallowed
        held.close()
        assert roundtrip(proxy.port) == b"ping"
    finally:
        proxy.close()


def test_proxy_holds_connections_while_it_is_moved(echo_server):
    proxy = FaultProxy(("127.0.0.1", 9))  # nothing listens on the discard port
    try:
        proxy.hold()
        answers = []
        waiting = threading.Thread(target=lambda: answers.append(roundtrip(proxy.port, timeout=10)))
        waiting.start()
        assert echo_server.connections == 0
        proxy.retarget(("127.0.0.1", echo_server.port))
        proxy.release()
        waiting.join(10)
        assert answers == [b"ping"] and echo_server.connections == 1
    finally:
        proxy.close()


def test_proxy_refuse_and_restore(echo_server):
    proxy = FaultProxy(("127.0.0.1", echo_server.port))
    try:
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            roundtrip(proxy.port)
        proxy.restore()
        assert roundtrip(proxy.port) == b"ping"
    finally:
        proxy.close()
