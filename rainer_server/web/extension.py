"""The Flask extension: ``Rainer(app)`` or ``Rainer().init_app(app)`` mounts Rainer on any app.

It reads the settings, registers the API, the web console, the health and metrics endpoints
and the ``flask rainer`` commands, and wraps the app in the mirror-read and request-metrics
middleware. The state it serves from is a ``RainerContext`` (``web/context.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from flask import Flask

from rainer_server import audit
from rainer_server.payloads import make_payloads
from rainer_server.settings import DEFAULTS
from rainer_server.settings import PREFIX
from rainer_server.settings import configured_values
from rainer_server.settings import load_settings
from rainer_server.settings import unknown_setting_messages
from rainer_server.settings import without_prefix
from rainer_server.storage import CommitStorage
from rainer_server.storage.db import open_database
from rainer_server.web import admin
from rainer_server.web import api
from rainer_server.web import console
from rainer_server.web import health
from rainer_server.web.auth import open_gate
from rainer_server.web.context import RainerContext
from rainer_server.web.context import VersionCache
from rainer_server.web.middleware import MirrorReads
from rainer_server.web.middleware import ReleaseConnections
from rainer_server.web.middleware import RequestMetrics

log = logging.getLogger(__name__)


class Rainer(RainerContext):
    """Rainer on a Flask app, kept at ``app.extensions["rainer"]``.

    Settings are the app's ``RAINER_*`` config; what it leaves unset comes from the
    ``RAINER_*`` environment variables and the file named by ``RAINER_CONFIG``, as for the
    standalone service, then the defaults.

    :param storage: a storage to serve instead of the one ``RAINER_DATABASE_URL`` names;
        the embedding app owns its lifecycle.
    :param environ: where to read ``RAINER_*`` variables (and ``RAINER_CONFIG``) from;
        ``os.environ`` by default, ``{}`` for the app's config alone.
    """

    def __init__(
        self,
        app: Flask | None = None,
        storage: CommitStorage | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(storage)
        self.environ = environ
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the settings and mount Rainer on ``app``.

        :raises ConfigurationError: naming the first invalid setting.
        """
        environ = os.environ if self.environ is None else self.environ
        values = configured_values(environ, warn=log.warning)
        own = {name: value for name, value in app.config.items() if name.startswith(PREFIX)}
        for message in unknown_setting_messages(own, "the app's config"):
            log.warning(message)
        values.update(own)  # the app's config wins
        self.settings = load_settings(without_prefix(values))
        self.version_cache = VersionCache(self.settings.version_cache_bytes)
        self.payloads = make_payloads(self.settings.payload_format, self.settings.payload_schemas)
        self.gate = open_gate(
            self.settings, open_database(self.settings.database_url, self.settings.database_timeout)
        )
        audit.configure(self.settings.audit_log)
        app.extensions["rainer"] = self
        api.register(app, self.settings.url_prefix)
        if self.settings.ui:
            console.register(app, self)
        if self.settings.health_routes:
            # /healthz, /readyz, /metrics: on the app, outside the API prefix.
            health.register(app)
        mirror_reads = MirrorReads(app.wsgi_app, app, self, self.settings.url_prefix)
        app.wsgi_app = RequestMetrics(ReleaseConnections(mirror_reads, self))  # type: ignore[method-assign]
        app.cli.add_command(admin.rainer_cli)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the Rainer service.

    Settings come from the defaults, then the Python file named by ``RAINER_CONFIG``, then
    ``RAINER_*`` environment variables; ``config`` (tests) replaces the file and environment.
    Opens no connections: storage and ZooKeeper are reached on first use.

    :raises ConfigurationError: naming the first invalid setting, or a settings file that
        is missing or does not run.
    """
    app = Flask("rainer_server")
    app.config.from_mapping(DEFAULTS)
    if config is None:
        # Into the app's config, as Flask's from_envvar would: the file may also hold Flask's
        # own settings. Unknown RAINER_* names are reported here, once.
        app.config.from_mapping(configured_values(os.environ, warn=log.warning))
    else:
        app.config.from_mapping(config)
    # The app's config holds everything already: the extension reads no environment again.
    Rainer(app, environ={})
    return app
