"""Rainer: a versioned key/value configuration service.

``create_app`` builds the service; the rest is the library API.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from flask import Flask

    from rainer_server.commit import Commit
    from rainer_server.errors import CommitNotFound
    from rainer_server.errors import CommitOrderingError
    from rainer_server.errors import ConcurrentCommitError
    from rainer_server.errors import InvalidCommit
    from rainer_server.errors import KeeperError
    from rainer_server.errors import RainerError
    from rainer_server.errors import StorageUnavailable
    from rainer_server.extension import Rainer
    from rainer_server.settings import ConfigurationError
    from rainer_server.storage import CommitStorage
    from rainer_server.storage import with_post_save_hook
    from rainer_server.storage import with_pre_save_hook
    from rainer_server.storage.db import DbCommitStorage
    from rainer_server.storage.db import open_database
    from rainer_server.storage.memory import MemoryCommitStorage

# Exported names -> defining module, imported on first use (PEP 562). The package must stay
# light: ``rainer_server.client`` and the ``rainer`` command import it, and they must work
# without Flask, peewee or kazoo being imported (or installed).
_EXPORTS = {
    "Commit": "rainer_server.commit",
    "CommitNotFound": "rainer_server.errors",
    "CommitOrderingError": "rainer_server.errors",
    "ConcurrentCommitError": "rainer_server.errors",
    "InvalidCommit": "rainer_server.errors",
    "KeeperError": "rainer_server.errors",
    "RainerError": "rainer_server.errors",
    "StorageUnavailable": "rainer_server.errors",
    "Rainer": "rainer_server.extension",
    "ConfigurationError": "rainer_server.settings",
    "CommitStorage": "rainer_server.storage",
    "with_post_save_hook": "rainer_server.storage",
    "with_pre_save_hook": "rainer_server.storage",
    "DbCommitStorage": "rainer_server.storage.db",
    "open_database": "rainer_server.storage.db",
    "MemoryCommitStorage": "rainer_server.storage.memory",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Commit",
    "CommitNotFound",
    "CommitOrderingError",
    "CommitStorage",
    "ConcurrentCommitError",
    "ConfigurationError",
    "DbCommitStorage",
    "InvalidCommit",
    "KeeperError",
    "MemoryCommitStorage",
    "Rainer",
    "RainerError",
    "StorageUnavailable",
    "create_app",
    "open_database",
    "with_post_save_hook",
    "with_pre_save_hook",
]


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the Rainer service.

    Settings come from the defaults, then the Python file named by ``RAINER_CONFIG``, then
    ``RAINER_*`` environment variables; ``config`` (tests) replaces the file and environment.
    Opens no connections: storage and ZooKeeper are reached on first use.

    :raises ConfigurationError: naming the first invalid setting.
    """
    from flask import Flask

    from rainer_server.extension import Rainer
    from rainer_server.settings import DEFAULTS
    from rainer_server.settings import settings_from_environ

    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    if config is None:
        app.config.from_envvar("RAINER_CONFIG", silent=True)
        app.config.from_mapping(settings_from_environ(os.environ))
    else:
        app.config.from_mapping(config)
    Rainer(app)
    return app
