"""The kazoo handler's select (rainer_server/zk/connection.py): what is ready answers at once,
the rest waits as kazoo's own select does, and descriptors past 1024 work."""

from __future__ import annotations

import os
import resource
import socket
import threading
import time

import pytest
from kazoo.handlers.threading import SequentialThreadingHandler

from rainer_server.zk.connection import QuickSelectHandler
from rainer_server.zk.connection import SerialKazooClient


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_readable_and_writable_sockets_are_answered_as_select_does(pair):
    a, b = pair
    handler = QuickSelectHandler()
    # Nothing to read: a read-only select waits its timeout and answers nothing.
    started = time.monotonic()
    assert handler.select([a], [], [], 0.05) == ([], [], [])
    assert time.monotonic() - started >= 0.04
    # A fresh socket can be written at once; after a byte arrives it can be read too.
    assert handler.select([], [a], [], 1.0) == ([], [a], [])
    b.send(b"x")
    assert handler.select([a, b], [a], [], 1.0) == ([a], [a], [])
    assert handler.select([b], [], [], 0) == ([], [], [])


def test_a_wait_ends_when_data_arrives(pair):
    a, b = pair
    threading.Timer(0.05, b.send, (b"x",)).start()
    started = time.monotonic()
    assert QuickSelectHandler().select([a], [], [], 5.0) == ([a], [], [])
    assert time.monotonic() - started < 4.0


def test_descriptors_past_1024_and_closed_ones(pair):
    a, b = pair
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= 1500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    high = os.dup2(a.fileno(), 1500)
    try:
        b.send(b"x")
        assert QuickSelectHandler().select([high], [], [], 1.0) == ([high], [], [])
    finally:
        os.close(high)
    closed = socket.socket()
    fd = closed.fileno()
    closed.close()
    # As kazoo's select: a descriptor that is not open is an error, not "ready" nor a wait.
    with pytest.raises(ValueError):
        QuickSelectHandler().select([fd], [], [], 1.0)
    with pytest.raises(ValueError):
        SequentialThreadingHandler().select([fd], [], [], 1.0)


def test_the_client_uses_it_unless_given_another():
    assert isinstance(SerialKazooClient(hosts="127.0.0.1:1").handler, QuickSelectHandler)
    other = SequentialThreadingHandler()
    assert SerialKazooClient(hosts="127.0.0.1:1", handler=other).handler is other


@pytest.mark.zookeeper
def test_a_server_that_stops_answering_a_stream_of_requests_is_given_up(zk_chroot):
    """kazoo counts every request sent as a ping: under a steady stream of requests, a
    connection whose packets vanish was not given up until the server closed its end. It must
    be given up after one read timeout without an answer (2/3 of the session timeout), well
    before the session expires."""
    from kazoo.protocol.states import KazooState

    from tests.tcpproxy import TcpProxy

    address, slash, chroot = zk_chroot.partition("/")
    host, port = address.split(",")[0].rsplit(":", 1)
    proxy = TcpProxy((host, int(port)))
    client = SerialKazooClient(hosts=proxy.address + slash + chroot, timeout=8.0)
    states: dict[str, threading.Event] = {
        KazooState.SUSPENDED: threading.Event(), KazooState.CONNECTED: threading.Event()
    }
    stop = threading.Event()
    try:
        client.start(timeout=15)
        session_timeout = client._session_timeout / 1000.0  # as the server negotiated it
        client.add_listener(lambda state: states[state].set() if state in states else None)

        def keep_asking() -> None:
            while not stop.wait(0.05):  # a worker's saves and reads: never a quiet second
                client.exists_async("/")

        threading.Thread(target=keep_asking, daemon=True).start()
        assert client.exists("/")  # answered: the stream flows
        paused_at = time.monotonic()
        proxy.pause()
        assert states[KazooState.SUSPENDED].wait(session_timeout * 3), "never given up"
        given_up_after = time.monotonic() - paused_at
        read_timeout = session_timeout * 2 / 3
        assert read_timeout <= given_up_after < session_timeout * 0.95, (
            given_up_after, session_timeout)
        proxy.resume()
        # Back within the session: the client reconnects and the requests flow again.
        assert states[KazooState.CONNECTED].wait(30), "never reconnected"
        assert client.exists("/")
    finally:
        stop.set()
        proxy.resume()
        client.stop()
        client.close()
        proxy.cut()
