"""The HTTP API (spec §4) through Flask's test client, over SQLite and MySQL."""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import datetime
from datetime import timezone
from urllib.parse import quote
from urllib.parse import unquote_to_bytes

import pytest

from rainer_server import Commit
from rainer_server import MemoryCommitStorage
from rainer_server import create_app
from rainer_server.payloads import BytesPayloads

AUTHOR = {"X-Rainer-Author": "alice"}


def post(client, key, version, body=b'{"a":1}', **headers):
    headers = {**AUTHOR, **{k.replace("_", "-"): v for k, v in headers.items()}}
    return client.post(f"/diary/{key}/{version}", data=body, headers=headers)


def assert_error(response, status, message):
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    assert message in response.get_json()["error"]
    assert b"Traceback" not in response.data


# ------------------------------------------------------------------ writes


def test_post_returns_the_new_meta(client):
    r = post(client, "svc", 1, b'{"threads": 4}', X_Rainer_Comment="first")
    assert r.status_code == 200 and r.mimetype == "application/json"
    meta = r.get_json()
    assert meta["key"] == "svc" and meta["version"] == 1
    assert meta["author"] == "alice" and meta["comment"] == "first"
    assert meta["empty"] is False
    assert meta["mtime"].endswith("Z") and len(meta["mtime"]) == 24


def test_post_keeps_bytes_exactly(client):
    body = b'{\n  "z": 1,\n  "a": [1, 2.50, "\xc3\xa9"]\n}\n'
    post(client, "exact", 1, body)
    r = client.get("/diary/exact")
    assert r.data == body
    assert r.headers["Content-Type"] == "text/plain; charset=UTF-8"


def test_post_with_explicit_mtime_and_matching_headers(client):
    r = post(
        client,
        "k",
        1,
        X_Rainer_Modified_Time="2014-01-02T03:04:05.006Z",
        X_Rainer_Key="k",
        X_Rainer_Version="1",
    )
    assert r.status_code == 200
    assert r.get_json()["mtime"] == "2014-01-02T03:04:05.006Z"
    r = post(client, "k", 2, X_Rainer_Modified_Time="2014-01-02T04:04:05.006+01:00")
    assert r.get_json()["mtime"] == "2014-01-02T03:04:05.006Z"


def test_version_conflicts_are_409_with_the_original_body(client):
    post(client, "k", 1)
    for bad in ("1", "3", "0", "99999999999999999999"):
        r = post(client, "k", bad)
        assert r.status_code == 409, bad
        assert r.get_json() == {
            "conflict": {"key": "k", "expectedVersion": 2, "providedVersion": int(bad)}
        }
    assert client.get("/diary/k/meta").get_json()["version"] == 1


def test_first_commit_must_be_version_one(client):
    r = post(client, "new", 2)
    assert r.status_code == 409
    assert r.get_json()["conflict"]["expectedVersion"] == 1


@pytest.mark.parametrize("value", ["True", "true", "YES", "1"])
def test_tombstone_as_pyrainer_sends_it(client, value):
    post(client, "k", 1)
    r = client.post(
        "/diary/k/2",
        data=b"",
        headers={**AUTHOR, "X-Rainer-Empty": value, "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200 and r.get_json()["empty"] is True
    got = client.get("/diary/k")
    assert got.status_code == 200 and got.data == b""
    assert got.headers["X-Rainer-Empty"] == "Yes"
    assert "k" not in client.get("/diary").get_json()
    assert client.get("/diary?all=yes").get_json()["k"]["empty"] is True


@pytest.mark.parametrize("value", ["false", "No", "0"])
def test_empty_false_values(client, value):
    r = post(client, "k", 1, X_Rainer_Empty=value)
    assert r.status_code == 200 and r.get_json()["empty"] is False


# ------------------------------------------------------------------ bad writes


def test_missing_author(client):
    r = client.post("/diary/k/1", data=b"{}")
    assert_error(r, 400, "Missing header: X-Rainer-Author")


def test_malformed_empty_header(client):
    assert_error(post(client, "k", 1, X_Rainer_Empty="maybe"), 400, "Malformed header: X-Rainer-Empty")


def test_empty_with_body(client):
    r = post(client, "k", 1, b"{}", X_Rainer_Empty="yes")
    assert_error(r, 400, "Empty payload required with X-Rainer-Empty")


def test_header_key_and_version_must_match(client):
    assert_error(post(client, "k", 1, X_Rainer_Key="other"), 400, "X-Rainer-Key must match URL key, or be omitted")
    assert_error(
        post(client, "k", 1, X_Rainer_Version="2"), 400, "X-Rainer-Version must match URL version, or be omitted"
    )


@pytest.mark.parametrize("mtime", ["yesterday", "99999-01-01", "0001-01-01T00:00:00+05:00", "2014-13-01"])
def test_malformed_mtime_names_the_header(client, mtime):
    assert_error(post(client, "k", 1, X_Rainer_Modified_Time=mtime), 400, "X-Rainer-Modified-Time")


def test_huge_numbers_in_urls_are_not_server_errors(client):
    post(client, "k", 1)
    huge = "9" * 30
    for url in (f"/diary/k/{huge}", f"/diary/k/{huge}/meta"):
        assert_error(client.get(url), 404, "Key not found")
    assert client.get(f"/diary/k/history?before={huge}").get_json()[0]["version"] == 1
    assert post(client, "k", huge).status_code == 409


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b"NaN", b"\xff\xfe", b'{"a": 1} trailing'])
def test_malformed_json_payload(client, body):
    r = post(client, "k", 1, body)
    assert_error(r, 400, "Malformed input: ")
    assert client.get("/diary/k").status_code == 404


@pytest.mark.parametrize("version", ["x", "1.0", "-1", "+1", "\u0663", " 1", "1e3"])
def test_non_numeric_versions_are_client_errors(client, version):
    r = client.post(f"/diary/k/{version}", data=b"{}", headers=AUTHOR)
    assert r.status_code in (400, 404)
    r = client.get(f"/diary/k/{version}")
    assert r.status_code in (400, 404)
    assert b"Traceback" not in r.data


@pytest.mark.parametrize(
    "key",
    ["%00", "a%0Ab", "%7F", "%C2%85", "k" * 256, "é" * 128, ".", ".."],
)
def test_invalid_keys_are_400(client, key):
    r = client.post(f"/diary/{key}/1", data=b"{}", headers=AUTHOR)
    assert r.status_code in (400, 404), (key, r.status_code)
    assert b"Traceback" not in r.data
    assert client.get("/diary?all=yes").get_json() == {}


def test_keys_are_byte_for_byte(client):
    for i, key in enumerate(["a", "A", "a%20", "%C3%A9", "e"]):
        assert post(client, key, 1, b'{"i":%d}' % i).status_code == 200
    listing = client.get("/diary").get_json()
    assert sorted(listing) == sorted(["a", "A", "a ", "é", "e"])
    assert client.get("/diary/%C3%A9").data == b'{"i":3}'


@pytest.mark.parametrize("raw", ["%FF", "%ED%A0%80", "%C3", "a%80b", "%C0%AF"])
def test_keys_that_are_not_utf8_are_400_never_another_key(client, raw):
    # Decoded with replacement, each of these would be a key with U+FFFD in it, which is a
    # real key of its own: it must not be reachable under other bytes.
    replaced = quote(unquote_to_bytes(raw).decode("utf-8", "replace"), safe="")
    assert post(client, replaced, 1, b'{"other": "key"}').status_code == 200
    for response in (
        post(client, raw, 1),
        post(client, raw, 2),
        client.get(f"/diary/{raw}"),
        client.get(f"/diary/{raw}/meta"),
        client.get(f"/diary/{raw}/1"),
        client.get(f"/diary/{raw}/1/meta"),
        client.get(f"/diary/{raw}/history"),
    ):
        assert_error(response, 400, "Key must be valid UTF-8")
    assert client.get(f"/diary/{replaced}/meta").get_json()["version"] == 1
    assert len(client.get("/diary?all=yes").get_json()) == 1


@pytest.mark.parametrize("version", ["01", "00", "007", "0001"])
def test_versions_have_one_spelling(client, version):
    post(client, "k", 1)
    post(client, "k", 2)
    for response in (
        post(client, "k", version),
        client.get(f"/diary/k/{version}"),
        client.get(f"/diary/k/{version}/meta"),
    ):
        assert_error(response, 400, f"Invalid version '{version}'")
    assert_error(
        post(client, "k", 3, X_Rainer_Version="0" + "3"),
        400,
        "X-Rainer-Version must match URL version, or be omitted",
    )
    assert post(client, "k", 3, X_Rainer_Version="3").status_code == 200
    # "0" is canonical and answers as before: never the next version, never stored.
    assert post(client, "k", "0").status_code == 409
    assert_error(client.get("/diary/k/0"), 404, "Key not found")


def test_the_mirror_fast_path_never_answers_for_another_key(app):
    from rainer_server.web.context import get_rainer

    # A mirror holding the key U+FFFD (ZooKeeper refuses that name, but the fast path must
    # not rely on it): %FF must not reach it, %EF%BF%BD must.
    commit = Commit("\ufffd", 1, b'{"replacement": 1}', "a", "", datetime.now(timezone.utc))

    class Complete:
        current = {"\ufffd": commit}
        initialized = True

        def close(self) -> None:
            pass

    rainer = get_rainer(app)
    rainer.mirror = Complete()  # type: ignore[assignment]
    rainer.cached_view = lambda: Complete()  # type: ignore[method-assign]
    client = app.test_client()
    hit = client.get("/diary/%EF%BF%BD")
    assert hit.status_code == 200 and hit.headers["X-Rainer-Cached"] == "Yes"
    for raw in ("%FF", "%ED%A0%80", "%EF%BF"):
        assert_error(client.get(f"/diary/{raw}"), 400, "Key must be valid UTF-8")


def test_payload_limit_is_413_and_saves_nothing(client, app):
    rainer = app.extensions["rainer"]
    rainer.settings = dataclasses.replace(rainer.settings, max_payload_bytes=100)
    big = b'{"a":"' + b"x" * 200 + b'"}'
    assert_error(post(client, "big", 1, big), 413, "Payload too large")
    assert client.get("/diary/big").status_code == 404
    assert post(client, "small", 1, b'{"a":"' + b"x" * 80 + b'"}').status_code == 200


def test_unicode_author_and_multiline_comment_survive(client):
    r = client.post(
        "/diary/k/1",
        data=b"{}",
        headers={"X-Rainer-Author": "Zoë".encode("utf-8").decode("latin-1"), "X-Rainer-Comment": "café"},
    )
    assert r.status_code == 200
    meta = client.get("/diary/k/meta").get_json()
    assert meta["author"] == "Zoë" and meta["comment"] == "café"
    got = client.get("/diary/k")
    assert got.headers["X-Rainer-Author"] == "Zo%C3%AB"
    assert got.headers["X-Rainer-Comment"] == "caf%C3%A9"
    assert got.headers["X-Rainer-Header-Encoding"] == "percent"


def test_percent_encoded_request_headers(client):
    headers = {
        "X-Rainer-Header-Encoding": "percent",
        "X-Rainer-Author": "Zo%C3%AB",
        "X-Rainer-Comment": "two%0Alines, 100%25",
        "X-Rainer-Key": "k%20x",
    }
    assert client.post("/diary/k%20x/1", data=b"{}", headers=headers).status_code == 200
    meta = client.get("/diary/k%20x/meta").get_json()
    assert meta["author"] == "Zoë" and meta["comment"] == "two\nlines, 100%"
    plain = client.get("/diary/k%20x")
    assert plain.headers["X-Rainer-Comment"] == "two%0Alines, 100%25"
    # Without the marker a '%' is literal, both ways.
    post(client, "p", 1, X_Rainer_Comment="50% off")
    r = client.get("/diary/p")
    assert r.headers["X-Rainer-Comment"] == "50% off" and "X-Rainer-Header-Encoding" not in r.headers
    assert_error(
        client.post("/diary/k%20x/2", data=b"{}", headers={**headers, "X-Rainer-Header-Encoding": "base64"}),
        400,
        "Malformed header: X-Rainer-Header-Encoding",
    )
    assert_error(
        client.post("/diary/k%20x/2", data=b"{}", headers={**headers, "X-Rainer-Author": "%FF"}),
        400,
        "Malformed header: X-Rainer-Author",
    )


# ------------------------------------------------------------------ reads


def test_get_payload_and_headers(client):
    post(client, "k", 1, b'{"v":1}', X_Rainer_Comment="one")
    post(client, "k", 2, b'{"v":2}', X_Rainer_Comment="two")
    r = client.get("/diary/k")
    assert r.data == b'{"v":2}'
    assert r.headers["X-Rainer-Key"] == "k"
    assert r.headers["X-Rainer-Version"] == "2"
    assert r.headers["X-Rainer-Author"] == "alice"
    assert r.headers["X-Rainer-Comment"] == "two"
    assert r.headers["X-Rainer-Empty"] == "No"
    assert r.headers["X-Rainer-Modified-Time"].endswith("Z")
    old = client.get("/diary/k/1")
    assert old.data == b'{"v":1}' and old.headers["X-Rainer-Comment"] == "one"
    assert client.get("/diary/k/1/meta").get_json()["comment"] == "one"
    assert client.get("/diary/k/meta").get_json()["version"] == 2


def test_binary_payload_is_octet_stream(app):
    app.extensions["rainer"].payloads = BytesPayloads()
    client = app.test_client()
    assert post(client, "bin", 1, b"\xff\x00\x01").status_code == 200
    r = client.get("/diary/bin")
    assert r.data == b"\xff\x00\x01" and r.mimetype == "application/octet-stream"
    listing = client.get("/diary?payload_base64=yes").get_json()
    assert base64.b64decode(listing["bin"]["payload_base64"]) == b"\xff\x00\x01"


def test_not_found(client):
    for url in ("/diary/nope", "/diary/nope/meta", "/diary/nope/1", "/diary/nope/1/meta"):
        assert_error(client.get(url), 404, "Key not found")
    post(client, "k", 1)
    assert_error(client.get("/diary/k/2"), 404, "Key not found")
    assert_error(client.get("/diary/k/0/meta"), 404, "Key not found")


def test_list_with_payloads(client):
    post(client, "b", 1, b'{"b":1}')
    post(client, "a", 1, b'{"a":1}')
    post(client, "a", 2, b'{"a":2}')
    listing = client.get("/diary").get_json()
    assert list(listing) == ["a", "b"]
    assert listing["a"]["version"] == 2 and "payload_utf8" not in listing["a"]
    full = client.get("/diary?payload_utf8=yes&payload_base64=TRUE").get_json()
    assert full["a"]["payload_utf8"] == '{"a":2}'
    assert base64.b64decode(full["b"]["payload_base64"]) == b'{"b":1}'
    assert client.get("/diary/").get_json() == listing


def test_list_is_revalidated_after_every_write(client):
    assert client.get("/diary").get_json() == {}
    for version in range(1, 4):
        post(client, "k", version, b'{"v":%d}' % version)
        assert client.get("/diary?payload_utf8=1").get_json()["k"]["payload_utf8"] == '{"v":%d}' % version
    etag = client.get("/diary").headers["ETag"]
    assert client.get("/diary", headers={"If-None-Match": etag}).status_code == 304
    post(client, "k", 4)
    assert client.get("/diary", headers={"If-None-Match": etag}).status_code == 200


@pytest.mark.parametrize("param", ["all", "payload_utf8", "payload_base64"])
def test_bad_boolean_parameters(client, param):
    assert_error(client.get(f"/diary?{param}=perhaps"), 400, f"Invalid '{param}' parameter (should be boolean)")


def test_unknown_routes_and_methods(client):
    assert client.get("/nothing/here").status_code == 404
    assert client.get("/diary/a/1/meta/x").status_code == 404
    r = client.delete("/diary/k/1")
    assert r.status_code == 405 and r.mimetype == "application/json"
    assert client.put("/diary/k").status_code == 405


# ------------------------------------------------------------------ payload formats


@pytest.mark.parametrize(
    "payload_format, good, bad",
    [
        ("yaml", b"a: 1\nb: [x, y]\n", b"a: [1\n"),
        ("text", "h\u00e9llo".encode(), b"\xff"),
        ("json", b"[1, 2]", b"[1, 2"),
    ],
)
def test_payload_formats(tmp_path, payload_format, good, bad):
    app = create_app(
        {"RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/f.db", "RAINER_PAYLOAD_FORMAT": payload_format}
    )
    client = app.test_client()
    assert post(client, "k", 1, good).status_code == 200
    assert client.get("/diary/k").data == good
    assert_error(post(client, "k", 2, bad), 400, "Malformed input: ")


def test_per_key_schemas(tmp_path):
    app = create_app(
        {
            "RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/s.db",
            "RAINER_PAYLOAD_SCHEMAS": {"pipelines.*": "tests.schemas:PipelineSchema"},
        }
    )
    client = app.test_client()
    assert post(client, "pipelines.ingest", 1, b'{"name": "ingest", "workers": 3}').status_code == 200
    r = post(client, "pipelines.ingest", 2, b'{"name": "ingest", "workers": "many"}')
    assert_error(r, 400, "Malformed input: ")
    assert r.get_json()["messages"] == {"workers": ["Not a valid integer."]}
    assert post(client, "other", 1, b'{"workers": "many"}').status_code == 200


# ------------------------------------------------------------------ app and extension


def test_create_app_opens_no_connections(tmp_path):
    db_file = tmp_path / "lazy.db"
    app = create_app({"RAINER_DATABASE_URL": f"sqlite:///{db_file}"})
    assert not db_file.exists()
    app.test_client().get("/diary")
    assert db_file.exists()


def test_url_prefix_setting(tmp_path):
    app = create_app({"RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/p.db", "RAINER_URL_PREFIX": "/config/v1"})
    client = app.test_client()
    assert client.post("/config/v1/k/1", data=b"{}", headers=AUTHOR).status_code == 200
    assert client.get("/config/v1/k").data == b"{}"
    assert client.get("/diary/k").status_code == 404


def test_embedding_in_an_existing_app():
    from flask import Flask

    from rainer_server import Rainer

    host = Flask("host")
    host.config["RAINER_URL_PREFIX"] = "/settings"

    @host.get("/hello")
    def hello():
        return "hi"

    storage = MemoryCommitStorage()
    Rainer(host, storage=storage)
    client = host.test_client()
    assert client.get("/hello").data == b"hi"
    assert client.post("/settings/k/1", data=b"[]", headers=AUTHOR).status_code == 200
    assert storage.get("k").payload == b"[]"


@pytest.mark.parametrize(
    "name, value",
    [
        ("RAINER_MAX_PAYLOAD_BYTES", "lots"),
        ("RAINER_PAYLOAD_FORMAT", "xml"),
        ("RAINER_URL_PREFIX", "diary/"),
        ("RAINER_DATABASE_URL", "postgres://x/y"),
        ("RAINER_TABLE", "drop table;"),
    ],
)
def test_bad_settings_stop_startup_naming_the_setting(name, value):
    from rainer_server import ConfigurationError

    with pytest.raises(ConfigurationError) as info:
        create_app({name: value})
    assert name in str(info.value) and "\n" not in str(info.value)


def test_environment_and_settings_file(tmp_path, monkeypatch):
    settings_file = tmp_path / "rainer.cfg"
    settings_file.write_text('RAINER_URL_PREFIX = "/from-file"\nRAINER_TABLE = "file_table"\n')
    monkeypatch.setenv("RAINER_CONFIG", str(settings_file))
    monkeypatch.setenv("RAINER_TABLE", "env_table")
    monkeypatch.setenv("RAINER_DATABASE_URL", f"sqlite:///{tmp_path}/env.db")
    settings = create_app().extensions["rainer"].settings
    assert settings.url_prefix == "/from-file"
    assert settings.table == "env_table"  # the environment wins over the file


def test_responses_are_json_even_for_unexpected_errors(app):
    class Broken(MemoryCommitStorage):
        def get(self, key, version=None):
            raise RuntimeError("boom with secrets")

    rainer = app.extensions["rainer"]
    rainer._database_storage, rainer._database_started = Broken(), True
    r = app.test_client().get("/diary/k")
    assert r.status_code == 500
    assert r.get_json() == {"error": "Internal server error"}
    assert json.dumps(r.get_json()).find("secrets") == -1


# ------------------------------------------------------------------ history


def test_history_pages_newest_first(client):
    for version in range(1, 6):
        post(client, "h", version, b'{"v":%d}' % version, X_Rainer_Comment=f"c{version}")
    client.post("/diary/h/6", data=b"", headers={**AUTHOR, "X-Rainer-Empty": "yes"})
    r = client.get("/diary/h/history")
    assert r.status_code == 200 and r.mimetype == "application/json"
    assert [m["version"] for m in r.get_json()] == [6, 5, 4, 3, 2, 1]
    assert r.get_json()[0]["empty"] is True and r.get_json()[1]["comment"] == "c5"
    page = client.get("/diary/h/history?limit=2&before=5").get_json()
    assert [m["version"] for m in page] == [4, 3]
    assert client.get("/diary/h/history?before=1").get_json() == []


def test_history_errors(client):
    assert_error(client.get("/diary/none/history"), 404, "Key not found")
    post(client, "h", 1)
    for query in ("limit=0", "limit=1001", "limit=x", "before=-1", "before=1.5"):
        r = client.get(f"/diary/h/history?{query}")
        assert r.status_code == 400, query
        assert b"Invalid '" in r.data


def test_random_garbage_never_makes_a_server_error(client):
    """Seeded random keys, versions, headers and bodies: every answer is a 2xx or a 4xx."""
    import random
    from urllib.parse import quote

    rng = random.Random(20261124)
    alphabet = ["a", "é", "/", ".", "%", "\x00", "\n", " ", "9", "٣", "\ufffd", "😀", "\x85", "?", "#"]

    def text(n):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))

    for _ in range(300):
        key = quote(text(6), safe="") or "k"
        version = rng.choice(["1", "2", "0", "-1", text(3), "9" * rng.randint(1, 40)])
        headers = {
            name: text(8).encode("utf-8").decode("latin-1")
            for name in ("X-Rainer-Author", "X-Rainer-Comment", "X-Rainer-Empty", "X-Rainer-Modified-Time",
                         "X-Rainer-Key", "X-Rainer-Version")
            if rng.random() < 0.5
        }
        headers = {k: v.replace("\n", " ").replace("\x00", "") for k, v in headers.items()}
        body = rng.choice([b"", b"{}", b"[1]", text(10).encode("utf-8"), bytes(rng.randrange(256) for _ in range(8))])
        for response in (
            client.post(f"/diary/{key}/{version}", data=body, headers=headers),
            client.get(f"/diary/{key}/{version}"),
            client.get(f"/diary/{key}/{version}/meta"),
            client.get(f"/diary/{key}"),
            client.get(f"/diary/{key}/history?limit={quote(version)}&before={quote(version)}"),
            client.get(f"/diary?all={quote(text(3))}"),
        ):
            assert response.status_code < 500, (key, version, headers, body, response.data)
            assert b"Traceback" not in response.data


def test_versioned_reads_answer_without_flask_exactly_as_flask_does(client, app):
    # GET /<key>/<version> is answered by the WSGI fast path (rainer.web.middleware); with a
    # query string, Flask answers. Both must be the same answer.
    assert post(client, "k", 1, b'{"a":1}').status_code == 200
    assert post(client, "k", 2, '{"a":"\u00e9"}'.encode()).status_code == 200
    view = app.view_functions["rainer.get_version"]
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return view(*args, **kwargs)

    app.view_functions["rainer.get_version"] = counted
    for version in (1, 2):
        fast = client.get(f"/diary/k/{version}")
        assert calls == []
        flask = client.get(f"/diary/k/{version}?via=flask")
        assert len(calls) == 1
        calls.clear()
        assert fast.status_code == flask.status_code == 200
        assert fast.data == flask.data
        assert sorted(fast.headers.items()) == sorted(flask.headers.items())
    # What it leaves to Flask, which says why.
    assert_error(client.get("/diary/k/3"), 404, "Key not found")
    assert client.get("/diary/k/01").status_code == 400
    assert client.get("/diary/%FF/1").status_code == 400
    assert client.get("/diary/k/meta").status_code == 200  # a route, not a version
