"""Fallback floor apps for bench_keeper.py, used only when tests/bench/floors.py (bench_core's,
whose apps bench_keeper reuses) is missing or lacks ``bare_wsgi`` / ``flask_dict``.

Same shapes as floors.py: ``bare_wsgi`` returns one small bytes body; ``flask_dict`` is Flask
serving ``GET /diary/<key>`` from a dict of ``BENCH_DICT_KEYS`` (10k) payloads. Nothing
connects at import (gunicorn preloads the module in the master and forks).
"""

from __future__ import annotations

import os
from datetime import datetime
from datetime import timezone

BASE_MTIME = datetime(2024, 1, 1, tzinfo=timezone.utc)


def key_name(index: int) -> str:
    return f"key-{index:05d}"


def make_payload(key: str, version: int, size: int = 200) -> bytes:
    head = f'{{"key": "{key}", "version": {version}, "settings": {{"pad": "'
    tail = '"}}'
    return (head + "x" * max(0, size - len(head) - len(tail)) + tail).encode("ascii")


_BARE_BODY = make_payload(key_name(0), 1)
_BARE_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(_BARE_BODY)))]


def bare_wsgi(environ, start_response):
    start_response("200 OK", list(_BARE_HEADERS))
    return [_BARE_BODY]


def _make_flask_dict():
    from flask import Flask
    from flask import Response

    app = Flask("flask_dict")
    nkeys = int(os.environ.get("BENCH_DICT_KEYS", "10000"))
    data = {key_name(i): make_payload(key_name(i), 1) for i in range(nkeys)}

    @app.get("/diary/<key>")
    def get(key):
        payload = data.get(key)
        if payload is None:
            return Response(b"Key not found", 404)
        return Response(payload, 200, mimetype="text/plain")

    return app


flask_dict = _make_flask_dict()
