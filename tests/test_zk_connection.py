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
