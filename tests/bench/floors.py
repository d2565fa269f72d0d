"""Floor apps for bench_core.py: the least a WSGI app can do for each kind of request.

Each is a module-level WSGI object, served exactly like the service
(``gunicorn -c config/gunicorn.conf.py --pythonpath tests/bench floors:<name>``), so the
floors pay the same gunicorn settings (sync workers, preload, access log) as Rainer does:

- ``bare_wsgi``: a plain WSGI callable returning a small bytes body;
- ``flask_dict``: Flask serving payloads from a dict, ``GET /diary/<key>``;
- ``flask_pymysql_get``: Flask + one persistent pymysql connection per worker, the
  primary-key ``SELECT`` of one row, ``GET /diary/<key>/<version>``;
- ``flask_pymysql_post``: Flask + pymysql, ``BEGIN; SELECT MAX(version); INSERT; COMMIT``,
  ``POST /diary/<key>/<version>``;
- ``naive_peewee_list``: Flask + peewee selecting every head as model objects and
  JSON-encoding them through ``model_to_dict``, ``GET /diary``.

The database ones read ``RAINER_DATABASE_URL`` and ``RAINER_TABLE`` like the service. Nothing
connects at import (gunicorn preloads the module in the master and forks).
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime
from datetime import timezone
from urllib.parse import unquote
from urllib.parse import urlparse

BASE_MTIME = datetime(2024, 1, 1, tzinfo=timezone.utc)


def key_name(index: int) -> str:
    return f"key-{index:05d}"


def make_payload(key: str, version: int, size: int = 200) -> bytes:
    """A JSON document of about ``size`` bytes, the same for the seed and the floors."""
    head = f'{{"key": "{key}", "version": {version}, "settings": {{"pad": "'
    tail = '"}}'
    return (head + "x" * max(0, size - len(head) - len(tail)) + tail).encode("ascii")


def _mysql_params() -> dict:
    url = urlparse(os.environ["RAINER_DATABASE_URL"])
    return {
        "host": url.hostname or "127.0.0.1",
        "port": url.port or 3306,
        "user": unquote(url.username or "root"),
        "password": unquote(url.password or ""),
        "database": url.path.lstrip("/"),
        "charset": "utf8mb4",
    }


def _table() -> str:
    return os.environ.get("RAINER_TABLE", "rainer")


# ---------------------------------------------------------------- (a) bare WSGI

_BARE_BODY = make_payload(key_name(0), 1)
_BARE_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(_BARE_BODY)))]


def bare_wsgi(environ, start_response):
    start_response("200 OK", list(_BARE_HEADERS))
    return [_BARE_BODY]


# ---------------------------------------------------------------- (b) Flask + dict


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


# ---------------------------------------------------------------- (c), (d) Flask + pymysql

_idle: list = []
_idle_pid = None


@contextlib.contextmanager
def _connection():
    """A persistent connection of this worker process (opened after the fork), one per request
    in flight: under gevent workers many requests of one process run at once, and a pymysql
    connection serves one at a time (as Rainer's pool hands each request its own)."""
    global _idle_pid
    import pymysql

    if _idle_pid != os.getpid():
        _idle.clear()
        _idle_pid = os.getpid()
    conn = _idle.pop() if _idle else pymysql.connect(autocommit=True, **_mysql_params())
    try:
        yield conn
    except BaseException:
        conn.close()  # in an unknown state: not reused
        raise
    _idle.append(conn)


def _make_flask_pymysql_get():
    from flask import Flask
    from flask import Response

    app = Flask("flask_pymysql_get")
    sql = (
        f"SELECT `key`, version, author, comment, mtime, is_empty, payload FROM `{_table()}` "
        "WHERE `key` = %s AND version = %s"
    )

    @app.get("/diary/<key>/<int:version>")
    def get(key, version):
        with _connection() as conn, conn.cursor() as cursor:
            cursor.execute(sql, (key.encode("utf-8"), version))
            row = cursor.fetchone()
        if row is None:
            return Response(b"Key not found", 404)
        return Response(row[6] or b"", 200, mimetype="text/plain")

    return app


def _make_flask_pymysql_post():
    from flask import Flask
    from flask import Response
    from flask import request

    app = Flask("flask_pymysql_post")
    table = _table()
    select = f"SELECT MAX(version) FROM `{table}` WHERE `key` = %s"
    insert = (
        f"INSERT INTO `{table}` (`key`, version, author, comment, mtime, is_empty, is_head, "
        "payload) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
    )

    @app.post("/diary/<key>/<int:version>")
    def post(key, version):
        body = request.get_data()
        key_bytes = key.encode("utf-8")
        with _connection() as conn:
            conn.begin()
            with conn.cursor() as cursor:
                cursor.execute(select, (key_bytes,))
                head = cursor.fetchone()[0] or 0
                if version != head + 1:
                    conn.rollback()
                    return Response(b'{"conflict": {}}', 409, mimetype="application/json")
                mtime = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
                cursor.execute(insert, (key_bytes, version, "bench", "", mtime, 0, 1, body))
            conn.commit()
        return Response(
            json.dumps({"key": key, "version": version}), 200, mimetype="application/json"
        )

    return app


flask_pymysql_get = _make_flask_pymysql_get()
flask_pymysql_post = _make_flask_pymysql_post()


# ---------------------------------------------------------------- (e) naive Flask + peewee


def _make_naive_peewee_list():
    import peewee
    from flask import Flask
    from flask import Response
    from playhouse.db_url import connect
    from playhouse.shortcuts import model_to_dict

    app = Flask("naive_peewee_list")
    database = connect(os.environ.get("RAINER_DATABASE_URL", "sqlite:///:memory:"))

    class Row(peewee.Model):
        key = peewee.BlobField()
        version = peewee.IntegerField()
        author = peewee.TextField()
        comment = peewee.TextField()
        mtime = peewee.DateTimeField()
        is_empty = peewee.BooleanField()
        is_head = peewee.BooleanField()
        payload = peewee.BlobField(null=True)

        class Meta:
            primary_key = peewee.CompositeKey("key", "version")
            table_name = _table()

    Row._meta.database = database

    def default(value):
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value).decode("utf-8")
        if isinstance(value, datetime):
            return value.isoformat()
        raise TypeError(type(value).__name__)

    @app.get("/diary/")
    @app.get("/diary")
    def listing():
        database.connect(reuse_if_open=True)
        heads = {}
        for row in Row.select().where(Row.is_head == True):  # noqa: E712
            meta = model_to_dict(row)
            del meta["payload"], meta["is_head"]
            heads[bytes(row.key).decode("utf-8")] = meta
        return Response(json.dumps(heads, default=default), 200, mimetype="application/json")

    return app


naive_peewee_list = _make_naive_peewee_list()
