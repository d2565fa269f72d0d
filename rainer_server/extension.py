"""The Flask extension: wires settings, storage and payload validation into an app.

``Rainer().init_app(app)`` mounts the API on any Flask app. Storage is opened lazily on first
use, once per process, so creating the app opens no connection (safe with ``preload_app``).
"""

from __future__ import annotations

import threading
from typing import Any

from flask import Flask
from flask import current_app

from rainer_server.payloads import PayloadValidator
from rainer_server.settings import Settings
from rainer_server.settings import load_settings
from rainer_server.storage import CommitStorage


class Rainer:
    """Rainer's state for one Flask app, kept at ``app.extensions["rainer"]``.

    :param storage: a storage to serve instead of the one ``RAINER_DATABASE_URL`` names;
        the embedding app owns its lifecycle.
    """

    def __init__(self, app: Flask | None = None, storage: CommitStorage | None = None) -> None:
        self._given_storage = storage
        self._storage: CommitStorage | None = storage
        self._lock = threading.Lock()
        self.settings: Settings = Settings()
        self.payloads = PayloadValidator()
        # Serialised lists by query flags: (heads token, body). Revalidated per request.
        self.list_cache: dict[tuple[bool, bool, bool], tuple[int, bytes]] = {}
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        from rainer_server import admin
        from rainer_server import api

        self.settings = load_settings(
            {key.lower(): value for key, value in app.config.get_namespace("RAINER_").items()}
        )
        self.payloads = PayloadValidator(self.settings.payload_format, self.settings.payload_schemas)
        app.extensions["rainer"] = self
        api.register(app, self.settings.url_prefix)
        app.cli.add_command(admin.rainer_cli)

    @property
    def storage(self) -> CommitStorage:
        """The system of record, started on first use."""
        if self._storage is None:
            with self._lock:
                if self._storage is None:
                    storage = self.open_storage()
                    storage.start()
                    self._storage = storage
        return self._storage

    def open_storage(self) -> CommitStorage:
        """A new, unstarted storage as the settings describe it."""
        from rainer_server.storage.db import DbCommitStorage
        from rainer_server.storage.db import open_database

        return DbCommitStorage(open_database(self.settings.database_url), self.settings.table)

    def close(self) -> None:
        """Release the storage this extension opened (not one it was given)."""
        with self._lock:
            if self._storage is not None and self._storage is not self._given_storage:
                self._storage.stop()
                self._storage = None


def get_rainer(app: Any = None) -> Rainer:
    """The ``Rainer`` of ``app`` (default: the current app)."""
    return (app or current_app).extensions["rainer"]
