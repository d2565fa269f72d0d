"""The fault scenarios: each drives load through a live ``Cluster``, breaks one thing, measures
its figures against their targets, and has the checker judge every acknowledged commit.

A scenario is a function of a ``Bench`` (the cluster, a key prefix of its own, the history,
a znode monitor) that adds ``Figure`` rows. ``quick`` runs are the CI cases
(``tests/test_cluster.py``); full runs (``tests/faults/run.py``) last longer and fault harder.
Every wait is on a condition with a deadline; the only timed pauses are fault durations
(how long an outage lasts), never a sleep before an assertion.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import re
import signal
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.faults.checker import Report
from tests.faults.checker import ZnodeMonitor
from tests.faults.checker import check
from tests.faults.checker import convergence_gap
from tests.faults.checker import dump_journal
from tests.faults.checker import dump_znodes
from tests.faults.checker import log_offsets
from tests.faults.checker import mirror_listing
from tests.faults.checker import save_artifacts
from tests.faults.cluster import Cluster
from tests.faults.cluster import ClusterError
from tests.faults.cluster import MariaDb
from tests.faults.history import History
from tests.faults.history import Load
from tests.faults.history import Target
from tests.faults.history import http
from tests.faults.history import post
from tests.faults.history import read_head


@dataclasses.dataclass
class Figure:
    scenario: str
    name: str
    value: str
    target: str
    #: True/False against the target; None for figures reported for information.
    ok: bool | None
    cause: str = ""
    #: One of the checker's figures every scenario has (lost, duplicated, gaps, resurrected);
    #: the checker table shows them all, so a compact figure table lists them only on failure.
    invariant: bool = False

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "info"}[self.ok]


@dataclasses.dataclass
class Outcome:
    scenario: str
    figures: list[Figure]
    report: Report | None
    seconds: float
    artifacts: Path | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and all(f.ok is not False for f in self.figures)


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


class Bench:
    """One scenario's run on the cluster."""

    def __init__(self, cluster: Cluster, scenario: str, out_dir: Path, quick: bool) -> None:
        self.cluster = cluster
        self.scenario = scenario
        self.out_dir = out_dir
        self.quick = quick
        self.prefix = f"{scenario}.{uuid.uuid4().hex[:4]}."
        self.history = History()
        self.figures: list[Figure] = []
        self.report: Report | None = None
        self.journal: list[dict] = []
        self.znodes: dict[str, dict] = {}
        self.observations: list[dict] = []
        self.logs = log_offsets(cluster.logs())
        self.monitor = ZnodeMonitor(cluster.admin(), cluster.zk_path, self.prefix)
        self.monitor.start()
        self.started = time.monotonic()
        self._probe_version = 0

    # ------------------------------------------------------------------ targets and load

    @property
    def nginx(self) -> Target:
        return Target("nginx", self.cluster.url)

    def target(self, host) -> Target:
        return Target(host.name, host.url)

    def load(self, **kwargs) -> Load:
        kwargs.setdefault("write_target", self.nginx)
        kwargs.setdefault("read_targets",
                          [*(self.target(h) for h in self.cluster.hosts), self.nginx])
        return Load(self.prefix, history=self.history, **kwargs)

    def figure(self, name: str, value: str, target: str, ok: bool | None, cause: str = "",
               invariant: bool = False) -> None:
        self.figures.append(Figure(self.scenario, name, value, target, ok, cause, invariant))

    def n(self, count: int) -> int:
        """``count`` acknowledged writes in a quick run, three times as many in a full one."""
        return count if self.quick else 3 * count

    def wait_acks(self, count: int, timeout: float) -> None:
        if not self.history.wait_acks(count, timeout):
            raise ClusterError(f"fewer than {count} writes acknowledged within {timeout} s")

    # ------------------------------------------------------------------ probes

    def ready(self, host, samples: int | None = None) -> bool:
        """Every one of several ``/readyz`` answers from ``host`` is 200."""
        samples = samples or 3 * host.workers
        return host.running and all(
            http("GET", host.url + "/readyz", timeout=3)[0] == 200 for _ in range(samples))

    def readyz(self, host) -> tuple[int, str]:
        status, _, body, error = http("GET", host.url + "/readyz", timeout=5)
        return status, (body.decode("utf-8", "replace") or error)

    def wait(self, condition: Callable[[], object], timeout: float, interval: float = 0.05,
             since: float | None = None):
        """Seconds until ``condition`` holds (counted from the wall-clock time ``since``, by
        default from now), or ``None`` after ``timeout``."""
        origin = time.time() if since is None else since
        deadline = time.monotonic() + timeout
        while time.monotonic() <= deadline:
            if condition():
                return time.time() - origin
            time.sleep(interval)
        return None

    def probe(self, timeout: float = 15.0) -> float | None:
        """Commit the next version of a probe key through nginx; seconds until every host
        serves it from its mirror on several reads in a row (``None``: not within timeout)."""
        key = self.prefix + "probe"
        self._probe_version += 1
        payload = json.dumps({"probe": self._probe_version}).encode()
        entry = post(self.nginx, key, self._probe_version, payload, "probe", self.history)
        if entry["s"] != 200:
            raise ClusterError(f"probe commit failed: {entry}")

        def everywhere() -> bool:
            for host in self.cluster.hosts:
                for _ in range(2 * host.workers):
                    read = read_head(self.target(host), key, "probe", self.history)
                    if read.get("v") != self._probe_version or not read.get("cached"):
                        return False
            return True

        took = self.wait(everywhere, timeout, 0.01)
        return None if took is None else time.time() - entry["t1"]

    def converged_gap(self) -> list[str]:
        cluster = self.cluster
        journal = dump_journal(cluster.db, cluster.database, cluster.table, self.prefix)
        znodes = dump_znodes(cluster.admin(), cluster.zk_path, self.prefix)
        listings = [mirror_listing(h.url, self.prefix)
                    for h in cluster.hosts if h.running for _ in range(2 * h.workers)]
        return convergence_gap(journal, znodes, listings)

    def wait_converged(self, timeout: float) -> float | None:
        """Seconds until the journal's heads, every znode and every host's mirror listing
        agree; ``None`` (and the last difference in ``self.gap``) after ``timeout``."""
        started = time.monotonic()
        self.gap: list[str] = []
        while True:
            try:
                self.gap = self.converged_gap()
            except Exception as exc:  # database or ensemble not answering yet
                self.gap = [f"{type(exc).__name__}: {exc}"]
            if not self.gap:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                return None
            time.sleep(0.05)

    # ------------------------------------------------------------------ the end

    def finish(self, load: Load, converge: float | None = None) -> Report:
        """Stop the load, delete each writer's first key, wait for convergence (at most
        ``converge`` s, default period + 10 s) and run the checker."""
        if not load.stop_event.is_set():
            load.stop()
        load.finish()
        limit = self.cluster.period + 10 if converge is None else converge
        took = self.wait_converged(limit) if limit > 0 else None
        if limit > 0:
            self.figure("converged after the load", seconds(took), f"<= {limit:.0f} s",
                        took is not None, "" if took is not None else "; ".join(self.gap[:3]))
        self.observations = self.monitor.stop()
        cluster = self.cluster
        self.journal = dump_journal(cluster.db, cluster.database, cluster.table, self.prefix)
        self.znodes = dump_znodes(cluster.admin(), cluster.zk_path, self.prefix)
        self.report = check(self.scenario, self.history.entries, self.journal, self.znodes,
                            self.observations)
        return self.report

    def invariants(self, lost_target: str = "0", expect_loss: bool = False) -> None:
        """The checker's figures every scenario is held to."""
        r = self.report
        if not expect_loss:
            self.figure("acknowledged commits lost", f"{len(r.lost)} of {r.acknowledged}",
                        lost_target, not r.lost, _first(r.lost), invariant=True)
            self.figure("duplicated versions", str(len(r.duplicated)), "0", not r.duplicated,
                        _first(r.duplicated), invariant=True)
        self.figure("journal gaps", str(len(r.gaps)), "0", not r.gaps, _first(r.gaps),
                    invariant=True)
        if expect_loss:
            # Not a resurrection by the service: ZooKeeper still holds versions the journal
            # lost, which the keeper rightly refuses to roll back, so a tombstone written with
            # a reused (lower) version cannot delete them.
            self.figure("deleted keys whose znode survives (consequence of the loss)",
                        str(len(r.resurrected)), "info", None, invariant=True)
            return
        self.figure("resurrected deletes", str(len(r.resurrected)), "0", not r.resurrected,
                    _resurrection_cause(r) if r.resurrected else "", invariant=True)

    def outcome(self, error: str = "") -> Outcome:
        outcome = Outcome(self.scenario, self.figures, self.report,
                          time.monotonic() - self.started, error=error)
        if self.monitor.is_alive():
            self.observations = self.monitor.stop()
        if not outcome.ok:
            if self.report is None:
                self.report = Report(self.scenario)
            outcome.artifacts = save_artifacts(
                self.out_dir / self.scenario, history=self.history, journal=self.journal,
                znodes=self.znodes, observations=self.observations, report=self.report,
                logs=self.logs)
        return outcome


#: Why mirrors stop following existing keys after a ZooKeeper connection loss (the product
#: bug these scenarios found; see README "Reliability").
MIRROR_FREEZE = (
    "product bug: kazoo drops every watch on a connection loss (EventType.NONE), and "
    "CommitMirror re-reads its keys only after a session loss, so each key's mirror entry "
    "freezes until the key is deleted and re-created")


def _first(items: list[dict]) -> str:
    return json.dumps(items[0], sort_keys=True) if items else ""


def _resurrection_cause(report: Report) -> str:
    item = report.resurrected[0]
    if item.get("at") == "end":
        return f"znode of deleted key {item['k']} still there at the end"
    return (f"known bug (branch 'deletes'): a publish pass re-created {item['k']} v{item['znode']} "
            f"{item['written'] - item['acked_at']:.2f} s after tombstone v{item['newer_acked']} "
            "was acknowledged")


def mark_of(entry: dict) -> bool:
    return bool(entry.get("mark"))


# ---------------------------------------------------------------------- scenarios


def racing_writers(b: Bench) -> None:
    """No fault: writers through nginx, racers on one key through every target, readers on
    every target. Exactly one racer may win each version; reads are at most ms stale."""
    targets = [b.target(h) for h in b.cluster.hosts] + [b.nginx]
    with b.load(racers=targets) as load:
        b.wait_acks(300 if b.quick else 1500, 120 if b.quick else 300)
    r = b.finish(load)
    races = [e for e in b.history.entries if e["op"] == "race"]
    wins = sum(1 for e in races if e["s"] == 200)
    conflicts = sum(1 for e in races if e["s"] == 409)
    b.figure("racing writers: versions won / 409s", f"{wins} / {conflicts}",
             "one 200 per version", not r.duplicated, _first(r.duplicated))
    b.figure("5xx", str(r.server_errors), "0", r.server_errors == 0,
             str(r.server_errors_by) if r.server_errors else "")
    b.figure("max staleness of a mirror read", f"{r.max_staleness * 1000:.0f} ms", "<= 1000 ms",
             r.max_staleness <= 1.0, "")
    b.invariants()


def zk_leader_killed(b: Bench) -> None:
    """SIGKILL the ZooKeeper leader under load: no save fails, the hosts reconnect to the
    other two nodes, and new commits reach every mirror again."""
    cluster = b.cluster
    ensemble = cluster.ensemble
    with b.load() as load:
        b.wait_acks(b.n(50), 180)
        before = b.probe()  # the probe key exists, and every mirror watches it
        leader = ensemble.leader()
        killed_at = time.time()
        ensemble.kill(leader)
        zk_back = b.wait(ensemble.serving, 30, since=killed_at)
        recovered = b.wait(lambda: all(b.ready(h) for h in cluster.hosts), 30, since=killed_at)
        visible = b.probe()
        b.wait_acks(b.n(50), 180)
        ensemble.start_node(leader)
        ensemble.wait_quorum(60)
        b.wait_acks(b.n(30), 180)
    r = b.finish(load)
    writes = [e for e in b.history.entries if e["op"] == "write"]
    failed = [e for e in writes if e["s"] not in (200, 409)]
    b.figure("failed saves (POST not 200/409)", f"{len(failed)} of {len(writes)}", "0",
             not failed, _first(failed))
    b.figure("ZooKeeper serving again (new leader)", seconds(zk_back), "info", None)
    b.figure("time to recover: every host ready", seconds(recovered),
             f"<= {cluster.session_timeout:.0f} s (session timeout)",
             recovered is not None and recovered <= cluster.session_timeout)
    b.figure("mirrors live: next version of a watched key cached on every host",
             f"{seconds(visible)} (before the kill: {seconds(before)})", "<= 1 s",
             visible is not None and visible <= 1.0, "" if visible is not None else MIRROR_FREEZE)
    b.figure("max staleness during the event", seconds(r.max_staleness), "info", None)
    b.invariants()


def quorum_lost(b: Bench) -> None:
    """Two of three ZooKeeper nodes down: writes go on (the database is the record), /readyz
    says the mirror is stale and since when, reads fall back or are marked; after quorum
    returns everything converges within a publish period + 3 s."""
    cluster = b.cluster
    ensemble = cluster.ensemble
    outage = 8.0 if b.quick else 15.0
    with b.load() as load:
        b.wait_acks(b.n(50), 180)
        victims = [ensemble.leader()] + [n for n in ensemble.nodes
                                         if n.mode() == "follower"][:1]
        lost_at = time.time()
        for node in victims:
            ensemble.kill(node)
        noticed = b.wait(lambda: all(b.readyz(h)[0] == 503 for h in cluster.hosts), 30,
                         since=lost_at)
        # The outage itself: a fault duration, during which the load goes on.
        time.sleep(max(0.0, outage - (time.time() - lost_at)))
        answers = {h.name: b.readyz(h) for h in cluster.hosts}
        load.stop_writers()
        outage_end = time.time()
        for node in victims:
            ensemble.start_node(node)
        ensemble.wait_quorum(60)
        converged = b.wait_converged(cluster.period + 3 + 10)
        load.resume_writers()
        b.wait_acks(b.n(30), 180)
    r = b.finish(load)
    during = [e for e in b.history.entries if lost_at <= e["t0"] < outage_end]
    writes = [e for e in during if e["op"] == "write"]
    bad = [e for e in writes if e["s"] not in (200, 409)]
    b.figure("writes while quorum is lost", f"{len(writes) - len(bad)} of {len(writes)} answered",
             "all 200 (or 409)", bool(writes) and not bad, _first(bad))
    status, body = answers[cluster.hosts[0].name]
    says_since = (status == 503 and "stale" in body
                  and bool(re.search(r"\d{4}-\d\d-\d\dT|since", body)))
    b.figure("/readyz says the mirror is stale, and since when",
             f"{status} after {seconds(noticed)}: {body.strip()}", "503, stale since <time>",
             says_since, "" if says_since else
             "no staleness or time in /readyz: it only reports the ZooKeeper connection state, "
             "and 'mirror: ok' (the mirror was complete once)")
    # Until a worker's client sees its connection drop, its mirror looks merely quiet; a
    # commit acknowledged meanwhile by a worker that did notice is caught by the watch hub's
    # poll of the journal (every MIRRORED_POLL_INTERVAL = 1 s), which sends reads of that key
    # to the database. Reads before every host said "stale" plus one poll are shown on their
    # own (info); after that none may be unmarked.
    settled = min(lost_at + (noticed if noticed is not None else 30.0) + 1.0, outage_end)
    unnoticed = _stale_cached_reads(b, r, lost_at, settled)
    b.figure("stale mirror reads until every host noticed, plus one poll",
             f"{len(unnoticed)}" + (f", up to {max(e['stale_for'] for e in unnoticed):.1f} s old"
                                    if unnoticed else ""), "info", None)
    stale_reads = _stale_cached_reads(b, r, settled, outage_end)
    unmarked = [e for e in stale_reads if not mark_of(e)]
    b.figure("reads during the outage fall back or are marked, after that",
             f"{len(stale_reads)} stale cached reads, {len(unmarked)} unmarked", "0 unmarked",
             not unmarked, "" if not unmarked else
             "the frozen mirror keeps answering GETs with X-Rainer-Cached: Yes and nothing "
             f"saying it is stale (up to {max(e['stale_for'] for e in unmarked):.1f} s old)")
    target = cluster.period + 3
    b.figure("convergence after quorum returns", seconds(converged), f"<= {target:.0f} s",
             converged is not None and converged <= target,
             "" if converged is not None else "; ".join(b.gap[:3]))
    b.invariants()


def _stale_cached_reads(b: Bench, report: Report, start: float, end: float) -> list[dict]:
    """Cached reads in [start, end) that answered an older version than one already
    acknowledged, each with ``stale_for`` seconds."""
    acks: dict[str, list[tuple[float, int]]] = {}
    for e in b.history.entries:
        if e["op"] in ("write", "race") and e["s"] == 200:
            acks.setdefault(e["k"], []).append((e["t1"], e["v"]))
    stale = []
    for e in b.history.entries:
        if e["op"] != "read" or not e.get("cached") or not start <= e["t0"] < end:
            continue
        newer = [t for t, v in acks.get(e["k"], ()) if t < e["t0"] and v > e["v"]]
        if newer:
            stale.append({**e, "stale_for": e["t0"] - min(newer)})
    return stale


def partition(b: Bench) -> None:
    """Cut the host holding the publisher off from ZooKeeper (its three proxies drop every
    packet): it must say its mirror is stale, the other host must take over publishing, and
    after the partition heals it catches up."""
    cluster = b.cluster
    host, _ = cluster.publisher()
    if host is None:
        host = cluster.hosts[0]
    other = next(h for h in cluster.hosts if h is not host)
    duration = 8.0 if b.quick else 15.0
    with b.load() as load:
        b.wait_acks(b.n(50), 180)
        cut_at = time.time()
        for proxy in cluster.zk_proxies[host.name]:
            proxy.partition()
        # Every worker has its own ZooKeeper session and notices the silence on its own read
        # timeout (seconds apart), and which worker answers is up to the kernel: the figure
        # is the answer of the first worker that noticed, not of a later sample.
        answers: list[tuple[int, str]] = []
        says = b.wait(lambda: answers.append(b.readyz(host)) or answers[-1][0] == 503, 30,
                      since=cut_at)
        answer = answers[-1]
        moved = b.wait(lambda: cluster.publisher()[0] is other, 30, since=cut_at)
        time.sleep(max(0.0, duration - (time.time() - cut_at)))  # the partition lasts
        load.stop_writers()
        healed_at = time.time()
        for proxy in cluster.zk_proxies[host.name]:
            proxy.heal()
        converged = b.wait_converged(cluster.period + 3 + 10)
        load.resume_writers()
        b.wait_acks(b.n(30), 180)
    r = b.finish(load)
    status, body = answer
    says_stale = status == 503 and "stale" in body
    b.figure(f"partitioned host {host.name}: /readyz",
             f"{status} after {seconds(says)}: {body.strip()}", "503 saying the mirror is stale",
             says_stale, "" if says_stale else
             "/readyz turns 503 for the ZooKeeper connection, but its mirror check stays 'ok'")
    # A silent connection looks like a quiet one until kazoo's read timeout (2/3 of the
    # session timeout, each worker on its own clock): reads before the session timeout has
    # passed cannot all be marked, and are shown on their own (info).
    noticed = min(cut_at + cluster.session_timeout, healed_at)
    unnoticed = [e for e in _stale_cached_reads(b, r, cut_at, noticed) if e["t"] == host.name]
    b.figure(f"host {host.name}: stale mirror reads in the first "
             f"{cluster.session_timeout:.0f} s (session timeout)",
             f"{len(unnoticed)}" + (f", up to {max(e['stale_for'] for e in unnoticed):.1f} s old"
                                    if unnoticed else ""), "info", None)
    stale_reads = [e for e in _stale_cached_reads(b, r, noticed, healed_at)
                   if e["t"] == host.name]
    unmarked = [e for e in stale_reads if not mark_of(e)]
    oldest = max((e["stale_for"] for e in stale_reads), default=0.0)
    b.figure(f"host {host.name}: stale mirror reads during the partition, after that",
             f"{len(stale_reads)}, {len(unmarked)} unmarked"
             + (f", up to {oldest:.1f} s old" if stale_reads else ""),
             "0 unmarked", not unmarked, "" if not unmarked else
             "served with X-Rainer-Cached: Yes and no staleness mark")
    writes = [e for e in b.history.entries
              if e["op"] == "write" and cut_at <= e["t0"] < healed_at]
    bad = [e for e in writes if e["s"] not in (200, 409)]
    slowest = max((e["t1"] - e["t0"] for e in writes), default=0.0)
    b.figure("writes during the partition", f"{len(writes) - len(bad)} of {len(writes)} answered, "
             f"slowest {slowest:.2f} s", "all 200 (or 409)", bool(writes) and not bad, _first(bad))
    limit = cluster.session_timeout + 2
    b.figure(f"publisher leadership moves to host {other.name}", seconds(moved),
             f"<= {limit:.0f} s (session timeout + 2 s)", moved is not None and moved <= limit)
    target = cluster.period + 3
    b.figure("convergence after the partition heals", seconds(converged), f"<= {target:.0f} s",
             converged is not None and converged <= target,
             "" if converged is not None else "; ".join(b.gap[:3]))
    b.figure("version decreases seen through nginx", str(r.decreases_by_target.get("nginx", 0)),
             "info", None)
    b.invariants()


def host_killed(b: Bench) -> None:
    """SIGKILL a whole app host (master and workers), the one holding the publisher: nginx
    sends everything to the other, leadership moves, no acknowledged commit is lost."""
    cluster = b.cluster
    victim, _ = cluster.publisher()
    if victim is None:
        victim = cluster.hosts[0]
    survivor = next(h for h in cluster.hosts if h is not victim)
    stable = b.prefix + "stable"
    post(b.nginx, stable, 1, b'{"stable": true}', "setup", b.history)
    znode = f"{cluster.zk_path}/data/{stable}"
    with b.load() as load:
        b.wait_acks(b.n(50), 180)
        killing = time.time()
        victim.kill9()
        killed_at = time.time()  # every process of the host is gone (reaped) by now
        moved = b.wait(lambda: cluster.publisher()[0] is survivor, 30, since=killing)
        cluster.admin().delete(znode)
        repaired = b.wait(lambda: cluster.admin().exists(znode), 30)
        b.wait_acks(b.n(100), 180)
    b.finish(load)
    entries = b.history.entries
    in_flight = [e for e in entries if e["t0"] < killed_at and e["t1"] >= killing
                 and e["t"] == "nginx" and e["s"] >= 500]
    after = [e for e in entries if e["t0"] > killed_at and e["t"] == "nginx" and e["s"] >= 500]
    b.figure("5xx through nginx for requests started after the kill", str(len(after)), "0",
             not after, _first(after))
    b.figure("5xx in flight on the killed host", str(len(in_flight)), "info", None)
    limit = cluster.session_timeout + 2
    b.figure(f"publisher leadership moves to host {survivor.name}", seconds(moved),
             f"<= {limit:.0f} s (session timeout + 2 s)", moved is not None and moved <= limit)
    b.figure("new publisher repairs a deleted znode", seconds(repaired),
             f"<= {cluster.period * 1.2 + 1:.1f} s (one period)", repaired is not None
             and repaired <= cluster.period * 1.2 + 1)
    victim.start()
    restarted = victim.wait_ready()
    b.figure(f"host {victim.name} back (restart to ready)", seconds(restarted), "info", None)
    b.invariants()


def worker_churn(b: Bench) -> None:
    """Workers replaced all the time: gunicorn's max_requests with jitter, and a HUP of every
    host every 30 s (quick: every 8 s), under load. No 5xx, nothing lost."""
    cluster = b.cluster
    args = f"{cluster.gunicorn_args} --max-requests 300 --max-requests-jitter 150"
    for host in cluster.hosts:  # rolling restart into the churning configuration
        host.stop()
        host.start(args)
        host.wait_ready()
    every, rounds = (8.0, 2) if b.quick else (30.0, 3)
    hups = 0
    try:
        with b.load() as load:
            started = time.monotonic()
            for n in range(1, rounds + 1):
                time.sleep(max(0.0, started + n * every - time.monotonic()))  # the schedule
                for host in cluster.hosts:
                    host.hup()
                    hups += 1
            b.wait_acks(b.n(50), 180)
        r = b.finish(load)
    finally:
        for host in cluster.hosts:
            host.stop()
            host.start(cluster.gunicorn_args)
            host.wait_ready()
    boots = sum(len(re.findall(rb"Booting worker with pid",
                               _read_from(*b.logs[f"gunicorn-{h.name}.log"])))
                for h in cluster.hosts)
    b.figure("workers replaced (max_requests + HUP)", f"{boots} boots, {hups} HUPs", "info", None)
    b.figure("5xx", str(r.server_errors), "0", r.server_errors == 0,
             str(r.server_errors_by) if r.server_errors else "")
    b.figure("requests with no answer", str(r.no_answer), "0", r.no_answer == 0)
    b.invariants()


def _read_from(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def database_moved(b: Bench) -> None:
    """Move the database to a new primary behind the hosts' TCP proxy: hold new connections and
    cut the old ones, copy the data (mariadb-dump into the new server), point the proxy at it,
    let the held connections through. The service follows without a restart."""
    cluster = b.cluster
    new = MariaDb(cluster.base, f"db{len(cluster.spare_dbs) + 2}")
    new.start()
    cluster.spare_dbs.append(new)
    with b.load() as load:
        b.wait_acks(b.n(50), 180)
        switch_started = time.time()
        cluster.db_proxy.hold()
        new.load(cluster.db.dump(cluster.database))
        cluster.db_proxy.retarget(new.address)
        cluster.db_proxy.release()
        switched = time.time()
        old, cluster.db = cluster.db, new
        old.stop()  # nothing may use the old primary any more
        b.wait_acks(b.n(100), 180)
    b.finish(load)
    entries = b.history.entries
    errors = [e for e in entries if e["s"] >= 500 or e["s"] == 0]
    first = min((e["t1"] for e in entries if e["op"] == "write" and e["s"] == 200
                 and e["t0"] >= switched), default=None)
    b.figure("5xx or no answer during the switchover", str(len(errors)), "0", not errors,
             _first(errors))
    b.figure("switchover (writes held at the proxy)", seconds(switched - switch_started),
             "info", None)
    b.figure("first acknowledged write after it",
             seconds(None if first is None else first - switched), "info", None)
    b.invariants()


def _database_kill(b: Bench, control: bool) -> None:
    cluster = b.cluster
    db = cluster.db
    if control:
        # =0: InnoDB writes its log buffer out every innodb_flush_log_at_timeout seconds
        # (default 1) instead of at each commit, so a kill -9 loses the commits acknowledged
        # since the last write-out. The full run keeps the default second and kills right after
        # a burst of acks (a loss is all but certain); the CI case widens the window to 5 s so
        # that it always is.
        db.execute("SET GLOBAL innodb_flush_log_at_trx_commit = 0")
        if b.quick:
            db.execute("SET GLOBAL innodb_flush_log_at_timeout = 5")
    flush, every = db.execute(
        "SELECT @@innodb_flush_log_at_trx_commit, @@innodb_flush_log_at_timeout")[0]
    with b.load(write_pause=0.0, writers=6 if control else 4) as load:
        b.wait_acks(b.n(150), 180)
        if control:
            # Kill at the end of a burst: the acks of the last few ms are in InnoDB's log
            # buffer, which =0 writes out once a second.
            b.history.wait_acks(20, 10)
        killed_at = time.time()
        db.kill9()
        noticed = b.wait(lambda: any(e["s"] == 503 for e in b.history.since(killed_at)), 30)
        db.start()
        restarted = time.time()
        recovered = b.wait(lambda: any(e["op"] == "write" and e["s"] == 200 and e["t0"] >= restarted
                                       for e in b.history.entries), 60)
        b.wait_acks(b.n(100), 180)
    r = b.finish(load, converge=0 if control else None)
    down = [e for e in b.history.entries if killed_at <= e["t0"] <= restarted]
    other = [e for e in down if e["s"] >= 500 and e["s"] != 503]
    if control:
        ahead = [d for d in r.drift if d["state"] in ("ahead", "differs", "unknown")]
        b.figure(f"innodb_flush_log_at_trx_commit={flush} (log written every {every} s): "
                 "kill -9 after a burst",
                 f"{len(r.lost)} of {r.acknowledged} acknowledged commits lost", "> 0 (control)",
                 len(r.lost) > 0, "" if r.lost else "nothing lost: the control proves nothing")
        b.figure("znodes holding commits the journal lost", str(len(ahead)), "info", None)
        b.invariants(expect_loss=True)
        return
    b.figure(f"innodb_flush_log_at_trx_commit={flush}: acknowledged commits lost",
             f"{len(r.lost)} of {r.acknowledged}", "0", not r.lost, _first(r.lost))
    b.figure("answers while the database is down", f"{len(down)} requests, "
             f"{sum(1 for e in down if e['s'] == 503)} 503, {len(other)} other 5xx",
             "503 only", not other, _first(other))
    b.figure("first 503 after the kill", seconds(noticed), "info", None)
    b.figure("first acknowledged write after the restart", seconds(recovered), "info", None)
    b.invariants()


def database_killed(b: Bench) -> None:
    """kill -9 MariaDB mid-writes and restart it: with innodb_flush_log_at_trx_commit=1,
    not one acknowledged commit may be missing."""
    _database_kill(b, control=False)


def database_killed_control(b: Bench) -> None:
    """The same kill with innodb_flush_log_at_trx_commit=0: commits acknowledged in the last
    second are lost, and the checker must say so (else it could not see a loss at all)."""
    _database_kill(b, control=True)


# ------------------------------------------------------------- a hung database, slow clients


class Sampler(threading.Thread):
    """Sends one kind of request to one target over and over (a fresh connection each, as a
    new client would) and records every answer: ``(t0, t1, status, cached, retry_after)``."""

    def __init__(self, kind: str, target: Target, path: str, pause: float = 0.02,
                 timeout: float = 30.0) -> None:
        super().__init__(name=f"sampler-{kind}-{target.name}", daemon=True)
        self.kind = kind
        self.target = target
        self.path = path
        self.pause = pause
        self.timeout = timeout
        self.samples: list[tuple[float, float, int, bool, str | None]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            t0 = time.time()
            status, headers, _, _ = http("GET", self.target.url + self.path, timeout=self.timeout)
            self.samples.append((t0, time.time(), status, headers.get("x-rainer-cached") == "Yes",
                                 headers.get("retry-after")))
            self.stop_event.wait(self.pause)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(self.timeout + 5)

    def between(self, start: float, end: float) -> list[tuple]:
        """Samples started in [start, end)."""
        return [s for s in self.samples if start <= s[0] < end]


@dataclasses.dataclass
class Samples:
    """What one sampler recorded (see ``Sampler``), handed back by a ``SamplerProcess``."""

    kind: str
    target: str
    samples: list[tuple]

    def between(self, start: float, end: float) -> list[tuple]:
        return [s for s in self.samples if start <= s[0] < end]


def _sample_in_child(specs: list[tuple], stop, conn) -> None:
    samplers = [Sampler(kind, Target(name, url), path, pause)
                for kind, name, url, path, pause in specs]
    for sampler in samplers:
        sampler.start()
    stop.wait()
    for sampler in samplers:
        sampler.stop()
    conn.send([(s.kind, s.target.name, s.samples) for s in samplers])
    conn.close()


class SamplerProcess:
    """Samplers in a process of their own, for the latencies held to milliseconds: the
    scenario's process runs the load, the fault proxies and the monitors, and its GIL would
    add their work to every latency it measured. ``specs``: ``(kind, target, path, pause)``."""

    def __init__(self, specs: list[tuple[str, Target, str, float]]) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._results, child = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_sample_in_child, daemon=True,
            args=([(k, t.name, t.url, path, pause) for k, t, path, pause in specs],
                  self._stop, child))

    def start(self) -> None:
        self._process.start()

    def stop(self, timeout: float = 60.0) -> list[Samples]:
        self._stop.set()
        if not self._results.poll(timeout):
            self._process.kill()
            raise ClusterError("the sampler process sent nothing back")
        recorded = [Samples(*item) for item in self._results.recv()]
        self._process.join(10)
        return recorded


def p99(samples: list[tuple]) -> float:
    """The 99th percentile of the samples' latencies in seconds (nearest rank); inf if none."""
    if not samples:
        return float("inf")
    latencies = sorted(s[1] - s[0] for s in samples)
    return latencies[min(len(latencies) - 1, max(0, -(-99 * len(latencies) // 100) - 1))]


def ms(value: float) -> str:
    return "none" if value == float("inf") else f"{value * 1000:.0f} ms"


def hung_database(b: Bench) -> None:
    """SIGSTOP MariaDB for 20 s under load (SIGCONT after): a hung server still completes TCP
    connects into its backlog, so the handshake and every query hang. DB-bound requests must
    answer 503 with Retry-After within 3 s; mirror-backed reads, /healthz and /metrics keep
    answering (p99 <= 100 ms); DB-bound requests answer 200 again within 2 s of SIGCONT."""
    cluster = b.cluster
    hang = 20.0
    stable = b.prefix + "stable"
    entry = post(b.nginx, stable, 1, b'{"stable": true}', "setup", b.history)
    if entry["s"] != 200:
        raise ClusterError(f"setup commit failed: {entry}")
    # The stable key in every host's mirror (and its index in every hub) before the hang.
    b.probe()
    if b.wait(lambda: all(read_head(b.target(h), stable, "setup", b.history).get("cached")
                          for h in cluster.hosts for _ in range(2 * h.workers)), 30) is None:
        raise ClusterError("the stable key never reached every mirror")
    quoted = urllib.parse.quote(stable, safe="")
    fast: list[tuple[str, Target, str, float]] = [("cached", b.nginx, f"/diary/{quoted}", 0.02)]
    # /history never comes from the mirror: a DB-bound read (its target is seconds, and its
    # answers are watched live for the recovery, so it samples from this process).
    db_samplers: list[Sampler] = []
    for host in cluster.hosts:
        target = b.target(host)
        fast += [("cached", target, f"/diary/{quoted}", 0.02),
                 ("healthz", target, "/healthz", 0.02),
                 # Twice a second (Prometheus scrapes every 15 s): a scrape reads every
                 # worker's files, and ten a second loaded the 2-core machine themselves.
                 ("metrics", target, "/metrics", 0.5)]
        db_samplers.append(Sampler("db", target, f"/diary/{quoted}/history?limit=1", pause=0.1))
    sampling = SamplerProcess(fast)
    sampling.start()
    samplers: list = []
    # Writers (they answer the checker) and readers, lighter than the other scenarios: the
    # figures here are latencies of other requests.
    with b.load(writers=2, read_pause=0.05) as load:
        for sampler in db_samplers:
            sampler.start()
        try:
            b.wait_acks(b.n(30), 120)
            pid = cluster.db.process.pid
            stopped = time.time()
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(hang)  # the fault's duration: requests go on meanwhile
            finally:
                os.kill(pid, signal.SIGCONT)
            resumed = time.time()
            # Every host's DB-bound reads answer 200 again (their first 200 started after the
            # SIGCONT; the last sample of each host then is checked below).
            back = b.wait(lambda: all(any(x[2] == 200 and x[0] >= resumed for x in s.samples)
                                      for s in db_samplers), 30, 0.02)
            b.wait_acks(b.n(30), 120)
        finally:
            for sampler in db_samplers:
                sampler.stop()
            samplers = sampling.stop()
    r = b.finish(load)
    # Requests that started in the hang and had to end before it did (a request started 3 s
    # before the SIGCONT may rightly get its 200 from the resumed server).
    window = (stopped, resumed - 3.0)
    db_bound = [s for x in db_samplers for s in x.between(*window)]
    # The writers' POSTs, and their /history look-ups after each failed one.
    writes = [e for e in b.history.entries
              if e["op"] in ("write", "resync") and window[0] <= e["t0"] < window[1]]
    slowest = max([s[1] - s[0] for s in db_bound] + [e["t1"] - e["t0"] for e in writes],
                  default=float("inf"))
    not_503 = [s for s in db_bound if s[2] != 503 or not s[4]]
    writes_not_503 = [e for e in writes if e["s"] != 503]
    b.figure("DB-bound requests in the hang: 503 with Retry-After",
             f"{len(db_bound) - len(not_503)} of {len(db_bound)} reads, "
             f"{len(writes) - len(writes_not_503)} of {len(writes)} writers' requests",
             "all", bool(db_bound) and not not_503 and not writes_not_503,
             str(not_503[:1] or writes_not_503[:1]))
    b.figure("slowest DB-bound answer in the hang", seconds(slowest), "<= 3 s", slowest <= 3.0)
    for kind in ("cached", "healthz", "metrics"):
        during = [s for x in samplers if x.kind == kind for s in x.between(stopped, resumed)]
        # The same requests before the hang: what the (shared, loaded) machine gives anyway.
        before = [s for x in samplers if x.kind == kind for s in x.between(0, stopped)]
        bad = [s for s in during if s[2] != 200 or (kind == "cached" and not s[3])]
        value = p99(during)
        b.figure(f"{kind} p99 during the hang (all targets)",
                 f"{ms(value)} over {len(during)}, {len(bad)} not 200"
                 + (" from the mirror" if kind == "cached" else "")
                 + f" (before the hang: {ms(p99(before))} over {len(before)})",
                 "<= 100 ms, all 200", value <= 0.1 and not bad and len(during) > 10,
                 str(bad[:1]) if bad else "")
    b.figure("recovery: every host's DB-bound reads 200 after SIGCONT", seconds(back), "<= 2 s",
             back is not None and back <= 2.0)
    other = {k: v for k, v in r.server_errors_by.items() if not k.endswith(" 503")}
    b.figure("5xx other than 503; requests with no answer",
             f"{sum(other.values())}; {r.no_answer}", "0; 0", not other and not r.no_answer,
             str(other) if other else "")
    b.invariants()


class SlowClients(threading.Thread):
    """``count`` connections to ``url``, each sending ``request`` a byte a second. A connection
    the server drops (gunicorn's gevent worker gives a request's headers its keepalive, 5 s;
    nginx its client_header_timeout, 10 s) is replaced by a new one at once, as a slowloris
    would: ``count`` are always trickling."""

    def __init__(self, url: str, count: int, request: bytes) -> None:
        super().__init__(name="slow-clients", daemon=True)
        parts = urllib.parse.urlsplit(url)
        self.address = (parts.hostname, parts.port)
        self.count = count
        self.request = request
        self.stop_event = threading.Event()
        #: [socket, bytes sent] of every open slow connection.
        self.open: list[list] = []
        self.dropped = 0
        self.rounds = 0

    def _connect(self) -> list:
        conn = socket.create_connection(self.address, timeout=5)
        conn.setblocking(False)
        return [conn, 0]

    def run(self) -> None:
        while len(self.open) < self.count and not self.stop_event.is_set():
            self.open.append(self._connect())
        while not self.stop_event.is_set():
            for n, slot in enumerate(self.open):
                conn, sent = slot
                if not _still_open(conn) or sent >= len(self.request):
                    conn.close()
                    self.dropped += sent < len(self.request)
                    slot = self.open[n] = self._connect()
                    conn, sent = slot
                try:
                    conn.send(self.request[sent:sent + 1])
                    slot[1] = sent + 1
                except OSError:
                    pass  # found dropped on the next round
            self.rounds += 1
            self.stop_event.wait(1.0)
        for conn, _ in self.open:
            conn.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)


def slow_clients(b: Bench) -> None:
    """200 connections sending their request a byte a second must not slow anyone else: another
    client's p99 stays <= 100 ms, straight to a host (gevent: a slow client is a greenlet, not a
    worker) and through nginx (it buffers the request before it picks a host)."""
    cluster = b.cluster
    count, duration = 200, 15.0 if b.quick else 30.0
    key = b.prefix + "stable"
    entry = post(b.nginx, key, 1, b'{"stable": true}', "setup", b.history)
    if entry["s"] != 200:
        raise ClusterError(f"setup commit failed: {entry}")
    quoted = urllib.parse.quote(key, safe="")
    host = cluster.hosts[0]
    for target in (b.target(host), b.nginx):
        # A request longer than the measurement at a byte a second.
        path = f"/diary/{quoted}?slow={'x' * int(duration + 30)}"
        request = f"GET {path} HTTP/1.1\r\nHost: slow\r\n\r\n".encode()
        baseline = Sampler("read", target, f"/diary/{quoted}", pause=0.02)
        baseline.start()
        time.sleep(5.0)  # the baseline's measurement
        baseline.stop()
        slow = SlowClients(target.url, count, request)
        slow.start()
        try:
            if b.wait(lambda: slow.rounds >= 1, 60) is None:
                raise ClusterError(f"only {len(slow.open)} of {count} slow connections opened")
            sampler = Sampler("read", target, f"/diary/{quoted}", pause=0.02)
            sampler.start()
            time.sleep(duration)  # the measurement, while the slow clients trickle
            sampler.stop()
        finally:
            slow.stop()
        bad = [s for s in sampler.samples if s[2] != 200]
        value = p99(sampler.samples)
        b.figure(f"another client's p99 with {count} slow clients, {target.name}",
                 f"{ms(value)} over {len(sampler.samples)} (without: {ms(p99(baseline.samples))});"
                 f" {len(bad)} not 200", "<= 100 ms, all 200",
                 value <= 0.1 and not bad and len(sampler.samples) > 20,
                 str(bad[:1]) if bad else "")
        b.figure(f"slow connections the server dropped (each replaced at once), {target.name}",
                 f"{slow.dropped} in {slow.rounds} s", "info", None)


def _still_open(conn: socket.socket) -> bool:
    """Whether the server still waits for the rest of the request on ``conn`` (it has neither
    closed it nor answered, e.g. with a 408)."""
    try:
        conn.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True  # nothing to read: still waiting
    except OSError:
        return False
    return False  # closed (b""), or an answer came

SCENARIOS: dict[str, Callable[[Bench], None]] = {
    "racing": racing_writers,
    "zk-leader": zk_leader_killed,
    "quorum": quorum_lost,
    "partition": partition,
    "host-kill": host_killed,
    "churn": worker_churn,
    "db-move": database_moved,
    "db-kill": database_killed,
    "db-kill-control": database_killed_control,
    "hung-db": hung_database,
    "slow-clients": slow_clients,
}


def run_scenario(cluster: Cluster, name: str, out_dir: Path, quick: bool) -> Outcome:
    bench = Bench(cluster, name, out_dir, quick)
    try:
        SCENARIOS[name](bench)
    except Exception as exc:  # a scenario that could not finish is a failed check too
        import traceback

        return bench.outcome(error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    return bench.outcome()


# ---------------------------------------------------------------------- the table


def table(outcomes: list[Outcome], compact: bool = False) -> str:
    """Every figure against its target; ``compact`` leaves out the checker's invariants that
    passed (the checker table shows their numbers)."""
    rows = [("scenario", "figure", "value", "target", "result", "cause")]
    for outcome in outcomes:
        for f in outcome.figures:
            if compact and f.invariant and f.ok is not False:
                continue
            rows.append((f.scenario, f.name, f.value, f.target, f.verdict, f.cause))
        if outcome.error:
            rows.append((outcome.scenario, "scenario finished", "no", "yes", "FAIL",
                         outcome.error.splitlines()[0]))
    return _markdown(rows)


def checker_table(outcomes: list[Outcome]) -> str:
    rows = [("scenario", "acknowledged", "lost", "duplicated", "gaps", "resurrected deletes",
             "version decreases", "max staleness", "5xx", "no answer", "drift", "time")]
    for o in outcomes:
        r = o.report
        if r is None:
            rows.append((o.scenario, *["-"] * 10, f"{o.seconds:.0f} s"))
            continue
        rows.append((o.scenario, str(r.acknowledged), str(len(r.lost)), str(len(r.duplicated)),
                     str(len(r.gaps)), str(len(r.resurrected)), str(len(r.decreases)),
                     f"{r.max_staleness:.2f} s", str(r.server_errors), str(r.no_answer),
                     str(len(r.drift)), f"{o.seconds:.0f} s"))
    return _markdown(rows)


def _markdown(rows: list[tuple]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in rows[0]) + " |",
             "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows[1:]]
    return "\n".join(lines)
