"""/metrics: Prometheus text over live gunicorn workers, added up across processes, and the
log lines a save writes (key, version, author; never the payload)."""

from __future__ import annotations

import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_gunicorn import Gunicorn
from tests.test_gunicorn import request
from tests.test_server_zookeeper import wait_for

AUTHOR = {"X-Rainer-Author": "alice"}
SECRET = b'{"password": "hunter2-do-not-log"}'


def scrape(base: str) -> dict[str, list]:
    """``GET /metrics`` parsed: sample name -> [(labels, value)]."""
    status, headers, body = request(base + "/metrics")
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples, name, **labels) -> float:
    return sum(
        value
        for found, value in samples.get(name, [])
        if all(found.get(k) == v for k, v in labels.items())
    )


def server_root(server: Gunicorn) -> str:
    return server.url.rsplit("/diary", 1)[0]


# ---------------------------------------------------------------------- in-process


def test_metrics_in_process_use_the_default_registry(client):
    before = client.get("/metrics")
    assert before.status_code == 200 and before.mimetype == "text/plain"
    text = before.get_data(as_text=True)
    for name in ("rainer_http_requests_total", "rainer_commits_saved_total", "rainer_payloads_rejected_total"):
        assert f"# TYPE {name} counter" in text
    # Counts are per process and shared by every app in it: compare before and after.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    saved = families["rainer_commits_saved"].samples[0].value
    assert client.post("/diary/m/1", data=b"{}", headers=AUTHOR).status_code == 200
    assert client.post("/diary/m/1", data=b"{}", headers=AUTHOR).status_code == 409
    after = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))}
    assert after["rainer_commits_saved"].samples[0].value == saved + 1
    routes = {s.labels["route"] for s in after["rainer_http_requests"].samples}
    assert "/diary/<key>/<version>" in routes and not any("/m/" in r for r in routes)


def test_openmetrics_on_request(client):
    r = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status_code == 200 and r.mimetype == "application/openmetrics-text"
    assert r.get_data(as_text=True).rstrip().endswith("# EOF")


# ---------------------------------------------------------------------- logging


def test_a_save_logs_key_version_and_author_but_never_the_payload(client, caplog):
    caplog.set_level(logging.DEBUG, logger="rainer_server")
    r = client.post(
        "/diary/db.password/1", data=SECRET, headers={**AUTHOR, "X-Rainer-Comment": "rotate"}
    )
    assert r.status_code == 200
    saved = [rec for rec in caplog.records if rec.getMessage().startswith("Saved commit")]
    assert [rec.getMessage() for rec in saved] == [
        f"Saved commit db.password version 1 by alice ({len(SECRET)} bytes)"
    ]
    assert saved[0].name == "rainer_server.web.commits" and saved[0].levelno == logging.INFO
    assert client.post("/diary/db.password/1", data=SECRET, headers=AUTHOR).status_code == 409
    assert client.post("/diary/db.password/2", data=b"{" + SECRET, headers=AUTHOR).status_code == 400
    assert b"hunter2" not in caplog.text.encode()


# ---------------------------------------------------------------------- live gunicorn


@pytest.mark.gunicorn
def test_counts_add_up_across_three_gunicorn_workers(tmp_path):
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    (multiproc / "counter_1.db").write_bytes(b"left over from an earlier run")
    server = Gunicorn(
        {
            "RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/m.db",
            "RAINER_TEST_LOG_DIR": str(tmp_path),
            "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        },
        workers=3,
    )
    try:
        server.wait_ready()
        root = server_root(server)
        assert not (multiproc / "counter_1.db").exists()  # emptied at start

        # wait_ready sees one worker answer; the others may still be booting, so keep asking
        # until a second worker has counted something (CI once saw every request go to one).
        def answering_workers() -> set[str]:
            return {name.rsplit("_", 1)[1] for name in os.listdir(multiproc) if name.startswith("counter_")}

        healthz_requests = 0
        with ThreadPoolExecutor(10) as pool:
            while len(answering_workers()) < 2 and healthz_requests < 3000:
                statuses = list(pool.map(lambda _: request(root + "/healthz")[0], range(30)))
                assert statuses == [200] * 30
                healthz_requests += 30
        for version in (1, 2, 3):
            assert request(f"{server.url}/k/{version}", SECRET, AUTHOR, "POST")[0] == 200
        assert request(f"{server.url}/k/2", b"{}", AUTHOR, "POST")[0] == 409
        assert request(f"{server.url}/k/4", b"{nope", AUTHOR, "POST")[0] == 400
        assert request(f"{server.url}/k/4", b"[" + b"1," * 300000 + b"1]", AUTHOR, "POST")[0] == 413
        assert request(f"{server.url}/k/4", b"{}", {}, "POST")[0] == 400  # no author: not a payload

        # Several workers answered, and whichever answers the scrape adds them all up.
        assert len(answering_workers()) >= 2, answering_workers()
        for _ in range(5):
            samples = scrape(root)
            assert total(samples, "rainer_http_requests_total", route="/healthz") == healthz_requests
            assert total(samples, "rainer_http_request_duration_seconds_count", route="/healthz") == healthz_requests
            assert total(samples, "rainer_http_request_duration_seconds_bucket", route="/healthz", le="+Inf") == healthz_requests
            assert total(samples, "rainer_http_requests_total", route="/diary/<key>/<version>", status="200") == 3
            assert total(samples, "rainer_commits_saved_total") == 3
            assert total(samples, "rainer_commit_conflicts_total") == 1
            assert total(samples, "rainer_payloads_rejected_total", reason="malformed") == 1
            assert total(samples, "rainer_payloads_rejected_total", reason="too_large") == 1
            assert total(samples, "rainer_payloads_rejected_total", reason="schema") == 0
        # No ZooKeeper configured: no ZooKeeper gauges claiming "disconnected".
        assert "rainer_zookeeper_connected" not in samples

        output = server.output()
        assert "[INFO] Saved commit k version 2 by alice" in output  # in gunicorn's error log
        assert "hunter2" not in output
    finally:
        server.stop()


@pytest.mark.gunicorn
@pytest.mark.zookeeper
def test_zookeeper_gauges_per_worker_and_a_dead_worker_drops_out(zk_chroot, zk, tmp_path):
    server = Gunicorn(
        {
            "RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/z.db",
            "RAINER_ZK_HOSTS": zk_chroot,
            "RAINER_ZK_SESSION_TIMEOUT": "4",
            "RAINER_PUBLISH_PERIOD": "0.5",
            "RAINER_PUBLISH_FUZZ": "0.1",
            "RAINER_TEST_LOG_DIR": str(tmp_path),
        },
        workers=3,
    )
    try:
        server.wait_ready()
        root = server_root(server)
        for key in ("a", "b", "c"):
            assert request(f"{server.url}/{key}/1", b"{}", AUTHOR, "POST")[0] == 200

        def settled():
            samples = scrape(root)
            leaders = dict((labels["pid"], value) for labels, value in samples.get("rainer_publisher_leader", []))
            mirrors = [v for _, v in samples.get("rainer_mirror_commits", [])]
            connected = [v for _, v in samples.get("rainer_zookeeper_connected", [])]
            # Each gauge below is set by a worker's own thread, one after the other (a pass is
            # counted before its duration, a view's commits before "initialized"), and the
            # passes counted may all predate the POSTs: all are waited for, none assumed.
            ok = (
                len(leaders) == 3
                and sum(leaders.values()) == 1
                and connected == [1.0] * 3
                and mirrors == [3.0] * 3
                and [v for _, v in samples.get("rainer_mirror_initialized", [])] == [1.0] * 3
                and [v > 0 for _, v in samples.get("rainer_mirror_last_update_timestamp_seconds", [])]
                == [True] * 3
                and total(samples, "rainer_publisher_passes_total", result="complete") >= 2
                and total(samples, "rainer_publisher_pass_duration_seconds_count") >= 2
                and total(samples, "rainer_publisher_last_pass_timestamp_seconds") > 0
                and total(samples, "rainer_publisher_keys_total", result="unchanged") >= 3
            )
            return ok and (samples, leaders)

        _, leaders = wait_for(settled, 20, "three workers connected, mirrored, one leading")

        # SIGKILL a non-leading worker: child_exit drops its live gauges, gunicorn starts another.
        victim = next(pid for pid, value in leaders.items() if value == 0)
        os.kill(int(victim), signal.SIGKILL)

        def replaced():
            pids = {labels["pid"] for labels, _ in scrape(root).get("rainer_zookeeper_connected", [])}
            return victim not in pids and len(pids) == 3

        wait_for(replaced, 20, "the killed worker's gauges gone, a new worker's there")
        # Counters survive a worker's death: nothing goes backwards.
        assert total(scrape(root), "rainer_commits_saved_total") == 3
    finally:
        server.stop()


def test_multiprocess_dir_is_made_once_per_master_and_removed_on_exit(tmp_path, monkeypatch):
    from rainer_server import gunicorn_hooks

    environ: dict[str, str] = {}
    path = gunicorn_hooks.prepare_metrics_dir(environ)
    assert Path(path).is_dir() and environ["PROMETHEUS_MULTIPROC_DIR"] == path
    (Path(path) / "counter_7.db").write_bytes(b"x")
    # A reload (SIGHUP) re-reads the config in the same master: the files stay.
    assert gunicorn_hooks.prepare_metrics_dir(environ) == path
    assert (Path(path) / "counter_7.db").exists()
    # A re-executed master (SIGUSR2) inherits the environment but gets a directory of its own.
    inherited = dict(environ, RAINER_PROMETHEUS_MASTER=f"1:{path}")
    other = gunicorn_hooks.prepare_metrics_dir(inherited)
    assert other != path and (Path(path) / "counter_7.db").exists()
    gunicorn_hooks.remove_metrics_dir(inherited)
    gunicorn_hooks.remove_metrics_dir(environ)
    assert not Path(path).exists() and not Path(other).exists()

    given = tmp_path / "given"
    given.mkdir()
    (given / "gauge_liveall_3.db").write_bytes(b"x")
    (given / "keep.txt").write_text("not ours")
    environ = {"PROMETHEUS_MULTIPROC_DIR": str(given)}
    assert gunicorn_hooks.prepare_metrics_dir(environ) == str(given)
    assert sorted(os.listdir(given)) == ["keep.txt"]
    gunicorn_hooks.remove_metrics_dir(environ)
    assert given.is_dir()  # given, not made: never removed


def test_request_metrics_never_fail_a_request(client, monkeypatch):
    from rainer_server.web import middleware
    from rainer_server import metrics

    def broken(*args, **kwargs):
        raise FileNotFoundError("multiprocess directory removed")

    monkeypatch.setattr(metrics.RainerMetrics, "observe_request", broken)
    monkeypatch.setattr(middleware, "_metrics_failed", False)
    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz").status_code == 200

