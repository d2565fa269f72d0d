"""What gunicorn's server hooks do for Rainer; ``config/gunicorn.conf.py`` only calls these.

Each worker gets its own ZooKeeper client, mirror and election contender, started once the
worker has initialised (threads and sockets do not survive ``fork``; a gevent worker's event
loop is only ready then). Every worker contends; one publishes.

The master prepares the Prometheus multiprocess directory before the app is loaded and drops
a dead worker's live gauges; each worker routes the ``rainer_server`` log to gunicorn's error
log, so the service writes one log in one format.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

import gevent

from rainer_server import metrics
from rainer_server.storage.db import cooperative
from rainer_server.web.context import RainerContext

# "<master pid>:<directory it created, or nothing>": which master prepared the directory.
_METRICS_MARK = "RAINER_PROMETHEUS_MASTER"
#: Loggers routed to gunicorn's error log, with the least severe level each one passes on.
ROUTED_LOGGERS = {"rainer_server": logging.DEBUG, "kazoo": logging.WARNING}


def _rainer(process: Any) -> RainerContext | None:
    """The preloaded app's Rainer, from the arbiter or a worker."""
    app = process.app.wsgi()  # cached by gunicorn: the preloaded app, not a second copy
    extensions = getattr(app, "extensions", {})
    return extensions.get("rainer")


# ---------------------------------------------------------------------- metrics directory


def prepare_metrics_dir(environ: MutableMapping[str, str] = os.environ) -> str:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at an empty directory, once per master.

    Call it from the config file, i.e. before the (preloaded) app imports prometheus_client,
    which reads the variable once. A directory given in the environment is emptied; else a
    fresh one is made under the temporary directory and removed again by ``on_exit``. A
    reload (SIGHUP) of the same master keeps it; a re-executed master (SIGUSR2) gets its own.
    """
    owner, _, created = environ.get(_METRICS_MARK, "").partition(":")
    pid = str(os.getpid())
    path = environ.get(metrics.MULTIPROC_ENV) or environ.get(metrics.MULTIPROC_ENV.lower())
    if owner == pid and path:
        return path
    if path and path == created:
        path = None  # our parent master's own directory: its workers still write there
    given = bool(path)
    path = metrics.prepare_multiprocess_dir(path)
    environ[metrics.MULTIPROC_ENV] = path
    environ[_METRICS_MARK] = f"{pid}:{'' if given else path}"
    if not given:
        # Also when the master never gets as far as on_exit (a bad setting stops it while
        # loading the app). Forked workers inherit this, but the pid check makes it a no-op.
        atexit.register(remove_metrics_dir, environ)
    return path


def remove_metrics_dir(environ: MutableMapping[str, str] = os.environ) -> None:
    """Remove the directory ``prepare_metrics_dir`` made, if this master made one."""
    owner, _, created = environ.get(_METRICS_MARK, "").partition(":")
    if owner == str(os.getpid()) and created:
        shutil.rmtree(created, ignore_errors=True)


# ---------------------------------------------------------------------- logging


class GunicornErrorLogHandler(logging.Handler):
    """Hands records to gunicorn's error logger, so they share its handlers and format.

    Forwarding (rather than copying the handlers) survives gunicorn replacing its handlers
    on a reload, and ``USR1`` log reopening.
    """

    def __init__(self, error_log: logging.Logger) -> None:
        super().__init__()
        self.error_log = error_log

    def emit(self, record: logging.LogRecord) -> None:
        self.error_log.handle(record)


def route_logging(server: Any) -> None:
    """Send the ``rainer_server`` (and kazoo's warnings) log to gunicorn's error log,
    at gunicorn's ``loglevel``. Idempotent."""
    _route_logging(server.log.error_log)


def route_startup_logging() -> None:
    """Route the log before there is a server to ask (call it from the config file).

    The app is preloaded before any hook runs, so its start-up warnings (unknown settings,
    a database that is down) would otherwise miss gunicorn's format. gunicorn sets up its
    error logger's handlers before it loads the app; until ``when_ready`` routes again with
    gunicorn's level, warnings and worse pass.
    """
    _route_logging(logging.getLogger("gunicorn.error"))


def _route_logging(error_log: logging.Logger) -> None:
    for name, least in ROUTED_LOGGERS.items():
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, GunicornErrorLogHandler)]:
            logger.removeHandler(handler)
        logger.addHandler(GunicornErrorLogHandler(error_log))
        logger.setLevel(max(error_log.getEffectiveLevel(), least))
        # Not to the root logger as well: that would print each line twice if it has handlers.
        logger.propagate = False


# ---------------------------------------------------------------------- hooks


def on_starting(server: Any) -> None:
    """In the master, before it binds: refuse to serve anonymous writes to the network unless
    the operator said so (``RAINER_AUTH=none``)."""
    rainer = _rainer(server)
    if rainer is None or rainer.settings.auth is not None:
        return
    exposed = [address for address in server.cfg.address if not _loopback(address)]
    if exposed:
        where = ", ".join(_describe(address) for address in exposed)
        sys.exit(
            f"rainer: listening on {where} needs RAINER_AUTH: choose token, proxy or "
            "token,proxy (with RAINER_POLICY), or RAINER_AUTH=none to keep anonymous writes"
        )


def _loopback(address: Any) -> bool:
    if not isinstance(address, tuple):
        return True  # a unix socket: only this host reaches it
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name that may resolve anywhere


def _describe(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def on_reload(server: Any) -> None:
    """In the master, on SIGHUP: read the access policy again before the new workers fork
    (they inherit it); a bad file keeps the old policy and says why in the log."""
    rainer = _rainer(server)
    if rainer is not None:
        rainer.gate.reload_policy()


def when_ready(server: Any) -> None:
    """In the master: route its log too (workers inherit the setting and renew it)."""
    route_logging(server)


def post_fork(server: Any, worker: Any) -> None:
    """Route logging (ZooKeeper starts in ``post_worker_init``)."""
    route_logging(server)


def post_worker_init(worker: Any) -> None:
    """Connect this worker to ZooKeeper (when configured) and join the publisher election;
    then, on ``TERM`` (a stop, or a ``HUP`` reload replacing this worker), have waiting
    requests answer at once with what they have, so the worker ends well within the
    graceful timeout."""
    rainer = _rainer(worker)
    if rainer is None:
        return
    if rainer.settings.zk_hosts:
        # Here rather than in post_fork: gunicorn's gevent worker re-creates its event loop
        # (``hub.reinit()``) between the two hooks, and kazoo's connection and callback
        # threads (greenlets under gevent) and sockets belong on the loop that will run them.
        rainer.start_zookeeper()
        worker.log.info("Worker %s joined the Rainer publisher election", worker.pid)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        # Not in the handler itself, which must not block: stopping takes locks. Under
        # gevent the handler runs in the event loop, where even starting a thread blocks.
        if cooperative():
            gevent.spawn(rainer.stop_watching)
        else:
            threading.Thread(target=rainer.stop_watching, name="rainer-stop-watching").start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)


def worker_exit(server: Any, worker: Any) -> None:
    """Leave the election and close ZooKeeper and the database cleanly."""
    rainer = _rainer(worker)
    if rainer is not None:
        rainer.close()


def child_exit(server: Any, worker: Any) -> None:
    """In the master, for every worker that ended (even by SIGKILL): drop its live gauges,
    so ``/metrics`` stops showing it as connected or leading."""
    try:
        metrics.mark_process_dead(worker.pid)
    except OSError as exc:
        server.log.warning("Cannot drop the metrics of worker %s: %s", worker.pid, exc)


def on_exit(server: Any) -> None:
    remove_metrics_dir()
