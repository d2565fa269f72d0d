"""The kazoo client Rainer connects with: kazoo's, with request submission serialised.

kazoo queues a request and then wakes its connection thread by writing one byte to a socket
pair. Under gevent's monkey-patching that socket is a gevent socket, and gevent refuses two
greenlets waiting on one socket at once ("This socket is already used by another greenlet").
A burst of requests from several greenlets (a gevent worker starting its mirror over a
thousand keys while the publisher reads the same keys) fills the socket's buffer, the first
writer waits for the connection to drain it, the second fails, and kazoo reports that
request as "Connection has been closed" or never answers it. Writers that queue on a lock
instead wait their turn; with real threads the lock costs an uncontended acquire.
"""

from __future__ import annotations

import threading
from typing import Any

from kazoo.client import KazooClient


class SerialKazooClient(KazooClient):
    """A ``KazooClient`` whose callers submit requests one at a time (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Reentrant: a completion callback run inline by the handler may submit again.
        self._submitting = threading.RLock()

    def _call(self, request: Any, async_object: Any) -> Any:
        with self._submitting:
            return super()._call(request, async_object)


__all__ = ["SerialKazooClient"]
