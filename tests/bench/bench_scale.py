#!/usr/bin/env python3
"""Scale figures (issue 5): heads listing, publisher passes, a mirror's memory and start-up.

    python3 tests/bench/bench_scale.py [--scenario 10000x50 --scenario 100000x5] [--json PATH]

Needs ``RAINER_TEST_MYSQL_URL`` (scripts/test's MariaDB will do); ZooKeeper from
``RAINER_TEST_ZK_HOSTS``, else a throw-away one from the Debian package (tests.zkserver).

For each scenario ``KEYSxVERSIONS`` it:

1. bulk-loads a fresh MySQL table with KEYS keys of VERSIONS versions each (~120-byte JSON
   payloads, ``is_head`` on each newest row, as ``save`` leaves them);
2. times ``storage.heads()`` and ``heads_token()`` (median of 5);
3. times one publisher pass into an empty ZooKeeper chroot (every key created), then an
   unchanged one (the publisher's mirror has every key: no writes);
4. opens a fresh mirror on its own kazoo client and reports the time until it is complete
   and the RSS it added (and tracemalloc's count of Python allocations in a second mirror);
5. starts gunicorn (1 worker, the table above, the chroot above), waits until it is ready and
   its start-up work has ended (``settle``), and times ``GET /diary`` (mirror-backed) and
   ``GET /diary?all=yes`` (database), first (cold: read and serialise; for the mirror the
   median over ``COLD_SAMPLES`` freshly started workers) and then warm (median of 5: cached
   body), plus the response size;
6. drops the table and the chroot.

Issue 13's targets, each against a floor measured in the same run, in ``--rounds`` paired
rounds (floor, then the figure; the verdict is on the median of the per-round ratios):

* first publisher pass <= 1.5x the floor: ``create_async`` of every key's znode (same
  payloads), at most 1000 unanswered, into an empty path;
* mirror start-up <= 1.2x the floor: ``get_async`` of every child of ``data/``, at most 1000
  unanswered, on a fresh client;
* cold ``GET /diary`` from the mirror grows linearly: the largest scenario's costs at most
  1.2x its share of keys over the smallest's (100k vs 10k keys: <= 12x). Also "after one
  change" (a POST, then the first listing that shows it), where only that key's JSON is
  made again.

It prints one table with PASS/FAIL per target and, with ``--json``, writes the figures. Exit
status 1 when a target fails. Bounded: every wait has a deadline; it stops what it started
on exit.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import tracemalloc
import urllib.request
import uuid
from datetime import datetime
from datetime import timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from rainer_server.chain import GENESIS  # noqa: E402
from rainer_server.chain import link  # noqa: E402
from rainer_server.commit import Commit  # noqa: E402
from rainer_server.zk.keeper import CommitKeeper  # noqa: E402
from rainer_server.zk.keeper import make_kazoo_client  # noqa: E402
from rainer_server.zk.publisher import AutoPublisher  # noqa: E402
from rainer_server.storage.db import DbCommitStorage  # noqa: E402
from rainer_server.storage.db import open_database  # noqa: E402
from tests.test_gunicorn import Gunicorn  # noqa: E402

sys.path.insert(0, str(ROOT / "tests" / "bench"))
from keeper_support import proc_stat  # noqa: E402

BATCH = 2000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


#: Freshly started workers whose first mirror listing is timed (the median is the figure).
COLD_SAMPLES = 3


def median_time(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def load(storage: DbCommitStorage, keys: int, versions: int) -> float:
    """Bulk-insert keys x versions rows; return the seconds it took."""
    started = time.perf_counter()
    db = storage.database
    table = storage.table_name
    moment = datetime(2026, 1, 1, tzinfo=timezone.utc)
    mtime = moment.strftime("%Y-%m-%d %H:%M:%S.000")
    sql_head = (
        f"INSERT INTO {table} (`key`, version, author, comment, mtime, is_empty, is_head, payload, "
        "chain) VALUES "
    )
    rows: list[tuple] = []

    def flush() -> None:
        if rows:
            placeholders = ",".join(["(%s,%s,%s,%s,%s,%s,%s,%s,%s)"] * len(rows))
            db.execute_sql(sql_head + placeholders, [v for row in rows for v in row])
            rows.clear()

    db.connect(reuse_if_open=True)
    with db.atomic():
        for k in range(keys):
            key = f"service-{k:06d}.settings"
            # Chained as the storage would chain them: no migration on first start.
            chain = GENESIS
            for v in range(1, versions + 1):
                payload = json.dumps(
                    {"key": key, "version": v, "pool": {"min": 4, "max": 64}, "flags": ["a", "b"], "pad": "x" * 20}
                ).encode()
                chain = link(chain, Commit(key, v, payload, "bench", "load", moment))
                rows.append(
                    (key.encode(), v, "bench", "load", mtime, False, v == versions, payload, chain)
                )
                if len(rows) >= BATCH:
                    flush()
        flush()
    return time.perf_counter() - started


def settle(server: Gunicorn, window: float = 0.5, timeout: float = 300) -> None:
    """Wait until the server's workers have used under a tenth of a CPU for ``window`` s.

    A worker is ready before its start-up work ends (an elected publisher's first pass and
    the watch hub's index of every head read the whole journal: seconds at 100k keys); a
    listing timed meanwhile measured that work too, as much as the listing.
    """
    deadline = time.monotonic() + timeout
    before = sum(workers(server).values())
    while time.monotonic() < deadline:
        time.sleep(window)
        now = sum(workers(server).values())
        if now - before < window / 10:
            return
        before = now
    raise RuntimeError("the gunicorn workers never went quiet")


def workers(server: Gunicorn) -> dict[int, float]:
    """The server's workers: pid -> CPU seconds used so far."""
    master = server.process.pid
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[0] == master:
                found[int(entry)] = stat[1]
    return found


def cold_listing(server: Gunicorn, url: str, ready, samples: int) -> tuple[float, int]:
    """Median seconds (and bytes) of the first listing of a freshly started worker.

    One sample was at the mercy of one moment of the machine (10k keys: 33-54 ms between
    runs); each further sample replaces the worker (SIGTERM, the master starts another),
    waits until its mirror is ready and its start-up work has ended, then lists.
    """
    times, size = [], 0
    for sample in range(samples):
        if sample:
            old = set(workers(server))
            for pid in old:
                os.kill(pid, signal.SIGTERM)
            wait(lambda: (pids := set(workers(server))) and not pids & old, 120,
                 "a new worker")
            wait(ready, 600, "the new worker's mirror")
        settle(server)
        took, size = http_time(url)
        times.append(took)
    return statistics.median(times), size


def wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def http_time(url: str) -> tuple[float, int]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as response:
        body = response.read()
    return time.perf_counter() - started, len(body)


def pipelined(call, arguments, in_flight: int = 1000) -> None:
    """``call(*args)`` for each of ``arguments`` (kazoo ``*_async``), at most ``in_flight``
    unanswered: the floor of any pipelined pass over the same znodes."""
    pending: collections.deque = collections.deque()
    for args in arguments:
        pending.append(call(*args))
        if len(pending) >= in_flight:
            pending.popleft().get(timeout=60)
    while pending:
        pending.popleft().get(timeout=60)


def drop(client, path: str, levels: int = 0) -> None:
    """Delete ``path``, whose znodes ``levels`` deep have children, and everything below;
    each level's leaves pipelined (kazoo's recursive delete is one round trip per znode:
    minutes for 100k)."""
    children = client.get_children(path)
    if levels:
        for child in children:
            drop(client, f"{path}/{child}", levels - 1)
    else:
        pipelined(client.delete_async, ((f"{path}/{child}",) for child in children))
    client.delete(path)


def listing_figures(figures: dict, mysql_url: str, table: str, hosts: str, heads: dict) -> dict:
    """``--listing-only``: one gunicorn worker on the table and chroot; cold, warm and
    after-a-change listings from its mirror."""
    with tempfile.TemporaryDirectory() as logs:
        server = Gunicorn(
            {
                "RAINER_DATABASE_URL": mysql_url,
                "RAINER_TABLE": table,
                "RAINER_ZK_HOSTS": hosts,
                "RAINER_PUBLISH_PERIOD": "3600",
                "RAINER_TEST_LOG_DIR": logs,
            },
            workers=1,
        )
        try:
            server.wait_ready(300)
            root = server.url.rsplit("/diary", 1)[0]

            def mirror_ready() -> bool:
                try:
                    return urllib.request.urlopen(root + "/readyz", timeout=5).status == 200
                except OSError:
                    return False

            wait(mirror_ready, 600, "gunicorn worker's mirror")
            url = server.url + "/"
            figures["list_mirror_cold_s"], figures["list_mirror_bytes"] = cold_listing(
                server, url, mirror_ready, COLD_SAMPLES
            )
            figures["list_mirror_warm_s"] = median_time(lambda: http_time(url))
            figures["list_mirror_changed_s"] = listing_after_changes(server.url, heads, 3)
        finally:
            server.stop()
    return figures


def listing_after_changes(base_url: str, heads: dict, rounds: int) -> float:
    """Median seconds of the first mirror listing that shows a new version of one key."""
    times = []
    key = min(heads)
    version = heads[key].version
    for _ in range(rounds):
        version += 1
        request = urllib.request.Request(
            f"{base_url}/{key}/{version}", data=b'{"changed": %d}' % version, method="POST",
            headers={"X-Rainer-Author": "bench", "Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=30).read()

        def served() -> bool:
            with urllib.request.urlopen(f"{base_url}/{key}", timeout=30) as response:
                return (response.headers.get("X-Rainer-Cached") == "Yes"
                        and response.headers.get("X-Rainer-Version") == str(version))

        wait(served, 60, "the mirror to serve the change")
        took, _ = http_time(base_url + "/")
        times.append(took)
    return statistics.median(times)


def run_scenario(
    mysql_url: str, zk_hosts: str, keys: int, versions: int, rounds: int = 3,
    listing_only: bool = False,
) -> dict:
    figures: dict = {"scenario": f"{keys}x{versions}", "keys": keys, "versions": versions}
    table = "t_scale_" + uuid.uuid4().hex[:8]
    storage = DbCommitStorage(open_database(mysql_url), table)
    storage.start()
    chroot = "/rainer-scale-" + uuid.uuid4().hex[:8]
    admin = make_kazoo_client(zk_hosts)
    admin.start(timeout=15)
    admin.ensure_path(chroot)
    clients = []
    try:
        figures["load_s"] = load(storage, keys, versions)
        assert len(storage.heads()) == keys
        figures["heads_s"] = median_time(storage.heads)
        figures["heads_token_s"] = median_time(storage.heads_token)

        # Publisher: first pass into an empty ZooKeeper, then an unchanged one; each round
        # after its floor (bare pipelined creates of the same znodes into an empty path).
        client = make_kazoo_client(zk_hosts + chroot, 30)
        client.start(timeout=15)
        clients.append(client)
        heads = storage.heads()
        serialized = [(key, commit.serialize()) for key, commit in heads.items()]
        floors, passes = [], []
        if listing_only:
            rounds = 0
            counts = AutoPublisher(client, CommitKeeper(client, "/rainer", timeout=30), storage,
                                   period=3600).publish_all()
            assert counts.created == keys and not counts.failed, counts
        for round_ in range(rounds):
            client.ensure_path(f"/floor-{round_}")
            started = time.perf_counter()
            pipelined(client.create_async, ((f"/floor-{round_}/{k}", data) for k, data in serialized))
            floors.append(time.perf_counter() - started)
            base = "/rainer" if round_ == rounds - 1 else f"/pass-{round_}"
            keeper = CommitKeeper(client, base, timeout=30)
            publisher = AutoPublisher(client, keeper, storage, period=3600)
            counts = publisher.publish_all()
            assert counts.created == keys and not counts.failed, counts
            passes.append(counts.duration)
            if base != "/rainer":
                publisher.close()
                drop(client, f"/floor-{round_}")
                drop(client, base, 1)
        if listing_only:
            return listing_figures(figures, mysql_url, table, zk_hosts + chroot, heads)
        figures["floor_creates_s"] = statistics.median(floors)
        figures["pass_first_s"] = statistics.median(passes)
        figures["pass_first_ratio"] = statistics.median(p / f for p, f in zip(passes, floors))
        mirror = publisher._get_mirror(lambda: True)  # the publisher's own mirror
        wait(lambda: mirror is not None and len(mirror.current) == keys, 600, "publisher mirror")
        counts = publisher.publish_all()
        assert counts.unchanged == keys and counts.written == 0, counts
        figures["pass_unchanged_s"] = counts.duration
        publisher.close()
        drop(client, f"/floor-{rounds - 1}")

        # Mirror start-up, each round after its floor (bare pipelined reads of every child).
        floors, opens = [], []
        for _ in range(rounds):
            fclient = make_kazoo_client(zk_hosts + chroot, 30)
            fclient.start(timeout=15)
            started = time.perf_counter()
            children = fclient.get_children("/rainer/data")
            pipelined(fclient.get_async, ((f"/rainer/data/{k}",) for k in children))
            floors.append(time.perf_counter() - started)
            fclient.stop()
            fclient.close()
            oclient = make_kazoo_client(zk_hosts + chroot, 30)
            oclient.start(timeout=15)
            started = time.perf_counter()
            opened = CommitKeeper(oclient, "/rainer", timeout=30).mirror(timeout=600)
            opens.append(time.perf_counter() - started)
            assert len(opened.current) == keys
            opened.close()
            oclient.stop()
            oclient.close()
        figures["floor_reads_s"] = statistics.median(floors)
        figures["mirror_start_ratio"] = statistics.median(o / f for o, f in zip(opens, floors))

        # A fresh mirror: start-up time and RSS it adds (its own client, like a worker's).
        gc.collect()
        before = rss_bytes()
        mclient = make_kazoo_client(zk_hosts + chroot, 30)
        mclient.start(timeout=15)
        clients.append(mclient)
        started = time.perf_counter()
        view = CommitKeeper(mclient, "/rainer", timeout=30).mirror(timeout=600)
        figures["mirror_start_s"] = statistics.median(opens)
        figures["mirror_start_rss_s"] = time.perf_counter() - started
        assert len(view.current) == keys
        gc.collect()
        figures["mirror_rss_mb"] = (rss_bytes() - before) / 2**20
        # Python allocations of one more mirror (tracemalloc slows it down: not timed).
        tracemalloc.start()
        second = CommitKeeper(mclient, "/rainer", timeout=30).mirror(timeout=600)
        gc.collect()
        figures["mirror_traced_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
        tracemalloc.stop()
        second.close()
        view.close()

        # Listing over HTTP: one sync worker on this table and chroot.
        with tempfile.TemporaryDirectory() as logs:
            server = Gunicorn(
                {
                    "RAINER_DATABASE_URL": mysql_url,
                    "RAINER_TABLE": table,
                    "RAINER_ZK_HOSTS": zk_hosts + chroot,
                    "RAINER_PUBLISH_PERIOD": "3600",
                    "RAINER_TEST_LOG_DIR": logs,
                },
                workers=1,
            )
            try:
                server.wait_ready(120)
                root = server.url.rsplit("/diary", 1)[0]

                def mirror_ready() -> bool:
                    try:
                        return urllib.request.urlopen(root + "/readyz", timeout=5).status == 200
                    except OSError:
                        return False

                started = time.perf_counter()
                wait(mirror_ready, 600, "gunicorn worker's mirror")
                figures["worker_ready_s"] = time.perf_counter() - started
                url = server.url + "/"
                figures["list_mirror_cold_s"], figures["list_mirror_bytes"] = cold_listing(
                    server, url, mirror_ready, COLD_SAMPLES
                )
                figures["list_mirror_warm_s"] = median_time(lambda: http_time(url))
                url = server.url + "/?all=yes"
                figures["list_db_cold_s"], figures["list_db_bytes"] = http_time(url)
                figures["list_db_warm_s"] = median_time(lambda: http_time(url))
                figures["list_mirror_changed_s"] = listing_after_changes(server.url, heads, rounds)
            finally:
                server.stop()
    finally:
        for client in clients:
            client.stop()
            client.close()
        try:
            admin.delete(chroot, recursive=True)
        finally:
            admin.stop()
            admin.close()
        storage.database.connect(reuse_if_open=True)
        storage.database.execute_sql(f"DROP TABLE IF EXISTS {table}")
        storage.stop()
    return figures


ROWS = [
    ("load (bulk insert)", "load_s", "s"),
    ("floor: create_async x keys, 1000 in flight", "floor_creates_s", "s"),
    ("storage.heads()", "heads_s", "s"),
    ("heads_token()", "heads_token_s", "s"),
    ("publisher pass, first (every key created)", "pass_first_s", "s"),
    ("  ratio to the floor (target <= 1.5x)", "pass_first_ratio", "x"),
    ("publisher pass, unchanged (no writes)", "pass_unchanged_s", "s"),
    ("floor: get_async of each child, 1000 in flight", "floor_reads_s", "s"),
    ("mirror start-up until complete", "mirror_start_s", "s"),
    ("  ratio to the floor (target <= 1.2x)", "mirror_start_ratio", "x"),
    ("mirror memory (RSS added)", "mirror_rss_mb", "MiB"),
    ("mirror Python allocations", "mirror_traced_mb", "MiB"),
    ("gunicorn worker ready (/readyz 200)", "worker_ready_s", "s"),
    ("GET /diary, mirror: first after a change", "list_mirror_cold_s", "s"),
    ("GET /diary, mirror: cached", "list_mirror_warm_s", "s"),
    ("GET /diary, mirror: first after one change", "list_mirror_changed_s", "s"),
    ("GET /diary?all=yes, MySQL: first after change", "list_db_cold_s", "s"),
    ("GET /diary?all=yes, MySQL: cached", "list_db_warm_s", "s"),
    ("listing size", "list_mirror_bytes", "bytes"),
]


def print_table(results: list[dict]) -> None:
    header = f"{'figure':48}" + "".join(f"{r['scenario']:>16}" for r in results)
    print(header)
    print("-" * len(header))
    for label, name, unit in ROWS:
        cells = []
        for r in results:
            value = r.get(name)
            if value is None:
                cells.append(f"{'-':>16}")
            elif unit == "s":
                cells.append(f"{value * 1000:>13.1f} ms" if value < 10 else f"{value:>14.1f} s")
            elif unit == "x":
                cells.append(f"{value:>15.2f}x")
            elif unit == "MiB":
                cells.append(f"{value:>12.1f} MiB")
            else:
                cells.append(f"{value / 2**20:>12.2f} MiB")
        print(f"{label:48}" + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", action="append", help="KEYSxVERSIONS (default: 10000x50, 100000x5)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--listing-only", action="store_true",
                        help="only what the listing target needs (one pass, one worker)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="paired floor/figure rounds for the publish and mirror ratios")
    args = parser.parse_args(argv)
    mysql_url = os.environ.get("RAINER_TEST_MYSQL_URL")
    if not mysql_url:
        parser.error("RAINER_TEST_MYSQL_URL is not set (scripts/test's MariaDB: mysql://root@127.0.0.1:3306/rainer_test)")
    zk_server = None
    zk_hosts = os.environ.get("RAINER_TEST_ZK_HOSTS")
    zk_dir = tempfile.TemporaryDirectory(prefix="rainer-scale-zk-")
    if not zk_hosts:
        from tests.zkserver import ZooKeeperServer

        # As deployed: the tests' 256 MiB heap died of OutOfMemoryError at 100k znodes.
        zk_server = ZooKeeperServer(zk_dir.name, production=True)
        zk_server.start()
        zk_hosts = zk_server.hosts
    results = []
    try:
        for scenario in args.scenario or ["10000x50", "100000x5"]:
            keys, versions = (int(n) for n in scenario.lower().split("x"))
            print(f"[bench_scale] {keys} keys x {versions} versions ...", file=sys.stderr, flush=True)
            results.append(run_scenario(mysql_url, zk_hosts, keys, versions, args.rounds,
                                        args.listing_only))
            # As each scenario ends: a long run that fails later keeps what it measured.
            print(f"[bench_scale] {json.dumps(results[-1])}", file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        if zk_server is not None:
            zk_server.stop()
        zk_dir.cleanup()
    print_table(results)
    verdicts = check_targets(results)
    for line in verdicts:
        print(line)
    return 1 if any(line.startswith("FAIL") for line in verdicts) else 0


def check_targets(results: list[dict]) -> list[str]:
    """One PASS/FAIL line per target of issue 13 (ratios measured in this run)."""
    lines = []
    for r in results:
        for name, label, limit in (
            ("pass_first_ratio", "first publish / pipelined creates", 1.5),
            ("mirror_start_ratio", "mirror start-up / pipelined reads", 1.2),
        ):
            value = r.get(name)
            if value is not None:
                verdict = "PASS" if value <= limit else "FAIL"
                lines.append(f"{verdict} {r['scenario']}: {label} {value:.2f}x (target <= {limit}x)")
    if len(results) >= 2:
        small, large = min(results, key=lambda r: r["keys"]), max(results, key=lambda r: r["keys"])
        limit = 1.2 * large["keys"] / small["keys"]
        for name, label in (("list_mirror_cold_s", "cold"), ("list_mirror_changed_s", "after one change")):
            ratio = large[name] / small[name]
            verdict = "PASS" if ratio <= limit else "FAIL"
            lines.append(
                f"{verdict} GET /diary from the mirror, {label}: {large['keys']} keys cost "
                f"{ratio:.1f}x {small['keys']} keys (target <= {limit:.0f}x)"
            )
    return lines


if __name__ == "__main__":
    sys.exit(main())
