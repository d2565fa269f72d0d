"""The fast fault cases on a real loopback cluster: a 3-node ZooKeeper ensemble, MariaDB of our
own, two gunicorn hosts and nginx (``tests/faults/cluster.py``), broken as production breaks.

Each case is a scenario of ``tests/faults/scenarios.py`` in its short form and must meet every
target; the checker's histories, dumps and logs of a failed one are kept (the path is in the
failure message). The full run, with longer faults and the figure table, is
``python3 tests/faults/run.py``.

Needs java with Debian's zookeeper jars, mariadbd and nginx (``scripts/test`` installs them);
without them the module skips, and under CI=true fails. It never touches the shared MariaDB.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import service_missing
from tests.faults.cluster import MARIADBD
from tests.faults.cluster import NGINX
from tests.faults.cluster import Cluster
from tests.faults.scenarios import checker_table
from tests.faults.scenarios import run_scenario
from tests.faults.scenarios import table

pytestmark = [pytest.mark.mysql, pytest.mark.zookeeper, pytest.mark.gunicorn]

#: Every scenario of the full run, in its order (the database moves before it is killed; the
#: control run, which leaves the journal behind ZooKeeper on purpose, is last). hung-db was
#: left out while its /metrics p99 (<= 100 ms) missed on a machine shared with benchmarks; it
#: is in because it alone found a save that left keys without a head (a packet the server ran
#: after its client had gone), and on CI's machine, alone, that p99 is 10-13 ms.
FAST = ["racing", "zk-leader", "quorum", "partition", "host-kill", "churn", "hung-db",
        "slow-clients", "db-move", "db-kill",
        "db-kill-control"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for tool in (NGINX, MARIADBD, "/usr/share/java/zookeeper.jar"):
        if not os.path.exists(tool):
            service_missing(f"{tool} is missing (scripts/test installs it)")
    if not shutil.which("java"):
        service_missing("java is missing (scripts/test installs default-jre-headless)")
    with Cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fault-checks")


@pytest.mark.parametrize("scenario", FAST)
def test_fault_scenario(cluster, out_dir, scenario):
    outcome = run_scenario(cluster, scenario, out_dir, quick=True)
    message = f"\n{table([outcome])}\n\n{checker_table([outcome])}\n"
    if outcome.error:
        message += f"\n{outcome.error}"
    if outcome.report is not None:
        message += f"\n{outcome.report.details(limit=5)}"
    if outcome.artifacts:
        message += f"\nhistories, dumps and logs: {outcome.artifacts}"
    assert outcome.ok, message
