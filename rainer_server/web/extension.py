"""The Flask extension: ``Rainer(app)`` or ``Rainer().init_app(app)`` mounts Rainer on any app.

It reads the settings, registers the API, the health and metrics endpoints and the
``flask rainer`` commands, and wraps the app in the mirror-read and request-metrics
middleware. The state it serves from is a ``RainerContext`` (``web/context.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask

from rainer_server import audit
from rainer_server.payloads import make_payloads
from rainer_server.settings import DEFAULTS
from rainer_server.settings import load_settings
from rainer_server.settings import settings_from_environ
from rainer_server.storage import CommitStorage
from rainer_server.storage.db import open_database
from rainer_server.web import admin
from rainer_server.web import api
from rainer_server.web import health
from rainer_server.web.auth import open_gate
from rainer_server.web.context import RainerContext
from rainer_server.web.middleware import MirrorReads
from rainer_server.web.middleware import RequestMetrics


class Rainer(RainerContext):
    """Rainer on a Flask app, kept at ``app.extensions["rainer"]``.

    :param storage: a storage to serve instead of the one ``RAINER_DATABASE_URL`` names;
        the embedding app owns its lifecycle.
    """

    def __init__(self, app: Flask | None = None, storage: CommitStorage | None = None) -> None:
        super().__init__(storage)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        self.settings = load_settings(
            {key.lower(): value for key, value in app.config.get_namespace("RAINER_").items()}
        )
        self.payloads = make_payloads(self.settings.payload_format, self.settings.payload_schemas)
        self.gate = open_gate(self.settings, open_database(self.settings.database_url))
        audit.configure(self.settings.audit_log)
        app.extensions["rainer"] = self
        api.register(app, self.settings.url_prefix)
        # /healthz, /readyz, /metrics: on the app, outside the API prefix.
        app.register_blueprint(health.bp)
        mirror_reads = MirrorReads(app.wsgi_app, app, self, self.settings.url_prefix)
        app.wsgi_app = RequestMetrics(mirror_reads)  # type: ignore[method-assign]
        app.cli.add_command(admin.rainer_cli)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the Rainer service.

    Settings come from the defaults, then the Python file named by ``RAINER_CONFIG``, then
    ``RAINER_*`` environment variables; ``config`` (tests) replaces the file and environment.
    Opens no connections: storage and ZooKeeper are reached on first use.

    :raises ConfigurationError: naming the first invalid setting.
    """
    app = Flask("rainer_server")
    app.config.from_mapping(DEFAULTS)
    if config is None:
        app.config.from_envvar("RAINER_CONFIG", silent=True)
        app.config.from_mapping(settings_from_environ(os.environ))
    else:
        app.config.from_mapping(config)
    Rainer(app)
    return app
