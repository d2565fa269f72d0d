"""Plumbing for bench_keeper.py: gunicorn and observer processes, wrk, MySQL, CPU accounting.

Kept apart from bench_core.py on purpose (another benchmark, edited by someone else): the
shapes are the same (gunicorn ``-c config/gunicorn.conf.py`` with the same flags for the
service and the floors, ``wrk --latency``, a "bg%" figure for the CPU other processes took).
"""

from __future__ import annotations

import ctypes
import http.client
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from urllib.parse import unquote
from urllib.parse import urlparse

from tests.zkserver import free_port

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent.parent


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns: system-wide, so comparable with the observers' timestamps."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _pdeathsig() -> None:  # pragma: no cover - runs in the child
    # If the bench is SIGKILLed, its children get SIGTERM from the kernel instead of lingering.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Children:
    """Every process this bench started, so that cleanup (also on errors) stops exactly them."""

    running: list = []

    @classmethod
    def stop_all(cls) -> None:
        for child in list(reversed(cls.running)):
            try:
                child.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: stopping {child!r}: {exc}", file=sys.stderr)


# ====================================================================== gunicorn


class Gunicorn:
    def __init__(self, name: str, app: str, env: dict[str, str], workers: int,
                 log_dir: Path) -> None:
        self.name = name
        self.app = app
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"gunicorn-{name}-{self.port}.log"
        self.log = open(self.log_path, "w+b")
        command = [
            sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py",
            "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers),
            "--pythonpath", str(BENCH), app,
        ]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_pdeathsig,
        )
        Children.running.append(self)

    def __repr__(self) -> str:
        return f"Gunicorn({self.name}, pid {self.process.pid})"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn {self.name} exited:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"gunicorn {self.name} not listening:\n{self.output()}")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"gunicorn {self.name} died:\n{self.output()}")

    def worker_pids(self) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = proc_stat(int(entry))
                if stat and stat[0] == self.process.pid:
                    pids.append(int(entry))
        return sorted(pids)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self in Children.running:
            Children.running.remove(self)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # graceful: worker_exit leaves ZooKeeper
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of its own process group (a stuck worker)
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        self.log.close()


# ====================================================================== observers


class Observer:
    """A keeper_observer.py process; ``wait_for(key, version)`` returns its arrival time (ns)."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH / "keeper_observer.py"), *args],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=_pdeathsig,
        )
        Children.running.append(self)
        self.lines: queue.SimpleQueue = queue.SimpleQueue()
        self.ready_s: float | None = None
        self.latest: dict[str, tuple[int, int]] = {}
        self._stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def __repr__(self) -> str:
        return f"Observer({self.args[0]}, pid {self.process.pid})"

    def _read(self) -> None:
        for raw in self.process.stdout:
            self.lines.put(raw.decode().split())
        self.lines.put(None)

    def _read_err(self) -> None:
        for raw in self.process.stderr:
            self._stderr.append(raw)
            del self._stderr[:-50]

    def _next(self, deadline: float) -> list[str]:
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError from None
        if line is None:
            raise RuntimeError(f"{self!r} exited:\n" + b"".join(self._stderr).decode(errors="replace"))
        return line

    def wait_ready(self, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        try:
            line = self._next(deadline)
        except TimeoutError:
            raise RuntimeError(f"{self!r} not ready within {timeout} s") from None
        if line[0] != "READY":
            raise RuntimeError(f"{self!r}: unexpected {line}")
        self.ready_s = float(line[1])
        return self.ready_s

    def wait_for(self, key: str, version: int, timeout: float = 10) -> int:
        """The CLOCK_MONOTONIC ns at which the observer first saw ``key`` at ``version``."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.latest.get(key)
            if seen is not None and seen[0] >= version:
                if seen[0] > version:
                    raise RuntimeError(f"{key}: saw version {seen[0]} while waiting for {version}")
                return seen[1]
            try:
                line = self._next(deadline)
            except TimeoutError:
                raise TimeoutError(f"{self!r}: {key} version {version} not seen in {timeout} s") from None
            self.latest[line[0]] = (int(line[1]), int(line[2]))

    def stop(self) -> None:
        if self in Children.running:
            Children.running.remove(self)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin,):
            try:
                stream.close()
            except OSError:
                pass


# ====================================================================== HTTP


def http_request(base: str, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 10):
    """(status, headers, body) of one request on a fresh connection (sync workers close it)."""
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


# ====================================================================== wrk

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    socket_errors: int
    raw: str = field(repr=False, default="")


def parse_wrk(output: str) -> WrkResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    p50 = _to_ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))
    p99 = _to_ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                        output)
    return WrkResult(rps, p50, p99, requests, int(non2xx.group(1)) if non2xx else 0,
                     sum(map(int, sockets.groups())) if sockets else 0, output)


def run_wrk(url: str, script: Path, script_args: list[str], seconds: float, connections: int,
            threads: int) -> WrkResult:
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
               "--latency", "--timeout", "10s", "-s", str(script), url, "--", *script_args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}{done.stdout}")
    return parse_wrk(done.stdout)


# ====================================================================== CPU accounting

_TICKS = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> tuple[int, float] | None:
    """(ppid, CPU seconds) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS


def busy_seconds() -> float:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _TICKS


def tree_cpu(roots: set[int]) -> float:
    """CPU seconds of ``roots`` and their direct children."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat and (int(entry) in roots or stat[0] in roots):
                total += stat[1]
    return total


def children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuWatch:
    """``background_pct``: CPU that processes other than ``roots`` (and wrk) used meanwhile,
    in percent of all CPUs, so that a disturbed figure can be recognised as such."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = set(roots)

    def __enter__(self) -> CpuWatch:
        self.t0 = time.monotonic()
        self.busy0 = busy_seconds()
        self.ours0 = tree_cpu(self.roots)
        self.children0 = children_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.monotonic() - self.t0
        busy = busy_seconds() - self.busy0
        ours = tree_cpu(self.roots) - self.ours0 + children_cpu() - self.children0
        capacity = elapsed * (os.cpu_count() or 1)
        self.background_pct = max(0.0, 100 * (busy - ours) / capacity) if capacity else 0.0


# ====================================================================== MySQL


def _server_params(server_url: str) -> dict:
    url = urlparse(server_url)
    return {"host": url.hostname or "127.0.0.1", "port": url.port or 3306,
            "user": unquote(url.username or "root"), "password": unquote(url.password or "")}


def mysql_execute(server_url: str, *statements: str) -> None:
    import pymysql

    conn = pymysql.connect(autocommit=True, **_server_params(server_url))
    try:
        with conn.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        conn.close()
