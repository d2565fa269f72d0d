"""Clients that record everything: every request of a fault run becomes one history entry.

An entry is a dict (one JSON line when saved)::

    {"c": client, "op": "write"|"read"|"resync"|"race", "t": target, "k": key,
     "v": version (posted, or answered in X-Rainer-Version), "s": HTTP status (0: no answer),
     "h": sha256 of the payload (posted, or answered), "e": tombstone?, "cached": mirror answer?,
     "t0": start, "t1": end (wall clock: comparable with ZooKeeper's znode mtime), "err": ...}

Writers own their keys and post version after version (some tombstones among them); after a
409 or an answer they cannot trust (5xx, no answer) they ask the database for the head
(``/history``, never the mirror) and go on from there. Racers fight over one shared key from
several targets. Readers read random keys from one target. ``checker.py`` judges the lot.
"""

from __future__ import annotations

import hashlib
import http.client as httpclient
import json
import random
import threading
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

AUTHOR = "fault-suite"


def digest(payload: bytes | None) -> str:
    return hashlib.sha256(payload or b"").hexdigest()[:20]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 10.0) -> tuple[int, dict[str, str], bytes, str]:
    """One request on a fresh connection: ``(status, headers, body, error)``; status 0 when
    no HTTP answer came (refused, reset, timed out)."""
    parts = urllib.parse.urlsplit(url)
    conn = httpclient.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data, ""
    except (OSError, httpclient.HTTPException) as exc:
        return 0, {}, b"", f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


class History:
    """Every entry of a run, in arrival order; thread-safe."""

    def __init__(self) -> None:
        self._entries: list[dict] = []
        self._lock = threading.Lock()
        self.acks = 0

    def add(self, entry: dict) -> None:
        with self._lock:
            self._entries.append(entry)
            if entry["op"] in ("write", "race") and entry["s"] == 200:
                self.acks += 1

    @property
    def entries(self) -> list[dict]:
        with self._lock:
            return list(self._entries)

    def since(self, t: float) -> list[dict]:
        return [e for e in self.entries if e["t0"] >= t]

    def save(self, path: Path) -> None:
        with open(path, "w") as out:
            for entry in self.entries:
                out.write(json.dumps(entry, sort_keys=True) + "\n")

    def wait_acks(self, count: int, timeout: float, stop: threading.Event | None = None) -> bool:
        """Wait until ``count`` more writes have been acknowledged than now."""
        goal = self.acks + count
        deadline = time.monotonic() + timeout
        while self.acks < goal and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.acks >= goal


class Target:
    """Where a client sends its requests: nginx, or one app host directly."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url.rstrip("/")

    def __repr__(self) -> str:
        return f"<Target {self.name} {self.url}>"


def post(target: Target, key: str, version: int, payload: bytes | None, client: str,
         history: History, op: str = "write", timeout: float = 15.0) -> dict:
    """POST one commit (``payload=None``: a tombstone) and record it."""
    headers = {"X-Rainer-Author": AUTHOR, "X-Rainer-Comment": client,
               "Content-Type": "application/octet-stream"}
    if payload is None:
        headers["X-Rainer-Empty"] = "yes"
    url = f"{target.url}/diary/{urllib.parse.quote(key, safe='')}/{version}"
    t0 = time.time()
    status, _, body, error = http("POST", url, payload or b"", headers, timeout)
    entry = {"c": client, "op": op, "t": target.name, "k": key, "v": version, "s": status,
             "h": digest(payload), "e": payload is None, "t0": t0, "t1": time.time()}
    if error or status >= 500:
        entry["err"] = error or body[:200].decode("utf-8", "replace")
    history.add(entry)
    return entry


def read_head(target: Target, key: str, client: str, history: History,
              timeout: float = 10.0) -> dict:
    """GET the key's payload (mirror-backed when the host can) and record what it said."""
    url = f"{target.url}/diary/{urllib.parse.quote(key, safe='')}"
    t0 = time.time()
    status, headers, body, error = http("GET", url, None, None, timeout)
    entry = {"c": client, "op": "read", "t": target.name, "k": key, "s": status,
             "t0": t0, "t1": time.time()}
    if status == 200:
        entry["v"] = int(headers.get("x-rainer-version", "0"))
        entry["e"] = headers.get("x-rainer-empty", "No") == "Yes"
        entry["h"] = digest(None if entry["e"] else body)
        entry["cached"] = headers.get("x-rainer-cached") == "Yes"
        # Anything that tells a client the answer may be old (none exists today).
        mark = [f"{k}: {v}" for k, v in headers.items() if "stale" in k or k in ("warning", "age")]
        if mark:
            entry["mark"] = mark
    elif status == 404:
        entry["v"] = 0
    if error or status >= 500:
        entry["err"] = error or body[:200].decode("utf-8", "replace")
    history.add(entry)
    return entry


def database_head(target: Target, key: str, client: str, history: History,
                  stop: threading.Event, limit: float = 60.0) -> int | None:
    """The key's newest version according to the database (``/history`` never comes from
    the mirror), asking again until it answers; ``None`` if stopped or out of time."""
    url = f"{target.url}/diary/{urllib.parse.quote(key, safe='')}/history?limit=1"
    deadline = time.monotonic() + limit
    pause = 0.05
    while time.monotonic() < deadline:
        t0 = time.time()
        status, _, body, error = http("GET", url, timeout=10)
        entry = {"c": client, "op": "resync", "t": target.name, "k": key, "s": status,
                 "t0": t0, "t1": time.time()}
        version = None
        if status == 200:
            metas = json.loads(body)
            version = metas[0]["version"] if metas else 0
        elif status == 404:
            version = 0
        entry["v"] = version
        if error or status >= 500:
            entry["err"] = error or body[:200].decode("utf-8", "replace")
        history.add(entry)
        if version is not None:
            return version
        if stop.wait(pause):
            return None
        pause = min(pause * 2, 0.5)
    return None


class _Client(threading.Thread):
    def __init__(self, name: str, history: History, stop: threading.Event) -> None:
        super().__init__(name=f"fault-client-{name}", daemon=True)
        self.client = name
        self.history = history
        self.stop_event = stop


class Writer(_Client):
    """Posts the next version of its own keys in turn; every ``delete_every``-th version is a
    tombstone (the key comes back with the next one)."""

    def __init__(self, name: str, keys: list[str], target: Target, history: History,
                 stop: threading.Event, pause: float = 0.0, delete_every: int = 7) -> None:
        super().__init__(name, history, stop)
        self.keys = keys
        self.target = target
        self.pause = pause
        self.delete_every = delete_every
        self.next_version = {key: 1 for key in keys}
        self.paused = threading.Event()  # set: stop posting (a burst ends) without stopping
        self.busy = False  # a commit (with its resync) is under way

    def payload(self, key: str, version: int) -> bytes | None:
        if version % self.delete_every == 0:
            return None
        return json.dumps({"writer": self.client, "key": key, "version": version,
                           "nonce": random.getrandbits(48)}).encode()

    def run(self) -> None:
        while not self.stop_event.is_set():
            for key in self.keys:
                if self.stop_event.is_set():
                    return
                # busy before looking at paused: stop_writers() sets paused, then waits for
                # busy to clear, so no commit can start unseen in between.
                self.busy = True
                while self.paused.is_set():
                    self.busy = False
                    if self.stop_event.wait(0.01):
                        return
                    self.busy = True
                try:
                    self.commit(key)
                finally:
                    self.busy = False
                if self.pause:
                    self.stop_event.wait(self.pause)

    def commit(self, key: str, payload: bytes | None | str = "auto") -> bool:
        version = self.next_version[key]
        body = self.payload(key, version) if payload == "auto" else payload
        entry = post(self.target, key, version, body, self.client, self.history)
        if entry["s"] == 200:
            self.next_version[key] = version + 1
            return True
        # 409: someone else has it; anything else: we cannot know whether it was saved.
        head = database_head(self.target, key, self.client, self.history, self.stop_event)
        if head is not None:
            self.next_version[key] = head + 1
        return False

    def delete(self, key: str, limit: float = 60.0) -> bool:
        """Tombstone ``key`` (after the run: the key must stay deleted everywhere)."""
        deadline = time.monotonic() + limit
        never = threading.Event()
        while time.monotonic() < deadline:
            version = self.next_version[key]
            entry = post(self.target, key, version, None, self.client, self.history)
            if entry["s"] == 200:
                self.next_version[key] = version + 1
                return True
            head = database_head(self.target, key, self.client, self.history, never)
            if head is not None:
                self.next_version[key] = head + 1
            time.sleep(0.05)
        return False


class Racer(_Client):
    """Reads the shared key's head from the database and posts the next version, over and over,
    against other racers: exactly one of them may win each version."""

    def __init__(self, name: str, key: str, target: Target, history: History,
                 stop: threading.Event, pause: float = 0.0) -> None:
        super().__init__(name, history, stop)
        self.key = key
        self.target = target
        self.pause = pause

    def run(self) -> None:
        while not self.stop_event.is_set():
            head = database_head(self.target, self.key, self.client, self.history,
                                 self.stop_event)
            if head is None:
                return
            payload = json.dumps({"racer": self.client, "version": head + 1,
                                  "nonce": random.getrandbits(48)}).encode()
            post(self.target, self.key, head + 1, payload, self.client, self.history, op="race")
            if self.pause:
                self.stop_event.wait(self.pause)


class Reader(_Client):
    """Reads random keys from one target as fast as ``pause`` lets it."""

    def __init__(self, name: str, keys: list[str], target: Target, history: History,
                 stop: threading.Event, pause: float = 0.0) -> None:
        super().__init__(name, history, stop)
        self.keys = keys
        self.target = target
        self.pause = pause

    def run(self) -> None:
        rng = random.Random(self.client)
        while not self.stop_event.is_set():
            read_head(self.target, rng.choice(self.keys), self.client, self.history)
            if self.pause:
                self.stop_event.wait(self.pause)


class Load:
    """Writers (and optional racers) through one target, readers on every target.

    ``stop()`` ends every client; ``finish()`` then deletes each writer's first key, so every
    run ends with keys that must stay deleted.
    """

    def __init__(self, prefix: str, write_target: Target, read_targets: Iterable[Target],
                 history: History | None = None, writers: int = 4, keys_per_writer: int = 3,
                 racers: Iterable[Target] = (), write_pause: float = 0.01,
                 read_pause: float = 0.01, delete_every: int = 7) -> None:
        self.prefix = prefix
        self.history = history or History()
        self.stop_event = threading.Event()
        self.writers = [
            Writer(f"w{n}", [f"{prefix}w{n}.k{i}" for i in range(keys_per_writer)],
                   write_target, self.history, self.stop_event, write_pause, delete_every)
            for n in range(writers)
        ]
        self.race_key = f"{prefix}race"
        self.racers = [Racer(f"r{n}-{t.name}", self.race_key, t, self.history, self.stop_event)
                       for n, t in enumerate(racers)]
        keys = self.keys
        self.readers = [Reader(f"read-{t.name}", keys, t, self.history, self.stop_event,
                               read_pause) for t in read_targets]
        self.started: float | None = None
        self.stopped: float | None = None

    @property
    def keys(self) -> list[str]:
        keys = [key for w in self.writers for key in w.keys]
        return keys + ([self.race_key] if self.racers else [])

    @property
    def clients(self) -> list[_Client]:
        return [*self.writers, *self.racers, *self.readers]

    def start(self) -> Load:
        self.started = time.time()
        for client in self.clients:
            client.start()
        return self

    def stop_writers(self, timeout: float = 60.0) -> None:
        """Pause every writer and wait until none has a commit under way."""
        for writer in self.writers:
            writer.paused.set()
        deadline = time.monotonic() + timeout
        while any(w.busy for w in self.writers) and time.monotonic() < deadline:
            time.sleep(0.01)

    def resume_writers(self) -> None:
        for writer in self.writers:
            writer.paused.clear()

    def stop(self) -> None:
        self.stop_event.set()
        for client in self.clients:
            client.join(60)
        self.stopped = time.time()

    def finish(self) -> None:
        for writer in self.writers:
            writer.delete(writer.keys[0])

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc) -> None:
        if not self.stop_event.is_set():
            self.stop()
