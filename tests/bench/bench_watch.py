#!/usr/bin/env python3
"""Watch benchmark: 1,000 watchers plus ordinary load, wake latency, and the worker models.

    python3 tests/bench/bench_watch.py [--watchers 1000] [--duration 6] [--rounds 3]
                                       [--samples 200] [--json PATH]

Needs ``RAINER_TEST_MYSQL_URL``'s server and ``RAINER_TEST_ZK_HOSTS`` (outside
``scripts/with-services`` it re-runs itself under ``scripts/with-services --bench``). One run:

1. seeds a MySQL database (1000 keys x 3 versions, 100 watched keys, a probe key) and
   publishes it to a fresh ZooKeeper path;
2. **worker models**: the same service, 2 workers, ZooKeeper on, under gunicorn's sync worker
   and under the gevent worker (what ``config/gunicorn.conf.py`` runs by default), in
   alternating rounds: cached ``GET /diary/<key>`` (the mirror), database ``GET
   /diary/<key>/<version>``, ``POST`` of next versions; ratio = gevent / sync;
3. **watchers**: 1,000 long-polling watchers (``watchers.py``: ``?index=N&wait=60s`` over
   keep-alive connections, 10 per key) on the gevent service while a second "host" commits
   to their keys 5 times a second; the same three ordinary loads without and with the
   watchers, in alternating rounds; ratio = with / without (target >= 0.8);
4. **wake latency**: a commit made on the other host to a key that 5 probes watch, every
   ~60 ms, ``--samples`` times, with the 1,000 watchers waiting: from the commit's 200 to the
   probe's answer, p50 and p99, with ZooKeeper (targets 50 / 250 ms) and on a service
   without ZooKeeper (polling, target p99 <= 1 s);
5. prints one table and stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from keeper_support import Children  # noqa: E402  (after the path set-up)
from keeper_support import CpuWatch  # noqa: E402
from keeper_support import Gunicorn  # noqa: E402
from keeper_support import http_request  # noqa: E402
from keeper_support import mysql_execute  # noqa: E402
from keeper_support import now_ns  # noqa: E402
from keeper_support import run_wrk  # noqa: E402

DATABASE = "rainer_bench_watch"
KEYS = 1000
VERSIONS = 3
WATCHED_KEYS = 100
PROBES = 5


# ====================================================================== set-up


def seed(db_url: str) -> None:
    from rainer_server import Commit
    from rainer_server import DbCommitStorage
    from rainer_server import open_database

    storage = DbCommitStorage(open_database(db_url))
    storage.start()
    pad = "x" * 100
    for n in range(KEYS):
        for version in range(1, VERSIONS + 1):
            payload = b'{"key": %d, "version": %d, "pad": "%s"}' % (n, version, pad.encode())
            storage.save(Commit.from_bytes(f"key-{n:05d}", version, payload, "bench", "seed"))
    for n in range(WATCHED_KEYS):
        storage.save(Commit.from_bytes(f"w-{n:03d}", 1, b"{}", "bench", "seed"))
    storage.save(Commit.from_bytes("probe", 1, b"{}", "bench", "seed"))
    storage.stop()


def env_for(db_url: str, zk_hosts: str | None, worker_class: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAINER_")}
    # No repeat-read cache of versions: the "DB GET" rows measure the database path under each
    # worker model (bench_core.py has the cached versioned reads).
    env.update(RAINER_DATABASE_URL=db_url, RAINER_WORKER_CLASS=worker_class,
               RAINER_PUBLISH_PERIOD="300", RAINER_VERSION_CACHE_BYTES="0")
    if zk_hosts:
        env["RAINER_ZK_HOSTS"] = zk_hosts
    return env


def publish(env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "rainer", "publish"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)


def start(name: str, env: dict[str, str], log_dir: Path, workers: int = 2,
          mirror: bool = True) -> Gunicorn:
    server = Gunicorn(name, "wsgi:app", env, workers, log_dir)
    server.wait_ready()
    deadline = time.monotonic() + 60
    # Every worker serves reads (from its mirror, with ZooKeeper) before anything is timed.
    while True:
        answers = [http_request(server.base, "GET", "/diary/key-00001") for _ in range(8)]
        if all(a[0] == 200 and (not mirror or a[1].get("X-Rainer-Cached") == "Yes")
               for a in answers):
            return server
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not serving from its mirror:\n{server.output()}")
        time.sleep(0.2)


# ====================================================================== ordinary load


def loads(connections: int) -> list[tuple[str, str, str, list[str]]]:
    """(name, path, script, args): the ordinary requests whose rates are compared."""
    return [
        ("cached GET /diary/<key>", "/diary", "get.lua", ["/diary", str(KEYS), "0"]),
        ("DB GET /diary/<key>/<v>", "/diary", "get.lua", ["/diary", str(KEYS), str(VERSIONS)]),
        ("POST next versions", "/diary", "post.lua", ["{tag}", "next", "200", "/diary"]),
    ]


def measure(server: Gunicorn, load, seconds: float, args) -> dict:
    name, path, script, script_args = load
    script_args = [a.replace("{tag}", f"t{uuid.uuid4().hex[:8]}") for a in script_args]
    with CpuWatch([server.process.pid]) as cpu:
        result = run_wrk(server.base + path, BENCH / script, script_args, seconds,
                         args.connections, args.threads)
    return {"rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
            "errors": result.non2xx + result.socket_errors, "bg_pct": cpu.background_pct}


def alternate(variants: dict, args, load_list, before=None) -> dict[str, dict[str, list[dict]]]:
    """Every load under every variant, ``args.rounds`` alternating rounds; variant -> load ->
    the rounds' results. ``variants``: name -> (server, enter, leave) (enter/leave: set-up
    around a variant's turn, e.g. starting the watchers)."""
    results: dict[str, dict[str, list[dict]]] = {v: {} for v in variants}
    seconds = max(1.0, args.duration / args.rounds)
    for load in load_list:
        for variant, (server, _, _) in variants.items():  # warm-up
            measure(server, load, 1, args)
    for round_number in range(args.rounds):
        order = list(variants) if round_number % 2 == 0 else list(reversed(variants))
        for variant in order:
            server, enter, leave = variants[variant]
            if enter:
                enter()
            try:
                for load in load_list:
                    results[variant].setdefault(load[0], []).append(
                        measure(server, load, seconds, args))
            finally:
                if leave:
                    leave()
    return results


def summary(rounds: list[dict]) -> dict:
    return {
        "rps": statistics.median(r["rps"] for r in rounds),
        "p99_ms": statistics.median(r["p99_ms"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "bg_pct": max(r["bg_pct"] for r in rounds),
    }


def paired_ratio(a: list[dict], b: list[dict]) -> float:
    return statistics.median(x["rps"] / y["rps"] for x, y in zip(a, b) if y["rps"])


# ====================================================================== watchers


class Watchers:
    """A watchers.py process: COUNT watchers on the w-keys and PROBES on ``probe``."""

    def __init__(self, server: Gunicorn, count: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH / "watchers.py"), "127.0.0.1", str(server.port), "/diary",
             str(count), str(WATCHED_KEYS), str(PROBES)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        Children.running.append(self)
        self.arrivals: dict[int, list[int]] = {}
        self.done: tuple[int, int] | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(120):
            raise RuntimeError("watchers not ready in 120 s")

    def _read(self) -> None:
        for line in self.process.stdout:
            parts = line.split()
            if parts[0] == "READY":
                self._ready.set()
            elif parts[0] == "P":
                self.arrivals.setdefault(int(parts[1]), []).append(int(parts[2]))
            elif parts[0] == "DONE":
                self.done = (int(parts[1]), int(parts[2]))

    def stop(self) -> None:
        if self in Children.running:
            Children.running.remove(self)
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


class Committer:
    """Commits to the watched keys through another host, ``rate`` times a second."""

    def __init__(self, host: Gunicorn, rate: float) -> None:
        self.host, self.rate = host, rate
        self.versions = {f"w-{n:03d}": 1 for n in range(WATCHED_KEYS)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(1 / self.rate):
            key = f"w-{n % WATCHED_KEYS:03d}"
            n += 1
            self.versions[key] += 1
            status, _, body = http_request(self.host.base, "POST", f"/diary/{key}/{self.versions[key]}",
                                           b"{}", {"X-Rainer-Author": "bench"})
            if status != 200:
                print(f"warning: commit {key}: {status} {body[:100]!r}", file=sys.stderr)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def wake_latency(host: Gunicorn, watchers: Watchers, samples: int, first_version: int) -> dict:
    """Commit ``probe`` on ``host`` ``samples`` times; latency from each 200 (and from each
    send) to its first and last probe answer."""
    sent: dict[int, tuple[int, int]] = {}
    version = first_version
    for _ in range(samples):
        version += 1
        before = now_ns()
        status, _, body = http_request(host.base, "POST", f"/diary/probe/{version}", b"{}",
                                       {"X-Rainer-Author": "bench"})
        if status != 200:
            raise RuntimeError(f"probe commit {version}: {status} {body!r}")
        sent[version] = (before, now_ns())
        deadline = time.monotonic() + 5
        while len(watchers.arrivals.get(version, [])) < PROBES and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(0.04)
    after_200, missing = [], 0
    for v, (_, acked) in sent.items():
        arrived = watchers.arrivals.get(v, [])
        if len(arrived) < PROBES:
            missing += PROBES - len(arrived)
        after_200.extend((t - acked) / 1e6 for t in arrived)
    after_200.sort()

    def pct(p: float) -> float:
        return after_200[min(len(after_200) - 1, int(p * len(after_200)))] if after_200 else float("nan")

    return {"p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": after_200[-1] if after_200 else None,
            "answers": len(after_200), "missing": missing, "last_version": version}


# ====================================================================== main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=6, help="seconds per load, over rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=200, help="wake-latency commits")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if not (os.environ.get("RAINER_TEST_MYSQL_URL") and os.environ.get("RAINER_TEST_ZK_HOSTS")):
        os.execv(ROOT / "scripts" / "with-services",
                 [str(ROOT / "scripts" / "with-services"), "--bench", sys.executable,
                  str(Path(__file__).resolve()), *(argv or sys.argv[1:])])

    mysql_server = os.environ["RAINER_TEST_MYSQL_URL"].rsplit("/", 1)[0]
    db_url = f"{mysql_server}/{DATABASE}"
    zk_hosts = os.environ["RAINER_TEST_ZK_HOSTS"] + f"/rainer-bench-watch-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    rows: list[dict] = []
    log_dir_ctx = tempfile.TemporaryDirectory(prefix="rainer-bench-watch-")
    log_dir = Path(log_dir_ctx.name)
    try:
        from kazoo.client import KazooClient

        admin = KazooClient(hosts=os.environ["RAINER_TEST_ZK_HOSTS"])
        admin.start(15)
        admin.ensure_path("/" + zk_hosts.split("/", 1)[1])  # the chroot must exist
        admin.stop()
        mysql_execute(mysql_server, f"DROP DATABASE IF EXISTS `{DATABASE}`",
                      f"CREATE DATABASE `{DATABASE}`")
        seed(db_url)
        publish(env_for(db_url, zk_hosts, "sync"))
        print(f"# seeded and published {KEYS} x {VERSIONS} (+{WATCHED_KEYS} watched keys)",
              flush=True)

        # ---- worker models: sync against gevent
        sync = start("sync", env_for(db_url, zk_hosts, "sync"), log_dir)
        gevent_server = start("gevent", env_for(db_url, zk_hosts, "gevent"), log_dir)
        load_list = loads(args.connections)
        models = alternate({"sync": (sync, None, None), "gevent": (gevent_server, None, None)},
                           args, load_list)
        sync.stop()
        for name, *_ in load_list:
            s, g = summary(models["sync"][name]), summary(models["gevent"][name])
            rows.append({"section": "worker model", "figure": f"{name}: gevent vs sync",
                         "value": g["rps"], "unit": "req/s", "floor": s["rps"],
                         "ratio": paired_ratio(models["gevent"][name], models["sync"][name]),
                         "target": ">= 0.9", "note": f"p99 {g['p99_ms']:.1f} vs {s['p99_ms']:.1f} ms, "
                         f"errors {g['errors']}/{s['errors']}, bg {max(g['bg_pct'], s['bg_pct']):.0f}%"})
            print(f"# {rows[-1]['figure']}: {g['rps']:.0f} vs {s['rps']:.0f} req/s", flush=True)

        # ---- 1,000 watchers beside the ordinary load
        other_host = start("other-host", env_for(db_url, zk_hosts, "gevent"), log_dir, workers=1)
        state: dict = {}

        def enter() -> None:
            state["watchers"] = Watchers(gevent_server, args.watchers)
            state["committer"] = Committer(other_host, 5)

        def leave() -> None:
            state.pop("committer").stop()
            state.pop("watchers").stop()

        with_watchers = alternate(
            {"without": (gevent_server, None, None), "with": (gevent_server, enter, leave)},
            args, load_list,
        )
        for name, *_ in load_list:
            w, wo = summary(with_watchers["with"][name]), summary(with_watchers["without"][name])
            rows.append({"section": "watchers", "figure": f"{name}: {args.watchers} watchers vs none",
                         "value": w["rps"], "unit": "req/s", "floor": wo["rps"],
                         "ratio": paired_ratio(with_watchers["with"][name],
                                               with_watchers["without"][name]),
                         "target": ">= 0.8", "note": f"p99 {w['p99_ms']:.1f} vs {wo['p99_ms']:.1f} ms, "
                         f"errors {w['errors']}/{wo['errors']}, bg {max(w['bg_pct'], wo['bg_pct']):.0f}%"})
            print(f"# {rows[-1]['figure']}: {w['rps']:.0f} vs {wo['rps']:.0f} req/s", flush=True)

        # ---- wake latency, with and without ZooKeeper
        watchers = Watchers(gevent_server, args.watchers)
        committer = Committer(other_host, 5)
        try:
            zk = wake_latency(other_host, watchers, args.samples, 1)
        finally:
            committer.stop()
            watchers.stop()
        no_zk = start("no-zookeeper", env_for(db_url, None, "gevent"), log_dir, mirror=False)
        watchers = Watchers(no_zk, args.watchers)
        try:
            polled = wake_latency(other_host, watchers, max(20, args.samples // 4), zk["last_version"])
        finally:
            watchers.stop()
        for label, figures, targets in (("ZooKeeper", zk, (50, 250)), ("no ZooKeeper", polled, (None, 1000))):
            for p, target in (("p50", targets[0]), ("p99", targets[1])):
                value = figures[f"{p}_ms"]
                rows.append({"section": "wake latency", "figure": f"commit on another host -> watcher, {p}, {label}",
                             "value": value, "unit": "ms", "floor": None, "ratio": None,
                             "target": f"<= {target} ms" if target else "",
                             "result": ("pass" if value <= target else "MISS") if target else "",
                             "note": f"{figures['answers']} answers, {figures['missing']} missing, "
                             f"with {args.watchers} watchers waiting"})
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        Children.stop_all()
        try:
            mysql_execute(mysql_server, f"DROP DATABASE IF EXISTS `{DATABASE}`")
        except Exception as exc:
            print(f"warning: dropping {DATABASE}: {exc}", file=sys.stderr)

    for row in rows:
        if row.get("ratio") is not None:
            bound = float(row["target"].split()[-1])
            row["result"] = "pass" if row["ratio"] >= bound else "MISS"
    print()
    print(f"# rainer watch benchmark: {os.cpu_count()} CPUs, {platform.python_implementation()} "
          f"{platform.python_version()}, 2 workers, {args.watchers} watchers, "
          f"{time.monotonic() - started:.0f} s")
    print(f"{'section':<13} {'figure':<58} {'value':>10} {'floor':>8} {'ratio':>6} "
          f"{'target':<9} {'result':<6} note")
    print("-" * 150)
    for row in rows:
        value = f"{row['value']:.0f} {row['unit']}" if row["unit"] == "req/s" else f"{row['value']:.1f} ms"
        floor = f"{row['floor']:.0f}" if row.get("floor") else "-"
        ratio = f"{row['ratio']:.2f}" if row.get("ratio") is not None else "-"
        print(f"{row['section']:<13} {row['figure']:<58} {value:>10} {floor:>8} {ratio:>6} "
              f"{row['target']:<9} {row.get('result', ''):<6} {row['note']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if any(row.get("result") == "MISS" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
