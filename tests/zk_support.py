"""Helpers shared by the ZooKeeper tests: condition waits, real session expiry, a client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from collections.abc import Iterator

from kazoo.client import KazooClient

from rainer_server.zk.keeper import make_kazoo_client


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def expire_session(client: KazooClient, hosts: str, wait_for_new_session: bool = True) -> None:
    """Really expire ``client``'s session on the server, as Curator's KillSession does.

    A second client attaches to the same session and closes it; the first one then finds its
    session expired when it reconnects, and kazoo starts a new session.
    """
    session_id, password = client.client_id
    lost = threading.Event()

    def listener(state: str) -> None:
        if state == "LOST":
            lost.set()

    client.add_listener(listener)
    killer = KazooClient(hosts=hosts, client_id=(session_id, password), timeout=10)
    killer.start(timeout=15)
    killer.stop()
    killer.close()
    assert lost.wait(10), "the session was not expired"
    client.remove_listener(listener)
    if wait_for_new_session:
        wait_until(
            lambda: client.connected and client.client_id[0] != session_id, what="a new session"
        )


def started_client(hosts: str) -> Iterator[KazooClient]:
    """A started client with capped backoff, for a fixture to yield from."""
    client = make_kazoo_client(hosts, session_timeout=10.0)
    client.start(timeout=15)
    client.ensure_path("/")
    yield client
    client.stop()
    client.close()
