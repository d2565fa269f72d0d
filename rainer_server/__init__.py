"""Rainer: a versioned key/value configuration service, and the library it is built from.

Every public name is importable from here (``from rainer_server import CommitKeeper``), and
loaded on first use (PEP 562): ``import rainer_server``, the client and the ``rainer`` command
stay light, importing neither Flask, peewee nor kazoo until a name that needs one is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING
from typing import Any

from rainer_server.version import __version__

if TYPE_CHECKING:
    from rainer_server.client import HttpCommitStorage
    from rainer_server.client import RainerClient
    from rainer_server.commit import Commit
    from rainer_server.errors import AccessDenied
    from rainer_server.errors import AuthenticationRequired
    from rainer_server.errors import RainerBadRequest
    from rainer_server.errors import RainerConnectionError
    from rainer_server.errors import RainerForbidden
    from rainer_server.errors import RainerHTTPError
    from rainer_server.errors import RainerUnauthorized
    from rainer_server.errors import RainerUnavailable
    from rainer_server.errors import CommitNotFound
    from rainer_server.errors import CommitOrderingError
    from rainer_server.errors import CommitTooLarge
    from rainer_server.errors import ConcurrentCommitError
    from rainer_server.errors import ConfigurationError
    from rainer_server.errors import CsrfRejected
    from rainer_server.errors import ExportLineInvalid
    from rainer_server.errors import InvalidCommit
    from rainer_server.errors import KeeperError
    from rainer_server.errors import LostCompareAndSet
    from rainer_server.errors import PayloadDeserializationError
    from rainer_server.errors import PayloadRejected
    from rainer_server.errors import PayloadTooLarge
    from rainer_server.errors import RainerError
    from rainer_server.errors import StorageUnavailable
    from rainer_server.payloads import BytesPayloads
    from rainer_server.payloads import JsonPayloads
    from rainer_server.payloads import KeyValueDeserialization
    from rainer_server.payloads import KeyValueSerialization
    from rainer_server.payloads import Payloads
    from rainer_server.payloads import SchemaPayloads
    from rainer_server.payloads import TextPayloads
    from rainer_server.payloads import YamlPayloads
    from rainer_server.payloads import make_payloads
    from rainer_server.storage import CommitStorage
    from rainer_server.storage import with_post_save_hook
    from rainer_server.storage import with_pre_save_hook
    from rainer_server.storage.db import DbCommitStorage
    from rainer_server.storage.db import open_database
    from rainer_server.storage.memory import MemoryCommitStorage
    from rainer_server.web.extension import Rainer
    from rainer_server.web.extension import create_app
    from rainer_server.zk.keeper import CommitKeeper
    from rainer_server.zk.keeper import make_kazoo_client
    from rainer_server.zk.mirror import CommitMirror
    from rainer_server.zk.publisher import AutoPublisher
    from rainer_server.zk.publishing import keeper_publishing
    from rainer_server.zk.rainers import Rainers

# Exported name -> the module defining it.
_EXPORTS = {
    "Commit": "rainer_server.commit",
    **dict.fromkeys(
        (
            "CommitNotFound",
            "CommitOrderingError",
            "CommitTooLarge",
            "AccessDenied",
            "AuthenticationRequired",
            "ConcurrentCommitError",
            "ConfigurationError",
            "CsrfRejected",
            "ExportLineInvalid",
            "InvalidCommit",
            "KeeperError",
            "LostCompareAndSet",
            "PayloadDeserializationError",
            "PayloadRejected",
            "PayloadTooLarge",
            "RainerError",
            "StorageUnavailable",
            "RainerHTTPError",
            "RainerBadRequest",
            "RainerUnauthorized",
            "RainerForbidden",
            "RainerUnavailable",
            "RainerConnectionError",
        ),
        "rainer_server.errors",
    ),
    **dict.fromkeys(
        (
            "BytesPayloads",
            "JsonPayloads",
            "KeyValueDeserialization",
            "KeyValueSerialization",
            "Payloads",
            "SchemaPayloads",
            "TextPayloads",
            "YamlPayloads",
            "make_payloads",
        ),
        "rainer_server.payloads",
    ),
    "CommitStorage": "rainer_server.storage",
    "with_post_save_hook": "rainer_server.storage",
    "with_pre_save_hook": "rainer_server.storage",
    "MemoryCommitStorage": "rainer_server.storage.memory",
    "DbCommitStorage": "rainer_server.storage.db",
    "open_database": "rainer_server.storage.db",
    "CommitKeeper": "rainer_server.zk.keeper",
    "make_kazoo_client": "rainer_server.zk.keeper",
    "CommitMirror": "rainer_server.zk.mirror",
    "AutoPublisher": "rainer_server.zk.publisher",
    "keeper_publishing": "rainer_server.zk.publishing",
    "Rainers": "rainer_server.zk.rainers",
    "RainerClient": "rainer_server.client",
    "HttpCommitStorage": "rainer_server.client",
    "Rainer": "rainer_server.web.extension",
    "create_app": "rainer_server.web.extension",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
