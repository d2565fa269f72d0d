#!/usr/bin/env python3
"""Database-backed reads under the gevent worker against the sync worker, in paired rounds.

    scripts/with-services python3 tests/bench/bench_workers.py [--rounds 4] [--duration 10]

Seeds a MySQL database (1000 keys x 10 versions, no ZooKeeper: every read goes to the
database), starts the service twice (2 workers each, ``config/gunicorn.conf.py``), once with
``RAINER_WORKER_CLASS=sync`` and once with ``gevent``, and measures ``wrk -t2 -c32`` for
``--duration`` seconds per run on ``GET /diary/<key>/<version>`` and ``GET /diary/<key>``,
alternating sync and gevent (the order flips every round). Prints each round's req/s and
the median of the per-round ratios gevent / sync (the issue's target: >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from keeper_support import CpuWatch  # noqa: E402  (after the path set-up)
from keeper_support import Gunicorn  # noqa: E402
from keeper_support import http_request  # noqa: E402
from keeper_support import mysql_execute  # noqa: E402
from keeper_support import run_wrk  # noqa: E402
from keeper_support import tree_cpu  # noqa: E402

DATABASE = "rainer_bench_workers"
KEYS = 1000
VERSIONS = 10
LOADS = {
    "GET /diary/<key>/<version>": ["/diary", str(KEYS), str(VERSIONS)],
    "GET /diary/<key>": ["/diary", str(KEYS), "0"],
}


def seed(db_url: str) -> None:
    from rainer_server import Commit
    from rainer_server import DbCommitStorage
    from rainer_server import open_database

    storage = DbCommitStorage(open_database(db_url))
    storage.start()
    pad = "x" * 100
    with storage.database.atomic():
        for n in range(KEYS):
            for version in range(1, VERSIONS + 1):
                payload = b'{"key": %d, "version": %d, "pad": "%s"}' % (n, version, pad.encode())
                storage.save(Commit.from_bytes(f"key-{n:05d}", version, payload, "bench", "seed"))
    storage.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-seed", action="store_true", help="reuse the seeded database")
    args = parser.parse_args()
    server_url = os.environ.get("RAINER_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/x")
    server_url = server_url.rsplit("/", 1)[0]
    db_url = f"{server_url}/{DATABASE}"
    if not args.no_seed:
        mysql_execute(server_url, f"DROP DATABASE IF EXISTS {DATABASE}",
                      f"CREATE DATABASE {DATABASE}")
        seed(db_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAINER_")}
    env["RAINER_DATABASE_URL"] = db_url
    log_dir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    servers = {
        model: Gunicorn(model, "wsgi:app", {**env, "RAINER_WORKER_CLASS": model},
                        args.workers, log_dir)
        for model in ("sync", "gevent")
    }
    try:
        for server in servers.values():
            server.wait_ready()
            status, _ = http_request(server.base, "GET", "/diary/key-00001/1")[:2]
            assert status == 200, server.output()
        masters = [server.process.pid for server in servers.values()]
        results: dict[str, dict[str, list[float]]] = {load: {"sync": [], "gevent": []}
                                                      for load in LOADS}
        # The service's CPU per request: on a shared, loaded machine a steadier figure than
        # req/s, and the one the gevent worker's overhead shows in.
        cpu_ms: dict[str, dict[str, list[float]]] = {load: {"sync": [], "gevent": []}
                                                     for load in LOADS}
        for load, script_args in LOADS.items():
            for model, server in servers.items():  # warm-up
                run_wrk(server.base + "/diary", BENCH / "get.lua", script_args, 2,
                        args.connections, args.threads)
            for r in range(args.rounds):
                order = ["sync", "gevent"] if r % 2 == 0 else ["gevent", "sync"]
                for model in order:
                    cpu0 = tree_cpu({servers[model].process.pid})
                    with CpuWatch(masters) as cpu:
                        result = run_wrk(servers[model].base + "/diary", BENCH / "get.lua",
                                         script_args, args.duration, args.connections,
                                         args.threads)
                    if result.non2xx or result.socket_errors:
                        raise RuntimeError(f"{model} {load}: {result}")
                    used = tree_cpu({servers[model].process.pid}) - cpu0
                    results[load][model].append(result.rps)
                    cpu_ms[load][model].append(1000 * used / max(1, result.requests))
                    print(f"{load:28} round {r + 1} {model:6} {result.rps:8.0f} req/s "
                          f"{cpu_ms[load][model][-1]:6.2f} CPU ms/request "
                          f"(background CPU {cpu.background_pct:.0f}%)", flush=True)
        print()
        for load, by_model in results.items():
            ratios = [g / s for g, s in zip(by_model["gevent"], by_model["sync"])]
            print(f"{load:28} req/s gevent/sync per round: "
                  f"{', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}")
            per = cpu_ms[load]
            ratios = [g / s for g, s in zip(per["gevent"], per["sync"])]
            print(f"{load:28} CPU/request gevent/sync per round: "
                  f"{', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}")
    finally:
        for server in servers.values():
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
