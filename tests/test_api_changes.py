"""The API's diff, revert and dry run, over SQLite and MySQL (the ``client`` fixture), and the
same access rules as every route."""

from __future__ import annotations

import contextlib
import json
import logging

import pytest

from flask import Flask

from rainer_server import Commit
from rainer_server import Rainer
from rainer_server import create_app
from rainer_server.storage.memory import MemoryCommitStorage
from tests.live import TEST_SECRET_KEY

AUTHOR = {"X-Rainer-Author": "alice"}


def post(client, key, version, body=b'{"a": 1}\n', query="", **headers):
    headers = {**AUTHOR, **{k.replace("_", "-"): v for k, v in headers.items()}}
    return client.post(f"/diary/{key}/{version}{query}", data=body, headers=headers)


def history(client, key):
    return client.get(f"/diary/{key}/history").get_json()


@contextlib.contextmanager
def audit_lines():
    lines: list[dict] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(json.loads(record.getMessage()))

    keep = Keep()
    logger = logging.getLogger("rainer.audit")
    logger.addHandler(keep)
    try:
        yield lines
    finally:
        logger.removeHandler(keep)


# ---------------------------------------------------------------------- diff


@pytest.fixture
def pool(client):
    """web.pool: 1 {"size": 10}, 2 {"size": 20, "max": 30}, 3 deleted, 4 {"size": 5}."""
    assert post(client, "web.pool", 1, b'{\n  "size": 10\n}\n', X_Rainer_Comment="first").status_code == 200
    post(client, "web.pool", 2, b'{\n  "size": 20,\n  "max": 30\n}\n', X_Rainer_Author="bob")
    post(client, "web.pool", 3, b"", X_Rainer_Empty="yes")
    post(client, "web.pool", 4, b'{\n  "size": 5\n}\n')
    return client


def test_diff_as_text_names_both_versions(pool):
    metas = {m["version"]: m for m in history(pool, "web.pool")}
    r = pool.get("/diary/web.pool/diff?from=1&to=2")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    assert r.data.decode() == (
        f"--- web.pool version 1 by alice at {metas[1]['mtime']}\n"
        f"+++ web.pool version 2 by bob at {metas[2]['mtime']}\n"
        "@@ -1,3 +1,4 @@\n"
        " {\n"
        '-  "size": 10\n'
        '+  "size": 20,\n'
        '+  "max": 30\n'
        " }\n"
    )


def test_diff_defaults_to_the_last_change_and_tombstones_diff_as_empty(pool):
    last = pool.get("/diary/web.pool/diff").data.decode()
    assert last.startswith("--- web.pool version 3 (deleted) by alice at ")
    assert "\n+++ web.pool version 4 by alice at " in last
    assert last.endswith('@@ -0,0 +1,3 @@\n+{\n+  "size": 5\n+}\n')
    deleting = pool.get("/diary/web.pool/diff?to=3").data.decode()
    assert "version 2 by bob" in deleting and "-  \"max\": 30\n" in deleting
    assert "\n+" not in deleting.split("@@", 1)[1]
    first = pool.get("/diary/web.pool/diff?to=1").data.decode()
    assert first.startswith("--- web.pool (nothing before version 1)\n+++ web.pool version 1 ")
    # Any two versions, either way round; the same payload diffs as the header alone.
    backwards = pool.get("/diary/web.pool/diff?from=4&to=1").data.decode()
    assert '-  "size": 5\n+  "size": 10\n' in backwards
    same = pool.get("/diary/web.pool/diff?from=2&to=2").data.decode()
    assert same.count("\n") == 2 and same.startswith("--- web.pool version 2")


def test_diff_as_json(pool):
    r = pool.get("/diary/web.pool/diff?from=1&to=2&format=json")
    assert r.status_code == 200 and r.mimetype == "application/json"
    answer = r.get_json()
    assert answer["key"] == "web.pool"
    assert answer["from"]["version"] == 1 and answer["from"]["comment"] == "first"
    assert answer["to"] == pool.get("/diary/web.pool/2/meta").get_json()
    assert answer["lines"] == [
        {"kind": "hunk", "old_line": None, "new_line": None, "text": "@@ -1,3 +1,4 @@", "newline": True},
        {"kind": "context", "old_line": 1, "new_line": 1, "text": "{", "newline": True},
        {"kind": "removed", "old_line": 2, "new_line": None, "text": '  "size": 10', "newline": True},
        {"kind": "added", "old_line": None, "new_line": 2, "text": '  "size": 20,', "newline": True},
        {"kind": "added", "old_line": None, "new_line": 3, "text": '  "max": 30', "newline": True},
        {"kind": "context", "old_line": 3, "new_line": 4, "text": "}", "newline": True},
    ]
    first = pool.get("/diary/web.pool/diff?to=1&format=json").get_json()
    assert first["from"] is None and [x["kind"] for x in first["lines"]] == ["hunk"] + ["added"] * 3


def test_diff_context(client):
    body = b"".join(b"%d\n" % n for n in range(1, 31))
    post(client, "long", 1, b"[\n" + body.replace(b"\n", b",\n") + b"0\n]\n")
    post(client, "long", 2, b"[\n" + body.replace(b"\n", b",\n").replace(b"15,", b"150,") + b"0\n]\n")
    lines = client.get("/diary/long/diff?format=json").get_json()["lines"]
    assert len(lines) == 1 + 3 + 2 + 3
    lines = client.get("/diary/long/diff?format=json&context=0").get_json()["lines"]
    assert [x["kind"] for x in lines] == ["hunk", "removed", "added"]
    whole = client.get("/diary/long/diff?format=json&context=100000").get_json()["lines"]
    assert len(whole) == 1 + 32 + 2  # every unchanged line, and the change


def test_diff_errors(pool):
    assert pool.get("/diary/nothing/diff").status_code == 404
    assert pool.get("/diary/web.pool/diff?to=9").get_json() == {"error": "Key not found"}
    assert pool.get("/diary/web.pool/diff?from=9").status_code == 404
    for query in ("to=0", "to=x", "from=-1", "from=1.5", "to=", "format=html", "context=-1"):
        r = pool.get(f"/diary/web.pool/diff?{query}")
        assert r.status_code == 400, query
        assert "Invalid" in r.get_json()["error"], query
    assert pool.get("/diary/a%2Fb/diff").status_code in (400, 404)


# ---------------------------------------------------------------------- revert


def test_revert_commits_the_old_payload_as_the_next_version(pool):
    r = post(pool, "web.pool", 5, b"", query="?revert_to=2", X_Rainer_Author="carol")
    assert r.status_code == 200, r.data
    meta = r.get_json()
    assert meta["version"] == 5 and meta["author"] == "carol" and meta["empty"] is False
    assert meta["comment"] == "Revert to version 2"
    assert pool.get("/diary/web.pool").data == pool.get("/diary/web.pool/2").data
    # History keeps everything; a comment of one's own replaces the default.
    assert [m["version"] for m in history(pool, "web.pool")] == [5, 4, 3, 2, 1]
    r = post(pool, "web.pool", 6, b"", query="?revert_to=1", X_Rainer_Comment="20 overloads the db")
    assert r.get_json()["comment"] == "20 overloads the db"
    assert pool.get("/diary/web.pool").data == b'{\n  "size": 10\n}\n'


def test_reverting_to_a_tombstone_deletes_and_reverting_a_deleted_key_restores_it(pool):
    deleted = post(pool, "web.pool", 5, b"", query="?revert_to=3")
    assert deleted.status_code == 200 and deleted.get_json()["empty"] is True
    assert "web.pool" not in pool.get("/diary").get_json()
    restored = post(pool, "web.pool", 6, b"", query="?revert_to=4")
    assert restored.get_json()["empty"] is False
    assert pool.get("/diary").get_json()["web.pool"]["version"] == 6
    assert pool.get("/diary/web.pool").data == b'{\n  "size": 5\n}\n'


def test_revert_is_ordered_like_any_post(pool):
    stale = post(pool, "web.pool", 4, b"", query="?revert_to=1")
    assert stale.status_code == 409
    assert stale.get_json() == {"conflict": {"key": "web.pool", "expectedVersion": 5, "providedVersion": 4}}
    assert post(pool, "web.pool", 6, b"", query="?revert_to=1").status_code == 409
    assert [m["version"] for m in history(pool, "web.pool")][0] == 4


def test_revert_errors(pool):
    assert post(pool, "web.pool", 5, b"", query="?revert_to=9").get_json() == {"error": "Key not found"}
    assert post(pool, "nothing", 1, b"", query="?revert_to=1").status_code == 404
    for query in ("?revert_to=0", "?revert_to=x", "?revert_to="):
        r = post(pool, "web.pool", 5, b"", query=query)
        assert r.status_code == 400 and "revert_to" in r.get_json()["error"], query
    with_body = post(pool, "web.pool", 5, b'{"x": 1}', query="?revert_to=1")
    assert with_body.status_code == 400 and "empty body" in with_body.get_json()["error"]
    tombstone = post(pool, "web.pool", 5, b"", query="?revert_to=1", X_Rainer_Empty="yes")
    assert tombstone.status_code == 400
    assert history(pool, "web.pool")[0]["version"] == 4


def test_a_reverted_payload_is_validated_like_a_new_one():
    """A payload the format (or a schema) no longer accepts is not brought back by a revert."""
    storage = MemoryCommitStorage()
    storage.save(Commit.from_bytes("k", 1, b"\xff written before JSON was required", "old", ""))
    app = Flask(__name__)
    Rainer(app, storage=storage, environ={})
    client = app.test_client()
    assert post(client, "k", 2, b"{}").status_code == 200
    r = post(client, "k", 3, b"", query="?revert_to=1")
    assert r.status_code == 400 and r.get_json()["error"].startswith("Malformed input: not UTF-8")
    assert storage.get("k").version == 2


# ---------------------------------------------------------------------- dry run


def test_a_dry_run_answers_the_meta_and_stores_nothing(pool):
    with audit_lines() as lines:
        r = post(pool, "web.pool", 5, b'{"size": 7}', query="?dry_run=yes", X_Rainer_Comment="try")
    assert r.status_code == 200 and r.headers["X-Rainer-Dry-Run"] == "yes"
    meta = r.get_json()
    assert (meta["key"], meta["version"], meta["author"], meta["comment"], meta["empty"]) == (
        "web.pool", 5, "alice", "try", False)
    assert history(pool, "web.pool")[0]["version"] == 4
    assert pool.get("/diary/web.pool").data == b'{\n  "size": 5\n}\n'
    assert not [e for e in lines if e["decision"] == "committed"]
    # A dry run of a revert, of a tombstone, of a new key.
    assert post(pool, "web.pool", 5, b"", query="?revert_to=3&dry_run=yes").get_json()["empty"] is True
    assert post(pool, "web.pool", 5, b"", query="?dry_run=1", X_Rainer_Empty="yes").status_code == 200
    assert post(pool, "fresh", 1, query="?dry_run=true").get_json()["version"] == 1
    assert pool.get("/diary/fresh").status_code == 404
    assert history(pool, "web.pool")[0]["version"] == 4
    # Then the real thing.
    with audit_lines() as lines:
        assert post(pool, "web.pool", 5, b'{"size": 7}').status_code == 200
    assert [e["decision"] for e in lines] == ["committed"]


BAD_WRITES = {
    "stale version": dict(version=2),
    "a gap": dict(version=9),
    "version 0": dict(version=0),
    "huge version": dict(version=99999999999),
    "not JSON": dict(body=b"{nope"),
    "no author": dict(headers={"X-Rainer-Author": None}),
    "empty with a body": dict(headers={"X-Rainer-Empty": "yes"}),
    "bad empty header": dict(headers={"X-Rainer-Empty": "maybe"}),
    "bad mtime": dict(headers={"X-Rainer-Modified-Time": "yesterday"}),
    "key header mismatch": dict(headers={"X-Rainer-Key": "other"}),
    "too large": dict(body=b'"' + b"x" * 2000 + b'"'),
    "invalid key": dict(key="a%00b"),
    "revert to nothing": dict(body=b"", query="&revert_to=99"),
}


@pytest.mark.parametrize("case", BAD_WRITES)
def test_a_dry_run_gives_the_error_a_real_post_gives(app_config, case):
    app = create_app({"TESTING": True, **app_config, "RAINER_MAX_PAYLOAD_BYTES": 1000})
    try:
        client = app.test_client()
        post(client, "k", 1)
        post(client, "k", 2)
        spec = BAD_WRITES[case]
        headers = {**AUTHOR, **spec.get("headers", {})}
        headers = {k: v for k, v in headers.items() if v is not None}
        url = f"/diary/{spec.get('key', 'k')}/{spec.get('version', 3)}"
        body = spec.get("body", b'{"a": 2}')
        extra = spec.get("query", "")
        dry = client.post(f"{url}?dry_run=yes{extra}", data=body, headers=headers)
        assert 400 <= dry.status_code < 500, dry.data
        assert history(client, "k")[0]["version"] == 2
        real = client.post(f"{url}?dry_run=no{extra}", data=body, headers=headers)
        assert (dry.status_code, dry.get_json()) == (real.status_code, real.get_json())
        assert history(client, "k")[0]["version"] == 2
    finally:
        app.extensions["rainer"].close()


# ---------------------------------------------------------------------- access


POLICY = """
rules:
  - keys: "hidden.*"
    read: [admin]
    write: [admin]
  - keys: "*"
    read: ["*"]
    write: [writer]
"""


@pytest.fixture
def guarded(app_config, tmp_path):
    (tmp_path / "policy.yaml").write_text(POLICY)
    app = create_app({
        "TESTING": True, **app_config, "RAINER_AUTH": "proxy",
        "RAINER_POLICY": str(tmp_path / "policy.yaml"), "RAINER_SECRET_KEY": TEST_SECRET_KEY,
    })
    client = app.test_client()
    for key in ("open.k", "hidden.k"):
        who = {"X-Remote-User": "admin" if key.startswith("hidden") else "writer"}
        assert client.post(f"/diary/{key}/1", data=b"1", headers=who).status_code == 200
        assert client.post(f"/diary/{key}/2", data=b"2", headers=who).status_code == 200
    yield client
    app.extensions["rainer"].close()


def test_diff_needs_read_and_revert_and_dry_run_need_write(guarded):
    as_ = lambda who: {"X-Remote-User": who} if who else {}  # noqa: E731
    assert guarded.get("/diary/hidden.k/diff", headers=as_("reader")).status_code == 403
    assert guarded.get("/diary/hidden.k/diff").status_code == 401
    assert guarded.get("/diary/hidden.k/diff", headers=as_("admin")).status_code == 200
    assert guarded.get("/diary/open.k/diff").status_code == 200
    for query in ("?revert_to=1", "?dry_run=yes", "?revert_to=1&dry_run=yes"):
        refused = guarded.post(f"/diary/open.k/3{query}", data=b"" if "revert" in query else b"3",
                               headers=as_("reader"))
        assert refused.status_code == 403, query
        assert guarded.post(f"/diary/open.k/3{query}", data=b"").status_code == 401
    # The author is the identity, for a revert as for any commit.
    r = guarded.post("/diary/open.k/3?revert_to=1", data=b"", headers=as_("writer"))
    assert r.status_code == 200 and r.get_json()["author"] == "writer"
    assert guarded.get("/diary/open.k/history").get_json()[0]["identity"] == "writer"
    other = guarded.post("/diary/open.k/4?revert_to=2", data=b"",
                         headers={**as_("writer"), "X-Rainer-Author": "someone"})
    assert other.status_code == 403 and other.get_json() == {"error": "Author must be writer"}
