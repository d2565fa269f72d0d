"""The keeper: each key's latest non-empty commit in ZooKeeper, and live mirrors of them.

Layout under the keeper's base path (spec §5), shared with the original JVM Rainer::

    <base>/data/<key>     the key's latest non-empty commit, in the wire format of spec §2
    <base>/election/      kazoo/Curator leader election of the auto-publishers

ZooKeeper is a cache of the system of record, never the record itself: every write here is a
compare-and-set on the znode's stat version, so a slow or stale writer can lose a race but can
never roll a key back.

Threading rules (kazoo's callback thread is shared by every watch and recipe of a client):
watch callbacks here only swap in-memory state. Anything that blocks on ZooKeeper runs on the
caller's thread or on the mirror's own worker threads.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING
from typing import Any

import immutables
from kazoo.client import KazooClient
from kazoo.exceptions import BadArgumentsError
from kazoo.exceptions import BadVersionError
from kazoo.exceptions import KazooException
from kazoo.exceptions import NodeExistsError
from kazoo.exceptions import NoNodeError
from kazoo.protocol.states import EventType
from kazoo.protocol.states import KazooState
from kazoo.retry import KazooRetry

from rainer_server.commit import Commit
from rainer_server.errors import ConcurrentCommitError
from rainer_server.errors import InvalidCommit
from rainer_server.errors import KeeperError

if TYPE_CHECKING:
    from rainer_server.publisher import AutoPublisher
    from rainer_server.storage import CommitStorage

log = logging.getLogger(__name__)

#: ZooKeeper refuses packets over ``jute.maxbuffer`` (1 MiB - 1 by default) by *dropping the
#: connection*, which would suspend every recipe on the client. Refusing a bit below that limit
#: turns one oversized commit into one logged error instead of a reconnect storm.
DEFAULT_MAX_ZNODE_BYTES = 1_000_000

#: How long one keeper call may wait on ZooKeeper. Writers (the keeper-publishing storage) must
#: not hang on an unreachable ensemble: the auto-publisher repairs whatever they skip.
DEFAULT_TIMEOUT = 2.0

#: Least seconds between two listings of ``data/`` while keys are being created or deleted.
CHILDREN_RELIST_INTERVAL = 0.05
#: At most this share of a mirror's time goes to listing ``data/`` during a burst: a listing
#: of 100k names takes ~0.1 s, so new keys then show up within about a second...
CHILDREN_LISTING_SHARE = 0.1
#: ...and never later than this.
CHILDREN_RELIST_MAX_INTERVAL = 1.0


def make_kazoo_client(hosts: str, session_timeout: float = 10.0, **kwargs: Any) -> KazooClient:
    """Build (but do not start) a ``KazooClient`` whose retries back off to at most ~1 s.

    kazoo's default reconnect backoff grows to an hour; after an outage a keeper would then
    stay disconnected long after ZooKeeper is back. Capped at about a second, a keeper
    converges within one publish period plus a few seconds.

    :param hosts: kazoo hosts string, optionally with a chroot (``"zk1:2181,zk2:2181/rainer"``).
    :param session_timeout: the ZooKeeper session timeout in seconds.
    :param kwargs: passed on to ``KazooClient``.
    """
    # Infinite tries, like kazoo's defaults: recipes (watches, the election) must survive any
    # outage. Only the delay between tries changes. Jitter <= 0.2 keeps a try within ~1.2 s.
    connection_retry = KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_jitter=0.2, max_delay=1.0)
    command_retry = KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_jitter=0.2, max_delay=1.0)
    return KazooClient(
        hosts=hosts,
        timeout=session_timeout,
        connection_retry=connection_retry,
        command_retry=command_retry,
        **kwargs,
    )


class CommitTooLarge(KeeperError):
    """A commit that serializes larger than the keeper's ``max_znode_bytes``."""

    def __init__(self, commit: Commit, size: int, limit: int) -> None:
        super().__init__(
            f"Commit {commit.key} (version[{commit.version}]) is too big for ZooKeeper: "
            f"{size} bytes, the limit is {limit}"
        )
        self.key = commit.key
        self.size = size
        self.limit = limit


class SaveResult(str, enum.Enum):
    """What ``CommitKeeper.save`` did to the znode."""

    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    UNCHANGED = "unchanged"


def _join(parent: str, child: str) -> str:
    return parent.rstrip("/") + "/" + child


def _trim(data: bytes) -> str:
    # A znode's payload may hold secrets: log its size only, never its bytes.
    return f"[{len(data)} bytes]"


def parse_znode(key: str, data: bytes) -> Commit:
    """Parse a znode's data as the commit of ``key``.

    :raises InvalidCommit: when the data is not a commit in the wire format, or is the commit
        of another key (the original refused those too).
    """
    commit = Commit.deserialize(data)
    if commit.key != key:
        raise InvalidCommit(f"Commit has wrong name: expected '{key}', got '{commit.key}'")
    return commit


class CommitKeeper:
    """ZooKeeper storage and notification of each key's most current commit.

    Not a ``CommitStorage``: it keeps no history, and empty or unparseable commits are not
    kept at all.

    :param client: a kazoo client; the keeper neither starts nor stops it.
    :param base_path: the keeper's root (``/rainer``); ``data/`` and ``election/`` live below.
    :param timeout: the longest one call waits on ZooKeeper, in seconds.
    :param max_znode_bytes: commits that serialize larger than this are refused.
    """

    def __init__(
        self,
        client: KazooClient,
        base_path: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_znode_bytes: int = DEFAULT_MAX_ZNODE_BYTES,
    ) -> None:
        self.client = client
        self.base_path = "/" + base_path.strip("/") if base_path.strip("/") else "/"
        self.data_path = _join(self.base_path, "data")
        self.election_path = _join(self.base_path, "election")
        self.timeout = timeout
        self.max_znode_bytes = max_znode_bytes
        # A worker's first writes race its client's first connection (started in the
        # background): until then, calls wait for it, at most ``timeout`` after this point.
        self._first_connect_deadline = time.monotonic() + timeout

    def __repr__(self) -> str:
        return f"CommitKeeper({self.base_path!r})"

    def znode(self, key: str) -> str:
        """The path of ``key``'s znode."""
        return _join(self.data_path, key)

    # ------------------------------------------------------------------ reads

    def get(self, key: str) -> Commit | None:
        """The commit in ``key``'s znode, or ``None`` when there is none.

        :raises InvalidCommit: when the znode exists but does not parse (as the original did).
        :raises KeeperError: when ZooKeeper cannot be reached in time.
        """
        deadline = self._start()
        data, _stat = self._read_znode(self.znode(key), deadline)
        return None if data is None else parse_znode(key, data)

    def keys(self) -> list[str]:
        """Every key with a znode, sorted (unparseable ones included)."""
        deadline = self._start()
        try:
            children = self._wait(self.client.get_children_async(self.data_path), deadline)
        except NoNodeError:
            return []
        return sorted(children)

    def heads(self) -> dict[str, Commit]:
        """A point-in-time map key -> commit of every parseable znode.

        Unlike ``get``, an unparseable znode is logged and left out (as the mirror does), so one
        corrupt key cannot hide all the others.
        """
        keys = self.keys()
        # Pipelined: every read is in flight at once, so 10k keys cost one round trip plus
        # kazoo's per-request overhead rather than 10k round trips.
        pending = [(key, self.client.get_async(self.znode(key))) for key in keys]
        heads: dict[str, Commit] = {}
        for key, result in pending:
            try:
                # A deadline per answer, not per call: 10k answers may take longer than one
                # timeout, but a silent ZooKeeper is still noticed within one.
                data, _stat = self._wait(result, time.monotonic() + self.timeout)
            except NoNodeError:
                continue  # deleted since it was listed
            try:
                heads[key] = parse_znode(key, data)
            except InvalidCommit as exc:
                log.error("Commit with bad serialization: %s: %s, data = %s", key, exc, _trim(data))
        return heads

    def mirror(self, timeout: float | None = 30.0, wait: bool = True) -> CommitMirror:
        """Open a live view of every znode under ``data/``, complete when returned.

        Close it (or use it as a context manager) when no longer needed.

        :param timeout: how long to wait for the first complete view; ``None`` waits forever.
        :param wait: ``False`` returns at once; ``initialized`` then tells when it is complete.
        :raises KeeperError: when the view is not complete in time (the mirror is closed).
        """
        mirror = CommitMirror(self)
        mirror.start()
        if wait and not mirror.wait_initialized(timeout):
            mirror.close()
            raise KeeperError(f"Mirror of {self.data_path} not initialized within {timeout} s")
        return mirror

    # ------------------------------------------------------------------ writes

    def save(self, commit: Commit) -> SaveResult:
        """Publish ``commit`` to its znode according to spec §5's table.

        Never rolls a key back: a commit whose version is not above the znode's (and which is
        not the very same commit) is refused.

        :raises ConcurrentCommitError: on a refused rollback or a lost compare-and-set.
        :raises KeeperError: when ZooKeeper cannot be reached in time, or the commit is too big.
        :raises InvalidCommit: when ZooKeeper refuses the key as a znode name.
        """
        key = commit.key
        path = self.znode(key)
        deadline = self._start()
        data, stat = self._read_znode(path, deadline)

        if data is None:
            if commit.empty:
                log.debug(
                    "No need to create empty commit %s (version[%s] znode[%s])",
                    key,
                    commit.version,
                    path,
                )
                return SaveResult.UNCHANGED
            payload = self._serialize(commit)
            log.info("Creating commit %s (version[%s] znode[%s])", key, commit.version, path)
            self._write(
                self.client.create_async(path, payload, makepath=True), deadline, commit, None
            )
            return SaveResult.CREATED

        try:
            existing: Commit | None = parse_znode(key, data)
        except InvalidCommit:
            existing = None

        if existing is None:
            log.warning(
                "Replacing corrupt commit %s (from version[unknown] to version[%s] znode[%s])",
                key,
                commit.version,
                path,
            )
            if commit.empty:
                self._write(
                    self.client.delete_async(path, version=stat.version), deadline, commit, None
                )
                return SaveResult.DELETED
            payload = self._serialize(commit)
            self._write(
                self.client.set_async(path, payload, version=stat.version), deadline, commit, None
            )
            return SaveResult.UPDATED

        if commit.empty and commit.version > existing.version:
            log.info("Removing commit[%s] (znode[%s])", key, path)
            self._write(
                self.client.delete_async(path, version=stat.version), deadline, commit, existing
            )
            return SaveResult.DELETED
        if commit == existing:
            log.debug("No change to commit[%s] (version[%s] znode[%s])", key, commit.version, path)
            return SaveResult.UNCHANGED
        if commit.version > existing.version:
            payload = self._serialize(commit)
            log.info(
                "Updating commit %s (from version[%s] to version[%s] znode[%s])",
                key,
                existing.version,
                commit.version,
                path,
            )
            self._write(
                self.client.set_async(path, payload, version=stat.version),
                deadline,
                commit,
                existing,
            )
            return SaveResult.UPDATED
        # Same or older version with different content: publishing it would be a rollback, or
        # would overwrite a commit that some other writer got in first.
        raise ConcurrentCommitError(
            key,
            "Refusing to update commit %s (from version[%s] to version[%s] znode[%s])"
            % (key, existing.version, commit.version, path),
        )

    def auto_publisher(
        self,
        storage: CommitStorage,
        period: float = 90.0,
        fuzz: float = 0.2,
        delay: bool = True,
        **kwargs: Any,
    ) -> AutoPublisher:
        """An elected publisher of ``storage``'s heads to this keeper (not yet started).

        :param kwargs: passed on to ``AutoPublisher`` (``mirror``, ``clock``, ``sleep``, ...).
        """
        from rainer_server.publisher import AutoPublisher

        return AutoPublisher(
            self.client,
            self,
            storage,
            self.election_path,
            period=period,
            fuzz=fuzz,
            delay=delay,
            **kwargs,
        )

    # ------------------------------------------------------------------ plumbing

    def _start(self) -> float:
        # kazoo queues requests while disconnected and its synchronous calls then block until
        # the connection is back. Failing fast here (and bounding every wait below) is what
        # keeps a writer from hanging on an unreachable ensemble.
        while not self.client.connected and time.monotonic() < self._first_connect_deadline:
            time.sleep(0.01)
        if not self.client.connected:
            raise KeeperError(f"Not connected to ZooKeeper (state {self.client.state})")
        return time.monotonic() + self.timeout

    def _wait(self, result: Any, deadline: float) -> Any:
        """Wait for an async kazoo result until ``deadline``, translating kazoo's failures."""
        try:
            return result.get(timeout=max(0.0, deadline - time.monotonic()))
        except (NoNodeError, NodeExistsError, BadVersionError):
            raise  # the callers give these a meaning
        except BadArgumentsError as exc:
            # ZooKeeper refuses some names our keys allow (e.g. U+E000-U+F8FF, U+FFF0-U+FFFF):
            # a problem of that key, not of ZooKeeper.
            raise InvalidCommit(f"ZooKeeper refuses this key or data: {exc!r}") from exc
        except self.client.handler.timeout_exception as exc:
            raise KeeperError(f"ZooKeeper did not answer within {self.timeout} s") from exc
        except KazooException as exc:
            raise KeeperError(f"ZooKeeper error: {exc!r}") from exc

    def _read_znode(self, path: str, deadline: float) -> tuple[bytes | None, Any]:
        """``(data, stat)`` of ``path``, or ``(None, None)`` when absent."""
        try:
            data, stat = self._wait(self.client.get_async(path), deadline)
        except NoNodeError:
            return None, None
        return data, stat

    def _serialize(self, commit: Commit) -> bytes:
        payload = commit.serialize()
        if len(payload) > self.max_znode_bytes:
            raise CommitTooLarge(commit, len(payload), self.max_znode_bytes)
        return payload

    def _write(self, result: Any, deadline: float, commit: Commit, existing: Commit | None) -> None:
        # A write that times out stays queued in kazoo and may still reach the server later;
        # that is harmless because every write is conditional (stat version, or create).
        try:
            self._wait(result, deadline)
        except (BadVersionError, NodeExistsError, NoNodeError) as exc:
            raise ConcurrentCommitError(
                commit.key,
                "Concurrent modification when trying to update commit: %s "
                "(from version[%s] to version[%s] znode[%s]): %r"
                % (
                    commit.key,
                    "unknown" if existing is None else existing.version,
                    commit.version,
                    self.znode(commit.key),
                    exc,
                ),
            ) from exc


class _KeyWatch:
    """One key's watch; identity tells a live watch from a retired one.

    Not kazoo's DataWatch: that costs ~1 KiB per key, a blocking round trip to register, and a
    new thread per key on every reconnect (100k keys: 100k threads at once).
    """

    __slots__ = ("key", "path", "initial", "retired", "stale", "on_event")

    def __init__(self, key: str, path: str, initial: bool) -> None:
        self.key = key
        self.path = path
        self.initial = initial
        self.retired = False
        #: The last read failed (connection lost): read again once connected.
        self.stale = False
        # One callable per key for its whole life: kazoo keeps watchers in a set.
        self.on_event: Callable[[Any], None] = lambda event: None


class MirrorView(Mapping[str, Commit]):
    """A mirror's snapshot: key -> commit, read-only, equal to any mapping with its items.

    Wraps a persistent map (``immutables.Map``), whose own ``==`` only knows other Maps.
    """

    __slots__ = ("_commits",)

    def __init__(self, commits: immutables.Map[str, Commit]) -> None:
        self._commits = commits

    def __getitem__(self, key: str) -> Commit:
        return self._commits[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._commits.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._commits

    def __iter__(self) -> Iterator[str]:
        return iter(self._commits)

    def __len__(self) -> int:
        return len(self._commits)

    def __repr__(self) -> str:
        return f"MirrorView({dict(self._commits)!r})"


_EMPTY_VIEW: Mapping[str, Commit] = MirrorView(immutables.Map())


class CommitMirror:
    """A live, immutable view of every parseable znode under a keeper's ``data/``.

    Driven by a watched listing of ``data/`` (its own thread, see ``_list_children``) and a
    watched read of each key (asynchronous: answers and watch events arrive on kazoo's thread,
    which only parses and swaps in-memory state). Each change replaces ``current`` with a new
    read-only mapping, so a reader holding one mapping sees a consistent snapshot, and
    notifies subscribers. After a session loss (watches gone) every key is read again.
    """

    def __init__(self, keeper: CommitKeeper) -> None:
        self.keeper = keeper
        self.client = keeper.client
        self.data_path = keeper.data_path
        self._lock = threading.RLock()
        # A persistent map: a change makes a new one in O(log n), sharing the rest, so the
        # view handed to readers is never copied (a dict copy of 100k keys per change made
        # every commit, and a first publish, cost O(keys)).
        self._commits: immutables.Map[str, Commit] = immutables.Map()
        self._unparseable: set[str] = set()
        self._watches: dict[str, _KeyWatch] = {}
        self._current: Mapping[str, Commit] = _EMPTY_VIEW
        self._subscribers: list[Callable[[Mapping[str, Commit]], object]] = []
        self._session_lost = False
        self._children_thread: threading.Thread | None = None
        # Set by a children (or path-creation) watch, and by close() to wake the lister.
        self._children_changed = threading.Event()
        # Keys listed by the first children callback whose first data callback is still due.
        self._awaiting: set[str] | None = None
        self._initialized = threading.Event()
        self._closing = threading.Event()
        self._closed = False
        self._started = False
        #: ``time.monotonic()`` of the last change to ``current`` (``None``: not initialized).
        self.last_update: float | None = None
        #: How many times ``data/`` has been listed: about one per burst of created or deleted
        #: keys, not one per key.
        self.listings = 0

    def __repr__(self) -> str:
        return f"CommitMirror({self.data_path!r}, {len(self._current)} commits)"

    def __enter__(self) -> CommitMirror:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ public API

    @property
    def current(self) -> Mapping[str, Commit]:
        """The latest view: an immutable mapping key -> commit."""
        return self._current

    @property
    def unparseable(self) -> frozenset[str]:
        """Keys whose znodes exist but were dropped from the view because they do not parse."""
        with self._lock:
            return frozenset(self._unparseable)

    @property
    def initialized(self) -> bool:
        """Whether the view has been complete at least once."""
        return self._initialized.is_set()

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_initialized(self, timeout: float | None = None) -> bool:
        return self._initialized.wait(timeout)

    def subscribe(self, fn: Callable[[Mapping[str, Commit]], object]) -> Callable[[], None]:
        """Call ``fn(mapping)`` now and after every change; return a function that unsubscribes.

        ``fn`` runs on kazoo's thread (or a mirror thread) with the mirror locked, so that no
        change is missed or reordered: it must be quick and must not block on ZooKeeper.
        """
        with self._lock:
            self._subscribers.append(fn)
            self._notify_one(fn, self._current)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)

        return unsubscribe

    def start(self) -> None:
        """Start watching; ``CommitKeeper.mirror()`` calls this and waits for completeness."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self.client.add_listener(self._on_state)
        self._children_thread = threading.Thread(
            target=self._list_children, name="rainer-mirror-children", daemon=True
        )
        self._children_thread.start()

    def close(self) -> None:
        """Stop watching; ``current`` keeps its last value."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing.set()
            self._children_changed.set()
            for kw in self._watches.values():
                kw.retired = True  # its pending watch, when it fires, does nothing
            self._watches.clear()
            self._subscribers.clear()
        self.client.remove_listener(self._on_state)
        # The lister may wait on ZooKeeper for up to the keeper's timeout: it is a daemon, and
        # what it finds now is dropped.
        thread = self._children_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)

    # ------------------------------------------------------------------ watching

    def _list_children(self) -> None:
        """List ``data/`` with a watch, hand the names to ``_on_children``, repeat on change.

        Not kazoo's ChildrenWatch: that re-lists on every single child event, so a burst of N
        new keys (a first publisher pass) costs O(N^2) names read and compared (10k keys: ~8k
        listings, over a minute of CPU). Here a change is listed at once unless the previous
        listing is recent (``CHILDREN_RELIST_INTERVAL``, longer for long listings, see
        ``CHILDREN_LISTING_SHARE``): a lone new key appears within a round trip, a burst costs
        a few listings per second.

        Session loss fires the watch too (kazoo resets watchers), so the keys created while
        the session was gone are found by the listing after the reconnect. While ``data/``
        is missing (never created, or an operator's ``deleteall``) the view is empty and an
        ``exists`` watch waits for it to appear. The first listing creates ``data/`` as the
        original's mirror does, so writers of other clients can create keys in it.
        """
        pause = 0.1
        ensured = False
        while True:
            with self._lock:
                if self._closed:
                    return
                changed = self._children_changed = threading.Event()

            def on_event(event: Any, changed: threading.Event = changed) -> None:
                changed.set()

            listed_at = time.monotonic()
            try:
                deadline = listed_at + self.keeper.timeout
                if not ensured:
                    self.keeper._wait(self.client.ensure_path_async(self.data_path), deadline)
                    ensured = True
                try:
                    children = self.keeper._wait(
                        self.client.get_children_async(self.data_path, watch=on_event), deadline
                    )
                except NoNodeError:
                    children = []
                    exists = self.client.exists_async(self.data_path, watch=on_event)
                    if self.keeper._wait(exists, deadline) is not None:
                        changed.set()  # created in between: list it right away
            except KeeperError as exc:
                log.warning("Mirror of %s: cannot list keys yet: %s", self.data_path, exc)
                self._closing.wait(pause)
                pause = min(pause * 2, 1.0)
                continue
            pause = 0.1
            self.listings += 1
            new = self._on_children(children)
            took = time.monotonic() - listed_at
            interval = min(
                max(CHILDREN_RELIST_INTERVAL, took / CHILDREN_LISTING_SHARE),
                CHILDREN_RELIST_MAX_INTERVAL,
            )
            # After timing the listing: issuing 100k first reads is not a cost of listing.
            for kw in new:
                self._read_key(kw)
            changed.wait()
            self._closing.wait(max(0.0, listed_at + interval - time.monotonic()))

    def _read_key(self, kw: _KeyWatch) -> None:
        """Read ``kw``'s znode and leave a watch on it; the answer comes to ``_on_read``."""
        if not kw.retired:
            self.client.get_async(kw.path, watch=kw.on_event).rawlink(partial(self._on_read, kw))

    def _reread(self, everything: bool) -> None:
        """Read again every key (the session was lost, and its watches with it) or the stale."""
        with self._lock:
            keys = [kw for kw in self._watches.values() if everything or kw.stale]
        for kw in keys:
            kw.stale = False
            self._read_key(kw)
        if keys:
            log.info("Mirror of %s: reading %d keys again after reconnecting", self.data_path,
                     len(keys))

    # ------------------------------------------------------------------ kazoo callbacks

    def _on_key_event(self, kw: _KeyWatch, event: Any) -> None:
        """A key's watch fired: read it again, which also leaves the next watch."""
        # NONE: the session is gone (kazoo fires every watch); _on_state reads all keys again.
        if not kw.retired and event.type != EventType.NONE:
            self._read_key(kw)

    def _on_read(self, kw: _KeyWatch, result: Any) -> None:
        try:
            data, _stat = result.get()
        except NoNodeError:
            # Deleted (the next listing forgets it) or not created yet. A read leaves no watch
            # on a missing znode; ``exists`` does, so a re-creation is seen.
            self._on_data(kw, None)
            if not kw.retired:
                self.client.exists_async(kw.path, watch=kw.on_event).rawlink(
                    partial(self._on_exists, kw)
                )
            return
        except Exception as exc:  # connection lost: read again once connected
            kw.stale = True
            log.debug("Mirror of %s: reading %s failed: %r", self.data_path, kw.key, exc)
            return
        self._on_data(kw, data)

    def _on_exists(self, kw: _KeyWatch, result: Any) -> None:
        try:
            stat = result.get()
        except Exception:
            kw.stale = True
            return
        if stat is not None:
            self._read_key(kw)  # created between the failed read and this check

    def _on_state(self, state: str) -> None:
        """Connection listener: after a reconnect, read what the outage may have hidden."""
        if state == KazooState.LOST:
            self._session_lost = True
        elif state == KazooState.CONNECTED and not self._closed:
            everything, self._session_lost = self._session_lost, False
            # Not on kazoo's thread: with 100k keys, issuing the reads takes a while.
            threading.Thread(
                target=self._reread, args=(everything,), name="rainer-mirror-reread", daemon=True
            ).start()

    def _on_children(self, children: list[str]) -> list[_KeyWatch]:
        """A listing of ``data/``: forget removed keys; return the new ones, to be read."""
        with self._lock:
            if self._closed:
                return []
            listed = set(children)
            changed = False
            for key in [key for key in self._watches if key not in listed]:
                self._watches.pop(key).retired = True
                self._unparseable.discard(key)
                if key in self._commits:
                    self._commits = self._commits.delete(key)
                    changed = True
                    log.info("Commit removed: %s", key)
                if self._awaiting is not None:
                    self._awaiting.discard(key)
            first = self._awaiting is None
            if first:
                self._awaiting = set(listed)
            new = [
                _KeyWatch(key, self.keeper.znode(key), initial=first)
                for key in listed
                if key not in self._watches
            ]
            for kw in new:
                kw.on_event = partial(self._on_key_event, kw)
                self._watches[kw.key] = kw
            if changed:
                self._publish()
            self._check_initialized()
        return new

    def _on_data(self, kw: _KeyWatch, data: bytes | None) -> None:
        """A key's znode (``None``: absent): parse and swap the view. No ZooKeeper calls here."""
        with self._lock:
            if self._closed or self._watches.get(kw.key) is not kw:
                return  # retired since the read was sent
            key = kw.key
            changed = False
            if data is None:
                self._unparseable.discard(key)
                if key in self._commits:
                    self._commits = self._commits.delete(key)
                    changed = True
                    log.info("Commit removed: %s", key)
            else:
                try:
                    commit = parse_znode(key, data)
                except InvalidCommit as exc:
                    self._unparseable.add(key)
                    log.error(
                        "Commit %s with bad serialization: %s: %s, data = %s",
                        "added" if key not in self._commits else "updated",
                        key,
                        exc,
                        _trim(data),
                    )
                    if key in self._commits:
                        self._commits = self._commits.delete(key)
                        changed = True
                else:
                    self._unparseable.discard(key)
                    previous = self._commits.get(key)
                    if previous != commit:
                        self._commits = self._commits.set(key, commit)
                        changed = True
                        if self.initialized:
                            log.info(
                                "Commit %s: %s: %s",
                                "added" if previous is None else "updated",
                                key,
                                commit,
                            )
            if kw.initial and self._awaiting is not None and key in self._awaiting:
                self._awaiting.discard(key)
                self._check_initialized()
            elif changed:
                self._publish()

    # ------------------------------------------------------------------ view

    def _check_initialized(self) -> None:
        # Called with the lock held. Before the first complete view nothing is published: with
        # 10k keys, a fresh mapping per key would be quadratic.
        if self._awaiting or self._awaiting is None or self.initialized:
            return
        self._publish(force=True)
        self._initialized.set()
        log.info("Mirror of %s initialized: %d commits", self.data_path, len(self._commits))

    def _publish(self, force: bool = False) -> None:
        # Called with the lock held, so subscribers see the views in order.
        if not (force or self.initialized):
            return
        view = MirrorView(self._commits)
        self._current = view
        self.last_update = time.monotonic()
        for fn in list(self._subscribers):
            self._notify_one(fn, view)

    def _notify_one(
        self, fn: Callable[[Mapping[str, Commit]], object], view: Mapping[str, Commit]
    ) -> None:
        try:
            fn(view)
        except Exception:
            log.exception("Mirror subscriber %r failed", fn)


__all__ = [
    "DEFAULT_MAX_ZNODE_BYTES",
    "DEFAULT_TIMEOUT",
    "CommitKeeper",
    "CommitMirror",
    "CommitTooLarge",
    "MirrorView",
    "SaveResult",
    "make_kazoo_client",
    "parse_znode",
]
