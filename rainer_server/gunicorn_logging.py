"""gunicorn's logger, with an access line that costs what its format asks for.

gunicorn builds every access line from a dictionary of every atom it knows: the request's
headers, the response's headers and the whole WSGI environ, each copied and escaped, for a
format that names a dozen of them. Under a load of cached reads that was a quarter of a
worker's CPU. ``AccessLogger`` reads the format once and computes only the atoms it names;
the line is the same, byte for byte (``tests/test_gunicorn_logging.py`` compares them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from gunicorn.glogging import Logger

# %(name)s, %(name)d, ...: the atoms a format names (gunicorn formats with a mapping).
_ATOM = re.compile(r"%\(([^)]*)\)")


def _status(resp: Any) -> Any:
    status = resp.status
    return status.split(None, 1)[0] if isinstance(status, str) else status


def _sent(resp: Any) -> Any:
    return getattr(resp, "sent", None)


def _simple_atoms(logger: Logger) -> dict[str, Callable[[Any, Any, dict, Any], Any]]:
    """gunicorn's atoms that are not headers nor environ variables (``Logger.atoms``)."""
    return {
        "h": lambda resp, req, environ, took: environ.get("REMOTE_ADDR", "-"),
        "l": lambda resp, req, environ, took: "-",
        "u": lambda resp, req, environ, took: logger._get_user(environ) or "-",
        "t": lambda resp, req, environ, took: logger.now(),
        "r": lambda resp, req, environ, took: "%s %s %s" % (
            environ["REQUEST_METHOD"], environ["RAW_URI"], environ["SERVER_PROTOCOL"]),
        "s": lambda resp, req, environ, took: _status(resp),
        "m": lambda resp, req, environ, took: environ.get("REQUEST_METHOD"),
        "U": lambda resp, req, environ, took: environ.get("PATH_INFO"),
        "q": lambda resp, req, environ, took: environ.get("QUERY_STRING"),
        "H": lambda resp, req, environ, took: environ.get("SERVER_PROTOCOL"),
        "b": lambda resp, req, environ, took: _sent(resp) is not None and str(resp.sent) or "-",
        "B": lambda resp, req, environ, took: _sent(resp),
        "f": lambda resp, req, environ, took: environ.get("HTTP_REFERER", "-"),
        "a": lambda resp, req, environ, took: environ.get("HTTP_USER_AGENT", "-"),
        "T": lambda resp, req, environ, took: took.seconds,
        "D": lambda resp, req, environ, took: took.seconds * 1000000 + took.microseconds,
        "M": lambda resp, req, environ, took: took.seconds * 1000 + int(took.microseconds / 1000),
        "L": lambda resp, req, environ, took: "%d.%06d" % (took.seconds, took.microseconds),
        "p": lambda resp, req, environ, took: "<%s>" % os.getpid(),
    }


def _headers(source: Any) -> Any:
    headers = getattr(source, "headers", source)
    return headers.items() if hasattr(headers, "items") else headers


class AccessLogger(Logger):
    """gunicorn's ``Logger`` whose ``atoms`` holds only the atoms the access format names.

    Header and environ atoms (``{name}i``, ``{name}o``, ``{name}e``) are looked up by name,
    as gunicorn's ``SafeAtoms`` does: case-insensitively, ``-`` when absent.
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        simple = _simple_atoms(self)
        self._simple = {}
        self._request_headers = set()
        self._response_headers = set()
        self._environ = set()
        for name in _ATOM.findall(cfg.access_log_format or ""):
            if name in simple:
                self._simple[name] = simple[name]
            elif name.startswith("{") and len(name) > 3 and name[-2] == "}":
                kind = {"i": self._request_headers, "o": self._response_headers,
                        "e": self._environ}.get(name[-1])
                if kind is not None:
                    kind.add(name[1:-2].lower())

    def atoms(self, resp: Any, req: Any, environ: dict, request_time: Any) -> dict[str, Any]:
        atoms = {name: make(resp, req, environ, request_time)
                 for name, make in self._simple.items()}
        if self._request_headers:
            _pick(atoms, _headers(req), self._request_headers, "i")
        if self._response_headers:
            _pick(atoms, _headers(resp), self._response_headers, "o")
        if self._environ:
            _pick(atoms, environ.items(), self._environ, "e")
        return atoms


def _pick(atoms: dict[str, Any], pairs: Any, wanted: set[str], suffix: str) -> None:
    """``atoms["{name}<suffix>"]`` for each wanted name among ``pairs`` (the last one wins, as
    in gunicorn's dict)."""
    for key, value in pairs:
        lowered = key.lower()
        if lowered in wanted:
            atoms["{%s}%s" % (lowered, suffix)] = value


__all__ = ["AccessLogger"]
