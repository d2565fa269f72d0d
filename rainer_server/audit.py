"""The audit trail of access decisions, and log lines nobody can forge.

One JSON line per commit and per refusal on the ``rainer.audit`` logger: time, identity (or
null), peer address, method, key, version, decision, reason, request id. Never a payload or a
token. JSON with ``ensure_ascii`` escapes every control character, so a value holding a line
break cannot start a line of its own; ``escape_controls`` does the same for the plain-text
lines of the other loggers.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime
from datetime import timezone
from logging.handlers import WatchedFileHandler
from typing import Any

AUDIT_LOGGER = "rainer.audit"

audit_log = logging.getLogger(AUDIT_LOGGER)

# C0 controls, DEL and C1 controls, plus the Unicode line and paragraph separators: each can
# end a line in some log viewer or terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``)."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or f"\\u{ord(char):04x}"


class EscapeControlCharacters(logging.Filter):
    """A handler filter: the formatted message of every record, control characters escaped."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = escape_controls(message)
        if escaped is not message:
            record.msg, record.args = escaped, None
        return True


def record(
    *,
    decision: str,
    identity: str | None,
    peer: str | None,
    method: str,
    key: str | None,
    version: int | None = None,
    reason: str | None = None,
    request_id: str | None = None,
) -> None:
    """Write one audit line. ``decision``: ``committed``, ``denied``, ``unauthenticated``,
    ``ignored-proxy-header``."""
    if not audit_log.isEnabledFor(logging.INFO):
        return
    entry: dict[str, Any] = {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z",
        "identity": identity,
        "peer": peer,
        "method": method,
        "key": key,
        "version": version,
        "decision": decision,
        "reason": reason,
        "request_id": request_id,
    }
    audit_log.info(json.dumps(entry, ensure_ascii=True, separators=(",", ":")))


def configure(path: str | None) -> None:
    """Send the audit trail to ``path`` (appended; reopened when rotated away), else stderr.

    Idempotent: a second call (another app in the same process) replaces the handler.
    """
    handler: logging.Handler
    if path:
        handler = WatchedFileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(EscapeControlCharacters())
    for old in list(audit_log.handlers):
        if getattr(old, "_rainer_audit", False):
            audit_log.removeHandler(old)
            old.close()
    handler._rainer_audit = True  # type: ignore[attr-defined]
    audit_log.addHandler(handler)
    audit_log.setLevel(logging.INFO)
    audit_log.propagate = False
