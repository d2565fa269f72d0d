"""Operational endpoints: ``/healthz``, ``/readyz`` and ``/metrics``, and request metrics.

Registered on the app itself, never under ``RAINER_URL_PREFIX``, so they cannot collide with
keys (with an empty prefix, werkzeug still prefers these static rules over ``/<key>``). An
embedding app may have routes of these names already: those it keeps (see ``register``).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from datetime import timezone
from typing import Any

from flask import Blueprint
from flask import Flask
from flask import Response
from flask import request

from rainer_server.errors import RainerError
from rainer_server.metrics import exposition
from rainer_server.web.context import get_rainer

log = logging.getLogger(__name__)

# '/' is never part of a key, so this primary-key lookup finds nothing: the cheapest query
# that goes through the storage's own connection handling, timeouts and reconnects.
READY_PROBE_KEY = "readyz/probe"
NO_STORE = {"Cache-Control": "no-store"}


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status, mimetype="application/json", headers=NO_STORE)


def healthz() -> Response:
    """The process is alive and answering; says nothing about its dependencies."""
    return _json({"status": "ok"})


def readyz() -> Response:
    """Whether this worker can serve: database reachable, and when ZooKeeper is configured,
    connected with this worker's mirror complete and serving. 503 with the failing checks
    otherwise."""
    rainer = get_rainer()
    checks: dict[str, str] = {"database": _check_database(rainer)}
    if rainer.settings.zk_hosts:
        rainer.start_zookeeper()  # outside gunicorn nothing else may have started it yet
        client, mirror = rainer.zk_client, rainer.mirror
        if client is None:
            checks["zookeeper"] = "not started"
        elif client.connected:
            checks["zookeeper"] = "ok"
        else:
            checks["zookeeper"] = f"not connected ({client.state})"
        if mirror is not None and mirror.stale_since is not None:
            since = datetime.fromtimestamp(mirror.stale_since, timezone.utc)
            checks["mirror"] = "stale since " + since.isoformat(timespec="milliseconds")[:-6] + "Z"
        elif mirror is not None and mirror.initialized:
            # The mirror serves (cached_view) once the watch hub knows every head's index (it
            # reads them from the database: ~1 s at 100k keys); until then reads go there.
            serving = rainer.cached_view() is not None
            checks["mirror"] = "ok" if serving else "complete; indexing the heads"
        else:
            checks["mirror"] = "not initialized"
    ready = all(value == "ok" for value in checks.values())
    body = {"status": "ok" if ready else "not ready", "checks": checks}
    return _json(body, 200 if ready else 503)


def _check_database(rainer: Any) -> str:
    try:
        rainer.database_storage.get(READY_PROBE_KEY)
    except RainerError as exc:  # StorageUnavailable
        log.warning(
            "Readiness check of the database failed: %s", getattr(exc, "detail", None) or exc
        )
        return f"unavailable: {exc}"
    except Exception as exc:
        log.warning("Readiness check of the database failed: %r", exc)
        return f"unavailable: {type(exc).__name__}"
    return "ok"


def prometheus_metrics() -> Response:
    body, content_type = exposition(request.headers.get("Accept"))
    return Response(body, 200, content_type=content_type, headers=NO_STORE)


ROUTES = {"/healthz": healthz, "/readyz": readyz, "/metrics": prometheus_metrics}


def register(app: Flask) -> None:
    """Add the routes to ``app``, except those it routes already: the app's own view keeps
    answering there, and a warning says so (``RAINER_HEALTH_ROUTES=false`` adds none).

    Only routes the app has by now are seen: register the app's own before Rainer.
    """
    taken = {rule.rule: rule.endpoint for rule in app.url_map.iter_rules()}
    bp = Blueprint("rainer_health", __name__)
    for path, view in ROUTES.items():
        if path in taken:
            log.warning(
                "Not adding Rainer's %s: the app already routes it to %s "
                "(set RAINER_HEALTH_ROUTES=false to add none of /healthz, /readyz, /metrics)",
                path,
                taken[path],
            )
            continue
        bp.add_url_rule(path, view_func=view, methods=["GET"])
    app.register_blueprint(bp)
