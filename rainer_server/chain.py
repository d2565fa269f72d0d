"""Tamper evidence: each journal row carries a hash chained over its key's history.

``chain(v) = sha256(chain(v - 1) ‖ canonical bytes of v)``, the chain before version 1 being
empty. Changing any stored field of any version (a payload, an author, a time) in SQL breaks
that version's link and, with it, every later one; ``flask rainer verify`` finds the first.
The canonical bytes are a JSON array, so no field can bleed into its neighbour.
"""

from __future__ import annotations

import base64
import hashlib
import json

from rainer_server.commit import Commit
from rainer_server.commit import format_mtime

#: The chain "before" version 1.
GENESIS = ""


def canonical_bytes(commit: Commit) -> bytes:
    """Every field a row stores, in a fixed order and encoding."""
    payload = None if commit.payload is None else base64.b64encode(commit.payload).decode("ascii")
    fields = [
        commit.key,
        commit.version,
        payload,
        commit.author,
        commit.comment,
        format_mtime(commit.mtime),
        commit.empty,
        commit.identity,
    ]
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def link(previous: str, commit: Commit) -> str:
    """The chain value of ``commit``, given the chain value of the version before it."""
    return hashlib.sha256(previous.encode("ascii") + b"\n" + canonical_bytes(commit)).hexdigest()
