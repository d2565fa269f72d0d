"""The mirror: a live, immutable view of every key's latest commit under a keeper's ``data/``.

Threading rules (kazoo's callback thread is shared by every watch and recipe of a client):
watch callbacks here only swap in-memory state. Anything that blocks on ZooKeeper runs on the
mirror's own worker thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from collections.abc import ItemsView
from collections.abc import Iterator
from collections.abc import KeysView
from collections.abc import Mapping
from collections.abc import ValuesView
from functools import partial
from typing import Any
from typing import Protocol

import immutables
from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError
from kazoo.protocol.states import EventType
from kazoo.protocol.states import KazooState

from rainer_server.commit import Commit
from rainer_server.errors import InvalidCommit
from rainer_server.errors import KeeperError
from rainer_server.payloads import KeyValueDeserialization
from rainer_server.zk.znode import describe_size
from rainer_server.zk.znode import parse_znode

log = logging.getLogger(__name__)


class ZnodeSource(Protocol):
    """What a mirror reads through: a ``CommitKeeper`` (which builds its mirrors with
    ``keeper.mirror()``; naming the class here would tie the two modules in a loop)."""

    client: KazooClient
    data_path: str
    timeout: float
    deserialization: KeyValueDeserialization | None

    def znode(self, key: str) -> str: ...

    def wait_for(self, result: Any, deadline: float) -> Any: ...

#: Least seconds between two listings of ``data/`` while keys are being created or deleted.
CHILDREN_RELIST_INTERVAL = 0.05
#: At most this share of a mirror's time goes to listing ``data/`` during a burst: a listing
#: of 100k names takes ~0.1 s, so new keys then show up within about a second...
CHILDREN_LISTING_SHARE = 0.1
#: ...and never later than this.
CHILDREN_RELIST_MAX_INTERVAL = 1.0
#: Reads of new keys (and of every key after a reconnect) unanswered at once.
READS_IN_FLIGHT = 1000


class _KeyWatch:
    """One key's watch; identity tells a live watch from a retired one.

    Not kazoo's DataWatch: that costs ~1 KiB per key, a blocking round trip to register, and a
    new thread per key on every reconnect (100k keys: 100k threads at once).
    """

    __slots__ = ("key", "path", "initial", "retired", "stale", "updated", "on_event")

    def __init__(self, key: str, path: str, initial: bool) -> None:
        self.key = key
        self.path = path
        self.initial = initial
        self.retired = False
        #: The last read failed (connection lost): read again once connected.
        self.stale = False
        #: A read's answer has been applied (so a first read's, applied later, is older).
        self.updated = False
        # One callable per key for its whole life: kazoo keeps watchers in a set.
        self.on_event: Callable[[Any], None] = lambda event: None


class ChangeLog:
    """The keys a mirror changed, numbered, so that what differs between two of its views is
    known without comparing them key by key: the listing of 100k keys rebuilds the JSON of
    the keys that changed, where touching every commit cost 20x what it did at 10k keys
    (each is a cache miss once they outgrow the CPU's cache).

    Bounded: past ``limit`` changes, or after a bulk load (``note_all``), older views are
    answered "unknown" and a reader compares everything, as it did without the log.
    """

    def __init__(self, limit: int = 4096) -> None:
        self._lock = threading.Lock()
        self._keys: collections.deque[tuple[int, str]] = collections.deque(maxlen=limit)
        #: The number of the newest change.
        self.sequence = 0
        # Changes up to this number are no longer in the log.
        self._forgotten = 0

    def note(self, key: str) -> None:
        with self._lock:
            if len(self._keys) == self._keys.maxlen:
                self._forgotten = self._keys[0][0]
            self.sequence += 1
            self._keys.append((self.sequence, key))

    def note_all(self) -> None:
        """Every key may have changed (cheaper than noting each of a bulk load)."""
        with self._lock:
            self.sequence += 1
            self._forgotten = self.sequence
            self._keys.clear()

    def between(self, older: int, newer: int) -> set[str] | None:
        """The keys changed after change ``older`` up to change ``newer``; ``None`` when the
        log no longer reaches back that far."""
        with self._lock:
            if older < self._forgotten:
                return None
            changed = set()
            for number, key in reversed(self._keys):
                if number <= older:
                    break
                if number <= newer:
                    changed.add(key)
            return changed


class MirrorView(Mapping[str, Commit]):
    """A mirror's snapshot: key -> commit, read-only, equal to any mapping with its items.

    Wraps a persistent map (``immutables.Map``), whose own ``==`` only knows other Maps.
    """

    __slots__ = ("_commits", "_log", "_sequence")

    def __init__(
        self, commits: immutables.Map[str, Commit], log: ChangeLog | None = None, sequence: int = 0
    ) -> None:
        self._commits = commits
        self._log = log
        self._sequence = sequence

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

    def changed_since(self, other: Mapping[str, Commit]) -> set[str] | None:
        """The keys whose commits may differ between ``other``, another view of the same
        mirror, and this one (in either order); ``None`` when that is not known."""
        if not isinstance(other, MirrorView) or self._log is None or other._log is not self._log:
            return None
        older, newer = sorted((self._sequence, other._sequence))
        return self._log.between(older, newer)


_EMPTY_VIEW: Mapping[str, Commit] = MirrorView(immutables.Map())


def _answer_key(answer: tuple[_KeyWatch, bytes, int]) -> str:
    return answer[0].key


class MirrorValues(Mapping[str, Any]):
    """A mirror's values, live: key -> ``commit.value``, read from the newest view at each access.

    A value is deserialized at its first read and kept with its commit, so a key nobody reads
    costs nothing and a key that has not changed is not deserialized again. ``keys()``,
    ``values()`` and ``items()`` each walk one view, so one loop sees one consistent state
    (``dict(m.items())`` is a consistent copy); separate reads (``m[a]``, then ``m[b]``) may
    see a change in between.

    :raises PayloadDeserializationError: (reading a value) the payload does not deserialize.
    """

    __slots__ = ("_mirror",)

    def __init__(self, mirror: CommitMirror) -> None:
        self._mirror = mirror

    def __getitem__(self, key: str) -> Any:
        return self._mirror.current[key].value

    def get(self, key: str, default: Any = None) -> Any:
        commit = self._mirror.current.get(key)
        return default if commit is None else commit.value

    def __contains__(self, key: object) -> bool:
        return key in self._mirror.current

    def __iter__(self) -> Iterator[str]:
        return iter(self._mirror.current)

    def __len__(self) -> int:
        return len(self._mirror.current)

    def keys(self) -> KeysView[str]:
        return _ValuesSnapshot(self._mirror.current).keys()

    def items(self) -> ItemsView[str, Any]:
        return _ValuesSnapshot(self._mirror.current).items()

    def values(self) -> ValuesView[Any]:
        return _ValuesSnapshot(self._mirror.current).values()

    def __repr__(self) -> str:
        return f"MirrorValues({self._mirror!r})"


class _ValuesSnapshot(Mapping[str, Any]):
    """The values of one view (what ``MirrorValues``' views walk)."""

    __slots__ = ("_commits",)

    def __init__(self, commits: Mapping[str, Commit]) -> None:
        self._commits = commits

    def __getitem__(self, key: str) -> Any:
        return self._commits[key].value

    def __iter__(self) -> Iterator[str]:
        return iter(self._commits)

    def __len__(self) -> int:
        return len(self._commits)


class CommitMirror:
    """A live, immutable view of every parseable znode under a keeper's ``data/``.

    Driven by a watched listing of ``data/`` (its own thread, see ``_list_children``) and a
    watched read of each key (asynchronous: answers and watch events arrive on kazoo's thread,
    which only parses and swaps in-memory state). Each change replaces ``current`` with a new
    read-only mapping, so a reader holding one mapping sees a consistent snapshot, and
    notifies subscribers. After a session loss (watches gone) every key is read again.

    The same machinery mirrors ``deleted/`` (``keeper.deletions_mirror()``): its source then
    names that path, and ``noun`` ("Deletion") what its log lines talk about.
    """

    def __init__(self, keeper: ZnodeSource, noun: str = "Commit") -> None:
        self.keeper = keeper
        self.client = keeper.client
        self.data_path = keeper.data_path
        # What one znode is, in log lines: "Commit" under data/, "Deletion" under deleted/.
        self.noun = noun
        self._lock = threading.RLock()
        # A persistent map: a change makes a new one in O(log n), sharing the rest, so the
        # view handed to readers is never copied (a dict copy of 100k keys per change made
        # every commit, and a first publish, cost O(keys)).
        self._commits: immutables.Map[str, Commit] = immutables.Map()
        self._unparseable: set[str] = set()
        # key -> (commit, its znode's stat version) as last read: what a writer's
        # compare-and-set can start from instead of reading the znode again.
        self._versions: dict[str, tuple[Commit, int]] = {}
        self._watches: dict[str, _KeyWatch] = {}
        self._current: Mapping[str, Commit] = _EMPTY_VIEW
        self._changes = ChangeLog()
        self._subscribers: list[Callable[[Mapping[str, Commit]], object]] = []
        self._session_lost = False
        #: Unix time the connection to ZooKeeper dropped, until every key has been read
        #: again after the reconnect; ``None`` while the view follows ZooKeeper.
        self.stale_since: float | None = None
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

    def values(self) -> MirrorValues:
        """A live mapping key -> value (``commit.value``, with the keeper's deserialization)."""
        return MirrorValues(self)

    def znode_version(self, key: str) -> tuple[Commit, int] | None:
        """``(commit, stat version)`` of ``key``'s znode as last read, or ``None``.

        Possibly behind ZooKeeper (a change in flight): only good as the expected version
        of a compare-and-set, which fails when it is.
        """
        return self._versions.get(key)

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
        failing_since: float | None = None
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
                    self.keeper.wait_for(self.client.ensure_path_async(self.data_path), deadline)
                    ensured = True
                try:
                    children = self.keeper.wait_for(
                        self.client.get_children_async(self.data_path, watch=on_event), deadline
                    )
                except NoNodeError:
                    children = []
                    exists = self.client.exists_async(self.data_path, watch=on_event)
                    if self.keeper.wait_for(exists, deadline) is not None:
                        changed.set()  # created in between: list it right away
            except KeeperError as exc:
                # A client started with start_async() refuses requests until its connection
                # thread runs: every boot met that once, and a warning for it cried wolf.
                failing_since = failing_since or listed_at
                quiet = listed_at - failing_since < self.keeper.timeout
                log.log(
                    logging.DEBUG if quiet else logging.WARNING,
                    "Mirror of %s: cannot list keys yet: %s",
                    self.data_path,
                    exc,
                )
                self._closing.wait(pause)
                pause = min(pause * 2, 1.0)
                continue
            pause = 0.1
            failing_since = None
            self.listings += 1
            new = self._on_children(children)
            took = time.monotonic() - listed_at
            interval = min(
                max(CHILDREN_RELIST_INTERVAL, took / CHILDREN_LISTING_SHARE),
                CHILDREN_RELIST_MAX_INTERVAL,
            )
            # After timing the listing: issuing 100k first reads is not a cost of listing.
            if new and new[0].initial:
                self._read_first(new)
            else:
                self._read_keys(new)
            changed.wait()
            self._closing.wait(max(0.0, listed_at + interval - time.monotonic()))

    def _read_key(self, kw: _KeyWatch) -> None:
        """Read ``kw``'s znode and leave a watch on it; the answer comes to ``_on_read``."""
        if not kw.retired:
            self.client.get_async(kw.path, watch=kw.on_event).rawlink(partial(self._on_read, kw))

    def _read_keys(self, kws: list[_KeyWatch]) -> None:
        """``_read_key`` each of ``kws``, with at most ``READS_IN_FLIGHT`` unanswered.

        Issued all at once, 10k reads made this thread race kazoo's connection thread for
        the GIL (one wake-up write per request) and a start-up cost ~1.4x the same reads
        pipelined with a bound.
        """
        if len(kws) <= READS_IN_FLIGHT:
            for kw in kws:
                self._read_key(kw)
            return
        slots = threading.Semaphore(READS_IN_FLIGHT)

        def answered(kw: _KeyWatch, result: Any) -> None:
            slots.release()
            self._on_read(kw, result)

        for kw in kws:
            if kw.retired:
                continue
            # Bounded: a connection lost meanwhile fails the reads (releasing their slots),
            # and the wait is only a pacing, so give up waiting rather than hang.
            slots.acquire(timeout=self.keeper.timeout)
            self.client.get_async(kw.path, watch=kw.on_event).rawlink(partial(answered, kw))

    def _read_first(self, kws: list[_KeyWatch]) -> None:
        """The first listing's reads, at most ``READS_IN_FLIGHT`` unanswered, collected here
        in order and then parsed and applied in one go.

        Each answer parsed on kazoo's callback thread as it arrived kept that thread taking
        the GIL from the connection thread between answers: with 10k keys that, not the
        parsing, made a start-up ~1.4x the bare reads. Nothing is published before the first
        complete view anyway. A key whose watch fires before the answers are applied is read
        again and applied as usual; its first answer, older, is then dropped.
        """
        answers: list[tuple[_KeyWatch, bytes, int]] = []
        pending: collections.deque[tuple[_KeyWatch, Any]] = collections.deque()

        def collect(kw: _KeyWatch, result: Any) -> None:
            try:
                data, stat = result.get(timeout=self.keeper.timeout)
            except Exception:
                # Absent (an exists watch then waits for it), or the connection dropped
                # (read again once connected), or no answer yet: as any read.
                result.rawlink(partial(self._on_read, kw))
            else:
                answers.append((kw, data, stat.version))

        for kw in kws:
            pending.append((kw, self.client.get_async(kw.path, watch=kw.on_event)))
            if len(pending) >= READS_IN_FLIGHT:
                collect(*pending.popleft())
        while pending:
            collect(*pending.popleft())
        self._apply_first(answers)

    def _apply_first(self, answers: list[tuple[_KeyWatch, bytes, int]]) -> None:
        """Parse and apply the first reads' answers at once (see ``_read_first``)."""
        with self._lock:
            if self._closed:
                return
            commits = self._commits.mutate()
            # Parsed in key order, the commits lie in memory in the order a listing walks
            # them. In ZooKeeper's order of answers (its hash order), a listing of 100k keys,
            # past the CPU's cache, missed it on every commit: 400 ms against 303 in key order.
            answers.sort(key=_answer_key)
            for kw, data, znode_version in answers:
                key = kw.key
                if self._watches.get(key) is not kw or kw.updated:
                    continue  # retired since, or a newer answer was applied
                kw.updated = True
                try:
                    commit = parse_znode(key, data, self.keeper.deserialization)
                except InvalidCommit as exc:
                    self._unparseable.add(key)
                    commits.pop(key, None)
                    self._versions.pop(key, None)
                    log.error(
                        "%s added with bad serialization: %s: %s, data = %s",
                        self.noun,
                        key,
                        exc,
                        describe_size(data),
                    )
                else:
                    self._unparseable.discard(key)
                    commits[key] = commit
                    self._versions[key] = (commit, znode_version)
                if self._awaiting is not None:
                    self._awaiting.discard(key)
            self._commits = commits.finish()
            self._changes.note_all()
            if self.initialized:
                self._publish()  # only if every key listed first was also read again
            else:
                self._check_initialized()

    def _reread(self, everything: bool) -> None:
        """Read again every key (the session was lost, and its watches with it) or the stale."""
        with self._lock:
            keys = [kw for kw in self._watches.values() if everything or kw.stale]
        for kw in keys:
            kw.stale = False
        self._read_keys(keys)
        # The reads are in flight on the live connection, queued ahead of any later change's
        # notification: the view follows ZooKeeper again.
        if self.client.connected:
            self.stale_since = None
        if keys:
            log.info("Mirror of %s: reading %d keys again after reconnecting", self.data_path,
                     len(keys))

    # ------------------------------------------------------------------ kazoo callbacks

    def _on_key_event(self, kw: _KeyWatch, event: Any) -> None:
        """A key's watch fired: read it again, which also leaves the next watch."""
        # NONE: the connection dropped and kazoo fired every watch to say they are gone;
        # _on_state reads all keys again once connected.
        if not kw.retired and event.type != EventType.NONE:
            self._read_key(kw)

    def _on_read(self, kw: _KeyWatch, result: Any) -> None:
        try:
            data, stat = result.get()
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
        self._on_data(kw, data, stat.version)

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
        if state in (KazooState.LOST, KazooState.SUSPENDED):
            # kazoo drops every watch when the connection drops, not only when the session
            # expires (it resets its watchers on SUSPENDED and sends no SetWatches on the
            # reconnect): every key must be read again, which leaves new watches.
            self._session_lost = True
            if self.stale_since is None:
                self.stale_since = time.time()
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
                self._versions.pop(key, None)
                if key in self._commits:
                    self._commits = self._commits.delete(key)
                    self._changes.note(key)
                    changed = True
                    log.info("%s removed: %s", self.noun, key)
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

    def _on_data(self, kw: _KeyWatch, data: bytes | None, znode_version: int = -1) -> None:
        """A key's znode (``None``: absent): parse and swap the view. No ZooKeeper calls here."""
        with self._lock:
            if self._closed or self._watches.get(kw.key) is not kw:
                return  # retired since the read was sent
            kw.updated = True
            key = kw.key
            changed = False
            self._versions.pop(key, None)
            if data is None:
                self._unparseable.discard(key)
                if key in self._commits:
                    self._commits = self._commits.delete(key)
                    self._changes.note(key)
                    changed = True
                    log.info("%s removed: %s", self.noun, key)
            else:
                try:
                    # The payload is not deserialized here (kazoo's thread, every change):
                    # a value is made when a reader first asks for it.
                    commit = parse_znode(key, data, self.keeper.deserialization)
                except InvalidCommit as exc:
                    self._unparseable.add(key)
                    log.error(
                        "%s %s with bad serialization: %s: %s, data = %s",
                        self.noun,
                        "added" if key not in self._commits else "updated",
                        key,
                        exc,
                        describe_size(data),
                    )
                    if key in self._commits:
                        self._commits = self._commits.delete(key)
                        self._changes.note(key)
                        changed = True
                else:
                    self._unparseable.discard(key)
                    previous = self._commits.get(key)
                    self._versions[key] = (commit, znode_version)
                    if previous != commit:
                        self._commits = self._commits.set(key, commit)
                        self._changes.note(key)
                        changed = True
                        if self.initialized:
                            # DEBUG: every process logs every change; one commit of a
                            # busy journal was several INFO lines per process.
                            log.debug(
                                "%s %s: %s: %s",
                                self.noun,
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
        view = MirrorView(self._commits, self._changes, self._changes.sequence)
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


__all__ = ["ChangeLog", "CommitMirror", "MirrorValues", "MirrorView"]
