"""Prometheus metrics: what they are, how events reach them, and the text exposition.

Under gunicorn every worker is its own process, so the metrics use prometheus_client's
multiprocess mode: ``config/gunicorn.conf.py`` sets ``PROMETHEUS_MULTIPROC_DIR`` before
anything imports prometheus_client, each process writes its values to files there, and a
scrape (answered by whichever worker) adds them up. Without that variable (``flask run``,
tests, an embedding app) the default in-process registry is used.

Metrics are created on first use, once per process, so importing this module or building
an app touches no files. Per-worker state (ZooKeeper connection, mirror, leadership) is set
when it changes, never computed at scrape time: the scraping worker cannot see the others.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Request latencies: a cached read is ~1 ms, a MySQL write ~10 ms, a full listing of 100k
# keys some hundred ms; anything past 10 s is a timeout in the making.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_PASS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"))
_KEY_RESULTS = ("created", "updated", "deleted", "unchanged", "refused", "failed")
_lock = threading.RLock()


def multiprocess_mode() -> bool:
    """Whether values are shared through ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's test)."""
    return MULTIPROC_ENV in os.environ or MULTIPROC_ENV.lower() in os.environ


class RainerMetrics:
    """The service's metrics, registered once per process (see ``metrics()``)."""

    def __init__(self) -> None:
        from prometheus_client import Counter
        from prometheus_client import Histogram

        self.requests = Counter(
            "rainer_http_requests",
            "HTTP requests answered, by method, route (the URL rule, not the path) and status.",
            ["method", "route", "status"],
        )
        self.request_seconds = Histogram(
            "rainer_http_request_duration_seconds",
            "Time to answer an HTTP request, by method, route and status.",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
        )
        self.commits_saved = Counter("rainer_commits_saved", "Commits saved through the HTTP API.")
        self.conflicts = Counter(
            "rainer_commit_conflicts", "Writes refused with 409: not the next version of the key."
        )
        self.payloads_rejected = Counter(
            "rainer_payloads_rejected",
            "Payloads refused: too_large (413), malformed (400 Malformed input), "
            "schema (400 with the schema's messages).",
            ["reason"],
        )
        self.access_denied = Counter(
            "rainer_access_denied",
            "Requests refused or distrusted: unauthenticated (401), denied (403), "
            "untrusted_proxy_header (an identity header from a peer not in "
            "RAINER_TRUSTED_PROXIES, ignored).",
            ["reason"],
        )
        # Label values created up front, so every series exists from the first scrape.
        for reason in ("too_large", "malformed", "schema"):
            self.payloads_rejected.labels(reason)
        for reason in ("unauthenticated", "denied", "untrusted_proxy_header"):
            self.access_denied.labels(reason)
        self._zookeeper: ZooKeeperMetrics | None = None
        # As bounded as the series themselves: known methods, the app's routes and statuses.
        self._request_children: dict[tuple[str, str, int], tuple] = {}

    # ------------------------------------------------------------------ HTTP

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        # The labelled children are looked up once per (method, route, status): .labels()
        # takes a lock and validates its arguments, a cost paid on every cached read.
        method = method if method in _METHODS else "other"
        children = self._request_children.get((method, route, status))
        if children is None:
            labels = (method, route, str(status))
            children = (self.requests.labels(*labels), self.request_seconds.labels(*labels))
            self._request_children[(method, route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    # ------------------------------------------------------------------ ZooKeeper

    @property
    def zookeeper(self) -> ZooKeeperMetrics:
        """The ZooKeeper, mirror and publisher metrics, created when first needed: a
        service without ZooKeeper does not export them (a 0 would read as "disconnected")."""
        if self._zookeeper is None:
            with _lock:
                if self._zookeeper is None:
                    self._zookeeper = ZooKeeperMetrics()
        return self._zookeeper


class ZooKeeperMetrics:
    """Per-worker ZooKeeper connection, mirror and publisher metrics."""

    def __init__(self) -> None:
        from prometheus_client import Counter
        from prometheus_client import Gauge
        from prometheus_client import Histogram

        self.publisher_passes = Counter(
            "rainer_publisher_passes",
            "Publisher passes over every head: ran to the end (complete) or stopped (aborted).",
            ["result"],
        )
        self.publisher_pass_seconds = Histogram(
            "rainer_publisher_pass_duration_seconds",
            "Time one publisher pass took.",
            buckets=_PASS_BUCKETS,
        )
        self.publisher_keys = Counter(
            "rainer_publisher_keys",
            "Keys handled by publisher passes, by result (created/updated/deleted were written).",
            ["result"],
        )
        # The most recent pass of any live worker: only the leader passes.
        self.publisher_last_written = Gauge(
            "rainer_publisher_last_pass_keys_written",
            "Keys the most recent publisher pass wrote to ZooKeeper.",
            multiprocess_mode="livemostrecent",
        )
        self.publisher_last_pass = Gauge(
            "rainer_publisher_last_pass_timestamp_seconds",
            "Unix time the most recent publisher pass ended.",
            multiprocess_mode="max",
        )
        # One sample per live worker (label pid in multiprocess mode): who leads, who is
        # connected, how big and how fresh each worker's mirror is.
        self.leader = Gauge(
            "rainer_publisher_leader",
            "1 when this process leads the publisher election (publishes), else 0.",
            multiprocess_mode="liveall",
        )
        self.zk_connected = Gauge(
            "rainer_zookeeper_connected",
            "1 when this process's ZooKeeper client is connected, else 0 (suspended or lost).",
            multiprocess_mode="liveall",
        )
        self.mirror_initialized = Gauge(
            "rainer_mirror_initialized",
            "1 once this process's mirror of ZooKeeper has been complete, else 0.",
            multiprocess_mode="liveall",
        )
        self.mirror_commits = Gauge(
            "rainer_mirror_commits",
            "Commits (keys) in this process's mirror of ZooKeeper.",
            multiprocess_mode="liveall",
        )
        self.mirror_last_update = Gauge(
            "rainer_mirror_last_update_timestamp_seconds",
            "Unix time this process's mirror last changed; its age is time() minus this.",
            multiprocess_mode="liveall",
        )
        for result in ("complete", "aborted"):
            self.publisher_passes.labels(result)
        for result in _KEY_RESULTS:
            self.publisher_keys.labels(result)

    def observe_connection(self, connected: bool) -> None:
        self.zk_connected.set(1 if connected else 0)

    def observe_mirror(self, commits: int, complete: bool) -> None:
        self.mirror_commits.set(commits)
        if complete:
            self.mirror_initialized.set(1)
            self.mirror_last_update.set(time.time())

    def observe_leadership(self, leading: bool) -> None:
        self.leader.set(1 if leading else 0)

    def observe_pass(self, counts: Any) -> None:
        """Count one publisher pass (a ``zk.publisher.PublishCounts``)."""
        self.publisher_passes.labels("aborted" if counts.aborted else "complete").inc()
        self.publisher_pass_seconds.observe(counts.duration)
        for result in _KEY_RESULTS:
            number = getattr(counts, result)
            if number:
                self.publisher_keys.labels(result).inc(number)
        self.publisher_last_written.set(counts.written)
        self.publisher_last_pass.set(time.time())


_metrics: RainerMetrics | None = None


def metrics() -> RainerMetrics:
    """This process's metrics, created on first use."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = RainerMetrics()
    return _metrics


def exposition(accept: str | None = None) -> tuple[bytes, str]:
    """The metrics and their content type, in the format ``accept`` asks for (Prometheus
    text by default, OpenMetrics on request): every live worker's in multiprocess mode."""
    from prometheus_client import REGISTRY
    from prometheus_client import CollectorRegistry
    from prometheus_client import multiprocess
    from prometheus_client.exposition import choose_encoder

    metrics()  # so that a scrape before any request still lists every metric
    registry = REGISTRY
    if multiprocess_mode():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    encoder, content_type = choose_encoder(accept)
    for attempt in (1, 2, 3):
        try:
            return encoder(registry), content_type
        except (FileNotFoundError, struct.error):
            # Files come and go while a scrape reads them: the master removes an ended
            # worker's live-gauge files (mark_process_dead), and a worker that just started
            # creates its files empty before it sizes them. Listing and reading again answers
            # correctly a moment later.
            if attempt == 3:
                raise
            time.sleep(0.01 * attempt)
    raise AssertionError("unreachable")


def prepare_multiprocess_dir(path: str | None) -> str:
    """Empty the multiprocess directory ``path`` (created when missing), or make a fresh
    temporary one when ``path`` is ``None``; return it.

    Files left by an earlier run would otherwise be added to this run's counters.
    """
    import tempfile

    if not path:
        return tempfile.mkdtemp(prefix="rainer-prometheus-")
    os.makedirs(path, exist_ok=True)
    # Only prometheus_client's files: the directory may hold other things.
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))
    return path


def mark_process_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (gunicorn's ``child_exit``, in the master)."""
    if multiprocess_mode():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


__all__ = [
    "RainerMetrics",
    "ZooKeeperMetrics",
    "exposition",
    "mark_process_dead",
    "metrics",
    "multiprocess_mode",
    "prepare_multiprocess_dir",
]
