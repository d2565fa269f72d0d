"""Drift repair: after an outage, re-check at once the keys whose keeper writes went wrong.

A keeper write that times out or loses its connection has an unknown outcome: ZooKeeper may
have logged it, and a new leader then commits it when quorum returns, seconds after the
storage moved on (a tombstone, a newer version written while ZooKeeper was out). Its
compare-and-set still matches, since nobody else could write meanwhile. A write that never got
through leaves ZooKeeper behind the storage just the same. Either way the elected publisher
would only notice on its next pass, a period later.

So every process remembers the keys its keeper could not save (``CommitKeeper.
suspect_listeners``) and, as soon as it is connected again, publishes each one's head as the
storage has it now, under the storage's ``locked_head`` like a publish pass. A request's
reads after reconnecting reach ZooKeeper after every write that can still land: a logged
proposal is committed (or dropped) when quorum forms, before any server serves clients, and
what kazoo still queued goes out first on this client's connection (and is defused: see
``CommitKeeper._defuse``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator

from kazoo.client import KazooClient
from kazoo.protocol.states import KazooState

from rainer_server.commit import Commit
from rainer_server.errors import ConcurrentCommitError
from rainer_server.errors import KeeperError
from rainer_server.errors import LostCompareAndSet
from rainer_server.errors import RainerError
from rainer_server.errors import StorageUnavailable
from rainer_server.storage import CommitStorage
from rainer_server.zk.keeper import CommitKeeper

log = logging.getLogger(__name__)

#: Seconds before trying again the keys whose repair failed (ZooKeeper or the storage still
#: out while the client reports connected); doubled after each failure in a row, up to
#: ``_MAX_RETRY``, so a long database outage costs a log line every few seconds, not a stream.
DEFAULT_RETRY = 1.0
_MAX_RETRY = 15.0


class DriftRepair:
    """Re-publish a process's suspect keys from ``storage`` whenever ZooKeeper answers.

    :param client: the keeper's kazoo client (neither started nor stopped here).
    :param keeper: whose failed saves are watched and repaired.
    :param storage: the system of record (the underlying storage, not the keeper-publishing
        one, whose hook would publish a second time).
    :param retry: seconds between attempts at a key whose repair failed.
    """

    def __init__(
        self,
        client: KazooClient,
        keeper: CommitKeeper,
        storage: CommitStorage,
        *,
        retry: float = DEFAULT_RETRY,
    ) -> None:
        self.client = client
        self.keeper = keeper
        self.storage = storage
        self.retry = retry
        self._cond = threading.Condition()
        self._suspects: set[str] = set()
        self._not_before = 0.0
        self._backoff = retry
        self._connected = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: Keys re-published so far (whatever the keeper did with them): for tests and logs.
        self.repaired = 0

    def __repr__(self) -> str:
        return f"DriftRepair({self.keeper!r}, {len(self._suspects)} suspects)"

    @property
    def suspects(self) -> frozenset[str]:
        """The keys waiting for a re-check."""
        with self._cond:
            return frozenset(self._suspects)

    def start(self) -> None:
        with self._cond:
            if self._thread is not None or self._stopping:
                return
            self.keeper.suspect_listeners.append(self.suspect)
            self.client.add_listener(self._on_state)
            # Read after adding the listener, so no transition slips between the two.
            self._connected = self.client.state == KazooState.CONNECTED
            self._thread = threading.Thread(
                target=self._run, name=f"rainer-drift-repair[{self.keeper.base_path}]", daemon=True
            )
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        with contextlib.suppress(ValueError):
            self.keeper.suspect_listeners.remove(self.suspect)
        self.client.remove_listener(self._on_state)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def suspect(self, key: str) -> None:
        """Re-check ``key`` once ZooKeeper answers (called by the keeper; cheap, any thread)."""
        with self._cond:
            self._suspects.add(key)
            self._cond.notify_all()

    def _on_state(self, state: str) -> None:
        # Runs on kazoo's connection thread: record and wake, nothing else.
        with self._cond:
            self._connected = state == KazooState.CONNECTED
            if self._connected:
                # Back: every suspect at once, not after a backoff.
                self._not_before, self._backoff = 0.0, self.retry
            self._cond.notify_all()

    def _due(self) -> bool:
        return self._stopping or (
            self._connected and bool(self._suspects) and time.monotonic() >= self._not_before
        )

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due():
                    wait = self._not_before - time.monotonic()
                    self._cond.wait(wait if wait > 0 and self._connected else None)
                if self._stopping:
                    return
                keys, self._suspects = sorted(self._suspects), set()
            log.info("Re-checking %d key(s) whose ZooKeeper write failed or timed out", len(keys))
            failed = self.repair(keys, lambda: self.client.connected and not self._stopping)
            with self._cond:
                if failed:
                    self._suspects.update(failed)
                    self._not_before = time.monotonic() + self._backoff
                    self._backoff = min(2 * self._backoff, _MAX_RETRY)
                else:
                    self._backoff = self.retry

    def repair(self, keys: list[str], may_write: Callable[[], bool] = lambda: True) -> list[str]:
        """Publish the storage's head of each of ``keys``; return the keys to try again."""
        lock_head = getattr(self.storage, "locked_head", None) or self._unlocked_head
        for index, key in enumerate(keys):
            if not may_write():
                return keys[index:]
            try:
                with lock_head(key) as head:
                    if head is not None:
                        result = self.keeper.save(head)
                        log.debug("Re-checked commit %s (version[%s]): %s", key, head.version,
                                  result.value)
                self.repaired += 1
            except LostCompareAndSet:
                return keys[index:]  # someone wrote it meanwhile: decide again on fresh reads
            except ConcurrentCommitError as exc:
                # ZooKeeper holds a newer or different commit: nothing of ours to repair.
                log.warning("Re-check of commit %s refused: %s", key, exc)
                self.repaired += 1
            except (KeeperError, StorageUnavailable) as exc:
                log.warning("Re-check of commit %s failed, will try again: %s", key, exc)
                return keys[index:]
            except RainerError as exc:
                log.warning("Re-check of commit %s refused: %s", key, exc)
                self.repaired += 1
            except Exception:
                log.exception("Re-check of commit %s failed", key)
        return []

    @contextlib.contextmanager
    def _unlocked_head(self, key: str) -> Iterator[Commit | None]:
        # A storage without locked_head (none of ours): its head, unlocked, is still the truth.
        yield self.storage.get(key)


__all__ = ["DEFAULT_RETRY", "DriftRepair"]
