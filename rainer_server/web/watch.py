"""Watching: one notifier per process follows the journal's feed and wakes waiting requests.

A request that waits (a blocking read, a feed with ``wait``) registers a ``Waiter`` saying
which keys it cares about and the index it has seen; the process's ``WatchHub`` reads the
feed from the database once per change (never once per watcher; while no request waits, at
most once per ``IDLE_BATCH``) and sets the event of each waiter a new commit concerns. What
wakes the hub:

* with ZooKeeper, every change of this process's mirror (its watches see a commit made on any
  worker of any host within milliseconds), and a save made by this process;
* always, a poll of the feed every ``poll_interval`` seconds: the only wake-up without
  ZooKeeper (every 0.25 s), and the safety net with it (every second: a commit ZooKeeper
  never got is still seen).

With a mirror, the hub also knows every key's head (version, index, tombstone) as of its
index, read once at start and then kept from the feed. The mirror carries no indexes (its
znodes keep the original's format), so this is where a mirror-backed answer finds the index
it sends, and how it knows whether the mirror already shows everything up to that index
(``mirror_index``): an answer never claims an index its body does not include.

Threads and locks are the standard library's: under gunicorn's gevent worker they are
monkey-patched into greenlets and cooperative events, so a waiting request costs a greenlet
and an event, not a worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

from rainer_server.commit import Commit
from rainer_server.errors import RainerError
from rainer_server.storage.db import release

log = logging.getLogger(__name__)

#: Seconds between two polls of the feed: the wake-up bound without ZooKeeper...
POLL_INTERVAL = 0.25
#: ...and with it, where the mirror wakes the hub at once and the poll is only the safety net
#: (a commit ZooKeeper never got); every worker of every host polls.
MIRRORED_POLL_INTERVAL = 1.0
#: Commits read per feed query while catching up.
FEED_PAGE = 1000
#: Seconds the hub lets changes pile up while no request waits, so that under a stream of
#: writes each worker reads the feed once per batch, not once per commit (a fifth of a
#: worker's CPU under POST load). A request that starts waiting ends the pause at once.
IDLE_BATCH = 0.05

KeyTest = Callable[[str], bool]


class Waiter:
    """One waiting request: wakes for a commit above ``after`` of a key it wants."""

    __slots__ = ("key", "wants", "after", "event")

    def __init__(self, key: str | None, wants: KeyTest | None, after: int) -> None:
        #: A single key (looked up directly), or ``None`` with ``wants`` testing keys.
        self.key = key
        self.wants = wants
        self.after = after
        self.event = threading.Event()

    def concerns(self, commit: Commit) -> bool:
        if commit.index is None or commit.index <= self.after:
            return False
        if self.key is not None:
            return commit.key == self.key
        return self.wants is None or self.wants(commit.key)


class WatchHub:
    """The process's notifier (see the module's docstring).

    :param storage: the journal (a ``CommitFeed``: ``last_index`` and ``changes``), or a
        function returning it (called on the hub's thread: it may start the storage).
    :param mirror: this process's ZooKeeper mirror, or ``None``.
    """

    def __init__(self, storage: Any, mirror: Any = None, poll_interval: float | None = None) -> None:
        self._storage = storage
        self.storage: Any = None
        self.mirror = mirror
        if poll_interval is None:
            poll_interval = POLL_INTERVAL if mirror is None else MIRRORED_POLL_INTERVAL
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._poke = threading.Event()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._registered = threading.Event()
        # Whether anything changed since the feed was last read, and who reads it: the hub's
        # thread, or an answer that needs the index now (``_caught_up``).
        self._changed = False
        self._reading = threading.Lock()
        self._thread: threading.Thread | None = None
        self._key_waiters: dict[str, set[Waiter]] = {}
        self._other_waiters: set[Waiter] = set()
        #: The feed's position: every commit up to here has been read and announced.
        self.index = 0
        #: With a mirror: key -> (version, index, empty) of every head as of ``index``.
        self.heads: dict[str, tuple[int, int, bool]] = {}
        # With a mirror: heads the mirror did not show yet, key -> (version, index, empty).
        self._unmirrored: dict[str, tuple[int, int, bool]] = {}
        # The newest mirror view ``_unmirrored`` was checked against: the next check only
        # looks at the keys changed since (a drifted ZooKeeper leaves thousands unmirrored,
        # and the mirror changes with every commit).
        self._checked_view: Mapping[str, Commit] | None = None
        # Heads read from the database by an answer ahead of the feed: key -> (version, index).
        self._learned: dict[str, tuple[int, int]] = {}
        self._unsubscribe: Callable[[], None] | None = None
        #: Whether the process is shutting down: waiting requests answer at once.
        self.stopping = False
        #: Whether the last attempt to start following failed (the database is down).
        self.failing = False

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Start following the feed (returns at once; ``ready`` once the position is known)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="rainer-watch", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def stop(self) -> None:
        """Wake every waiting request (they answer with what they have) and stop following."""
        self.stopping = True
        self._stopping.set()
        self._poke.set()
        self._registered.set()
        with self._lock:
            waiters = self._all_waiters()
        for waiter in waiters:
            waiter.event.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2)

    def poke(self, *_args: object) -> None:
        """Something changed (the mirror, a save here): read the feed now."""
        self._changed = True
        self._poke.set()

    def _run(self) -> None:
        pause = self.poll_interval
        while not self._stopping.is_set():
            try:
                if self.storage is None:
                    self.storage = self._storage() if callable(self._storage) else self._storage
                if not self._ready.is_set():
                    self._begin()
                self._catch_up()
                pause = self.poll_interval
                self.failing = False
            except RainerError as exc:  # the database is unreachable: try again, slower
                if not self.failing:
                    log.warning("Watch: cannot read the journal's feed: %s", exc)
                self.failing = True
                pause = min(pause * 2, 5.0)
            except Exception:
                log.exception("Watch: reading the feed failed")
                self.failing = True
                pause = min(pause * 2, 5.0)
            finally:
                database = getattr(self.storage, "database", None)
                if database is not None:
                    release(database)
            self._poke.wait(pause)
            self._poke.clear()
            # Cleared before looking, so a request registering after the look ends the pause.
            self._registered.clear()
            if not self.waiting:
                self._registered.wait(IDLE_BATCH)

    def _begin(self) -> None:
        index = self.storage.last_index()
        if self.mirror is not None:
            # Every head as of at least ``index`` (read after it): what the mirror must show.
            heads = {
                key: (c.version, c.index or 0, c.empty) for key, c in self.storage.heads().items()
            }
            with self._lock:
                self.heads = heads
                self._unmirrored = dict(heads)
                self._checked_view = None
                self.index = max([index, *(h[1] for h in heads.values())])
                waiters = self._all_waiters()
            self._unsubscribe = self.mirror.subscribe(self._on_view)
            self._on_view(self.mirror.current)
        else:
            with self._lock:
                self.index = index
                waiters = self._all_waiters()
        self._ready.set()
        # The position jumped from 0 to ``index`` without announcing the commits in between:
        # a request registered before (its answer read an older index) may be waiting for one
        # of them, and the feed will never show it again. Wake every such waiter: it reads
        # again and waits again if nothing it wants changed, so a spurious wake costs one
        # read. Waiters registered from here on read after the jump, and the feed has the rest.
        for waiter in waiters:
            waiter.event.set()
        log.debug("Watch: following the journal from index %s", self.index)

    # ------------------------------------------------------------------ the feed

    def _catch_up(self) -> None:
        with self._reading:
            self._changed = False
            while True:
                page = self.storage.changes(self.index, FEED_PAGE)
                if not page:
                    return
                self._announce(page)
                if len(page) < FEED_PAGE:
                    return

    def _caught_up(self) -> None:
        """Read the feed now if anything changed since the last read: an answer is about to
        claim the hub's index, and the hub may be pausing (``IDLE_BATCH``)."""
        if not self._changed or not self._ready.is_set():
            return
        try:
            self._catch_up()
        except RainerError:
            pass  # the database is down: the index as last read, which the mirror shows

    def _announce(self, commits: list[Commit]) -> None:
        woken: list[Waiter] = []
        announced: list[str] = []
        with self._lock:
            for commit in commits:
                if commit.index is None or commit.index <= self.index:
                    continue
                self.index = commit.index
                if self.mirror is not None:
                    head = (commit.version, commit.index, commit.empty)
                    self.heads[commit.key] = head
                    self._unmirrored[commit.key] = head
                    announced.append(commit.key)
                for waiter in self._key_waiters.get(commit.key, ()):
                    if waiter.concerns(commit):
                        woken.append(waiter)
                for waiter in self._other_waiters:
                    if waiter.concerns(commit):
                        woken.append(waiter)
        if self.mirror is not None:
            # The mirror may show these already (it often hears of a commit before the feed).
            self._forget_mirrored(announced)
        for waiter in woken:
            waiter.event.set()

    def _on_view(self, _view: Mapping[str, Commit]) -> None:
        # On kazoo's thread (a mirror subscriber): in-memory work only, then poke the loop.
        self._forget_mirrored()
        self.poke()

    def _forget_mirrored(self, announced: Iterable[str] = ()) -> None:
        """Drop from ``_unmirrored`` what the mirror's newest view shows: the keys just
        ``announced`` and those the mirror changed since the last check; every key when the
        mirror cannot say which changed."""
        with self._lock:
            # Read under the lock, so the checked view only moves forward.
            view = self.mirror.current
            changed = None
            if self._checked_view is not None and hasattr(view, "changed_since"):
                changed = view.changed_since(self._checked_view)
            self._checked_view = view
            if changed is None:
                candidates: Iterable[str] = list(self._unmirrored)
            else:
                changed.update(announced)
                candidates = [k for k in changed if k in self._unmirrored]
            for key in candidates:
                if _shows(view, key, self._unmirrored[key]):
                    del self._unmirrored[key]

    # ------------------------------------------------------------------ what answers read

    def mirror_index(self) -> int | None:
        """The index up to which the mirror shows every head, when that is the hub's whole
        position (the mirror is not behind the journal as far as the hub knows); else
        ``None``: answer from the database."""
        if not self._ready.is_set():
            return None
        self._caught_up()
        with self._lock:
            return None if self._unmirrored else self.index

    def head_index(self, key: str, version: int) -> int | None:
        """The index of ``key`` at ``version`` when that is its head as far as the hub knows."""
        head = self.heads.get(key)
        if head is not None and head[0] == version:
            return head[1]
        learned = self._learned.get(key)
        return learned[1] if learned is not None and learned[0] == version else None

    def learn(self, commit: Commit) -> None:
        """Remember the index of a head an answer read from the database (the mirror showed
        it before the feed did), so the next answer needs no database."""
        if commit.index is not None:
            learned = self._learned.get(commit.key)
            if learned is None or learned[0] < commit.version:
                self._learned[commit.key] = (commit.version, commit.index)

    def newest_index(self, wants: KeyTest | None) -> int:
        """The index of the newest head (tombstones too) of the keys ``wants``; 0 if none."""
        heads = self.heads
        if wants is None:
            return self.index
        return max((h[1] for k, h in list(heads.items()) if wants(k)), default=0)

    # ------------------------------------------------------------------ waiting

    def register(self, after: int, key: str | None = None, wants: KeyTest | None = None) -> Waiter:
        """A waiter for commits above ``after`` of ``key`` (or of the keys ``wants``; every
        key when both are ``None``). Register before reading what is current, so that a
        commit landing in between wakes it. ``unregister`` it when done."""
        waiter = Waiter(key, wants, after)
        with self._lock:
            if key is not None:
                self._key_waiters.setdefault(key, set()).add(waiter)
            else:
                self._other_waiters.add(waiter)
        self._registered.set()
        if self.stopping:
            waiter.event.set()
        return waiter

    def unregister(self, waiter: Waiter) -> None:
        with self._lock:
            if waiter.key is not None:
                waiters = self._key_waiters.get(waiter.key)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._key_waiters[waiter.key]
            else:
                self._other_waiters.discard(waiter)

    def _all_waiters(self) -> list[Waiter]:
        # Under ``_lock``.
        return [*self._other_waiters, *(w for ws in self._key_waiters.values() for w in ws)]

    @property
    def waiting(self) -> int:
        """How many requests are waiting."""
        with self._lock:
            return len(self._other_waiters) + sum(map(len, self._key_waiters.values()))


def _shows(view: Mapping[str, Commit], key: str, head: tuple[int, int, bool]) -> bool:
    """Whether the mirror ``view`` shows ``key`` at ``head`` or later."""
    version, _index, empty = head
    current = view.get(key)
    if empty:
        # A tombstone leaves no znode: the key is gone, or already at a newer version.
        return current is None or current.version > version
    return current is not None and current.version >= version


__all__ = ["POLL_INTERVAL", "WatchHub", "Waiter"]
