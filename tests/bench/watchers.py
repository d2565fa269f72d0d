#!/usr/bin/env python3
"""Many long-polling watchers in one process (asyncio), for bench_watch.py.

    watchers.py HOST PORT PREFIX COUNT KEYS PROBES

COUNT watchers block on ``GET PREFIX/w-<n % KEYS>?index=N&wait=60s`` over keep-alive
connections, each asking again from the index it was given; PROBES more watch the key
``probe``. Prints ``READY`` once every watcher has its first index and waits, then one line
``P <version> <CLOCK_MONOTONIC ns>`` per probe answer, and on stdin's end (or SIGTERM)
``DONE <answers> <errors>``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time


class Counts:
    answers = 0
    errors = 0


async def _request(reader, writer, host: str, path: str) -> tuple[int, dict[str, str], bytes]:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def watcher(host: str, port: int, prefix: str, key: str, probe: bool, ready) -> None:
    first = True
    index = None
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            Counts.errors += 1
            await asyncio.sleep(0.5)
            continue
        try:
            while True:
                path = f"{prefix}/{key}" if index is None else f"{prefix}/{key}?index={index}&wait=60s"
                status, headers, _ = await _request(reader, writer, host, path)
                arrived = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                if status not in (200, 404):
                    Counts.errors += 1
                    await asyncio.sleep(0.5)
                    continue
                new = int(headers.get("x-rainer-index", "0"))
                if index is not None:
                    Counts.answers += 1
                    if probe and new > index:
                        print(f"P {headers.get('x-rainer-version')} {arrived}", flush=True)
                index = new
                if first:
                    first = False
                    ready()
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            Counts.errors += 1
        finally:
            writer.close()


async def main() -> None:
    host, port, prefix, count, keys, probes = sys.argv[1:7]
    port_number, total = int(port), int(count) + int(probes)
    remaining = [total]
    all_ready = asyncio.Event()

    def ready() -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            all_ready.set()

    tasks = [
        asyncio.create_task(watcher(host, port_number, prefix, f"w-{n % int(keys):03d}", False, ready))
        for n in range(int(count))
    ]
    tasks += [
        asyncio.create_task(watcher(host, port_number, prefix, "probe", True, ready))
        for _ in range(int(probes))
    ]
    await all_ready.wait()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.readline() else None)
    await stop.wait()
    print(f"DONE {Counts.answers} {Counts.errors}", flush=True)
    for task in tasks:
        task.cancel()


if __name__ == "__main__":
    asyncio.run(main())
