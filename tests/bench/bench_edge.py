#!/usr/bin/env python3
"""Reads at the edge against etcd: Rainer behind the shipped nginx site, etcd as the peer.

    python3 tests/bench/bench_edge.py --mysql mysql://root@127.0.0.1:3306 [--json PATH]
        [--duration 10] [--warmup 2] [--rounds 3] [--connections 32] [--threads 2]

Run it under ``scripts/with-services --bench`` (MariaDB, ZooKeeper, wrk and Debian's
``etcd-server``). It starts, on free loopback ports:

- etcd (Debian's ``/usr/bin/etcd``, v2 API enabled) with a temporary data directory;
- Rainer as the README deploys it: gunicorn (``config/gunicorn.conf.py``: gevent workers),
  MariaDB, ZooKeeper on, and ``deploy/nginx/rainer.conf`` in front of it in an nginx.conf
  like Debian's (``worker_processes auto``, access log on).

One key holds one 203-byte value in both. wrk (``-t2 -c32``) then measures, in alternating
rounds (every scenario once per round, the order reversed every other round, so slow drifts
and bursts of load spread over all of them):

- etcd v3 range (``POST /v3/kv/range``, its gRPC gateway) and put, etcd v2 GET and PUT;
- Rainer through nginx, cached: repeat anonymous reads, answered from the micro-cache;
- Rainer through nginx, uncached: the same reads by a caller that sends credentials (an
  ``Authorization`` header, which the service without access control ignores), which nginx
  passes to gunicorn every time;
- Rainer direct: the same reads, with the same header, straight to gunicorn;
- Rainer through a bare nginx proxy (a second nginx that passes requests on over kept
  connections and does nothing else): not a target, the ceiling of any proxy in front on a
  machine where it shares the CPUs with gunicorn and wrk.

Targets (ratios of paired rounds, medians): cached via nginx >= 1.0x etcd v3 range (stretch:
>= etcd v2 GET), uncached via nginx >= 0.95x direct. Every answer is checked before it is
measured, and every wrk run must be free of errors. The machine's load (/proc/loadavg, and
the CPU that processes other than ours used during each wrk run and for 3 s before and after
with ours idle) is printed; a run where others took more than 20% of the CPUs is DISTURBED,
neither a PASS nor a FAIL. Exit status: 0 every target met, 1 a target missed, 2 invalid or
disturbed.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from floors import make_payload  # noqa: E402
from keeper_support import Children  # noqa: E402
from keeper_support import CpuWatch  # noqa: E402
from keeper_support import Gunicorn  # noqa: E402
from keeper_support import _pdeathsig  # noqa: E402
from keeper_support import mysql_execute  # noqa: E402
from keeper_support import run_wrk  # noqa: E402
from tests.test_nginx import SITE  # noqa: E402
from tests.test_nginx import render  # noqa: E402
from tests.zkserver import free_port  # noqa: E402

ETCD = "/usr/bin/etcd"
NGINX = "/usr/sbin/nginx"
KEY = "key-00000"  # get.lua's first key
VALUE = make_payload(KEY, 1, size=203)
TABLE = "rainer"
DATABASE = "rainer_bench_edge"
#: A credential for a service without access control: ignored by gunicorn, but nginx must
#: pass such a request on to it every time (it may be for this caller only).
CREDENTIAL = "bench-not-a-token"
#: Others' CPU use above this share of all CPUs makes a figure disturbed (as bench_core).
DISTURBED_PCT = 20.0

assert len(VALUE) == 203, len(VALUE)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


# ====================================================================== etcd


class Etcd:
    """One etcd member on loopback ports, its data in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        peer = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "etcd.log"
        self.log = open(self.log_path, "w+b")
        self.version = _etcd_version()
        command = [
            ETCD, "--name", "bench", "--data-dir", str(workdir / "etcd-data"),
            "--listen-client-urls", self.base, "--advertise-client-urls", self.base,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"bench=http://127.0.0.1:{peer}",
            "--log-level", "warn",
        ]
        if self.version >= (3, 4):
            command.append("--enable-v2=true")  # off by default from 3.4 on
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_pdeathsig,
        )
        Children.running.append(self)
        # The gRPC gateway's prefix: /v3 from 3.4 on, /v3beta in 3.3, /v3alpha before.
        self.v3 = "/v3" if self.version >= (3, 4) else "/v3beta" if self.version >= (3, 3) else "/v3alpha"

    def __repr__(self) -> str:
        return f"Etcd(pid {self.process.pid})"

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited:\n{self.output()}")
            try:
                if self.call("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"etcd not ready:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self in Children.running:
            Children.running.remove(self)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _etcd_version() -> tuple[int, int]:
    out = subprocess.run([ETCD, "--version"], capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            major, minor = line.split(":", 1)[1].strip().split(".")[:2]
            return int(major), int(minor)
    raise RuntimeError(f"cannot tell etcd's version from: {out!r}")


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


# ====================================================================== nginx


class NginxSite:
    """deploy/nginx/rainer.conf in an nginx.conf like Debian's, on a loopback port."""

    def __init__(self, workdir: Path, upstream_port: int, bare: bool = False) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        prefix = workdir / ("nginx-bare" if bare else "nginx")
        prefix.mkdir()
        if bare:
            # The least any reverse proxy does: pass the request on over a kept connection,
            # log nothing, cache nothing, add no header. What it costs is the ceiling of
            # "uncached via nginx / direct" on a machine where nginx shares the CPUs.
            site = f"""
    access_log off;
    upstream rainer {{ server 127.0.0.1:{upstream_port}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://rainer;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""
        else:
            # tests/test_nginx.py's rendering (ports, cache directory) inside Debian's defaults.
            site = render(SITE.read_text(), self.port, upstream_port, prefix)
            site = site.split("http {", 1)[1].rsplit("}", 1)[0]
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = f"""{user}worker_processes auto;
events {{ worker_connections 768; }}
http {{
    sendfile on;
    tcp_nopush on;
    types_hash_max_size 2048;
    default_type application/octet-stream;
{site}
}}
"""
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(conf)
        self.error_log = prefix / "error.log"
        self.process = subprocess.Popen(
            [NGINX, "-p", str(prefix), "-c", str(self.conf), "-e", str(self.error_log),
             "-g", f"daemon off; pid {prefix / 'nginx.pid'};"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_pdeathsig,
        )
        Children.running.append(self)

    def __repr__(self) -> str:
        return f"NginxSite(pid {self.process.pid})"

    def wait_ready(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.error_log.read_text()}")
            try:
                http_get(self.base, "/healthz")
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx not listening")

    def stop(self) -> None:
        if self in Children.running:
            Children.running.remove(self)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def http_get(base: str, path: str, headers: dict[str, str] | None = None,
             method: str = "GET", body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# ====================================================================== scenarios


def scenarios(etcd: Etcd, site: NginxSite, rainer: Gunicorn, bare: NginxSite) -> dict[str, dict]:
    """Each measured request: where wrk sends it, and how its answer is checked first."""
    json_headers = ["Content-Type: application/json"]
    put_value = VALUE.decode("ascii")
    return {
        "etcd v3 range": {
            "base": etcd.base, "script": "request.lua",
            "args": ["POST", f"{etcd.v3}/kv/range", json.dumps({"key": b64(KEY)}), *json_headers],
        },
        "etcd v3 put": {
            "base": etcd.base, "script": "request.lua",
            "args": ["POST", f"{etcd.v3}/kv/put",
                     json.dumps({"key": b64(KEY), "value": b64(VALUE)}), *json_headers],
        },
        "etcd v2 GET": {
            "base": etcd.base, "script": "request.lua", "args": ["GET", f"/v2/keys/{KEY}"],
        },
        "etcd v2 PUT": {
            "base": etcd.base, "script": "request.lua",
            "args": ["PUT", f"/v2/keys/{KEY}", f"value={put_value}",
                     "Content-Type: application/x-www-form-urlencoded"],
        },
        "rainer via nginx, cached": {
            "base": site.base, "script": "get.lua", "args": ["/diary", "1", "0"],
        },
        "rainer via nginx, uncached": {
            "base": site.base, "script": "get.lua", "args": ["/diary", "1", "0", CREDENTIAL],
        },
        "rainer direct": {
            "base": rainer.base, "script": "get.lua", "args": ["/diary", "1", "0", CREDENTIAL],
        },
        "rainer via a bare nginx proxy": {
            "base": bare.base, "script": "get.lua", "args": ["/diary", "1", "0", CREDENTIAL],
        },
    }


TARGETS = [
    # (figure, against, target ratio, what a miss is)
    ("rainer via nginx, cached", "etcd v3 range", 1.0, "target"),
    ("rainer via nginx, cached", "etcd v2 GET", 1.0, "stretch"),
    ("rainer via nginx, uncached", "rainer direct", 0.95, "target"),
    # Not a target: how far any proxy in front can get on this machine (see NginxSite).
    ("rainer via a bare nginx proxy", "rainer direct", None, "ceiling"),
]


def verify(etcd: Etcd, site: NginxSite, rainer: Gunicorn, bare: NginxSite) -> list[str]:
    """Every measured request answers what it should; the problems, if any."""
    problems = []
    auth = {"Authorization": f"Bearer {CREDENTIAL}"}
    status, body = etcd.call("POST", f"{etcd.v3}/kv/range", json.dumps({"key": b64(KEY)}).encode(),
                             {"Content-Type": "application/json"})
    kvs = json.loads(body).get("kvs", []) if status == 200 else []
    if not kvs or base64.b64decode(kvs[0]["value"]) != VALUE:
        problems.append(f"etcd v3 range: {status} {body[:200]!r}")
    status, body = etcd.call("GET", f"/v2/keys/{KEY}")
    if status != 200 or json.loads(body)["node"]["value"] != VALUE.decode():
        problems.append(f"etcd v2 GET: {status} {body[:200]!r}")
    for name, base in (("rainer direct", rainer.base), ("a bare nginx proxy", bare.base)):
        status, headers, body = http_get(base, f"/diary/{KEY}", auth)
        if status != 200 or body != VALUE:
            problems.append(f"{name}: {status} {body[:200]!r}")
    # The cached read is a HIT once the first answer is in (the second, or after the lock).
    deadline = time.monotonic() + 10
    while True:
        status, headers, body = http_get(site.base, f"/diary/{KEY}")
        if status == 200 and body == VALUE and headers.get("X-Cache-Status") == "HIT":
            break
        if time.monotonic() > deadline:
            problems.append(f"via nginx, cached: never a HIT ({status} {headers} {body[:100]!r})")
            break
        time.sleep(0.05)
    status, headers, body = http_get(site.base, f"/diary/{KEY}", auth)
    if status != 200 or body != VALUE or headers.get("X-Cache-Status") != "BYPASS":
        problems.append(f"via nginx, uncached: {status} {headers.get('X-Cache-Status')} {body[:100]!r}")
    return problems


def measure(runs: dict[str, dict], roots: list[int], args) -> dict[str, dict]:
    names = list(runs)
    rows = {name: {"rounds": []} for name in names}
    for name in names:  # warm-up: connections, caches, JIT-less but warm interpreters
        spec = runs[name]
        run_wrk(spec["base"], BENCH / spec["script"], spec["args"], args.warmup,
                args.connections, args.threads)
    for number in range(args.rounds):
        order = names if number % 2 == 0 else list(reversed(names))
        for name in order:
            spec = runs[name]
            with CpuWatch(roots) as cpu:
                result = run_wrk(spec["base"], BENCH / spec["script"], spec["args"],
                                 args.duration, args.connections, args.threads)
            rows[name]["rounds"].append({
                "rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                "requests": result.requests, "non2xx": result.non2xx,
                "socket_errors": result.socket_errors, "bg_pct": cpu.background_pct,
            })
            log(f"  round {number + 1} {name:<28} {result.rps:9.0f} req/s  p50 {result.p50_ms:6.2f} ms"
                f"  p99 {result.p99_ms:6.2f} ms  errors {result.non2xx + result.socket_errors}"
                f"  background CPU {cpu.background_pct:.0f}%")
    for name, row in rows.items():
        row["rps"] = statistics.median(r["rps"] for r in row["rounds"])
        row["p50_ms"] = statistics.median(r["p50_ms"] for r in row["rounds"])
        row["p99_ms"] = statistics.median(r["p99_ms"] for r in row["rounds"])
        row["errors"] = sum(r["non2xx"] + r["socket_errors"] for r in row["rounds"])
        row["bg_pct"] = max(r["bg_pct"] for r in row["rounds"])
    return rows


def idle_background(roots: list[int], seconds: float = 3.0) -> float:
    """Percent of all CPUs processes other than ours used over ``seconds`` with ours idle."""
    with CpuWatch([os.getpid(), *roots]) as cpu:
        time.sleep(seconds)
    return cpu.background_pct


def paired_ratio(row: dict, other: dict) -> float:
    return statistics.median(a["rps"] / b["rps"] for a, b in zip(row["rounds"], other["rounds"]))


def build_table(rows: dict[str, dict]) -> list[dict]:
    table = []
    for name, row in rows.items():
        table.append({"scenario": name, "rps": row["rps"], "p50_ms": row["p50_ms"],
                      "p99_ms": row["p99_ms"], "errors": row["errors"], "bg_pct": row["bg_pct"],
                      "against": None, "ratio": None, "target": None, "verdict": None})
    for figure, against, target, kind in TARGETS:
        a, b = rows[figure], rows[against]
        ratio = paired_ratio(a, b)
        if target is None:
            table.append({"scenario": f"{figure} / {against}", "rps": a["rps"],
                          "p50_ms": a["p50_ms"], "p99_ms": a["p99_ms"],
                          "errors": a["errors"] + b["errors"],
                          "bg_pct": max(a["bg_pct"], b["bg_pct"]), "against": against,
                          "ratio": ratio, "target": f"({kind})", "verdict": "",
                          "kind": kind, "floor_rps": b["rps"]})
            continue
        disturbed = max(a["bg_pct"], b["bg_pct"]) > DISTURBED_PCT
        errors = a["errors"] + b["errors"]
        if errors:
            verdict = "INVALID"
        elif disturbed:
            # Others' load may have made either side slower: neither a pass nor a miss.
            verdict = "DISTURBED" + (" (FAIL)" if ratio < target else "")
        elif ratio < target:
            verdict = "FAIL"
        else:
            verdict = "PASS"
        table.append({"scenario": f"{figure} / {against}", "rps": a["rps"], "p50_ms": a["p50_ms"],
                      "p99_ms": a["p99_ms"], "errors": errors,
                      "bg_pct": max(a["bg_pct"], b["bg_pct"]), "against": against,
                      "ratio": ratio, "target": f">= {target:.2f}x ({kind})", "verdict": verdict,
                      "kind": kind, "floor_rps": b["rps"]})
    return table


def print_table(table: list[dict]) -> None:
    print(f"{'scenario':<46} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'bg%':>4} "
          f"{'ratio':>6} {'target':<20} result")
    print("-" * 112)
    for r in table:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['scenario']:<46} {r['rps']:9.0f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} "
              f"{r['bg_pct']:4.0f} {ratio:>6} {r['target'] or '':<20} {r['verdict'] or ''}")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mysql", default=os.environ.get("RAINER_TEST_MYSQL_URL", "").rsplit("/", 1)[0],
                        help="MariaDB server URL, without a database (default: from RAINER_TEST_MYSQL_URL)")
    parser.add_argument("--zk", default=os.environ.get("RAINER_TEST_ZK_HOSTS"),
                        help="ZooKeeper hosts (default: RAINER_TEST_ZK_HOSTS)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per scenario")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (the default's)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if not args.mysql or not args.zk:
        parser.error("needs --mysql and --zk (or run under scripts/with-services --bench)")
    for program in (ETCD, NGINX, shutil.which("wrk")):
        if not program or not os.access(program, os.X_OK):
            parser.error(f"{program or 'wrk'} is missing (scripts/with-services --bench installs it)")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)

    from kazoo.client import KazooClient

    started = time.monotonic()
    load_before = loadavg()
    log(f"rainer edge bench: {os.cpu_count()} CPUs, loadavg before: {load_before}")
    chroot = "/rainer-bench-edge-" + uuid.uuid4().hex[:12]
    zk = KazooClient(hosts=args.zk, timeout=10)
    zk.start(timeout=15)
    zk.ensure_path(chroot)
    db_url = f"{args.mysql}/{DATABASE}"
    mysql_execute(args.mysql, f"DROP DATABASE IF EXISTS `{DATABASE}`", f"CREATE DATABASE `{DATABASE}`")
    workdir = Path(tempfile.mkdtemp(prefix="rainer-bench-edge-"))
    status = 2
    try:
        etcd = Etcd(workdir)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAINER_")}
        env.update(RAINER_DATABASE_URL=db_url, RAINER_TABLE=TABLE,
                   RAINER_ZK_HOSTS=args.zk + chroot, PYTHONDONTWRITEBYTECODE="1")
        rainer = Gunicorn("rainer", "wsgi:app", env, args.workers, workdir)
        etcd.wait_ready()
        rainer.wait_ready()
        site = NginxSite(workdir, rainer.port)
        site.wait_ready()
        bare = NginxSite(workdir, rainer.port, bare=True)
        bare.wait_ready()
        log(f"etcd {'.'.join(map(str, etcd.version))} at {etcd.base} (v3 gateway {etcd.v3}), "
            f"rainer at {rainer.base} ({args.workers} gevent workers, MariaDB, ZooKeeper), "
            f"nginx at {site.base}")

        # The value, in both.
        status_v3, body = etcd.call("POST", f"{etcd.v3}/kv/put",
                                    json.dumps({"key": b64(KEY), "value": b64(VALUE)}).encode(),
                                    {"Content-Type": "application/json"})
        assert status_v3 == 200, body
        status_v2, body = etcd.call("PUT", f"/v2/keys/{KEY}", f"value={VALUE.decode()}".encode(),
                                    {"Content-Type": "application/x-www-form-urlencoded"})
        assert status_v2 in (200, 201), body
        code, _, body = http_get(rainer.base, f"/diary/{KEY}/1", {"X-Rainer-Author": "bench"},
                                 "POST", VALUE)
        assert code == 200, body
        # Rainer's reads come from the ZooKeeper mirror once it has the key.
        deadline = time.monotonic() + 30
        while http_get(rainer.base, f"/diary/{KEY}")[1].get("X-Rainer-Cached") != "Yes":
            if time.monotonic() > deadline:
                raise RuntimeError("the mirror never served the key")
            time.sleep(0.05)

        problems = verify(etcd, site, rainer, bare)
        if problems:
            for problem in problems:
                print(f"INVALID: {problem}")
            return 2
        roots = [etcd.process.pid, rainer.process.pid, site.process.pid, bare.process.pid]
        idle_before = idle_background(roots)
        log(f"background CPU with ours idle: {idle_before:.0f}% of the CPUs")
        rows = measure(scenarios(etcd, site, rainer, bare), roots, args)
        # The measured answers are still right (nothing broke under load).
        problems = verify(etcd, site, rainer, bare)
        load_after = loadavg()

        table = build_table(rows)
        print()
        print(f"# rainer edge vs etcd: {os.cpu_count()} CPUs, wrk -t{args.threads} -c{args.connections}, "
              f"{args.rounds} alternating rounds x {args.duration:.0f} s, medians; ratios of paired rounds")
        print(f"# loadavg before: {load_before}; after: {load_after}")
        print_table(table)
        for problem in problems:
            print(f"INVALID after the runs: {problem}")
        disturbed = [r["scenario"] for r in table if r["bg_pct"] > DISTURBED_PCT and r["ratio"] is None]
        if disturbed:
            print(f"WARNING: other processes used over {DISTURBED_PCT:.0f}% of the CPUs during "
                  f"{', '.join(disturbed)}: not a pass; rerun on a quiet machine")
        verdicts = [r["verdict"] for r in table if r.get("kind") == "target"]
        idle_after = idle_background(roots)
        print(f"# background CPU with ours idle: before {idle_before:.0f}%, after {idle_after:.0f}% "
              f"of the CPUs (limit {DISTURBED_PCT:.0f}%)")
        quiet = max(idle_before, idle_after) <= DISTURBED_PCT
        if problems or any(v == "INVALID" or v.startswith("DISTURBED") for v in verdicts) or not quiet:
            status = 2
        elif "FAIL" in verdicts:
            status = 1
        else:
            status = 0
        print(f"# {time.monotonic() - started:.0f} s; "
              f"{'PASS' if status == 0 else 'FAIL' if status == 1 else 'NOT A PASS (invalid or disturbed)'}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "etcd_version": ".".join(map(str, etcd.version)),
                "loadavg_before": load_before, "loadavg_after": load_after,
                "idle_background_pct": [idle_before, idle_after],
                "rows": rows, "table": table, "problems": problems,
            }, indent=2))
        return status
    except KeyboardInterrupt:
        log("interrupted")
        return 2
    finally:
        Children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
        try:
            mysql_execute(args.mysql, f"DROP DATABASE IF EXISTS `{DATABASE}`")
        finally:
            zk.delete(chroot, recursive=True)
            zk.stop()
            zk.close()


if __name__ == "__main__":
    sys.exit(main())
