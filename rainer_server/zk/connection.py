"""The kazoo client Rainer connects with: kazoo's, with request submission serialised.

kazoo queues a request and then wakes its connection thread by writing one byte to a socket
pair. Under gevent's monkey-patching that socket is a gevent socket, and gevent refuses two
greenlets waiting on one socket at once ("This socket is already used by another greenlet").
A burst of requests from several greenlets (a gevent worker starting its mirror over a
thousand keys while the publisher reads the same keys) fills the socket's buffer, the first
writer waits for the connection to drain it, the second fails, and kazoo reports that
request as "Connection has been closed" or never answers it. Writers that queue on a lock
instead wait their turn; with real threads the lock costs an uncontended acquire.

Its handler first asks whether a socket is ready already (one ``poll`` with no timeout) before
it waits the way kazoo does: kazoo builds and closes a selector on every call, before every
write and on every turn of its loop, and under gevent that selector (``GeventSelector``) was
13 % of a worker's CPU under POST load.

Its connection also gives up on a server that stops answering while requests keep going out
(``AnswerDeadlineConnection``).
"""

from __future__ import annotations

import select
import threading
import time
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionDropped
from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.protocol.connection import ConnectionHandler

try:
    from gevent.monkey import get_original
except ImportError:  # pragma: no cover (gevent is a dependency; the handler works without)
    _os_poll = select.poll
else:
    # The system's poll even where gevent patched the module: with no timeout it never blocks,
    # and unlike select() it takes descriptors past 1024 (a worker holding 1000 watchers).
    _os_poll = get_original("select", "poll")


class SerialKazooClient(KazooClient):
    """A ``KazooClient`` whose callers submit requests one at a time (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("handler", QuickSelectHandler())
        super().__init__(*args, **kwargs)
        kazoos = self._connection
        self._connection = AnswerDeadlineConnection(
            self, kazoos.retry_sleeper, logger=kazoos.logger, sasl_options=kazoos.sasl_options
        )
        # Reentrant: a completion callback run inline by the handler may submit again.
        self._submitting = threading.RLock()

    def _call(self, request: Any, async_object: Any) -> Any:
        with self._submitting:
            return super()._call(request, async_object)


class AnswerDeadlineConnection(ConnectionHandler):
    """kazoo's connection, which also drops a connection that stops answering while requests
    keep going out.

    kazoo sends a ping only after half its read timeout without sending anything, and counts
    every request sent as a ping, answered or not. Under a steady stream of requests (a
    worker saving commits), a connection whose packets vanish (a network partition) was
    never given up: the fault run's partitioned host served its mirror's reads, unmarked as
    stale, until ZooKeeper expired the session and closed its end, and in a real partition
    no close arrives. Here, a request about to be sent while earlier ones wait for an answer
    and nothing has been read for a whole read timeout (kazoo's bound for a ping's answer,
    2/3 of the session timeout) drops the connection as a lost ping does: the client turns
    SUSPENDED (the mirror says it is stale) and tries the next server.
    """

    _read_at = 0.0

    def _connect(self, host: str, hostip: str, port: int) -> Any:
        timeouts = super()._connect(host, hostip, port)
        self._read_at = time.monotonic()
        return timeouts

    def _read_socket(self, read_timeout: float) -> Any:
        self._read_at = time.monotonic()
        return super()._read_socket(read_timeout)

    def _send_request(self, read_timeout: float, connect_timeout: float) -> Any:
        silent = time.monotonic() - self._read_at
        if self.client._pending and silent > read_timeout:
            raise ConnectionDropped(
                f"no answer for {silent:.1f} s to {len(self.client._pending)} requests"
            )
        return super()._send_request(read_timeout, connect_timeout)


class QuickSelectHandler(SequentialThreadingHandler):
    """kazoo's threading handler, whose ``select`` answers at once what is ready already."""

    def select(self, rlist: list, wlist: list, xlist: list, timeout: float | None = None) -> Any:
        poller = _os_poll()
        masks: dict[int, int] = {}
        objects: dict[int, Any] = {}
        for sockets, mask in ((rlist, select.POLLIN), (wlist, select.POLLOUT)):
            for sock in sockets:
                fd = sock if isinstance(sock, int) else sock.fileno()
                masks[fd] = masks.get(fd, 0) | mask
                objects[fd] = sock
        for fd, mask in masks.items():
            poller.register(fd, mask)
        ready = poller.poll(0)
        if not ready:
            return super().select(rlist, wlist, xlist, timeout)
        readable, writable = [], []
        for fd, events in ready:
            if events & select.POLLNVAL:
                raise ValueError("Invalid event mask or fd")  # as kazoo's own select
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and masks[fd] & select.POLLIN:
                readable.append(objects[fd])
            if events & (select.POLLOUT | select.POLLHUP | select.POLLERR) and masks[fd] & select.POLLOUT:
                writable.append(objects[fd])
        if not (readable or writable):
            return super().select(rlist, wlist, xlist, timeout)
        return readable, writable, []


__all__ = ["AnswerDeadlineConnection", "QuickSelectHandler", "SerialKazooClient"]
