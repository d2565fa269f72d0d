"""The full fault run: one cluster, every scenario, one table of figures against targets.

    python3 tests/faults/run.py [--quick] [--only racing,host-kill] [--out DIR] [--keep] [--period S]

Prints each scenario's checker summary as it goes, then the figure table and the checker
table (Markdown), also written to ``DIR/table.md``. A failed check leaves its history, dumps
and logs under ``DIR/<scenario>/``. Exit status 1 when any figure misses its target.
Needs Debian's zookeeper, mariadb-server and nginx packages (``scripts/with-services``
installs them); it starts its own ensemble, MariaDB and nginx on free loopback ports.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.faults.cluster import MARIADBD  # noqa: E402
from tests.faults.cluster import NGINX  # noqa: E402
from tests.faults.cluster import Cluster  # noqa: E402
from tests.faults.scenarios import SCENARIOS  # noqa: E402
from tests.faults.scenarios import checker_table  # noqa: E402
from tests.faults.scenarios import run_scenario  # noqa: E402
from tests.faults.scenarios import table  # noqa: E402

#: The order of a full run: the database moves before it is killed; the control run, which
#: leaves the journal behind ZooKeeper on purpose, comes last.
ORDER = ["racing", "zk-leader", "quorum", "partition", "host-kill", "churn", "hung-db",
         "slow-clients", "db-move", "db-kill", "db-kill-control"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/faults/run.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short CI durations")
    parser.add_argument("--only", default="", help="comma-separated scenarios: " + ", ".join(ORDER))
    parser.add_argument("--out", type=Path, default=None, help="where tables and failed checks go")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's directory")
    parser.add_argument("--period", type=float, default=2.0,
                        help="RAINER_PUBLISH_PERIOD of every host (a long one shows what does "
                             "not wait for a publish pass)")
    parser.add_argument("--gunicorn-args", default="",
                        help="extra gunicorn settings for every host, e.g. '--log-level debug'")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or ORDER
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios: {unknown}")
    for tool in (NGINX, MARIADBD, "/usr/share/java/zookeeper.jar"):
        if not os.path.exists(tool):
            print(f"{tool} is missing (scripts/with-services installs it)", file=sys.stderr)
            return 2
    out = args.out or Path(f"/tmp/rainer-faults-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    outcomes = []
    cluster = Cluster(out / "cluster", keep=args.keep, gunicorn_args=args.gunicorn_args,
                      period=args.period)
    print(f"[faults] starting the cluster under {cluster.base}", flush=True)
    with cluster:
        print(cluster.describe(), flush=True)
        for name in names:
            print(f"[faults] {name} ...", flush=True)
            outcome = run_scenario(cluster, name, out, args.quick)
            outcomes.append(outcome)
            verdict = "ok" if outcome.ok else "FAILED"
            summary = outcome.report.summary() if outcome.report else outcome.error
            print(f"[faults] {name} {verdict} in {outcome.seconds:.0f} s: {summary}", flush=True)
            if not outcome.ok and outcome.report:
                print(outcome.report.details(limit=3), flush=True)
            if outcome.artifacts:
                print(f"[faults]   histories and logs: {outcome.artifacts}", flush=True)
    if not args.keep:
        import shutil

        shutil.rmtree(out / "cluster", ignore_errors=True)
    text = (f"{table(outcomes, compact=True)}\n\n{checker_table(outcomes)}\n\n"
            f"{len(names)} scenarios in {(time.monotonic() - started) / 60:.1f} min\n")
    (out / "table.md").write_text(f"{text}\nEvery figure:\n\n{table(outcomes)}\n")
    print()
    print(text)
    print(f"[faults] written to {out / 'table.md'}")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
