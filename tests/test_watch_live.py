"""Watching under gunicorn's gevent workers, as deployed: wake-ups from another host (with
and without ZooKeeper), a feed followed while processes race, reconnecting mid-burst,
watchers beside ordinary requests, shutdown, and the ``rainer watch`` command."""

from __future__ import annotations

import json
import multiprocessing
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from rainer_server.client import RainerClient
from rainer_server.errors import CommitOrderingError
from tests.live import rainer_command
from tests.live import rainer_env
from tests.tcpproxy import TcpProxy
from tests.test_gunicorn import Gunicorn
from tests.test_watch import call
from tests.test_watch import later
from tests.test_watch import post
from tests.zk_support import wait_until

pytestmark = pytest.mark.gunicorn


def _start(env: dict[str, str], tmp_path: Path, workers: int = 2) -> Gunicorn:
    server = Gunicorn({**env, "RAINER_TEST_LOG_DIR": str(tmp_path)}, workers=workers)
    try:
        server.wait_ready()
    except Exception:
        server.stop()
        raise
    return server


@pytest.fixture
def hosts(request, app_config, tmp_path):
    """Two gunicorns (two "hosts") on one journal; with ZooKeeper when parametrised so."""
    env = dict(app_config)
    if getattr(request, "param", None) == "zookeeper":
        env["RAINER_ZK_HOSTS"] = request.getfixturevalue("zk_chroot")
    started = []
    try:
        for _ in range(2):
            started.append(_start(env, tmp_path))
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.mark.parametrize("hosts", ["database", pytest.param("zookeeper", marks=pytest.mark.zookeeper)],
                         indirect=True)
def test_a_commit_on_another_host_wakes_a_blocking_read(hosts):
    waiting, writing = hosts
    index = post(writing.url, "k", 1)
    # Both hosts serve the key (from their mirror, when they have one) before timing.
    wait_until(lambda: call(f"{waiting.url}/k")[0] == 200, what="k on the waiting host")
    for version in range(2, 6):
        result = {}

        def wait() -> None:
            result["answer"] = call(f"{waiting.url}/k?index={index}&wait=20s")
            result["at"] = time.monotonic()

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.3)  # the request is waiting by now
        sent = time.monotonic()
        post(writing.url, "k", version, b'{"v": %d}' % version)
        thread.join(30)
        status, headers, body = result["answer"]
        assert status == 200 and body == b'{"v": %d}' % version
        assert int(headers["X-Rainer-Index"]) > index
        # Woken by the commit, not by the end of its 20 s wait. How soon (one poll of the
        # index per process every 0.25 s without ZooKeeper, the mirror's watch with it) is
        # bench_watch.py's figure: a timed bound here would fail on a loaded machine.
        assert result["at"] - sent < 10.0
        index = int(headers["X-Rainer-Index"])
    # And a blocking read that sees nothing answers unchanged at the end of its wait. (Each
    # wait starts from the last answer's index: a plain read may come from a worker whose
    # mirror is a moment behind, with that moment's index, which is consistent but stale.)
    status, headers, body = call(f"{waiting.url}/k?index={index}&wait=1s")
    assert status == 200 and headers["X-Rainer-Index"] == str(index) and body == b'{"v": 5}'


@pytest.mark.zookeeper
def test_the_mirror_fast_path_sends_the_index_and_answers_304(app_config, zk_chroot, tmp_path):
    # One worker: the test is about what the fast path answers, not about which worker does
    # (asking "every worker" through requests depends on how they happen to spread).
    server = _start({**app_config, "RAINER_ZK_HOSTS": zk_chroot}, tmp_path, workers=1)
    try:
        post(server.url, "k", 1)
        post(server.url, "k", 2)
        # Cached and at v2: right after the POST of v2 the mirror may still serve v1.
        wait_until(
            lambda: (h := call(f"{server.url}/k")[1]).get("X-Rainer-Cached") == "Yes"
            and h.get("ETag") == '"v2"'
            and h.get("X-Rainer-Index") == "2",
            what="the worker's mirror to serve v2",
        )
        for _ in range(4):
            status, headers, _ = call(f"{server.url}/k")
            assert headers["X-Rainer-Cached"] == "Yes" and headers["X-Rainer-Index"] == "2"
            assert headers["ETag"] == '"v2"'
            status, headers, body = call(f"{server.url}/k", headers={"If-None-Match": '"v2"'})
            assert status == 304 and body == b"" and headers["X-Rainer-Index"] == "2"
        status, headers, body = call(server.url)
        assert headers["X-Rainer-Index"] == "2"
    finally:
        server.stop()


# ---------------------------------------------------------------------- under load


def test_waiting_requests_do_not_hold_the_workers(app_config, tmp_path):
    server = _start(app_config, tmp_path)
    try:
        post(server.url, "k", 1)
        answers = []

        def wait() -> None:
            answers.append(call(f"{server.url}/k?index=1&wait=20s", timeout=60)[0])

        threads = [threading.Thread(target=wait) for _ in range(200)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        assert answers == []  # all still waiting, on two workers
        started = time.monotonic()
        assert call(f"{server.url}/k/meta")[0] == 200
        assert call(f"{server.url}/other")[0] == 404
        assert call(server.url)[0] == 200
        assert time.monotonic() - started < 2
        post(server.url, "k", 2)
        for thread in threads:
            thread.join(30)
        assert answers == [200] * 200
    finally:
        server.stop()


def test_shutdown_answers_waiting_requests(app_config, tmp_path):
    server = _start(app_config, tmp_path)
    try:
        post(server.url, "k", 1)
        answers = []
        threads = [
            threading.Thread(target=lambda: answers.append(call(f"{server.url}/k?index=1&wait=60s")))
            for _ in range(20)
        ]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(20)
        for thread in threads:
            thread.join(10)
        assert time.monotonic() - started < 10  # not the 30 s graceful timeout, nor the 60 s wait
        assert [a[0] for a in answers] == [200] * 20
        assert all(a[1]["X-Rainer-Index"] == "1" and a[2] == b"{}" for a in answers)
        assert server.process.returncode == 0
    finally:
        server.stop()


# ---------------------------------------------------------------------- the feed, racing


def _http_writer(url: str, name: str, count: int, acks) -> None:
    client = RainerClient(url)
    for n in range(count):
        key = f"{name}.{n}" if n % 2 else f"shared.{n % 3}"
        while True:
            try:
                version = int(client.get_metadata(key)["version"]) + 1
            except Exception:
                version = 1
            try:
                client.post_commit({"key": key, "version": version, "author": name}, b"{}")
            except CommitOrderingError:
                continue
            acks.put((key, version))
            break
    acks.put(None)


def test_a_feed_follower_over_http_sees_every_acknowledged_commit_once(app_config, tmp_path):
    server = _start(app_config, tmp_path)
    try:
        context = multiprocessing.get_context("spawn")
        acks = context.Queue()
        writers = [
            context.Process(target=_http_writer, args=(server.url, f"p{n}", 40, acks))
            for n in range(3)
        ]
        for writer in writers:
            writer.start()
        client = RainerClient(server.url)
        seen, position, done, acknowledged = [], 0, 0, set()
        deadline = time.monotonic() + 120
        while done < len(writers) or len(seen) < len(acknowledged):
            assert time.monotonic() < deadline
            after, commits = client.changes(since=position, limit=5, wait=0.2)
            for commit in commits:
                assert commit.index > position
                position = commit.index
                seen.append(commit)
            position = max(position, after)
            while not acks.empty():
                ack = acks.get()
                done += ack is None
                if ack is not None:
                    acknowledged.add(ack)
        for writer in writers:
            writer.join(30)
        pairs = [(c.key, c.version) for c in seen]
        assert len(pairs) == len(set(pairs)) == 120 and set(pairs) == acknowledged
        indexes = [c.index for c in seen]
        assert indexes == sorted(indexes) and len(set(indexes)) == 120
        versions: dict[str, int] = {}
        for c in seen:
            assert c.version == versions.get(c.key, 0) + 1
            versions[c.key] = c.version
    finally:
        server.stop()


def test_a_watcher_that_loses_its_connection_mid_burst_loses_nothing(app_config, tmp_path):
    server = _start(app_config, tmp_path)
    proxy = TcpProxy(("127.0.0.1", server.port))
    try:
        client = RainerClient(f"http://{proxy.address}/diary", timeout=5)
        writer = RainerClient(server.url)
        writer.post_commit({"key": "b.0", "version": 1, "author": "w"}, b"{}")
        start = writer.index(prefix="b.")
        watch = client.watch(prefix="b.", index=start, wait=2, sleep=lambda s: time.sleep(min(s, 0.2)))
        burst_done = threading.Event()

        def burst() -> None:
            versions = {"b.0": 1}
            for n in range(1, 101):
                key = f"b.{n % 7}"
                versions[key] = versions.get(key, 0) + 1
                writer.post_commit({"key": key, "version": versions[key], "author": "w"},
                                   b'{"n": %d}' % n)
            burst_done.set()

        threading.Thread(target=burst, daemon=True).start()
        seen = []
        deadline = time.monotonic() + 60
        for commit in watch:
            assert time.monotonic() < deadline, f"only {len(seen)} seen: {seen}"
            seen.append(json.loads(commit.payload)["n"])
            if len(seen) == 30:
                proxy.cut()  # the connection drops, and the server is unreachable a while
                later(0.5, proxy.restore)
            if len(seen) == 100:
                break
        assert seen == list(range(1, 101))
        assert burst_done.wait(10)
    finally:
        proxy.close()
        server.stop()


# ---------------------------------------------------------------------- rainer watch


def test_rainer_watch_prints_runs_and_ends_on_ctrl_c(app_config, tmp_path):
    server = _start(app_config, tmp_path)
    try:
        post(server.url, "svc", 1)
        out = tmp_path / "out.txt"
        ran = tmp_path / "ran.txt"
        env = rainer_env(server.url)
        plain_out = tmp_path / "plain.txt"
        plain = subprocess.Popen(
            [*rainer_command(), "watch", "svc", "--index", "1"], env=env,
            stdout=plain_out.open("wb"), stderr=subprocess.PIPE,
        )
        as_json = subprocess.Popen(
            [*rainer_command(), "watch", "--prefix", "sv", "--index", "1", "--json", "--exec",
             f'echo "$RAINER_KEY $RAINER_VERSION $RAINER_INDEX $(cat "$RAINER_PAYLOAD_PATH")" >> {ran}'],
            env=env, stdout=out.open("wb"), stderr=subprocess.PIPE,
        )
        try:
            time.sleep(0.5)  # (whenever they start watching, they start after index 1)
            post(server.url, "svc", 2, b'{"v": 2}')
            post(server.url, "svc.sub", 1, b'{"sub": 1}')
            post(server.url, "svc", 3, empty=True)
            wait_until(lambda: ran.exists() and len(ran.read_text().splitlines()) == 3,
                       what="three commands run")
            wait_until(lambda: len(plain_out.read_text().splitlines()) == 2, what="two lines")
            assert ran.read_text().splitlines() == ['svc 2 2 {"v": 2}', 'svc.sub 1 3 {"sub": 1}', "svc 3 4 "]
            lines = [json.loads(line) for line in out.read_text().splitlines()]
            assert [(d["key"], d["version"], d["index"], d["empty"]) for d in lines] == [
                ("svc", 2, 2, False), ("svc.sub", 1, 3, False), ("svc", 3, 4, True),
            ]
        finally:
            for process in (plain, as_json):
                process.send_signal(signal.SIGINT)
        _, stderr = plain.communicate(timeout=10)
        assert plain.returncode == 0 and b"Traceback" not in stderr
        assert plain_out.read_text().splitlines() == ["2\tsvc\t2\ttester\tupdated", "4\tsvc\t3\ttester\tdeleted"]
        as_json.wait(10)
        assert as_json.returncode == 0
    finally:
        server.stop()
