"""Live servers and terminals for the client, CLI and admin tests.

``live_server`` serves a fresh app (SQLite file or MySQL table, as ``app_config`` is
parametrised) over real HTTP from a thread; ``run_rainer`` drives the installed ``rainer``
console script as a user would; ``run_in_pty`` runs a command in a real pseudo-terminal.
"""

from __future__ import annotations

import errno
import os
import pty
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import BaseWSGIServer
from werkzeug.serving import WSGIRequestHandler

from rainer_server import create_app

ROOT = Path(__file__).resolve().parent.parent
#: RAINER_SECRET_KEY for tests with RAINER_AUTH on (the console then needs one).
TEST_SECRET_KEY = "test-only-secret-key-0123456789abcdef"
BIN = Path(sys.executable).parent
#: The installed console script (``rainer = rainer_server.cli:main`` in setup.cfg).
RAINER = str(BIN / "rainer") if (BIN / "rainer").exists() else None


class _QuietHandler(WSGIRequestHandler):
    """Records requests on the server instead of logging them."""

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        self.server.requests.append(f"{self.command} {self.path}")


class _PooledWSGIServer(BaseWSGIServer):
    """werkzeug's server with a fixed pool of request threads.

    peewee keeps one connection per thread; with a thread per request (werkzeug's
    ``threaded=True``) every request would pay a new MySQL connection (~30 ms here).
    """

    multithread = True

    def __init__(self, app, workers: int, on_thread_exit) -> None:
        super().__init__("127.0.0.1", 0, app, handler=_QuietHandler)
        #: "METHOD /path?query" of each request answered, in order.
        self.requests: list[str] = []
        self._on_thread_exit = on_thread_exit
        self._queue: queue.Queue = queue.Queue()
        self._workers = [
            threading.Thread(target=self._work, name=f"live-worker-{n}", daemon=True)
            for n in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    def process_request(self, request, client_address) -> None:
        self._queue.put((request, client_address))

    def _work(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                request, client_address = item
                try:
                    self.finish_request(request, client_address)
                except Exception:
                    self.handle_error(request, client_address)
                finally:
                    self.shutdown_request(request)
        finally:
            self._on_thread_exit()

    def server_close(self) -> None:
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(10)
        super().server_close()


class LiveServer:
    """``app`` served over HTTP on a free local port from background threads."""

    def __init__(self, app, workers: int = 6) -> None:
        self.app = app
        rainer = app.extensions["rainer"]

        def close_connection() -> None:
            # Not ``rainer.database_storage``: that would open (and start) one at shutdown.
            database = getattr(rainer._database_storage, "database", None)
            if database is not None and not database.is_closed():
                database.close()

        self.server = _PooledWSGIServer(app, workers, close_connection)
        self.url = f"http://127.0.0.1:{self.server.server_port}/diary"
        self.requests = self.server.requests
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="live-server",
            daemon=True,
        )
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
        self.app.extensions["rainer"].close()


def start_live_server(config: Mapping[str, Any]) -> LiveServer:
    """Serve a new app made from ``config`` (plus ``TESTING``)."""
    return LiveServer(create_app({"TESTING": True, **config}))


@pytest.fixture
def sqlite_live_server(tmp_path):
    """The API over HTTP on a fresh SQLite file (for tests where the backend is irrelevant)."""
    server = start_live_server({"RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/rainer.db"})
    yield server
    server.stop()


@pytest.fixture
def live_server(app_config):
    """The API over HTTP on a fresh database (JSON payloads, the default)."""
    server = start_live_server(app_config)
    yield server
    server.stop()


# ---------------------------------------------------------------------- the command line


def rainer_env(url: str | None, **extra: str) -> dict[str, str]:
    """A clean environment for ``rainer``: no terminal settings leaking in from the outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAINER_")}
    for name in ("PAGER", "EDITOR", "VISUAL", "NO_COLOR", "LESS", "TERM"):
        env.pop(name, None)
    if url is not None:
        env["RAINER_URL"] = url
    env["RAINER_AUTHOR"] = "tester"
    env.update(extra)
    return env


def rainer_command() -> list[str]:
    return [RAINER] if RAINER else [sys.executable, "-m", "rainer_server.cli"]


def run_rainer(
    *args: str,
    url: str | None = None,
    input: bytes | str | None = None,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess:
    """Run ``rainer ARGS`` with stdin ``input`` and piped stdout/stderr (bytes).

    :param env: changes to ``rainer_env(url)``; a value of ``None`` removes the variable.
    """
    if isinstance(input, str):
        input = input.encode("utf-8")
    environment = rainer_env(url)
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return subprocess.run(
        [*rainer_command(), *args],
        input=input if input is not None else b"",
        capture_output=True,
        env=environment,
        timeout=timeout,
        cwd=ROOT,
    )


def run_in_pty(
    argv: list[str],
    env: Mapping[str, str],
    answers: Mapping[bytes, bytes] | None = None,
    timeout: float = 30,
    cwd: str | Path = ROOT,
) -> tuple[int, bytes]:
    """Run ``argv`` with stdin/stdout/stderr on a new pseudo-terminal; return (status, output).

    :param answers: when the output so far ends with a key (a prompt), type its value once.
    """
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once, whatever happens
        try:
            os.chdir(cwd)
            os.execvpe(argv[0], argv, {**env, "TERM": env.get("TERM", "xterm")})
        finally:
            os._exit(127)
    output = b""
    pending = dict(answers or {})
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                raise AssertionError(f"{argv} did not finish in {timeout} s; output: {output!r}")
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError as exc:  # EIO: every process on the terminal has closed it
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            output += chunk
            for prompt, answer in list(pending.items()):
                if output.rstrip(b" ").endswith(prompt.rstrip(b" ")):
                    os.write(fd, answer)
                    del pending[prompt]
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output
