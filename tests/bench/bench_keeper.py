#!/usr/bin/env python3
"""ZooKeeper benchmark (issue 3): commit propagation, mirror-backed reads, publisher passes.

    python3 tests/bench/bench_keeper.py [--duration 8] [--json PATH]

One run, against floors measured in the same run:

0. starts its own standalone ZooKeeper (tests.zkserver, in a temp dir), drops and creates the
   MySQL database ``rainer_bench_keeper`` and seeds 10k keys (``key-00000`` ..., one ~200-byte
   JSON version each, the payloads of floors.py) through ``DbCommitStorage``'s own model;
1. publisher (``AutoPublisher.publish_all()`` built by ``CommitKeeper(...).auto_publisher(
   storage, mirror=...)`` with a mirror on the same kazoo client, as gunicorn workers do):
   (a) one pass into an empty ZooKeeper (10k creates; target <= 1.5x its floor: bare kazoo
   ``create_async`` of the same 10k znodes, at most 1000 unanswered, no watchers), (b) a
   second, unchanged pass (target: no writes, well under a second); then a mirror's start-up
   over the 10k znodes (target <= 1.2x its floor: ``get_async`` of each child, at most 1000
   unanswered; median of 5 paired rounds). Extra rows: ``keeper.save`` x 10k with no mirror
   anywhere, sequential creates, the mirror's catch-up after (a) and how often it re-listed
   ``data/`` during (a), ``storage.heads()``, ``keeper.heads()``;
2. starts gunicorn three times with the same config file and worker count
   (``-c config/gunicorn.conf.py --workers 2``): Rainer with ZooKeeper configured (base path
   of step 1, so every worker mirrors the 10k keys), floors.py's ``flask_dict`` and
   ``bare_wsgi``;
3. latency, 1000 samples each, interleaved in blocks of 100, each sample waiting for the
   previous one to arrive: a separate observer process (keeper_observer.py) timestamps
   arrivals (CLOCK_MONOTONIC, shared by all processes):
   - floor: bare kazoo ``set`` in this process -> kazoo ``DataWatch`` firing in the observer;
   - ``POST /diary/bench-post/<v>`` to Rainer's gunicorn -> a mirror in another process
     (``CommitKeeper(make_kazoo_client(hosts), path).mirror()`` + ``subscribe``): the same
     code and the same ZooKeeper round trips as the other gunicorn worker's mirror. Measured
     from just before sending (the main figure) and from the 200 arriving;
   - ``keeper.save(commit)`` in this process -> the observer's mirror (the keeper alone);
   afterwards every gunicorn worker must serve the last version from its mirror;
4. ``GET /diary/key-NNNNN`` (random keys) with wrk against the three gunicorns, in alternating
   rounds (``--rounds``, ``--duration`` split over them, after ``--warmup``); a sample of
   Rainer's answers must carry ``X-Rainer-Cached: Yes`` and the seeded payload, before and
   after. Target: Rainer >= 0.9 x flask_dict (median of per-round ratios). Also reported:
   the workers' CPU per request (less sensitive to a busy machine than req/s);
5. prints one table; ``--json PATH`` also writes it. Stops everything it started (also on
   errors, Ctrl-C, SIGTERM) and drops the database.

Exit status: 0 all targets met, 1 a target missed, 2 the benchmark itself is invalid.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from keeper_support import Children  # noqa: E402  (after the path set-up)
from keeper_support import CpuWatch  # noqa: E402
from keeper_support import Gunicorn  # noqa: E402
from keeper_support import Observer  # noqa: E402
from keeper_support import http_request  # noqa: E402
from keeper_support import mysql_execute  # noqa: E402
from keeper_support import now_ns  # noqa: E402
from keeper_support import parse_wrk  # noqa: E402
from keeper_support import proc_stat  # noqa: E402
from keeper_support import run_wrk  # noqa: E402
from keeper_support import tree_cpu  # noqa: E402

from floors import BASE_MTIME  # noqa: E402  (bench_core's floor apps, reused read-only)
from floors import key_name  # noqa: E402
from floors import make_payload  # noqa: E402

FLOOR_MODULE = "floors"

NKEYS = 10_000
MIRROR_START_ROUNDS = 5
TABLE = "rainer"
BASE_PATH = "/bench"                 # the keeper's base path, Rainer's RAINER_ZK_PATH
FLOOR_ZNODE = "/bench-floor/node"    # bare kazoo set -> DataWatch
POST_KEY = "bench-post"
SAVE_KEY = "bench-save"
LOAD_KEY = "bench-load"              # sampled while wrk POSTs other keys
#: Commit -> another process's mirror, from the POST being sent, under POST load (issue 13).
PROPAGATION_P50_MS = 5.0
PROPAGATION_P99_MS = 15.0
AUTHOR = {"X-Rainer-Author": "bench", "Content-Type": "application/json"}


def log(message: str) -> None:
    print(f"# {message}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# ====================================================================== setup


def seed(db_url: str) -> float:
    """10k keys x 1 version through DbCommitStorage's own model (bulk), checked on a sample."""
    from rainer_server import DbCommitStorage
    from rainer_server import open_database
    from rainer_server.chain import GENESIS
    from rainer_server.chain import link

    started = time.perf_counter()
    database = open_database(db_url)
    try:
        storage = DbCommitStorage(database, TABLE)
        storage.start()
        row = storage._row
        columns = [row.key, row.version, row.author, row.comment, row.mtime, row.is_empty,
                   row.is_head, row.payload, row.chain]
        with database.atomic():
            batch = []
            for i in range(NKEYS):
                c = seed_commit(i)
                # Chained as the storage would chain it: no migration on first start.
                batch.append((c.key, c.version, c.author, c.comment, c.mtime, c.empty, True,
                              c.payload, link(GENESIS, c)))
                if len(batch) >= 2000:
                    row.insert_many(batch, fields=columns).execute()
                    batch.clear()
            if batch:
                row.insert_many(batch, fields=columns).execute()
        rng = random.Random(1)
        for i in rng.sample(range(NKEYS), 20):
            if storage.get(key_name(i)) != seed_commit(i):
                raise RuntimeError(f"seed: {key_name(i)} does not read back equal")
    finally:
        database.close()
    return time.perf_counter() - started


def seed_commit(i: int):
    from rainer_server import Commit

    key = key_name(i)
    return Commit(key, 1, make_payload(key, 1), "bench", "seed",
                  BASE_MTIME + timedelta(milliseconds=i))


def kazoo_client(hosts: str, clients: list, bare: bool = False):
    from kazoo.client import KazooClient

    from rainer_server.zk.keeper import make_kazoo_client

    client = KazooClient(hosts=hosts) if bare else make_kazoo_client(hosts)
    client.start(timeout=15)
    clients.append(client)
    return client


# ====================================================================== 1. publisher


def counted_mirror(mirror, timeout: float = 60.0):
    """Start ``mirror`` (as ``CommitKeeper.mirror()`` does) counting its children callbacks."""
    mirror.bench_relists = {"calls": 0, "names": 0}
    on_children = mirror._on_children

    def counting(children):
        mirror.bench_relists["calls"] += 1
        mirror.bench_relists["names"] += len(children)
        return on_children(children)

    mirror._on_children = counting  # before start(): the children watch binds it then
    mirror.start()
    if not mirror.wait_initialized(timeout):
        mirror.close()
        raise RuntimeError("mirror not initialized")
    return mirror


def pipelined(call, arguments, in_flight: int = 1000) -> None:
    """``call(*args)`` (a kazoo ``*_async``) for each of ``arguments``, at most ``in_flight``
    unanswered."""
    pending: collections.deque = collections.deque()
    for args in arguments:
        pending.append(call(*args))
        if len(pending) >= in_flight:
            pending.popleft().get(timeout=60)
    while pending:
        pending.popleft().get(timeout=60)


def bench_publisher(hosts: str, db_url: str, clients: list, extras: bool) -> dict:
    from rainer_server import DbCommitStorage
    from rainer_server import open_database
    from rainer_server.zk.keeper import CommitKeeper
    from rainer_server.zk.mirror import CommitMirror
    from rainer_server.zk.publisher import AutoPublisher

    out: dict = {}
    commits = [seed_commit(i) for i in range(NKEYS)]
    client = kazoo_client(hosts, clients)

    # Warm ZooKeeper's JVM (C1 only) up a little, so the first measurement does not pay for it.
    client.ensure_path("/warm")
    for i in range(1000):
        client.create(f"/warm/n{i}", b"x" * 300)
    for i in range(1000):
        client.delete(f"/warm/n{i}")

    # Floor: the least a sequential first pass can do, one create per key, nobody watching.
    client.ensure_path("/bench-raw/data")
    started = time.perf_counter()
    for c in commits:
        client.create(f"/bench-raw/data/{c.key}", c.serialize())
    out["raw_create_s"] = time.perf_counter() - started
    log(f"floor: bare kazoo create x {NKEYS} (sequential): {out['raw_create_s']:.2f} s")

    # Floor of the first publish (issue 13): pipelined creates, at most 1000 unanswered.
    client.ensure_path("/bench-pipe/data")
    started = time.perf_counter()
    pipelined(client.create_async, ((f"/bench-pipe/data/{c.key}", c.serialize()) for c in commits))
    out["pipelined_create_s"] = time.perf_counter() - started
    log(f"floor: bare kazoo create_async x {NKEYS} (1000 in flight): "
        f"{out['pipelined_create_s']:.2f} s")
    if extras:
        nomirror = CommitKeeper(client, "/bench-nomirror")
        client.ensure_path("/bench-nomirror/data")
        started = time.perf_counter()
        for c in commits:
            nomirror.save(c)
        out["save_nomirror_s"] = time.perf_counter() - started
        log(f"extra: keeper.save x {NKEYS}, no mirror anywhere: {out['save_nomirror_s']:.2f} s")

    database = open_database(db_url)
    storage = DbCommitStorage(database, TABLE)
    try:
        storage.start()
        heads_s = []
        for _ in range(3):
            started = time.perf_counter()
            heads = storage.heads()
            heads_s.append(time.perf_counter() - started)
        out["heads_s"] = statistics.median(heads_s)
        assert len(heads) == NKEYS

        keeper = CommitKeeper(client, BASE_PATH)
        # Empty; on the publisher's client, as in gunicorn. What keeper.mirror() does, with the
        # children callback counted (instrumentation only).
        mirror = counted_mirror(CommitMirror(keeper))
        # Not started: no election.
        publisher = AutoPublisher(keeper.client, keeper, storage, mirror=mirror)
        try:
            started = time.perf_counter()
            counts = publisher.publish_all()
            out["pass_a_s"] = time.perf_counter() - started
            out["pass_a"] = counts.as_dict()
            out["pass_a_relists"] = dict(mirror.bench_relists)
            log(f"publisher pass (a), empty ZooKeeper: {out['pass_a_s']:.2f} s, {counts}")
            # The mirror must have seen every create before an unchanged pass can skip them all.
            started = time.perf_counter()
            deadline = time.monotonic() + 120
            while len(mirror.current) < NKEYS and time.monotonic() < deadline:
                time.sleep(0.005)
            out["catch_up_s"] = time.perf_counter() - started
            out["mirror_after_a"] = len(mirror.current)
            started = time.perf_counter()
            counts = publisher.publish_all()
            out["pass_b_s"] = time.perf_counter() - started
            out["pass_b"] = counts.as_dict()
            log(f"publisher pass (b), unchanged: {out['pass_b_s'] * 1000:.0f} ms, {counts} "
                f"(storage.heads() alone {out['heads_s'] * 1000:.0f} ms)")
        finally:
            publisher.close()  # and the mirror of deleted/ it opened
            mirror.close()
        # Mirror start-up (issue 13), paired rounds: bare pipelined reads of every child on a
        # fresh client (the floor), then a mirror opened on another fresh client.
        floors, opens = [], []
        # Five rounds: the floor alone spread 0.42-1.38 s over 8 rounds on this client, and a
        # median of 3 moved between 0.85x and 1.6x.
        for _ in range(MIRROR_START_ROUNDS):
            fresh = kazoo_client(hosts, clients)
            started = time.perf_counter()
            children = fresh.get_children(keeper.data_path)
            pipelined(fresh.get_async, ((f"{keeper.data_path}/{k}",) for k in children))
            floors.append(time.perf_counter() - started)
            fresh = kazoo_client(hosts, clients)
            started = time.perf_counter()
            opened = CommitKeeper(fresh, BASE_PATH).mirror(timeout=120)
            opens.append(time.perf_counter() - started)
            assert len(opened.current) == NKEYS
            opened.close()
        out["pipelined_reads_s"] = statistics.median(floors)
        out["mirror_start_s"] = statistics.median(opens)
        out["mirror_start_ratio"] = statistics.median(o / f for o, f in zip(opens, floors))
        log(f"mirror start-up over {NKEYS} znodes {out['mirror_start_s']:.2f} s, bare pipelined "
            f"reads {out['pipelined_reads_s']:.2f} s: {out['mirror_start_ratio']:.2f}x "
            f"(median of {MIRROR_START_ROUNDS} paired rounds)")
        started = time.perf_counter()
        heads_zk = keeper.heads()
        out["keeper_heads_s"] = time.perf_counter() - started
        log(f"keeper.heads() (pipelined reads) of {len(heads_zk)} znodes: "
            f"{out['keeper_heads_s']:.2f} s")
        # ZooKeeper holds exactly the storage's heads.
        children = client.get_children(keeper.data_path)
        out["znodes"] = len(children)
        problems = []
        if len(children) != NKEYS:
            problems.append(f"{len(children)} znodes under {keeper.data_path}, expected {NKEYS}")
        for i in random.Random(2).sample(range(NKEYS), 25):
            if keeper.get(key_name(i)) != commits[i]:
                problems.append(f"znode {key_name(i)} differs from the storage")
        out["problems"] = problems
    finally:
        storage.stop()
    return out


# ====================================================================== 3. latency


def bench_latency(hosts: str, rainer: Gunicorn, clients: list, samples: int, block: int,
                  warmup: int) -> dict:
    from rainer_server import Commit
    from rainer_server.commit import now
    from rainer_server.zk.keeper import CommitKeeper

    floor_client = kazoo_client(hosts, clients, bare=True)
    commit_size = len(Commit(SAVE_KEY, 1, make_payload(SAVE_KEY, 1), "bench", "save",
                             now()).serialize())

    def floor_data(version: int) -> bytes:
        head = b"%d\n" % version
        return head + b"x" * max(0, commit_size - len(head))

    floor_client.ensure_path(FLOOR_ZNODE)
    floor_client.set(FLOOR_ZNODE, floor_data(0))
    watcher = Observer("datawatch", hosts, FLOOR_ZNODE)
    mirror_obs = Observer("mirror", hosts, BASE_PATH, POST_KEY, SAVE_KEY)
    watcher.wait_ready()
    mirror_open_s = mirror_obs.wait_ready()
    log(f"observers ready; the observer's mirror opened over {NKEYS} znodes in "
        f"{mirror_open_s:.2f} s")

    save_client = kazoo_client(hosts, clients)
    keeper = CommitKeeper(save_client, BASE_PATH)
    versions = {"floor": 0, "post": 0, "save": 0}
    results: dict[str, list[tuple[int, int, int]]] = {"floor": [], "post": [], "save": []}

    def one(kind: str) -> tuple[int, int, int]:
        versions[kind] += 1
        v = versions[kind]
        if kind == "floor":
            t0 = now_ns()
            floor_client.set(FLOOR_ZNODE, floor_data(v))
            t1 = now_ns()
            ta = watcher.wait_for("floor", v)
        elif kind == "save":
            commit = Commit(SAVE_KEY, v, make_payload(SAVE_KEY, v), "bench", "save", now())
            t0 = now_ns()
            keeper.save(commit)
            t1 = now_ns()
            ta = mirror_obs.wait_for(SAVE_KEY, v)
        else:
            body = make_payload(POST_KEY, v)
            t0 = now_ns()
            status, _, answer = http_request(rainer.base, "POST", f"/diary/{POST_KEY}/{v}",
                                             body, AUTHOR)
            t1 = now_ns()
            if status != 200:
                raise RuntimeError(f"POST {POST_KEY}/{v}: {status} {answer[:300]!r}")
            ta = mirror_obs.wait_for(POST_KEY, v)
        return t0, t1, ta

    kinds = ["floor", "post", "save"]
    for kind in kinds:  # warm-up, and the keys' first versions (children watch, not data)
        for _ in range(warmup):
            one(kind)
    started = time.monotonic()
    blocks = max(1, samples // block)
    for b in range(blocks):
        order = kinds[b % 3:] + kinds[:b % 3]
        for kind in order:
            for _ in range(block):
                results[kind].append(one(kind))
    elapsed = time.monotonic() - started

    def summary(rows, frm: int) -> dict:
        ms = [(ta - (t0 if frm == 0 else t1)) / 1e6 for t0, t1, ta in rows]
        return {"p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
                "p99_ms": percentile(ms, 99), "max_ms": max(ms), "n": len(ms),
                "early_pct": 100 * sum(1 for x in ms if x < 0) / len(ms)}

    def call_ms(rows) -> float:
        return statistics.median((t1 - t0) / 1e6 for t0, t1, _ in rows)

    out = {
        "floor": summary(results["floor"], 0),
        "floor_call_ms": call_ms(results["floor"]),
        "post_from_send": summary(results["post"], 0),
        "post_after_200": summary(results["post"], 1),
        "post_call_ms": call_ms(results["post"]),
        "save": summary(results["save"], 0),
        # From the write call returning to the other process's callback: the watch delivery
        # (ZooKeeper's notification, kazoo's re-read, and for the mirror its parse + new view).
        "floor_after_call": summary(results["floor"], 1),
        "save_after_call": summary(results["save"], 1),
        "save_call_ms": call_ms(results["save"]),
        "mirror_open_s": mirror_open_s,
        "elapsed_s": elapsed,
    }
    # Every gunicorn worker serves the last version from its own mirror (requests land on
    # whichever worker accepts first, so ask a few times).
    last = versions["post"]
    problems = []
    deadline = time.monotonic() + 10
    good = 0
    while good < 20 and time.monotonic() < deadline:
        status, headers, body = http_request(rainer.base, "GET", f"/diary/{POST_KEY}")
        ok = (status == 200 and headers.get("X-Rainer-Cached") == "Yes"
              and headers.get("X-Rainer-Version") == str(last)
              and body == make_payload(POST_KEY, last))
        good = good + 1 if ok else 0
        if not ok:
            time.sleep(0.05)
    if good < 20:
        problems.append(f"gunicorn workers do not all serve {POST_KEY} v{last} from the mirror")
    out["problems"] = problems
    watcher.stop()
    mirror_obs.stop()
    return out


# ====================================================================== 3b. under load


def bench_propagation_under_load(hosts: str, rainer: Gunicorn, seconds: float,
                                 connections: int, threads: int, key: str = LOAD_KEY) -> dict:
    """Commit -> another process's mirror while wrk POSTs next versions (post.lua) at Rainer.

    Samples are POSTs of ``key``'s next version, sent one after the other in between
    wrk's requests (each waits for the observer's mirror to show the previous one), timed from
    just before sending to the observer's callback.
    """
    import subprocess
    import uuid

    observer = Observer("mirror", hosts, BASE_PATH, key)
    observer.wait_ready()
    version = 0
    samples: list[float] = []
    after_200: list[float] = []
    tag = "load" + uuid.uuid4().hex[:8]
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(3, round(seconds))}s",
               "--latency", "--timeout", "10s", "-s", str(BENCH / "post.lua"), rainer.base + "/diary",
               "--", tag, "next", "200"]
    # Version 1 before the load: the samples time updates, not how soon a mirror lists a
    # new key (a listing of data/, see the mirror's CHILDREN_RELIST_*).
    version = 1
    status, _, answer = http_request(rainer.base, "POST", f"/diary/{key}/1",
                                     make_payload(key, 1), AUTHOR)
    if status != 200:
        raise RuntimeError(f"POST {key}/1: {status} {answer[:300]!r}")
    observer.wait_for(key, 1)
    wrk = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        # The first second: wrk's keys are created (children listings), the load settles.
        time.sleep(1.0)
        while time.monotonic() - started < seconds - 1.0:
            version += 1
            t0 = now_ns()
            status, _, answer = http_request(rainer.base, "POST", f"/diary/{key}/{version}",
                                             make_payload(key, version), AUTHOR)
            t1 = now_ns()
            if status != 200:
                raise RuntimeError(f"POST {key}/{version}: {status} {answer[:300]!r}")
            arrived = observer.wait_for(key, version)
            samples.append((arrived - t0) / 1e6)
            after_200.append((arrived - t1) / 1e6)
        out, err = wrk.communicate(timeout=seconds + 60)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
        observer.stop()
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed ({wrk.returncode}): {err}{out}")
    load = parse_wrk(out)
    return {"p50_ms": percentile(samples, 50), "p90_ms": percentile(samples, 90),
            "p99_ms": percentile(samples, 99), "max_ms": max(samples), "n": len(samples),
            # From the 200 arriving: what the server's own queueing under load leaves out.
            "after_200_p50_ms": percentile(after_200, 50),
            "after_200_p99_ms": percentile(after_200, 99),
            "connections": connections,
            "load_rps": load.rps, "load_p50_ms": load.p50_ms, "load_non2xx": load.non2xx,
            "load_socket_errors": load.socket_errors}


# ====================================================================== 3b. ZooKeeper's own cost


#: The ZooKeeper floor's shape: sets spread over this many znodes by this many threads of one
#: client (a worker's concurrent saves), each change re-read by this many other processes.
ZK_FLOOR_KEYS = 200
ZK_FLOOR_THREADS = 16
ZK_FLOOR_MIRRORS = 2


def _zk_floor_mirror(hosts: str, path: str, ready, done, answers) -> None:
    """A process's least mirror: each watch that fires re-reads its znode with a new watch."""
    from kazoo.client import KazooClient

    client = KazooClient(hosts=hosts)
    client.start(timeout=15)
    events = [0]

    def changed(event) -> None:
        events[0] += 1
        client.get_async(event.path, watch=changed)

    for i in range(ZK_FLOOR_KEYS):
        client.get(f"{path}/k{i}", watch=changed)
    cpu0 = proc_stat(os.getpid())[1]
    ready.set()
    done.wait()
    answers.put((proc_stat(os.getpid())[1] - cpu0, events[0]))
    client.stop()
    client.close()


def bench_zookeeper_floor(hosts: str, jvm_pid: int, sets: int = 8000) -> dict:
    """CPU per commit of the least ZooKeeper work a mirrored commit needs, with bare kazoo:
    one ``set`` (16 threads of one client, as a worker's concurrent saves) and, in each of
    ``ZK_FLOOR_MIRRORS`` other processes, the watch firing and one ``get`` with a new watch.

    Split into the writer's CPU, the mirrors' and ZooKeeper's JVM, on the same CPUs as the
    service: what "POST with ZooKeeper / POST without" pays on this machine before any of
    Rainer's code runs.
    """
    import multiprocessing
    import threading

    from kazoo.client import KazooClient

    path = f"/zk-floor-{os.getpid()}"
    writer = KazooClient(hosts=hosts)
    writer.start(timeout=15)
    context = multiprocessing.get_context("spawn")  # no fork of a process running kazoo threads
    done, answers, mirrors = context.Event(), context.Queue(), []
    try:
        for i in range(ZK_FLOOR_KEYS):
            writer.create(f"{path}/k{i}", b"x" * 300, makepath=True)
        for _ in range(ZK_FLOOR_MIRRORS):
            ready = context.Event()
            mirror = context.Process(target=_zk_floor_mirror,
                                     args=(hosts, path, ready, done, answers))
            mirror.start()
            if not ready.wait(60):
                raise RuntimeError("a ZooKeeper floor mirror never started")
            mirrors.append(mirror)
        per_thread = sets // ZK_FLOOR_THREADS

        def write(thread: int) -> None:
            for n in range(per_thread):
                writer.set(f"{path}/k{(thread * 11 + n) % ZK_FLOOR_KEYS}", b"y" * 300)

        threads = [threading.Thread(target=write, args=(t,)) for t in range(ZK_FLOOR_THREADS)]
        jvm0, writer0, started = proc_stat(jvm_pid)[1], proc_stat(os.getpid())[1], time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        jvm_s, writer_s = proc_stat(jvm_pid)[1] - jvm0, proc_stat(os.getpid())[1] - writer0
        # The mirrors' last events arrive after the last set returns.
        time.sleep(0.5)
        done.set()
        mirrored = [answers.get(timeout=60) for _ in mirrors]
    finally:
        done.set()
        for mirror in mirrors:
            mirror.join(30)
        writer.delete(path, recursive=True)
        writer.stop()
        writer.close()
    n = per_thread * ZK_FLOOR_THREADS
    out = {"sets": n, "rate": n / elapsed, "writer_ms": 1000 * writer_s / n,
           "jvm_ms": 1000 * jvm_s / n, "mirror_ms": [1000 * cpu / n for cpu, _ in mirrored],
           "mirror_events": [events for _, events in mirrored]}
    out["total_ms"] = out["writer_ms"] + out["jvm_ms"] + sum(out["mirror_ms"])
    log(f"ZooKeeper floor per mirrored commit: {out['total_ms']:.2f} ms CPU (writer "
        f"{out['writer_ms']:.2f}, JVM {out['jvm_ms']:.2f}, mirrors "
        f"{', '.join(f'{m:.2f}' for m in out['mirror_ms'])}; {out['rate']:.0f} sets/s)")
    return out


# ====================================================================== 4. GET throughput


def verify_cached(base: str, n: int = 50, sent: dict[str, str] | None = None) -> list[str]:
    """A sample of GETs answered from the mirror with the seeded payload."""
    problems = []
    for i in random.Random(n).sample(range(NKEYS), n):
        key = key_name(i)
        status, headers, body = http_request(base, "GET", f"/diary/{key}", headers=sent)
        if status != 200 or body != make_payload(key, 1):
            problems.append(f"{base} GET /diary/{key}: {status}, body {body[:80]!r}")
        elif headers.get("X-Rainer-Cached") != "Yes":
            problems.append(f"{base} GET /diary/{key}: no X-Rainer-Cached: Yes")
    return problems


def bench_gets(servers: dict[str, Gunicorn], args, token: str) -> dict:
    script = BENCH / "get.lua"  # bench_core's: heads of random keys
    script_args = ["/diary", str(NKEYS), "0"]
    masters = [os.getpid()] + [s.process.pid for s in servers.values()]
    runs: dict[str, list[dict]] = {name: [] for name in servers}

    def measure(name: str, seconds: float) -> dict:
        server = servers[name]
        cpu0 = tree_cpu({server.process.pid})
        with CpuWatch(masters) as cpu:
            # rainer_auth: every request carries a token the policy must look up.
            extra_args = [token] if name == "rainer_auth" else []
            result = run_wrk(server.base + "/diary/key-00000", script, script_args + extra_args,
                             seconds, args.connections, args.threads)
        server_cpu = tree_cpu({server.process.pid}) - cpu0
        server.check_alive()
        return {"rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                "requests": result.requests, "non2xx": result.non2xx,
                "socket_errors": result.socket_errors, "bg_pct": cpu.background_pct,
                # CPU the server's workers spent per answer: far less sensitive to what else
                # runs on the machine than req/s.
                "cpu_us_per_req": 1e6 * server_cpu / result.requests if result.requests else 0}

    names = list(servers)
    if args.warmup > 0:
        for name in names:
            measure(name, args.warmup)
    seconds = max(1.0, args.duration / args.rounds)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2:
            order = order[::-1]
        for name in order:
            runs[name].append(measure(name, seconds))
    rows = {}
    for name, rounds in runs.items():
        rps = [run["rps"] for run in rounds]
        middle = statistics.median(rps)
        rows[name] = {
            "rps": middle,
            "spread_pct": 100 * (max(rps) - min(rps)) / middle if middle else 0.0,
            "p50_ms": statistics.median(run["p50_ms"] for run in rounds),
            "p99_ms": statistics.median(run["p99_ms"] for run in rounds),
            "requests": sum(run["requests"] for run in rounds),
            "non2xx": sum(run["non2xx"] for run in rounds),
            "socket_errors": sum(run["socket_errors"] for run in rounds),
            "bg_pct": statistics.mean(run["bg_pct"] for run in rounds),
            "cpu_us_per_req": statistics.median(run["cpu_us_per_req"] for run in rounds),
            "rounds": rounds,
        }
    for name in names:
        if name != "rainer":
            ratios = [a["rps"] / b["rps"] for a, b in zip(runs["rainer"], runs[name])
                      if b["rps"]]
            rows["rainer"][f"ratio_vs_{name}"] = statistics.median(ratios) if ratios else 0.0
            cpu = [b["cpu_us_per_req"] / a["cpu_us_per_req"]
                   for a, b in zip(runs["rainer"], runs[name]) if a["cpu_us_per_req"]]
            rows["rainer"][f"cpu_ratio_vs_{name}"] = statistics.median(cpu) if cpu else 0.0
    return rows


def wait_cached(rainer: Gunicorn, timeout: float = 120,
                headers: dict[str, str] | None = None) -> float:
    """Seconds until 20 answers in a row (spread over the workers) come from a mirror."""
    started = time.monotonic()
    deadline = started + timeout
    good = 0
    while good < 20:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Rainer's mirrors not complete within {timeout} s:\n"
                               f"{rainer.output()}")
        rainer.check_alive()
        try:
            status, answer, _ = http_request(rainer.base, "GET", "/diary/key-00000",
                                             headers=headers)
        except OSError:
            status, answer = 0, {}
        if status == 200 and answer.get("X-Rainer-Cached") == "Yes":
            good += 1
        else:
            good = 0
            time.sleep(0.05)
    return time.monotonic() - started


# ====================================================================== report


def build_table(pub: dict, lat: dict, gets: dict, extra: dict) -> list[dict]:
    rows: list[dict] = []

    def row(scenario, value, unit, floor=None, ratio=None, target="", verdict="info", note=""):
        rows.append({"scenario": scenario, "value": value, "unit": unit, "floor": floor,
                     "ratio": ratio, "target": target, "verdict": verdict, "note": note})

    if lat:
        f = lat["floor"]
        for label, data in (("POST sent", lat["post_from_send"]),
                            ("keeper.save() call", lat["save"])):
            for q in ("p50", "p99"):
                v, fl = data[f"{q}_ms"], f[f"{q}_ms"]
                row(f"commit->other mirror {q} ({label})", v, "ms", fl, v / fl if fl else None,
                    note="floor: kazoo set -> DataWatch in 2nd process")
        d, fd = lat["save_after_call"], lat["floor_after_call"]
        row("  delivery after the write returned p50", d["p50_ms"], "ms", fd["p50_ms"],
            d["p50_ms"] / fd["p50_ms"] if fd["p50_ms"] > 0 else None,
            note=f"p99 {d['p99_ms']:.2f} vs {fd['p99_ms']:.2f} ms: mirror vs bare DataWatch")
        a = lat["post_after_200"]
        row("commit->other mirror p50 (after 200)", a["p50_ms"], "ms",
            note=f"p99 {a['p99_ms']:.2f} ms; mirror first in {a['early_pct']:.0f}%")
        row("POST round trip p50 (MySQL + keeper)", lat["post_call_ms"], "ms",
            note=f"keeper.save {lat['save_call_ms']:.2f} ms, kazoo set "
                 f"{lat['floor_call_ms']:.2f} ms")
    loaded = extra.get("propagation_under_load")
    if loaded:
        for q, target in (("p50", PROPAGATION_P50_MS), ("p99", PROPAGATION_P99_MS)):
            v = loaded[f"{q}_ms"]
            row(f"commit->other mirror {q}, POST sent, under POST load", v, "ms",
                target=f"<= {target:g} ms", verdict="PASS" if v <= target else "FAIL",
                note=f"n={loaded['n']} while wrk POSTed {loaded['load_rps']:.0f} req/s, "
                     f"p50 {loaded['load_p50_ms']:.1f} ms each (post.lua next versions)")
        row("  the same from the 200 arriving p50", loaded["after_200_p50_ms"], "ms",
            note=f"p99 {loaded['after_200_p99_ms']:.2f} ms: the delivery alone")
        # Little's law: with every connection always waiting, each POST spends this long in
        # the server, the commit's wait included, whatever the service does with it.
        in_system = 1000 * loaded["connections"] / loaded["load_rps"]
        row("  connections / rate (time in the server)", in_system, "ms",
            note=f"{loaded['connections']} connections at {loaded['load_rps']:.0f} req/s; "
                 f"{PROPAGATION_P50_MS:g} ms would take "
                 f"{1000 * loaded['connections'] / PROPAGATION_P50_MS:.0f} req/s")
    zk_floor = extra.get("zookeeper_floor")
    if zk_floor:
        row("ZooKeeper floor per mirrored commit (CPU)", zk_floor["total_ms"], "ms",
            note=f"bare kazoo set + {ZK_FLOOR_MIRRORS} processes re-reading: writer "
                 f"{zk_floor['writer_ms']:.2f}, JVM {zk_floor['jvm_ms']:.2f}, mirrors "
                 f"{' + '.join(f'{m:.2f}' for m in zk_floor['mirror_ms'])} ms")
    light = extra.get("propagation_light_load")
    if light:
        for q in ("p50", "p99"):
            row(f"commit->other mirror {q}, POST sent, light POST load", light[f"{q}_ms"], "ms",
                note=f"information: n={light['n']} while wrk -c{light['connections']} POSTed "
                     f"{light['load_rps']:.0f} req/s, p50 {light['load_p50_ms']:.1f} ms each")
    if gets:
        r = gets["rainer"]
        for name, target in (("flask_dict", 0.9), ("bare_wsgi", None)):
            if name not in gets:
                continue
            ratio = r.get(f"ratio_vs_{name}")
            cpu_ratio = r.get(f"cpu_ratio_vs_{name}")
            disagree = (" NOISY: req/s and CPU ratios disagree"
                        if ratio and cpu_ratio and abs(ratio - cpu_ratio) > 0.07 else "")
            row(f"GET /diary/<key> cached req/s vs {name}", r["rps"], "req/s",
                gets[name]["rps"], ratio,
                target=f">= {target:.2f}x" if target else "",
                verdict=("PASS" if ratio >= target else "FAIL") if target else "info",
                note=f"p99 {r['p99_ms']:.1f} vs {gets[name]['p99_ms']:.1f} ms, spread "
                     f"{r['spread_pct']:.0f}%/{gets[name]['spread_pct']:.0f}%, bg "
                     f"{r['bg_pct']:.0f}%{disagree}")
            row(f"  GET worker CPU per request vs {name}", r["cpu_us_per_req"], "us",
                gets[name]["cpu_us_per_req"], r.get(f"cpu_ratio_vs_{name}"),
                note="ratio = floor CPU / Rainer CPU (same sense as req/s)")
        if "rainer_auth" in gets:
            a = gets["rainer_auth"]
            # ratio_vs_rainer_auth is off/on: the row shows on/off.
            off_over_on = r.get("ratio_vs_rainer_auth")
            ratio = 1 / off_over_on if off_over_on else 0.0
            row("GET /diary/<key> cached, auth on (token + policy) vs off", a["rps"], "req/s",
                r["rps"], ratio, target=">= 0.80x",
                verdict="PASS" if ratio >= 0.8 else "FAIL",
                note=f"worker CPU {a['cpu_us_per_req']:.0f} vs {r['cpu_us_per_req']:.0f} us/req")
    if pub:
        a = pub["pass_a"]
        ok_a = (a["created"] == NKEYS and not a["failed"] and not a["refused"]
                and not a["aborted"] and not pub["problems"])
        ratio_a = pub["pass_a_s"] / pub["pipelined_create_s"]
        row("publish pass (a): 10k keys, empty ZK", pub["pass_a_s"], "s",
            pub["pipelined_create_s"], ratio_a, f"<= 1.50x, {NKEYS} created",
            "PASS" if ok_a and ratio_a <= 1.5 else "FAIL",
            note=f"created {a['created']} updated {a['updated']} failed {a['failed']} "
                 f"(floor: create_async, 1000 in flight; sequential create "
                 f"{pub['raw_create_s']:.2f} s)")
        ratio_m = pub["mirror_start_ratio"]
        row("mirror start-up over 10k znodes", pub["mirror_start_s"], "s",
            pub["pipelined_reads_s"], ratio_m, "<= 1.20x", "PASS" if ratio_m <= 1.2 else "FAIL",
            note="floor: get_async of each child, 1000 in flight; "
                 f"median of {MIRROR_START_ROUNDS} paired rounds")
        b = pub["pass_b"]
        written = b["created"] + b["updated"] + b["deleted"]
        ok_b = (written == 0 and b["unchanged"] == NKEYS and not b["failed"]
                and not b["refused"] and pub["pass_b_s"] < 1.0)
        row("publish pass (b): 10k unchanged", pub["pass_b_s"], "s", None, None,
            "0 writes, < 1 s", "PASS" if ok_b else "FAIL",
            note=f"{written} writes, {b['unchanged']} unchanged; storage.heads() "
                 f"{pub['heads_s'] * 1000:.0f} ms of it")
        rl = pub["pass_a_relists"]
        row("  mirror catch-up after pass (a)", pub["catch_up_s"], "s",
            note=f"{pub['mirror_after_a']} keys in the publisher's mirror; during (a) it "
                 f"re-listed data/ {rl['calls']} times, {rl['names'] / 1e6:.1f}M names")
        if "save_nomirror_s" in pub:
            row("  keeper.save x 10k, no mirror", pub["save_nomirror_s"], "s",
                pub["raw_create_s"], pub["save_nomirror_s"] / pub["raw_create_s"])
    if lat:
        fl = pub.get("keeper_heads_s")
        row("  mirror open over 10k znodes (observer)", lat["mirror_open_s"], "s", fl,
            lat["mirror_open_s"] / fl if fl else None,
            note="floor: keeper.heads(), the same 10k reads pipelined (an observer process, "
                 "under the gunicorns' load)")
    if "workers_cached_s" in extra:
        row("  gunicorn start -> every worker mirror-backed", extra["workers_cached_s"], "s",
            note="reads fall back to the database until then")
    return rows


def print_table(table: list[dict]) -> None:
    def fmt(value, unit=""):
        if value is None:
            return "-"
        if unit == "req/s":
            return f"{value:.0f}"
        if unit == "s":
            return f"{value:.3f}"
        if unit == "us":
            return f"{value:.0f}"
        return f"{value:.2f}"

    print(f"{'scenario':<50} {'value':>10} {'unit':<5} {'floor':>10} {'ratio':>7} "
          f"{'target':<18} {'verdict':<7} note")
    for r in table:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['scenario']:<50} {fmt(r['value'], r['unit']):>10} {r['unit']:<5} "
              f"{fmt(r['floor'], r['unit']):>10} {ratio:>7} {r['target']:<18} "
              f"{r['verdict']:<7} {r['note']}")


# ====================================================================== main


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8,
                        help="wrk seconds per GET server, split over --rounds")
    parser.add_argument("--rounds", type=int, default=8,
                        help="alternating wrk rounds (short rounds pair up better on a busy "
                             "machine)")
    parser.add_argument("--warmup", type=float, default=2, help="wrk warm-up seconds per server")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (all apps)")
    parser.add_argument("--samples", type=int, default=1000, help="latency samples per kind")
    # (bench_keeper's GET rounds use --connections 16; the POST load is issue 13's -c32.)
    parser.add_argument("--load-seconds", type=float, default=20,
                        help="seconds of POST load while propagation is sampled")
    parser.add_argument("--load-connections", type=int, default=32,
                        help="wrk connections of that POST load")
    parser.add_argument("--light-connections", type=int, default=2,
                        help="wrk connections of a second, lighter POST load (information: "
                             "the saturating one times mostly the queue in front of the POST)")
    parser.add_argument("--only-load", action="store_true",
                        help="skip the publisher, idle latency and GET rounds (debugging)")
    parser.add_argument("--mysql", default="mysql://root@127.0.0.1:3306",
                        help="MySQL server URL, without database")
    parser.add_argument("--database", default="rainer_bench_keeper")  # one run at a time
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the extra publisher rows (no-mirror saves, pipelined creates)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--keep-logs", metavar="DIR", help="keep gunicorn/ZooKeeper logs here")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    db_url = f"{args.mysql.rstrip('/')}/{args.database}"
    workdir = Path(tempfile.mkdtemp(prefix="rainer-bench-keeper-"))
    started = time.monotonic()
    zk = None
    clients: list = []
    created = False
    pub: dict = {}
    lat: dict = {}
    gets: dict = {}
    invalid: list[str] = []
    extra: dict = {}
    try:
        from rainer_server.storage.db import open_database
        from rainer_server.storage.tokens import DbTokenStore
        from tests.zkserver import ZooKeeperServer

        log(f"rainer keeper bench: {os.cpu_count()} CPUs, load1 {os.getloadavg()[0]:.2f}, "
            f"gunicorn --workers {args.workers} (the configured worker class, gevent by "
            f"default), floors from {FLOOR_MODULE}.py, "
            f"MySQL {db_url}")
        zk = ZooKeeperServer(workdir / "zk", production=True).start()
        log(f"ZooKeeper at {zk.hosts}")
        mysql_execute(args.mysql, f"DROP DATABASE IF EXISTS `{args.database}`",
                      f"CREATE DATABASE `{args.database}`")
        created = True
        log(f"seeded {NKEYS} keys in {seed(db_url):.1f} s")

        pub = bench_publisher(zk.hosts, db_url, clients, not args.no_extras)
        invalid += pub["problems"]
        extra["zookeeper_floor"] = bench_zookeeper_floor(zk.hosts, zk.pid)

        env = {k: v for k, v in os.environ.items() if not k.startswith("RAINER_")}
        env.update(
            RAINER_DATABASE_URL=db_url, RAINER_TABLE=TABLE, RAINER_ZK_HOSTS=zk.hosts,
            RAINER_ZK_PATH=BASE_PATH,
            # No elected pass during the measurements (each costs a storage.heads()).
            RAINER_PUBLISH_PERIOD="3600",
            PYTHONDONTWRITEBYTECODE="1",
        )
        # The same service with access control on: a token per request, a policy naming
        # the identity (not "*"), so each read costs the identity lookup and the decision.
        policy = workdir / "policy.yaml"
        policy.write_text("rules:\n  - keys: '*'\n    read: [bench]\n    write: [bench]\n")
        token = DbTokenStore(open_database(db_url), TABLE + "_tokens").create("bench")
        auth = {"Authorization": f"Bearer {token}"}
        servers = {
            "rainer": Gunicorn("rainer", "wsgi:app", env, args.workers, workdir),
            "rainer_auth": Gunicorn("rainer_auth", "wsgi:app",
                                    {**env, "RAINER_AUTH": "token", "RAINER_POLICY": str(policy),
                                     "RAINER_SECRET_KEY": "bench-only-secret-key-0123456789abcdef"},
                                    args.workers, workdir),
            "flask_dict": Gunicorn("flask_dict", f"{FLOOR_MODULE}:flask_dict", env,
                                   args.workers, workdir),
            "bare_wsgi": Gunicorn("bare_wsgi", f"{FLOOR_MODULE}:bare_wsgi", env,
                                  args.workers, workdir),
        }
        for server in servers.values():
            server.wait_ready()
        extra["workers_cached_s"] = wait_cached(servers["rainer"])
        wait_cached(servers["rainer_auth"], headers=auth)
        status, _, _ = http_request(servers["rainer_auth"].base, "GET", "/diary/key-00042")
        if status != 401:
            raise RuntimeError(f"rainer_auth answered {status} without a token")
        log(f"gunicorns up; every Rainer worker serves from its mirror after "
            f"{extra['workers_cached_s']:.1f} s")
        for name in ("flask_dict", "bare_wsgi"):
            status, _, body = http_request(servers[name].base, "GET", "/diary/key-00042")
            if status != 200 or (name == "flask_dict" and body != make_payload(key_name(42), 1)):
                raise RuntimeError(f"{name}: probe answered {status} {body[:100]!r}")

        if not args.only_load:
            lat = bench_latency(zk.hosts, servers["rainer"], clients, args.samples,
                                block=min(100, args.samples), warmup=20)
            invalid += lat["problems"]
        for key in ("floor", "post_from_send", "post_after_200", "save") if lat else ():
            s = lat[key]
            log(f"latency {key:<15} p50 {s['p50_ms']:.2f} ms, p90 {s['p90_ms']:.2f} ms, "
                f"p99 {s['p99_ms']:.2f} ms, max {s['max_ms']:.1f} ms (n={s['n']})")

        loaded = bench_propagation_under_load(zk.hosts, servers["rainer"], args.load_seconds,
                                              args.load_connections, args.threads)
        extra["propagation_under_load"] = loaded
        log(f"latency under POST load ({loaded['load_rps']:.0f} req/s): p50 "
            f"{loaded['p50_ms']:.2f} ms, p99 {loaded['p99_ms']:.2f} ms, max "
            f"{loaded['max_ms']:.1f} ms (n={loaded['n']})")
        light = bench_propagation_under_load(
            zk.hosts, servers["rainer"], args.load_seconds, args.light_connections,
            min(args.threads, args.light_connections), key=LOAD_KEY + "-light",
        )
        extra["propagation_light_load"] = light
        log(f"latency under a light POST load ({light['load_rps']:.0f} req/s): p50 "
            f"{light['p50_ms']:.2f} ms, p99 {light['p99_ms']:.2f} ms, max "
            f"{light['max_ms']:.1f} ms (n={light['n']})")
        for load in (loaded, light):
            if load["load_non2xx"] or load["load_socket_errors"]:
                invalid.append(f"POST load: {load['load_non2xx']} non-2xx, "
                               f"{load['load_socket_errors']} socket errors")
        invalid += verify_cached(servers["rainer"].base)
        invalid += verify_cached(servers["rainer_auth"].base, sent=auth)
        if not args.only_load:
            gets = bench_gets(servers, args, token)
        invalid += verify_cached(servers["rainer"].base)
        invalid += verify_cached(servers["rainer_auth"].base, sent=auth)
        for name, r in gets.items():
            log(f"GET {name:<11} {r['rps']:8.0f} req/s (spread {r['spread_pct']:.0f}%), "
                f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, {r['non2xx']} non-2xx, "
                f"{r['socket_errors']} socket errors, bg CPU {r['bg_pct']:.0f}%")
            if r["non2xx"] or r["socket_errors"]:
                invalid.append(f"GET {name}: {r['non2xx']} non-2xx, "
                               f"{r['socket_errors']} socket errors")
        if args.keep_logs:
            for server in servers.values():
                server.log.flush()
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        Children.stop_all()
        for client in clients:
            try:
                client.stop()
                client.close()
            except Exception:
                pass
        if zk is not None:
            zk.stop()
        if created:
            try:
                mysql_execute(args.mysql, f"DROP DATABASE IF EXISTS `{args.database}`")
            except Exception as exc:
                print(f"warning: could not drop {args.database}: {exc}", file=sys.stderr)
        if args.keep_logs:
            shutil.copytree(workdir, args.keep_logs, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("version-2"))
        shutil.rmtree(workdir, ignore_errors=True)

    table = build_table(pub, lat, gets, extra)
    print()
    print_table(table)
    for problem in invalid:
        print(f"INVALID: {problem}")
    elapsed = time.monotonic() - started
    print(f"# {elapsed:.0f} s total; load1 at end {os.getloadavg()[0]:.2f}. Latencies over "
          f"{args.samples} samples per kind, interleaved; req/s medians over {args.rounds} wrk "
          f"rounds of {max(1.0, args.duration / args.rounds):g} s (-t{args.threads} "
          f"-c{args.connections}), ratio = median of per-round ratios; bg = CPU used by other "
          "processes on the machine.")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({
                "meta": {"cpus": os.cpu_count(), "workers": args.workers,
                         "connections": args.connections, "threads": args.threads,
                         "duration_s": args.duration, "rounds": args.rounds,
                         "samples": args.samples, "python": platform.python_version(),
                         "elapsed_s": elapsed, "invalid": invalid, **extra},
                "table": table, "publisher": pub, "latency": lat, "gets": gets,
            }, out, indent=2, default=str)
    if invalid:
        return 2
    return 0 if all(r["verdict"] != "FAIL" for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
