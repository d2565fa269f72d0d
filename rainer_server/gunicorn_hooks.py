"""What gunicorn's server hooks do for Rainer; ``config/gunicorn.conf.py`` only calls these.

Each worker gets its own ZooKeeper client, mirror and election contender, started after the
fork (threads and sockets do not survive ``fork``). Every worker contends; one publishes.
"""

from __future__ import annotations

from typing import Any

from rainer_server.extension import Rainer


def _rainer(worker: Any) -> Rainer | None:
    app = worker.app.wsgi()  # cached by gunicorn: the preloaded app, not a second copy
    extensions = getattr(app, "extensions", {})
    return extensions.get("rainer")


def post_fork(server: Any, worker: Any) -> None:
    """Connect this worker to ZooKeeper (when configured) and join the publisher election."""
    rainer = _rainer(worker)
    if rainer is not None and rainer.settings.zk_hosts:
        rainer.start_zookeeper()
        server.log.info("Worker %s joined the Rainer publisher election", worker.pid)


def worker_exit(server: Any, worker: Any) -> None:
    """Leave the election and close ZooKeeper and the database cleanly."""
    rainer = _rainer(worker)
    if rainer is not None:
        rainer.close()
