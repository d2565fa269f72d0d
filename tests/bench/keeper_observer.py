#!/usr/bin/env python3
"""The "other process" of bench_keeper.py's latency scenarios: it watches and timestamps.

    python3 tests/bench/keeper_observer.py datawatch HOSTS ZNODE
    python3 tests/bench/keeper_observer.py mirror HOSTS BASE_PATH KEY [KEY ...]

``datawatch`` (the floor): a bare ``KazooClient`` with one kazoo ``DataWatch`` on ``ZNODE``,
whose data starts with ``b"<version>\\n"``.

``mirror`` (Rainer): ``CommitKeeper(make_kazoo_client(HOSTS), BASE_PATH).mirror()``, exactly as
a gunicorn worker opens it, with a ``subscribe`` callback that looks up ``KEY``s in each new
view.

Protocol on stdout, one line each: ``READY <seconds to open>`` once watching, then
``<key> <version> <CLOCK_MONOTONIC ns>`` every time a watched key's version goes up (the
timestamp is taken first thing in the callback; CLOCK_MONOTONIC is system-wide, so the bench
process compares it with its own clock). The callbacks only timestamp and queue; a separate
thread writes the lines, so printing never delays kazoo's thread. Exits on SIGTERM or when
stdin closes (the bench died).
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def main(argv: list[str]) -> int:
    mode, hosts = argv[0], argv[1]
    out: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def writer() -> None:
        while True:
            item = out.get()
            if item is None:
                return
            sys.stdout.write("%s %d %d\n" % item)
            sys.stdout.flush()

    def stdin_guard() -> None:
        # The bench holds our stdin open; EOF means it is gone (even after SIGKILL).
        sys.stdin.read()
        stop.set()

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=writer, daemon=True).start()
    threading.Thread(target=stdin_guard, daemon=True).start()

    started = time.perf_counter()
    if mode == "datawatch":
        from kazoo.client import KazooClient

        znode = argv[2]
        client = KazooClient(hosts=hosts)
        client.start(timeout=15)
        last = [0]

        def on_data(data, stat, event=None):
            ts = now_ns()
            if data:
                version = int(data.split(b"\n", 1)[0])
                if version > last[0]:
                    last[0] = version
                    out.put(("floor", version, ts))

        client.DataWatch(znode, on_data)
        closer = [client.stop, client.close]
    elif mode == "mirror":
        from rainer_server.zk.keeper import CommitKeeper
        from rainer_server.zk.keeper import make_kazoo_client

        base_path, keys = argv[2], argv[3:]
        client = make_kazoo_client(hosts)
        client.start(timeout=15)
        mirror = CommitKeeper(client, base_path).mirror(timeout=120)
        last = {key: 0 for key in keys}

        def on_view(view):
            ts = now_ns()
            for key in keys:
                commit = view.get(key)
                if commit is not None and commit.version > last[key]:
                    last[key] = commit.version
                    out.put((key, commit.version, ts))

        mirror.subscribe(on_view)
        closer = [mirror.close, client.stop, client.close]
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    sys.stdout.write(f"READY {time.perf_counter() - started:.3f}\n")
    sys.stdout.flush()
    stop.wait()
    for close in closer:
        try:
            close()
        except Exception:
            pass
    out.put(None)
    sys.stdout.flush()
    os._exit(0)  # kazoo's threads may still be retrying; nothing left to flush


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
