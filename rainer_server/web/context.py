"""The running service behind a Flask app: settings, storage, ZooKeeper, and response caches.

Views, commands and middleware reach it with ``get_rainer()``. Nothing is opened when it is
made: the database on first use, ZooKeeper on first use or from gunicorn's
``post_worker_init`` hook, once per process. So ``preload_app`` forks no sockets and no threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from flask import current_app

from rainer_server import metrics
from rainer_server.commit import Commit
from rainer_server.errors import ConfigurationError
from rainer_server.errors import StorageUnavailable
from rainer_server.payloads import Payloads
from rainer_server.payloads import make_payloads
from rainer_server.settings import Settings
from rainer_server.storage import CommitStorage
from rainer_server.storage.db import DbCommitStorage
from rainer_server.storage.db import check_database
from rainer_server.storage.db import open_database
from rainer_server.storage.db import release
from rainer_server.web.auth import Gate
from rainer_server.web.listing import ListingFragments
from rainer_server.web.watch import WatchHub
from rainer_server.zk.keeper import CommitKeeper
from rainer_server.zk.keeper import make_kazoo_client
from rainer_server.zk.mirror import CommitMirror
from rainer_server.zk.rainers import Rainers

log = logging.getLogger(__name__)


#: Seconds a cached version is trusted. A version never changes while its journal lives, but a
#: database restored from an older backup (or replaced under the same URL) may hold another
#: commit under a number this process has cached: after this long it is read again.
VERSION_CACHE_TTL = 60.0
#: What one entry costs besides its payload and key (the Commit, its strings, the LRU's node).
_ENTRY_OVERHEAD = 400


class VersionCache:
    """An LRU of ``(key, version) -> Commit`` for ``GET /<key>/<version>``, bounded by bytes.

    Requests of one process (greenlets or threads) share it; each entry expires after
    ``ttl`` seconds. Only commits the storage returned are kept: a missing version is read
    again each time (it may be written a moment later).
    """

    def __init__(self, max_bytes: int, ttl: float = VERSION_CACHE_TTL) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.bytes = 0
        self._entries: OrderedDict[tuple[str, int], tuple[Commit, float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, version: int) -> Commit | None:
        with self._lock:
            entry = self._entries.get((key, version))
            if entry is None:
                return None
            commit, expires, size = entry
            if time.monotonic() >= expires:
                del self._entries[(key, version)]
                self.bytes -= size
                return None
            self._entries.move_to_end((key, version))
            return commit

    def put(self, commit: Commit) -> None:
        size = len(commit.payload or b"") + len(commit.key) * 2 + _ENTRY_OVERHEAD
        if size > self.max_bytes:
            return  # would push everything else out
        item = (commit.key, commit.version)
        with self._lock:
            old = self._entries.pop(item, None)
            if old is not None:
                self.bytes -= old[2]
            self._entries[item] = (commit, time.monotonic() + self.ttl, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


class RainerContext:
    """One app's Rainer state, kept at ``app.extensions["rainer"]`` (``Rainer`` extends it
    with the Flask wiring).

    :param storage: a storage to serve instead of the one ``RAINER_DATABASE_URL`` names;
        the embedding app owns its lifecycle.
    """

    def __init__(self, storage: CommitStorage | None = None) -> None:
        self._given_storage = storage
        self._database_storage: CommitStorage | None = storage
        self._database_started = False
        self._lock = threading.RLock()
        self.settings: Settings = Settings()
        # The settings' payload format: a POST's payload must deserialize with it.
        self.payloads: Payloads = make_payloads()
        # Anyone may do anything until init_app reads the settings.
        self.gate = Gate(self.settings, None)
        # Serialised lists by query flags: (heads token or mirror view, body).
        self.list_cache: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        # Each mirror commit's member of a listing, serialised once per change of its key.
        self.listing = ListingFragments()
        # GET /<key>/<version>: immutable, so repeat reads need no database (init_app sizes it).
        self.version_cache = VersionCache(self.settings.version_cache_bytes)
        # Mirror-backed payload GETs: key -> (commit, its response headers).
        self.prepared_headers: dict[str, tuple[Any, list[tuple[str, str]]]] = {}
        # A kazoo client (typed loosely: kazoo is imported under zk/ only).
        self.zk_client: Any = None
        self.rainers: Rainers | None = None
        self.mirror: CommitMirror | None = None
        # Signs the console's session cookies (an itsdangerous serializer), when it is on.
        self.console_sessions: Any = None
        self._watch_hub: WatchHub | None = None

    # ------------------------------------------------------------------ storage

    @property
    def database_storage(self) -> CommitStorage:
        """The system of record (reads and writes, no ZooKeeper), started on first use."""
        if not self._database_started:
            with self._lock:
                if self._database_storage is None:
                    self._database_storage = self.open_storage()
                if not self._database_started:
                    self._database_storage.start()
                    self._database_started = True
        assert self._database_storage is not None
        return self._database_storage

    @property
    def storage(self) -> CommitStorage:
        """The storage to use for writes: keeper-publishing when ZooKeeper is configured."""
        storage = self.database_storage
        if self.settings.zk_hosts:
            self.start_zookeeper()
            assert self.rainers is not None
            return self.rainers.storage
        return storage

    def open_storage(self) -> CommitStorage:
        """A new, unstarted storage as the settings describe it."""
        database = open_database(self.settings.database_url, self.settings.database_timeout)
        return DbCommitStorage(database, self.settings.table)

    def release_connections(self) -> None:
        """Give this greenlet's pooled database connections back (see ``release``): at the end
        of every request, and before a request waits."""
        database = getattr(self._database_storage, "database", None)
        if database is not None:
            release(database)
        tokens = self.gate.tokens
        if tokens is not None:
            release(tokens.database)

    def check_database(self) -> None:
        """Connect to the configured database once and close again: refuse a setting the
        database will never accept, and only log one it cannot reach right now (requests then
        get 503 until it answers; an outage must not stop a restart).

        Call it once per start, not per request (``rainer_server.wsgi`` does, in gunicorn's
        master before it forks): it leaves no connection open. Does nothing for a storage
        given to the constructor.

        :raises ConfigurationError: naming ``RAINER_DATABASE_URL``: unknown database, access
            denied, an SQLite file that cannot be opened.
        """
        if self._given_storage is not None:
            return
        try:
            problem = check_database(self.settings.database_url)
        except ConfigurationError as exc:
            raise ConfigurationError(f"Invalid setting RAINER_DATABASE_URL: {exc}") from None
        if problem is not None:
            log.warning(
                "Database unavailable at startup, starting anyway (requests get 503 until it "
                "answers): %s",
                problem,
            )
            return
        # Create the journal, or bring an earlier one up to date, now rather than in the
        # first request (chaining a big old journal takes a while), then let go of the
        # connection before gunicorn forks.
        storage = self.open_storage()
        try:
            storage.start()
        except StorageUnavailable as exc:
            log.warning("Cannot prepare the journal at startup: %s", exc.detail or exc)
        finally:
            storage.stop()

    # ------------------------------------------------------------------ ZooKeeper

    def cached_view(self) -> CommitMirror | None:
        """This process's mirror when it is complete, following ZooKeeper and placed in the
        index by the watch hub (or the hub cannot read the database at all: then the mirror
        still serves, without indexes), for cached reads; else ``None``, and reads go to the
        database: while ZooKeeper is out of reach (a lost quorum, a partition) the mirror
        cannot see changes, the journal can."""
        if not self.settings.zk_hosts:
            return None
        self.start_zookeeper()
        mirror, hub = self.mirror, self._watch_hub
        if mirror is None or not mirror.initialized or mirror.stale_since is not None:
            return None
        if hub is None:
            return None
        return mirror if hub.ready or hub.failing else None

    def start_zookeeper(self) -> None:
        """Connect to ZooKeeper, open the mirror and join the publisher election.

        Returns at once: the connection, the mirror and the election complete in the
        background, and reads fall back to the database until the mirror is complete. Does
        nothing when ZooKeeper is not configured or already started. Call it after forking.
        """
        if self.rainers is not None or not self.settings.zk_hosts:
            return
        with self._lock:
            if self.rainers is not None:
                return
            settings = self.settings
            client = make_kazoo_client(settings.zk_hosts, settings.zk_session_timeout)
            # start_async: a ZooKeeper that is down at boot must not hold up requests; the
            # database is the system of record and kazoo keeps trying in the background.
            client.start_async()
            mirror = CommitKeeper(client, settings.zk_path).mirror(wait=False)
            self._ensure_database_storage_object()
            assert self._database_storage is not None
            rainers = Rainers.create(
                client,
                settings.zk_path,
                self._database_storage,
                period=settings.publish_period,
                fuzz=settings.publish_fuzz,
                mirror=mirror,
            )
            # Before the publisher starts, so that no leadership change is missed.
            rainers.report_to(metrics.metrics().zookeeper, mirror)
            if rainers.drift_repair is not None:
                rainers.drift_repair.start()
            rainers.auto_publisher.start()
            self.zk_client, self.mirror, self.rainers = client, mirror, rainers
            # With the mirror: its changes wake watchers, and place its commits in the index.
            self._start_watching()
            log.info("Rainer connected to ZooKeeper at %s%s", settings.zk_hosts, settings.zk_path)

    def _ensure_database_storage_object(self) -> None:
        # The publisher needs the storage object now; it is started (table created) on first use.
        if self._database_storage is None:
            self._database_storage = self.open_storage()

    # ------------------------------------------------------------------ watching

    @property
    def watch_hub(self) -> WatchHub:
        """This process's notifier of new commits (started on first use, or with ZooKeeper)."""
        hub = self._watch_hub
        if hub is None:
            self.start_zookeeper()
            hub = self._start_watching()
        return hub

    def _start_watching(self) -> WatchHub:
        with self._lock:
            hub = self._watch_hub
            if hub is None:
                # The storage is started on the hub's thread: ZooKeeper's start
                # (post_worker_init) must not wait for the database.
                hub = self._watch_hub = WatchHub(lambda: self.database_storage, self.mirror)
                hub.start()
        return hub

    def watching(self) -> WatchHub | None:
        """The notifier when it has been started, else ``None`` (nothing is started)."""
        return self._watch_hub

    def stop_watching(self) -> None:
        """Answer every waiting request now (shutdown, reload)."""
        hub = self._watch_hub
        if hub is not None:
            hub.stop()

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Leave the election, close the mirror and ZooKeeper, release the storage we opened."""
        with self._lock:
            hub, self._watch_hub = self._watch_hub, None
        if hub is not None:
            hub.stop()
        with self._lock:
            rainers, mirror, client = self.rainers, self.mirror, self.zk_client
            self.rainers = self.mirror = self.zk_client = None
            if rainers is not None:
                rainers.auto_publisher.close()
                if rainers.drift_repair is not None:
                    rainers.drift_repair.close()
            if mirror is not None:
                mirror.close()
            if client is not None:
                client.stop()
                client.close()
            storage = self._database_storage
            if storage is not None and storage is not self._given_storage:
                storage.stop()
                self._database_storage = None
                self._database_started = False




def get_rainer(app: Any = None) -> RainerContext:
    """The Rainer state of ``app`` (default: the current app)."""
    return (app or current_app).extensions["rainer"]
