"""The access logger writes gunicorn's own line, byte for byte, for any format."""

from __future__ import annotations

import ast
import base64
from datetime import timedelta
from pathlib import Path

import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger

import rainer_server
from rainer_server.gunicorn_logging import AccessLogger


def _packaged_settings() -> dict[str, object]:
    """The literal settings of ``rainer_server/gunicorn_conf.py``, read without importing it
    (importing it prepares the metrics directory and routes logging in this process)."""
    tree = ast.parse((Path(rainer_server.__file__).parent / "gunicorn_conf.py").read_text())
    settings = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            try:
                settings[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, AttributeError):
                pass
    return settings


PACKAGED = _packaged_settings()


class Response:
    """What gunicorn's access log reads of its ``wsgi.Response``."""

    def __init__(self, status, sent, headers):
        self.status = status
        self.sent = sent
        self.headers = headers


class Request:
    """What gunicorn's access log reads of its ``http.Request``: upper-cased header names."""

    def __init__(self, headers):
        self.headers = headers


def line(logger_class, access_format, resp, req, environ, took, tmp_path, monkeypatch):
    cfg = Config()
    cfg.set("accesslog", str(tmp_path / f"{logger_class.__name__}.log"))
    cfg.set("access_log_format", access_format)
    logger = logger_class(cfg)
    # Both lines in the same second.
    monkeypatch.setattr(logger, "now", lambda: "[03/Dec/2026:13:42:21 +0000]")
    logger.access(resp, req, environ, took)
    for handler in logger.access_log.handlers:
        handler.flush()
    text = (tmp_path / f"{logger_class.__name__}.log").read_text()
    logger.access_log.handlers.clear()
    return text


ENVIRON = {
    "REQUEST_METHOD": "POST",
    "RAW_URI": "/diary/web.pool/2?x=1",
    "PATH_INFO": "/diary/web.pool/2",
    "QUERY_STRING": "x=1",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REMOTE_ADDR": "10.1.2.3",
    "HTTP_USER_AGENT": 'curl/8 "quoted"',
    "HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"alice:secret").decode(),
    "wsgi.url_scheme": "https",
}
REQUEST_HEADERS = [
    ("HOST", "rainer"),
    ("X-FORWARDED-FOR", "192.0.2.7"),
    ("USER-AGENT", 'curl/8 "quoted"'),
    ("X-TWICE", "first"),
    ("X-TWICE", "second"),
]
RESPONSE_HEADERS = [("Content-Type", "application/json"), ("ETag", '"v2"')]

FORMATS = [
    PACKAGED["access_log_format"],
    Config().access_log_format,  # gunicorn's default
    # Every atom gunicorn knows, headers and environ variables in any case, and some it lacks.
    "%(h)s %(l)s %(u)s %(t)s %(r)s %(s)s %(m)s %(U)s %(q)s %(H)s %(b)s %(B)s %(f)s %(a)s "
    "%(T)s %(D)s %(M)s %(L)s %(p)s %({X-Forwarded-For}i)s %({x-twice}i)s %({etag}o)s "
    "%({Content-Type}o)s %({wsgi.url_scheme}e)s %({REMOTE_ADDR}e)s %({absent}i)s "
    "%({absent}o)s %({absent}e)s %(Z)s %(D)d",
]


@pytest.mark.parametrize("access_format", FORMATS)
@pytest.mark.parametrize("status, sent", [("200 OK", 203), ("409 CONFLICT", None), (404, 0)])
def test_the_line_is_gunicorns_own(access_format, status, sent, tmp_path, monkeypatch):
    args = (Response(status, sent, RESPONSE_HEADERS), Request(REQUEST_HEADERS), ENVIRON,
            timedelta(seconds=1, microseconds=2345))
    ours = line(AccessLogger, access_format, *args, tmp_path, monkeypatch)
    theirs = line(Logger, access_format, *args, tmp_path, monkeypatch)
    assert ours == theirs
    assert ours.count("\n") == 1
    # The user agent's quotes come out escaped, as gunicorn escapes them.
    if "%(a)s" in access_format:
        assert 'curl/8 \\"quoted\\"' in ours


def test_the_service_logs_with_it():
    assert PACKAGED["logger_class"] == "rainer_server.gunicorn_logging.AccessLogger"
    cfg = Config()
    cfg.set("logger_class", PACKAGED["logger_class"])
    assert cfg.logger_class is AccessLogger

