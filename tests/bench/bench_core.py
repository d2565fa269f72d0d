#!/usr/bin/env python3
"""Core benchmark (issue 2): Rainer under gunicorn + MySQL against floors measured in the same run.

    python3 tests/bench/bench_core.py [--duration 8] [--connections 16] [--json PATH]

One run:

1. drops and creates the MySQL database ``rainer_bench`` and seeds it through
   ``DbCommitStorage`` (its own table model, bulk ``insert_many`` in one transaction per
   table, rows exactly as ``save`` writes them, ``is_head`` on each key's newest row):
   ``shallow`` 10k keys x 1 version, ``deep`` 10k keys x 50 versions, ``k1000`` 1000 keys x
   1-5 versions, ~200-byte JSON payloads; then checks a sample of them read back equal;
2. for every scenario starts gunicorn (``-c config/gunicorn.conf.py``, sync workers, the same
   worker count for the service and the floors) on a free port, checks one request answers
   200, warms up, then measures with ``wrk -t2 -c<connections> -d<seconds>s --latency``;
3. measures the floors (``floors.py``) the same way. A scenario and its floor form a group:
   their gunicorns run side by side (only one under load at a time) and are measured in
   alternating rounds (``--rounds``, ``--duration`` split over them), ratios are medians of
   per-round ratios, and the CPU other processes used meanwhile is reported (bg%), because a
   shared 2-core machine is noisy;
4. prints one table (req/s, p50, p99, errors, floor, ratio, target, verdict); a scenario with
   any non-2xx answer or socket error is INVALID, as is a POST history that is not contiguous;
5. stops every gunicorn it started (also on Ctrl-C / SIGTERM / errors) and drops the database.

Exit status: 0 all targets met, 1 a target missed, 2 the benchmark itself is invalid.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from dataclasses import field
from datetime import timedelta
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from floors import BASE_MTIME  # noqa: E402  (after the path set-up)
from floors import key_name  # noqa: E402
from keeper_support import Children  # noqa: E402
from keeper_support import Gunicorn  # noqa: E402
from keeper_support import WrkResult  # noqa: E402
from keeper_support import busy_seconds  # noqa: E402
from keeper_support import children_cpu  # noqa: E402
from keeper_support import parse_wrk  # noqa: E402
from keeper_support import proc_stat  # noqa: E402
from floors import make_payload  # noqa: E402

TABLES = {
    # table: (keys, versions of key i)
    "shallow": (10_000, lambda i: 1),
    "deep": (10_000, lambda i: 50),
    "k1000": (1_000, lambda i: 1 + i % 5),
}
POST_TABLE = "post"
# Its own journal: a server without ZooKeeper writing into the table a ZooKeeper cluster serves
# is a drift nobody deploys (every key it writes is missing from ZooKeeper, and answers go to
# the database until the next publish pass).
ZK_POST_TABLE = "post_zk"
FLOOR_POST_TABLE = "floor_post"


# ====================================================================== seeding


def admin_connection(server_url: str):
    import pymysql

    return pymysql.connect(autocommit=True, **_server_params(server_url))


def _server_params(server_url: str) -> dict:
    from urllib.parse import unquote
    from urllib.parse import urlparse

    url = urlparse(server_url)
    return {
        "host": url.hostname or "127.0.0.1",
        "port": url.port or 3306,
        "user": unquote(url.username or "root"),
        "password": unquote(url.password or ""),
    }


def recreate_database(server_url: str, name: str) -> None:
    conn = admin_connection(server_url)
    try:
        with conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
            cursor.execute(f"CREATE DATABASE `{name}`")
    finally:
        conn.close()


def drop_database(server_url: str, name: str) -> None:
    conn = admin_connection(server_url)
    try:
        with conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


def seed_commit(key: str, version: int, index: int):
    from rainer_server import Commit

    mtime = BASE_MTIME + timedelta(minutes=version, milliseconds=index)
    return Commit(key, version, make_payload(key, version), "bench", f"seed {version}", mtime)


def seed(db_url: str, tables: set[str] | None = None) -> dict[str, float]:
    """Fill the tables (all, or those of ``tables``) through DbCommitStorage's own model;
    return seconds per table."""
    from rainer_server import DbCommitStorage
    from rainer_server import open_database
    from rainer_server.chain import GENESIS
    from rainer_server.chain import link

    database = open_database(db_url)
    timings = {}
    try:
        for table, (nkeys, versions_of) in TABLES.items():
            if tables is not None and table not in tables:
                continue
            started = time.perf_counter()
            storage = DbCommitStorage(database, table)
            storage.start()
            row = storage._row
            # The columns DbCommitStorage._insert writes, in its order, through its fields
            # (so the key/mtime/payload conversions are the storage's own).
            columns = [
                row.key, row.version, row.author, row.comment,
                row.mtime, row.is_empty, row.is_head, row.payload, row.chain,
            ]
            batch: list[tuple] = []
            with database.atomic():
                for i in range(nkeys):
                    key = key_name(i)
                    last = versions_of(i)
                    # Chained as the storage would chain them: no migration on first start.
                    chain = GENESIS
                    for version in range(1, last + 1):
                        c = seed_commit(key, version, i)
                        chain = link(chain, c)
                        batch.append((c.key, c.version, c.author, c.comment, c.mtime, c.empty,
                                      version == last, c.payload, chain))
                        if len(batch) >= 2000:
                            row.insert_many(batch, fields=columns).execute()
                            batch.clear()
                if batch:
                    row.insert_many(batch, fields=columns).execute()
                    batch.clear()
            verify_seed(storage, table, nkeys, versions_of)
            timings[table] = time.perf_counter() - started
        for table in (POST_TABLE, ZK_POST_TABLE, FLOOR_POST_TABLE):
            DbCommitStorage(database, table).start()
    finally:
        database.close()
    return timings


def verify_seed(storage, table: str, nkeys: int, versions_of) -> None:
    import random

    rng = random.Random(table)
    for _ in range(50):
        i = rng.randrange(nkeys)
        key, last = key_name(i), versions_of(i)
        version = rng.randint(1, last)
        got = storage.get(key, version)
        assert got == seed_commit(key, version, i), f"{table}: {key}@{version} reads back {got!r}"
        assert storage.get(key) == seed_commit(key, last, i), f"{table}: head of {key} is wrong"
    total = sum(versions_of(i) for i in range(nkeys))
    heads = storage.heads()
    assert len(heads) == nkeys, f"{table}: {len(heads)} heads, expected {nkeys}"
    assert storage.heads_token() == total, f"{table}: heads_token != {total}"
    count, flagged = storage.database.execute_sql(
        f"SELECT COUNT(*), SUM(is_head) FROM `{table}`"
    ).fetchone()
    assert (count, int(flagged)) == (total, nkeys), f"{table}: {count} rows, {flagged} heads"


def check_post_history(db_url: str, table: str, check_heads: bool) -> str | None:
    """None when every key's versions are 1..n (and exactly one head), else a description."""
    from rainer_server import open_database

    database = open_database(db_url)
    try:
        bad = database.execute_sql(
            f"SELECT COUNT(*) FROM (SELECT `key` FROM `{table}` GROUP BY `key` "
            "HAVING COUNT(*) <> MAX(version) OR MIN(version) <> 1"
            + (" OR SUM(is_head) <> 1 OR MAX(is_head * version) <> MAX(version)"
               if check_heads else "")
            + ") AS broken"
        ).fetchone()[0]
        rows, keys = database.execute_sql(
            f"SELECT COUNT(*), COUNT(DISTINCT `key`) FROM `{table}`"
        ).fetchone()
    finally:
        database.close()
    if bad:
        return f"{bad} of {keys} keys in {table} have a broken history"
    return None


def time_heads_in_process(db_url: str, repeat: int = 7) -> dict[str, dict[str, float]]:
    """Uncached storage.heads() and heads_token() on shallow vs deep, median ms."""
    from rainer_server import DbCommitStorage
    from rainer_server import open_database

    database = open_database(db_url)
    out = {}
    try:
        for table in ("shallow", "deep"):
            storage = DbCommitStorage(database, table)
            for name, fn, n in (("heads", storage.heads, repeat),
                                ("heads_token", storage.heads_token, 10 * repeat)):
                fn()  # warm the buffer pool and the connection
                samples = []
                for _ in range(n):
                    started = time.perf_counter()
                    fn()
                    samples.append((time.perf_counter() - started) * 1000)
                out.setdefault(table, {})[name] = statistics.median(samples)
    finally:
        database.close()
    return out


def check_published(db_url: str, table: str, hosts: str, base_path: str, tags: list[str],
                    timeout: float = 15.0) -> str | None:
    """``None`` once ZooKeeper holds exactly the database's head of every key the runs posted
    (publishing may trail the answers: waits for it up to ``timeout``), else what differs."""
    from rainer_server import DbCommitStorage
    from rainer_server import open_database
    from rainer_server.zk.keeper import CommitKeeper
    from rainer_server.zk.keeper import make_kazoo_client

    database = open_database(db_url)
    storage = DbCommitStorage(database, table)
    client = make_kazoo_client(hosts)
    try:
        storage.start()
        heads = {key: commit for key, commit in storage.heads().items()
                 if key.startswith(tuple(tags))}
        client.start(timeout=15)
        keeper = CommitKeeper(client, base_path)
        deadline = time.monotonic() + timeout
        while True:
            published = {key: commit for key, commit in keeper.heads().items()
                         if key.startswith(tuple(tags))}
            differ = [key for key in heads if published.get(key) != heads[key]]
            if not differ and len(published) == len(heads):
                return None
            if time.monotonic() > deadline:
                return (f"{base_path}: {len(differ)} of {len(heads)} keys not published as "
                        f"saved (e.g. {differ[:3]}), {len(published)} znodes")
            time.sleep(0.2)
    finally:
        client.stop()
        client.close()
        storage.stop()
        database.close()


def service_env(db_url: str, table: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAINER_")}
    env.update(RAINER_DATABASE_URL=db_url, RAINER_TABLE=table, PYTHONDONTWRITEBYTECODE="1")
    return env


# ====================================================================== wrk


def run_wrk(url: str, script: str | None, script_args: list[str], duration: float,
            connections: int, threads: int) -> WrkResult:
    # wrk takes whole seconds only.
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
               "--latency",
               "--timeout", "10s"]
    if script:
        command += ["-s", str(BENCH / script)]
    command.append(url)
    if script_args:
        command += ["--", *script_args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}{done.stdout}")
    return parse_wrk(done.stdout)


# ====================================================================== scenarios


@dataclass
class Scenario:
    name: str
    label: str
    group: str                     # scenarios of a group are measured in alternating rounds
    app: str                       # gunicorn app spec
    table: str
    path: str                      # URL path wrk is pointed at
    script: str | None             # lua script
    args: list[str]                # script args; "{tag}" becomes a fresh tag per wrk run
    probe: tuple[str, str]         # (method, path) answered 200 before measuring; {tag} too
    floor: bool = False
    env: dict[str, str] = field(default_factory=dict)
    # Slow scenarios (about a second a request) use fewer connections than --connections,
    # so requests queued behind the workers stay well inside wrk's timeout, and fewer rounds.
    slow: bool = False
    # Needs ZooKeeper: RAINER_ZK_HOSTS and a base path of its own are added to env.
    zookeeper: bool = False


def scenarios(connections: int, threads: int) -> list[Scenario]:
    # Each thread cycles over `pool` keys; version v of a key goes out `pool` requests after
    # version v-1, when at most connections/threads requests of that thread are in flight.
    pool = str(max(200, 25 * math.ceil(connections / threads)))
    rainer, deep = "wsgi:app", "deep"
    head_args = ["/diary", "10000", "0"]
    version_args = ["/diary", "10000", "50"]
    get_head_probe = ("GET", "/diary/key-00042")
    get_version_probe = ("GET", "/diary/key-00042/17")
    list_probe = ("GET", "/diary")
    post_probe = ("POST", "/diary/probe-{tag}/1")
    next_args = ["{tag}", "next", pool]
    new_args = ["{tag}", "new", pool]
    out = [
        Scenario("floor_a", "(a) bare WSGI bytes", "get-head", "floors:bare_wsgi", deep,
                 "/diary", "get.lua", head_args, get_head_probe, floor=True),
        Scenario("floor_b", "(b) Flask dict[key]", "get-head", "floors:flask_dict", deep,
                 "/diary", "get.lua", head_args, get_head_probe, floor=True),
        Scenario("get_head", "GET /diary/<key> (deep)", "get-head", rainer, deep, "/diary",
                 "get.lua", head_args, get_head_probe),
        Scenario("floor_c", "(c) Flask+pymysql PK select", "get-version",
                 "floors:flask_pymysql_get", deep, "/diary", "get.lua", version_args,
                 get_version_probe, floor=True),
        Scenario("get_version", "GET /diary/<key>/<v> (deep)", "get-version", rainer, deep,
                 "/diary", "get.lua", version_args, get_version_probe),
        # Repeat reads: 100 keys x 50 versions (5000 immutable versions) fit the per-process
        # version cache after the warm-up, as a fleet's pinned versions would.
        Scenario("get_version_hot", "GET /diary/<key>/<v> repeats (5000)", "get-version",
                 rainer, deep, "/diary", "get.lua", ["/diary", "100", "50"], get_version_probe),
        Scenario("list_shallow", "GET /diary 10k x 1 version", "list", rainer, "shallow",
                 "/diary", None, [], list_probe),
        Scenario("list_deep", "GET /diary 10k x 50 versions", "list", rainer, deep, "/diary",
                 None, [], list_probe),
        # The same with the list cache off: what the first list after any write costs.
        Scenario("list_shallow_nc", "GET /diary 10k x 1, uncached", "list-uncached",
                 "variants:rainer_nocache", "shallow", "/diary", None, [], list_probe,
                 slow=True),
        Scenario("list_deep_nc", "GET /diary 10k x 50, uncached", "list-uncached",
                 "variants:rainer_nocache", deep, "/diary", None, [], list_probe, slow=True),
        Scenario("floor_e", "(e) naive Flask+peewee list 1000", "list-1000",
                 "floors:naive_peewee_list", "k1000", "/diary", None, [], list_probe,
                 floor=True),
        Scenario("list_1000", "GET /diary 1000 heads", "list-1000", rainer, "k1000", "/diary",
                 None, [], list_probe),
        Scenario("floor_d_next", "(d) Flask+pymysql insert txn", "post-next",
                 "floors:flask_pymysql_post", FLOOR_POST_TABLE, "/diary", "post.lua", next_args,
                 post_probe, floor=True),
        Scenario("post_next", "POST next versions, distinct keys", "post-next", rainer,
                 POST_TABLE, "/diary", "post.lua", next_args, post_probe),
        # As the README deploys it: every worker publishes to ZooKeeper and mirrors it. The
        # ZooKeeper settings are filled in by main() (zk_env); its table is its own
        # (ZK_POST_TABLE, see there).
        Scenario("post_next_zk", "POST next versions, with ZooKeeper", "post-next", rainer,
                 ZK_POST_TABLE, "/diary", "post.lua", next_args, post_probe, zookeeper=True),
        Scenario("floor_d_new", "(d) insert txn, new keys v1", "post-new",
                 "floors:flask_pymysql_post", FLOOR_POST_TABLE, "/diary", "post.lua", new_args,
                 post_probe, floor=True),
        Scenario("post_new", "POST version 1 of new keys", "post-new", rainer, POST_TABLE,
                 "/diary", "post.lua", new_args, post_probe),
    ]
    return out


# Comparisons: (scenario, floor or baseline, kind, target). kind "min": ratio = rps / floor rps
# must be >= target. kind "max-inverse": ratio = baseline rps / rps must be <= target.
# Both are medians of the per-round ratios (a round measures the pair back to back).
COMPARISONS = [
    ("get_head", "floor_a", "min", None),
    ("get_head", "floor_b", "min", None),
    ("get_version", "floor_c", "min", 0.95),
    ("get_version_hot", "floor_c", "min", 0.95),
    ("list_deep", "list_shallow", "max-inverse", 1.3),
    ("list_deep_nc", "list_shallow_nc", "max-inverse", 1.3),
    ("list_1000", "floor_e", "min", 5.0),
    ("post_next", "floor_d_next", "min", 0.8),
    ("post_next_zk", "post_next", "min", 0.85),
    ("post_next_zk", "floor_d_next", "min", 0.8),
    ("post_new", "floor_d_new", "min", 0.8),
]


def probe(base: str, method: str, path: str) -> tuple[int, bytes]:
    data = None
    headers = {}
    if method == "POST":
        data = b'{"probe": true}'
        headers = {"X-Rainer-Author": "bench", "Content-Type": "application/json"}
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        # The first request over a freshly seeded journal starts the storage, which chains
        # and numbers every row (500k for deep): minutes on a busy machine.
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---------------------------------------------------------------- CPU accounting
# The machine is shared: other work on it skews a run. Around every wrk run we count the CPU
# used by everything except this benchmark's gunicorns, wrk and the database server, as a
# percentage of all CPUs ("bg%"), so a disturbed figure can be recognised as such.


def _service_pids() -> list[int]:
    """The database server's and ZooKeeper's processes: part of what a POST costs, never
    background load (the ZooKeeper scenarios would otherwise look disturbed by their own
    ZooKeeper)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    comm = f.read().strip()
                if comm == "java":
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if b"zookeeper" not in f.read().lower():
                            continue
                elif comm not in ("mariadbd", "mysqld"):
                    continue
                pids.append(int(entry))
            except OSError:
                pass
    return pids


def _our_cpu(masters: list[int], database: list[int]) -> float:
    """CPU seconds of the gunicorn masters, their workers and the services (``_service_pids``)."""
    wanted = set(masters)
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        stat = proc_stat(pid)
        if stat and (pid in wanted or stat[0] in wanted or pid in database):
            total += stat[1]
    return total


class CpuWatch:
    def __init__(self, masters: list[int]) -> None:
        self.masters = masters
        self.database = _service_pids()

    def __enter__(self):
        self.t0 = time.monotonic()
        self.busy0 = busy_seconds()
        self.ours0 = _our_cpu(self.masters, self.database)
        self.children0 = children_cpu()
        return self

    def __exit__(self, *exc):
        elapsed = time.monotonic() - self.t0
        busy = busy_seconds() - self.busy0
        ours = _our_cpu(self.masters, self.database) - self.ours0
        wrk = children_cpu() - self.children0
        capacity = elapsed * (os.cpu_count() or 1)
        self.background_pct = max(0.0, 100 * (busy - ours - wrk) / capacity) if capacity else 0
        self.ours_pct = 100 * (ours + wrk) / capacity if capacity else 0



# ---------------------------------------------------------------- running a group


def run_group(group: list[Scenario], args, db_url: str, log_dir: Path) -> dict[str, dict]:
    """Measure a group's scenarios in alternating rounds, every gunicorn up all along.

    Only one is under load at a time (idle sync workers cost nothing); alternating the order
    each round spreads slow drifts and bursts of background load over all of them.
    """
    servers: dict[str, Gunicorn] = {}
    rounds: dict[str, list[dict]] = {s.name: [] for s in group}
    connections: dict[str, int] = {}
    tags: dict[str, list[str]] = {s.name: [] for s in group}
    problems: dict[str, str | None] = {}
    zk_paths: dict[str, str] = {}
    try:
        for s in group:
            env = {**service_env(db_url, s.table), **s.env}
            if s.zookeeper:
                zk_paths[s.name] = f"/bench-core-{uuid.uuid4().hex[:8]}"
                # No elected pass during the rounds: each reads every head of the table.
                env.update(RAINER_ZK_HOSTS=args.zk_hosts, RAINER_ZK_PATH=zk_paths[s.name],
                           RAINER_PUBLISH_PERIOD="3600")
            servers[s.name] = Gunicorn(s.name, s.app, env, args.workers, log_dir)
        for s in group:
            server = servers[s.name]
            # The first start over a freshly seeded journal numbers its rows in the global
            # index (500k for deep): minutes on a busy machine, not the 30 s of a plain start.
            server.wait_ready(timeout=600)
            method, path = s.probe
            status, body = probe(server.base, method,
                                 path.replace("{tag}", uuid.uuid4().hex[:10]))
            if status != 200:
                raise RuntimeError(f"{s.name}: probe {method} {path} answered {status}: "
                                   f"{body[:300]!r}\n{server.output()}")
            connections[s.name] = args.connections
            if s.slow:
                connections[s.name] = max(args.threads, min(args.connections, 2 * args.workers))
        masters = [server.process.pid for server in servers.values()]

        def measure(s: Scenario, seconds: float) -> dict:
            tag = "w" + uuid.uuid4().hex[:10]
            tags[s.name].append(tag)
            script_args = [item.replace("{tag}", tag) for item in s.args]
            with CpuWatch(masters) as cpu:
                result = run_wrk(servers[s.name].base + s.path, s.script, script_args, seconds,
                                 connections[s.name], args.threads)
            if servers[s.name].process.poll() is not None:
                raise RuntimeError(f"{s.name}: gunicorn died\n{servers[s.name].output()}")
            return {"rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                    "requests": result.requests, "non2xx": result.non2xx,
                    "socket_errors": result.socket_errors, "bg_pct": cpu.background_pct,
                    "ours_pct": cpu.ours_pct}

        if args.warmup > 0:
            for s in group:
                warm = measure(s, args.warmup)
                if warm["non2xx"] or warm["socket_errors"]:
                    print(f"  warning: warm-up of {s.name}: {warm['non2xx']} non-2xx, "
                          f"{warm['socket_errors']} socket errors", file=sys.stderr)
        n = args.rounds
        for r in range(n):
            order = group[r % len(group):] + group[:r % len(group)]
            if r % 2:
                order = order[::-1]
            for s in order:
                s_rounds = min(n, 2) if s.slow else n
                if r >= s_rounds:
                    continue
                seconds = args.duration / s_rounds
                if s.slow:
                    seconds = max(seconds, 4)  # about a second a request
                rounds[s.name].append(measure(s, seconds))
        problems = {name: check_published(db_url, s.table, args.zk_hosts, zk_paths[name],
                                          tags[name])
                    for name in zk_paths for s in group if s.name == name}
    finally:
        for server in servers.values():
            server.stop()

    rows = {}
    for s in group:
        runs = rounds[s.name]
        rps = [run["rps"] for run in runs]
        non2xx = sum(run["non2xx"] for run in runs)
        sockets = sum(run["socket_errors"] for run in runs)
        completed = all(run["requests"] > 0 for run in runs)
        middle = statistics.median(rps)
        rows[s.name] = {
            "scenario": s.name,
            "label": s.label,
            "group": s.group,
            "floor": s.floor,
            "app": s.app,
            "table": s.table,
            "connections": connections[s.name],
            "rps": statistics.median(rps),
            "spread_pct": 100 * (max(rps) - min(rps)) / middle if middle else 0,
            "p50_ms": statistics.median(run["p50_ms"] for run in runs),
            "p99_ms": statistics.median(run["p99_ms"] for run in runs),
            "requests": sum(run["requests"] for run in runs),
            "non2xx": non2xx,
            "socket_errors": sockets,
            "bg_pct": statistics.mean(run["bg_pct"] for run in runs),
            "valid": non2xx == 0 and sockets == 0 and completed and not problems.get(s.name),
            "problem": problems.get(s.name),
            "rounds": runs,
        }
    return rows


# ====================================================================== report


def _paired_ratio(row: dict, other: dict, inverse: bool) -> float:
    pairs = list(zip(row["rounds"], other["rounds"]))
    if row["group"] == other["group"] and pairs:
        if all(a["rps"] and b["rps"] for a, b in pairs):
            return statistics.median(
                (b["rps"] / a["rps"]) if inverse else (a["rps"] / b["rps"]) for a, b in pairs
            )
    if not (row["rps"] and other["rps"]):
        return float("nan")
    return other["rps"] / row["rps"] if inverse else row["rps"] / other["rps"]


def build_table(rows: dict[str, dict], heads_ms: dict | None, connections: int) -> list[dict]:
    """Rows of the printed table, in measuring order, with comparisons attached."""
    table = []
    compared = {}
    for scenario, base, kind, target in COMPARISONS:
        compared.setdefault(scenario, []).append((base, kind, target))
    for name, row in rows.items():
        comparisons = compared.get(name) or [(None, None, None)]
        for n, (base, kind, target) in enumerate(comparisons):
            label = row["label"]
            if row["connections"] != connections:
                label += f" c={row['connections']}"
            line = {
                "scenario": label if n == 0 else "  (same run)",
                "key": name,
                "rps": row["rps"],
                "spread_pct": row["spread_pct"],
                "p50_ms": row["p50_ms"],
                "p99_ms": row["p99_ms"],
                "errors": row["non2xx"] + row["socket_errors"],
                "bg_pct": row["bg_pct"],
                "floor": None,
                "ratio": None,
                "target": None,
                "verdict": "" if row["valid"] else "INVALID",
            }
            if base is not None and base in rows:
                other = rows[base]
                line["floor"] = other["label"].strip()
                line["ratio"] = _paired_ratio(row, other, inverse=(kind != "min"))
                if kind == "min":
                    line["target"] = f">= {target:g}" if target else "(info)"
                    ok = target is None or line["ratio"] >= target
                else:
                    line["p50_ratio"] = row["p50_ms"] / other["p50_ms"]
                    line["target"] = f"<= {target:g} (1/thru)"
                    ok = line["ratio"] <= target
                valid = row["valid"] and other["valid"]
                if not valid:
                    line["verdict"] = "INVALID"
                elif target is not None:
                    line["verdict"] = "pass" if ok else "FAIL"
            table.append(line)
    if heads_ms:
        shallow = heads_ms["shallow"]
        for name in ("heads", "heads_token"):
            for which in heads_ms:
                value = heads_ms[which][name]
                line = {
                    "scenario": f"in-process {name}() {which}",
                    "key": f"{name}_{which}",
                    "rps": 1000 / value if value else None,
                    "spread_pct": None,
                    "p50_ms": value,
                    "p99_ms": None,
                    "errors": 0,
                    "bg_pct": None,
                    "floor": None,
                    "ratio": None,
                    "target": None,
                    "verdict": "",
                }
                if which != "shallow":
                    line["floor"] = f"{name}() shallow"
                    line["ratio"] = value / shallow[name]
                    if name == "heads":  # the issue's "heads() must not cost more" rule
                        line["target"] = "<= 1.3 (time)"
                        line["verdict"] = "pass" if line["ratio"] <= 1.3 else "FAIL"
                    else:
                        line["target"] = "(info)"
                table.append(line)
    return table


def print_table(table: list[dict]) -> None:
    def fmt(value, spec):
        width = int(re.match(r"\d*", spec).group() or 0)
        return format("-", f">{width}") if value is None else format(value, spec)

    header = (f"{'scenario':<36} {'req/s':>8} {'±%':>4} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'err':>4} {'bg%':>4}  {'floor / baseline':<34} {'ratio':>6}  "
              f"{'target':<14} {'result':<7}")
    print(header)
    print("-" * len(header))
    for line in table:
        print(f"{line['scenario']:<36} {fmt(line['rps'], '8.1f')} "
              f"{fmt(line['spread_pct'], '4.0f')} {fmt(line['p50_ms'], '8.2f')} "
              f"{fmt(line['p99_ms'], '8.2f')} {line['errors']:>4} {fmt(line['bg_pct'], '4.0f')}  "
              f"{line['floor'] or '':<34} {fmt(line['ratio'], '6.2f')}  "
              f"{line['target'] or '':<14} {line['verdict']:<7}")


# ====================================================================== main


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8,
                        help="seconds measured per scenario, split over --rounds")
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternating rounds per group of compared scenarios")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of warm-up per scenario")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (all apps)")
    parser.add_argument("--mysql", default="mysql://root@127.0.0.1:3306",
                        help="MySQL server URL, without database")
    parser.add_argument("--database", default="rainer_bench")
    parser.add_argument("--zk-hosts", default=os.environ.get("RAINER_TEST_ZK_HOSTS"),
                        help="ZooKeeper for the scenarios with ZooKeeper (default: "
                             "$RAINER_TEST_ZK_HOSTS, else a throw-away one is started)")
    parser.add_argument("--only", help="comma-separated scenario names (debugging)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database")
    parser.add_argument("--log-dir", help="keep gunicorn logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads")

    # Also when started in the background by a shell, which leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    db_url = f"{args.mysql.rstrip('/')}/{args.database}"
    log_dir_ctx = tempfile.TemporaryDirectory(prefix="rainer-bench-")
    log_dir = Path(args.log_dir or log_dir_ctx.name)
    log_dir.mkdir(parents=True, exist_ok=True)
    selected = set(args.only.split(",")) if args.only else None
    started = time.monotonic()
    rows: dict[str, dict] = {}
    heads_ms = None
    invalid: list[str] = []
    created = False
    zk_server = None
    try:
        print(f"# rainer bench: {os.cpu_count()} CPUs, gunicorn --workers {args.workers} "
              f"(the configured worker class, gevent by default), wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s "
              f"(+{args.warmup:g}s warm-up), MySQL {db_url}", flush=True)
        recreate_database(args.mysql, args.database)
        created = True
        groups: dict[str, list[Scenario]] = {}
        for s in scenarios(args.connections, args.threads):
            if not selected or s.name in selected or s.group in selected:
                groups.setdefault(s.group, []).append(s)
        # --only seeds only what the chosen scenarios read (deep alone takes minutes).
        needed = None if not selected else {s.table for g in groups.values() for s in g}
        timings = seed(db_url, needed)
        print("# seeded " + ", ".join(f"{t} in {s:.1f}s" for t, s in timings.items()),
              flush=True)
        if needed is None or {"shallow", "deep"} <= needed:
            heads_ms = time_heads_in_process(db_url)
        if not args.zk_hosts and any(s.zookeeper for g in groups.values() for s in g):
            from tests.zkserver import ZooKeeperServer

            zk_server = ZooKeeperServer(Path(log_dir) / "zk", production=True).start()
            args.zk_hosts = zk_server.hosts
        for name, group in groups.items():
            print(f"# {name}: {', '.join(s.name for s in group)} "
                  f"(load1 {os.getloadavg()[0]:.2f})", flush=True)
            rows.update(run_group(group, args, db_url, log_dir))
            for s in group:
                r = rows[s.name]
                print(f"#   {s.name:<18} {r['rps']:8.1f} req/s (±{r['spread_pct']:.0f}%), "
                      f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                      f"{r['non2xx']} non-2xx, {r['socket_errors']} socket errors, "
                      f"background CPU {r['bg_pct']:.0f}%", flush=True)
        for table, check_heads in (
            (POST_TABLE, True), (ZK_POST_TABLE, True), (FLOOR_POST_TABLE, False)
        ):
            problem = check_post_history(db_url, table, check_heads)
            if problem:
                invalid.append(problem)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        Children.stop_all()
        if zk_server is not None:
            zk_server.stop()
        if created and not args.keep_db:
            try:
                drop_database(args.mysql, args.database)
            except Exception as exc:
                print(f"warning: could not drop {args.database}: {exc}", file=sys.stderr)
        if not args.log_dir:
            log_dir_ctx.cleanup()

    table = build_table(rows, heads_ms, args.connections)
    print()
    print_table(table)
    invalid += [f"{r['scenario']}: {r['non2xx']} non-2xx, {r['socket_errors']} socket errors, "
                f"{r['requests']} requests" + (f"; {r['problem']}" if r["problem"] else "")
                for r in rows.values() if not r["valid"]]
    for problem in invalid:
        print(f"INVALID: {problem}")
    disturbed = sorted({r["group"] for r in rows.values() if r["bg_pct"] > 20})
    if disturbed:
        print(f"WARNING: other processes used over 20% of the CPUs during {', '.join(disturbed)}"
              "; those figures are disturbed, rerun on a quiet machine to confirm them")
    elapsed = time.monotonic() - started
    print(f"# {elapsed:.0f}s total; loadavg at end {os.getloadavg()[0]:.2f}. req/s, p50, p99: "
          f"medians over {args.rounds} rounds (2 for c=4 rows); ±%: spread of req/s over the "
          "rounds; bg%: CPU used by other processes on the machine during the rounds; ratio: "
          "median of per-round ratios.")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({
                "meta": {
                    "cpus": os.cpu_count(),
                    "workers": args.workers,
                    "worker_class": os.environ.get("RAINER_WORKER_CLASS", "gevent"),
                    "connections": args.connections,
                    "threads": args.threads,
                    "duration_s": args.duration,
                    "rounds": args.rounds,
                    "warmup_s": args.warmup,
                    "python": platform.python_version(),
                    "elapsed_s": elapsed,
                    "invalid": invalid,
                },
                "table": table,
                "runs": {k: {kk: vv for kk, vv in v.items()} for k, v in rows.items()},
                "heads_in_process_ms": heads_ms,
            }, out, indent=2)
    if invalid:
        return 2
    return 1 if any(line["verdict"] == "FAIL" for line in table) else 0


if __name__ == "__main__":
    sys.exit(main())
