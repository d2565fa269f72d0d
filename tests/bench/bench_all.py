#!/usr/bin/env python3
"""Every Rainer benchmark in one run, printed as one table of figures, floors and ratios.

    python3 tests/bench/bench_all.py [--quick] [--json PATH] [--scale 10000x50 --scale 100000x5]

Brings up what it needs: run outside ``scripts/with-services`` it re-runs itself under
``scripts/with-services --bench``, which installs and starts MariaDB, a throw-away ZooKeeper
and wrk on a Debian machine. Then, one after the other (never side by side: they would
disturb each other's figures on a 2-core machine):

1. ``bench_core.py``: gunicorn + MariaDB against floors measured in the same run (issue 2);
2. ``bench_keeper.py``: mirror latency, cached reads, publisher passes against their floors,
   on its own ZooKeeper (issue 3);
3. ``bench_scale.py``: heads, publisher passes, a mirror's start-up and memory, listings,
   at 10k keys x 50 versions and 100k keys x 5 versions (issue 5);
4. ``bench_watch.py``: 1,000 watchers beside ordinary load, wake latency, gevent against sync
   workers (issue 11);
5. ``bench_edge.py``: reads through the shipped nginx site (micro-cache hits, and reads that
   bypass it) against direct reads and against etcd (v3 range and put, v2 GET and PUT) as the
   peer (issue 13).

Before the first and after every benchmark, with nothing of ours running, it samples the CPU
the rest of the machine uses for a few seconds: a run during which that exceeds
``QUIET_PCT`` of the CPUs is disturbed, and is never called a pass (exit status 2).

Each writes JSON; this script prints their rows in one table. ``--quick`` shortens the wrk
runs and the scale scenarios, to check that everything works, not to quote figures.
Exit status: the worst of them (0 every target met, 1 a target missed, 2 invalid or disturbed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent.parent
sys.path.insert(0, str(BENCH))

from bench_scale import ROWS as SCALE_ROWS  # noqa: E402  (after the path set-up)
from keeper_support import CpuWatch  # noqa: E402

#: Background CPU (percent of all CPUs, sampled while none of ours runs) above which a run is
#: disturbed: its figures may be others' noise.
QUIET_PCT = 10.0
QUIET_SAMPLE = 3.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short runs and small scale scenarios (a smoke test)")
    parser.add_argument("--scale", action="append", metavar="KEYSxVERSIONS",
                        help="scale scenarios (default: 10000x50 and 100000x5)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    args = parser.parse_args(argv)

    if not (os.environ.get("RAINER_TEST_MYSQL_URL") and os.environ.get("RAINER_TEST_ZK_HOSTS")):
        script = [sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:])]
        os.execv(ROOT / "scripts" / "with-services",
                 [str(ROOT / "scripts" / "with-services"), "--bench", *script])

    mysql_server = os.environ["RAINER_TEST_MYSQL_URL"].rsplit("/", 1)[0]
    started = time.monotonic()
    wrk = ["--duration", "2", "--warmup", "1"] if args.quick else []
    scale = args.scale or (["2000x5"] if args.quick else ["10000x50", "100000x5"])
    results: dict[str, dict] = {}
    statuses: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="rainer-bench-all-") as tmp:
        runs = {
            "core": ["bench_core.py", "--mysql", mysql_server, *wrk],
            "keeper": ["bench_keeper.py", "--mysql", mysql_server, *wrk,
                       *(["--samples", "200"] if args.quick else [])],
            "scale": ["bench_scale.py", *(arg for s in scale for arg in ("--scenario", s))],
            "watch": ["bench_watch.py",
                      *(["--watchers", "200", "--samples", "40", "--duration", "2"]
                        if args.quick else [])],
            "edge": ["bench_edge.py", "--mysql", mysql_server,
                     *(["--duration", "2", "--warmup", "1", "--rounds", "2"] if args.quick else [])],
        }
        background = [sample_background("before the first benchmark")]
        for name, command in runs.items():
            out = Path(tmp) / f"{name}.json"
            print(f"# ---- {name}: {' '.join(command)}", flush=True)
            statuses[name] = subprocess.run(
                [sys.executable, str(BENCH / command[0]), *command[1:], "--json", str(out)],
                cwd=ROOT,
            ).returncode
            if out.exists():
                results[name] = json.loads(out.read_text())
            background.append(sample_background(f"after {name}"))

    rows = table_rows(results)
    print()
    print(f"# rainer: every benchmark, {os.cpu_count()} CPUs, {platform.python_implementation()} "
          f"{platform.python_version()}, {time.monotonic() - started:.0f} s"
          + (" (--quick: not for quoting)" if args.quick else ""))
    print_table(rows)
    for name, status in statuses.items():
        if status not in (0, 1):
            print(f"{name}: INVALID or failed (exit {status}); see its output above")
    worst = max(pct for _when, pct, _load in background)
    print(f"background CPU (sampled {QUIET_SAMPLE:.0f} s between benchmarks): "
          + ", ".join(f"{when} {pct:.0f}% (load {load})" for when, pct, load in background))
    disturbed = worst > QUIET_PCT
    if disturbed:
        print(f"DISTURBED: other processes used up to {worst:.0f}% of the CPUs (limit "
              f"{QUIET_PCT:.0f}%): these figures are not a pass; run again on a quiet machine")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"rows": rows, "runs": results, "background": background, "disturbed": disturbed},
            indent=2))
    if disturbed or any(name not in results for name in statuses):
        return 2
    return max(statuses.values())


def sample_background(when: str) -> tuple[str, float, str]:
    """(when, percent of all CPUs other processes used over a few idle seconds, loadavg)."""
    with CpuWatch([os.getpid()]) as watch:
        time.sleep(QUIET_SAMPLE)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"# background CPU {when}: {watch.background_pct:.0f}% (load {load})", flush=True)
    return when, watch.background_pct, load


def table_rows(results: dict[str, dict]) -> list[dict]:
    """Rows of (section, figure, value, unit, floor, ratio, target, result) from each JSON."""
    rows: list[dict] = []
    core = results.get("core", {}).get("table", [])
    by_name = {r["scenario"]: r for r in core}
    for r in core:
        in_process = r["scenario"].startswith("in-process")
        value, unit = (r["p50_ms"], "ms") if in_process else (r["rps"], "req/s")
        floor = _find_floor(by_name, r.get("floor"))
        rows.append(_row(
            "core", r["scenario"], value, unit,
            None if floor is None else (floor["p50_ms"] if in_process else floor["rps"]),
            r.get("floor"), r.get("ratio"), r.get("target"), r.get("verdict"),
        ))
    for r in results.get("keeper", {}).get("table", []):
        rows.append(_row(
            "keeper", r["scenario"].strip(), r["value"], r["unit"], r.get("floor"),
            r.get("note"), r.get("ratio"), r.get("target"),
            "" if r.get("verdict") == "info" else r.get("verdict"),
        ))
    scale = results.get("scale", [])
    for label, name, unit in SCALE_ROWS:
        for r in scale:
            if r.get(name) is not None:
                rows.append(_row(f"scale {r['scenario']}", label, r[name], unit))
    for r in results.get("watch", []):
        rows.append(_row(
            r["section"], r["figure"], r["value"], r["unit"], r.get("floor"), r.get("note"),
            r.get("ratio"), r.get("target"), r.get("result"),
        ))
    for r in results.get("edge", {}).get("table", []):
        rows.append(_row(
            "edge", r["scenario"], r["rps"], "req/s", r.get("floor_rps"), r.get("against"),
            r.get("ratio"), r.get("target"), r.get("verdict"),
        ))
    return rows


def _row(section: str, figure: str, value: float | None, unit: str, floor: float | None = None,
         floor_name: str | None = None, ratio: float | None = None, target: str | None = None,
         result: str | None = None) -> dict:
    """One row of the table, the same keys whichever benchmark it comes from."""
    return {"section": section, "figure": figure, "value": value, "unit": unit, "floor": floor,
            "floor_name": floor_name or "", "ratio": ratio, "target": target or "",
            "result": result or ""}


def _find_floor(rows: dict[str, dict], name: str | None) -> dict | None:
    # bench_core names a floor by its label, which its own row may extend ("..., c=4").
    if not name:
        return None
    if name in rows:
        return rows[name]
    return next((row for label, row in rows.items() if name in label), None)


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "s" and value < 1:
        return f"{value * 1000:.1f} ms"
    if unit == "bytes":
        return f"{value / 2**20:.2f} MiB"
    text = f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return f"{text} {unit}".strip()


def print_table(rows: list[dict]) -> None:
    print(f"{'section':<15} {'figure':<46} {'value':>12} {'floor':>8} {'ratio':>6} "
          f"{'target':<14} {'result':<7} floor / note")
    print("-" * 140)
    for r in rows:
        value = _number(r["value"], r["unit"])
        floor = "-" if r["floor"] is None else _number(r["floor"])
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['section']:<15} {r['figure'][:46]:<46} {value:>12} {floor:>8} {ratio:>6} "
              f"{str(r['target'])[:14]:<14} {r['result']:<7} {r['floor_name'] or ''}")


if __name__ == "__main__":
    sys.exit(main())
