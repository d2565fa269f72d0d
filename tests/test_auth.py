"""Identity and access control over HTTP: every route under every identity, counted.

The matrix test's oracle is written out by hand below (``EXPECTED``), not computed with the
policy code it checks.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from urllib.parse import quote

import pytest

from rainer_server import create_app
from rainer_server.commit import Commit
from tests.live import TEST_SECRET_KEY
from tests.zk_support import wait_until

POLICY = """
groups:
  readers: [rita]
rules:
  - keys: "team-a.*"
    read: [readers, wendy, pat]
    write: [wendy]
  - keys: "secret.*"
    read: [admin]
    write: [admin]
  - keys: "*"
    read: ["*"]
    write: [admin, deploy-bot]
act_as: [deploy-bot]
"""

KEYS = ["team-a.x", "team-a-evil.x", "TEAM-A.x", "secret.key", "public.key"]


def expected(identity: str | None, action: str, key: str) -> bool:
    """The policy above, by hand."""
    if key.startswith("team-a."):
        allowed = {"read": {"rita", "wendy", "pat"}, "write": {"wendy"}}[action]
        return identity in allowed
    if key.startswith("secret."):
        return identity == "admin"
    if action == "read":
        return True
    return identity in {"admin", "deploy-bot"}


# name -> (how the request is made, the identity the server must see; "invalid" = 401 always)
IDENTITIES = {
    "anonymous": ("none", None),
    "reader": ("token:rita", "rita"),
    "writer": ("token:wendy", "wendy"),
    "bot": ("token:deploy-bot", "deploy-bot"),
    "admin": ("token:admin", "admin"),
    "revoked": ("token:revoked-user", "invalid"),
    "expired": ("token:expired-user", "invalid"),
    "garbage": ("raw:Bearer rnr_not-a-real-token", "invalid"),
    # Another scheme is not a token: with proxy mode on, the caller is anonymous...
    "basic": ("raw:Basic YWxpY2U6cHc=", None),
    # ...or whom a trusted proxy names (it checked the password itself).
    "basic-proxied": ("basic-proxy:pat", "pat"),
    "proxied": ("proxy-trusted:pat", "pat"),
    "spoofed": ("proxy-untrusted:wendy", None),
}


def _make_app(config, tmp_path, extra=None):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    app = create_app(
        {
            "TESTING": True,
            **config,
            "RAINER_AUTH": "token,proxy",
            "RAINER_POLICY": str(policy),
            "RAINER_TRUSTED_PROXIES": "127.0.0.1/32",
            "RAINER_SECRET_KEY": TEST_SECRET_KEY,
            **(extra or {}),
        }
    )
    return app


@pytest.fixture
def auth_app(app_config, tmp_path):
    app = _make_app(app_config, tmp_path)
    yield app
    app.extensions["rainer"].close()


def _tokens(app) -> dict[str, str]:
    store = app.extensions["rainer"].gate.tokens
    tokens = {name: store.create(name) for name in ("rita", "wendy", "deploy-bot", "admin")}
    tokens["revoked-user"] = store.create("revoked-user")
    assert store.revoke("revoked-user")
    tokens["expired-user"] = store.create("expired-user", timedelta(seconds=-1))
    return tokens


def _environ(how: str, tokens: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(headers, environ) of a request made as ``how``."""
    kind, _, value = how.partition(":")
    if kind == "token":
        return {"Authorization": f"Bearer {tokens[value]}"}, {"REMOTE_ADDR": "127.0.0.1"}
    if kind == "raw":
        return {"Authorization": value}, {"REMOTE_ADDR": "127.0.0.1"}
    if kind == "basic-proxy":
        return ({"Authorization": "Basic cGF0OnB3", "X-Remote-User": value},
                {"REMOTE_ADDR": "127.0.0.1"})
    if kind == "proxy-trusted":
        return {"X-Remote-User": value}, {"REMOTE_ADDR": "127.0.0.1"}
    if kind == "proxy-untrusted":
        return {"X-Remote-User": value}, {"REMOTE_ADDR": "10.9.8.7"}
    return {}, {"REMOTE_ADDR": "127.0.0.1"}


def _seed(app, mirror: bool = False):
    """Version 1 of every key, through the service's own storage (it publishes to ZooKeeper
    when configured); returns the database storage to check against."""
    rainer = app.extensions["rainer"]
    for key in KEYS:
        rainer.storage.save(Commit.from_bytes(key, 1, b'{"secret": "%s"}' % key.encode(), "seed", ""))
    if mirror:
        _wait_mirrored(rainer)
    return rainer.database_storage


def _wait_mirrored(rainer):
    storage = rainer.database_storage
    wait_until(
        lambda: all(rainer.mirror.current.get(k) == storage.get(k) for k in KEYS),
        what="every key in the mirror",
    )


def _read_routes(key: str) -> list[str]:
    k = quote(key, safe="")
    return [f"/diary/{k}", f"/diary/{k}/meta", f"/diary/{k}/history", f"/diary/{k}/1",
            f"/diary/{k}/1/meta", f"/diary/{k}/history?payload_base64=yes"]


LISTINGS = ["/diary", "/diary/?all=yes", "/diary/?payload_utf8=yes&payload_base64=yes",
            "/diary/?all=yes&payload_base64=yes"]


def run_matrix(app, mirror: bool = False) -> dict[str, int]:
    """Every identity on every route and key; returns the counts. ``mirror``: wait for the
    mirror before each identity, so reads of heads take the mirror fast path."""
    rainer = app.extensions["rainer"]
    storage = _seed(app, mirror)
    tokens = _tokens(app)
    client = app.test_client()
    counts = dict(requests=0, unauthorized_successes=0, authorized_failures=0,
                  leaked_list_entries=0, wrong_status=0, cached_reads=0)
    problems: list[str] = []

    def note(kind: str, what: str) -> None:
        counts[kind] += 1
        problems.append(f"{kind}: {what}")

    for name, (how, identity) in IDENTITIES.items():
        if mirror:
            _wait_mirrored(rainer)
        headers, environ = _environ(how, tokens)
        invalid = identity == "invalid"
        who = None if invalid else identity
        for key in KEYS:
            for url in _read_routes(key):
                response = client.get(url, headers=headers, environ_base=environ)
                counts["requests"] += 1
                counts["cached_reads"] += response.headers.get("X-Rainer-Cached") == "Yes"
                allowed = not invalid and expected(who, "read", key)
                ok = response.status_code == 200
                if ok and not allowed:
                    note("unauthorized_successes", f"{name} GET {url}")
                if allowed and not ok:
                    note("authorized_failures", f"{name} GET {url} -> {response.status_code}")
                if not allowed:
                    want = 401 if invalid or who is None else 403
                    if response.status_code != want or b"\"secret\"" in response.data:
                        note("wrong_status", f"{name} GET {url} -> {response.status_code}")
            # A write: the next version, author omitted (it becomes the identity).
            head = storage.get(key).version
            response = client.post(f"/diary/{quote(key, safe='')}/{head + 1}",
                                   headers={**headers, "X-Rainer-Author": who or "someone"}
                                   if who is None else headers,
                                   data=b'{"by": "%s"}' % name.encode(), environ_base=environ)
            counts["requests"] += 1
            allowed = not invalid and expected(who, "write", key)
            ok = response.status_code == 200
            if ok and not allowed:
                note("unauthorized_successes", f"{name} POST {key}")
            if allowed and not ok:
                note("authorized_failures", f"{name} POST {key} -> {response.status_code}")
            if ok and storage.get(key).identity != who:
                note("wrong_status", f"{name} POST {key}: identity {storage.get(key).identity!r}")
            if not ok and storage.get(key).version != head:
                note("unauthorized_successes", f"{name} POST {key} changed the key")
            # A tombstone, then put the key back (as an admin) for the next identity.
            response = client.post(f"/diary/{quote(key, safe='')}/{storage.get(key).version + 1}",
                                   headers={**headers, "X-Rainer-Empty": "yes",
                                            **({"X-Rainer-Author": "x"} if who is None else {})},
                                   environ_base=environ)
            counts["requests"] += 1
            if response.status_code == 200 and not allowed:
                note("unauthorized_successes", f"{name} tombstone {key}")
            if storage.get(key).empty:
                rainer.storage.save(Commit.from_bytes(key, storage.get(key).version + 1,
                                                      b'{"secret": "%s"}' % key.encode(), "seed", ""))
        if mirror:
            _wait_mirrored(rainer)
        for url in LISTINGS:
            response = client.get(url, headers=headers, environ_base=environ)
            counts["requests"] += 1
            if invalid:
                if response.status_code != 401:
                    note("unauthorized_successes", f"{name} GET {url} -> {response.status_code}")
                continue
            listing = response.get_json()
            visible = {k for k in KEYS if expected(who, "read", k)}
            leaked = set(listing) - visible
            for key in leaked:
                note("leaked_list_entries", f"{name} {url} shows {key}")
            if set(listing) != visible:
                note("authorized_failures", f"{name} {url} lacks {visible - set(listing)}")
            filtered = response.headers.get("X-Rainer-Results-Filtered") == "yes"
            if filtered != (visible != set(KEYS)):
                note("wrong_status", f"{name} {url} filtered header {filtered}")
        whoami = client.get("/diary/-/whoami?key=team-a.x", headers=headers, environ_base=environ)
        counts["requests"] += 1
        if invalid:
            assert whoami.status_code == 401
        else:
            answer = whoami.get_json()
            assert answer["identity"] == who
            assert answer["read"] is expected(who, "read", "team-a.x")
            assert answer["write"] is expected(who, "write", "team-a.x")
    assert problems == []
    return counts


def test_every_route_under_every_identity(auth_app):
    counts = run_matrix(auth_app)
    assert counts["unauthorized_successes"] == 0
    assert counts["leaked_list_entries"] == 0
    assert counts["authorized_failures"] == 0
    assert counts["requests"] > 400
    print(json.dumps(counts))


@pytest.mark.zookeeper
def test_every_route_under_every_identity_on_the_mirror_fast_path(zk_chroot, tmp_path):
    app = _make_app(
        {"RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/r.db", "RAINER_ZK_HOSTS": zk_chroot},
        tmp_path,
    )
    try:
        rainer = app.extensions["rainer"]
        rainer.start_zookeeper()
        wait_until(lambda: rainer.cached_view() is not None, what="the mirror")
        counts = run_matrix(app, mirror=True)
        print(json.dumps(counts))
        assert counts["unauthorized_successes"] == 0 and counts["leaked_list_entries"] == 0
        assert counts["authorized_failures"] == 0
        assert counts["cached_reads"] > 0
    finally:
        app.extensions["rainer"].close()


# ---------------------------------------------------------------------- authors and times


def test_the_author_is_the_identity(auth_app):
    tokens = _tokens(auth_app)
    client = auth_app.test_client()
    wendy = {"Authorization": f"Bearer {tokens['wendy']}"}
    response = client.post("/diary/team-a.x/1", headers=wendy, data=b"{}")
    assert response.status_code == 200 and response.get_json()["author"] == "wendy"
    same = client.post("/diary/team-a.x/2", headers={**wendy, "X-Rainer-Author": "wendy"}, data=b"{}")
    assert same.status_code == 200
    spoof = client.post("/diary/team-a.x/3", headers={**wendy, "X-Rainer-Author": "alice"}, data=b"{}")
    assert spoof.status_code == 403 and spoof.get_json() == {"error": "Author must be wendy"}
    mtime = client.post("/diary/team-a.x/3", headers={**wendy, "X-Rainer-Modified-Time": "1999-01-01T00:00:00Z"}, data=b"{}")
    assert mtime.status_code == 403
    storage = auth_app.extensions["rainer"].database_storage
    assert storage.get("team-a.x").version == 2
    history = client.get("/diary/team-a.x/history", headers=wendy).get_json()
    assert [(h["author"], h["identity"]) for h in history] == [("wendy", "wendy")] * 2


def test_an_act_as_identity_may_set_author_and_time(auth_app):
    tokens = _tokens(auth_app)
    client = auth_app.test_client()
    bot = {"Authorization": f"Bearer {tokens['deploy-bot']}", "X-Rainer-Author": "alice",
           "X-Rainer-Modified-Time": "2014-01-01T00:00:00.000Z"}
    response = client.post("/diary/web.pool/1", headers=bot, data=b"{}")
    assert response.status_code == 200
    assert response.get_json()["author"] == "alice"
    assert response.get_json()["mtime"] == "2014-01-01T00:00:00.000Z"
    # The journal still knows who really wrote it.
    assert auth_app.extensions["rainer"].database_storage.get("web.pool").identity == "deploy-bot"


def test_401_carries_the_bearer_challenge(auth_app):
    client = auth_app.test_client()
    response = client.get("/diary/secret.key")
    assert response.status_code == 401
    assert response.get_json() == {"error": "Authentication required"}
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="rainer"'
    bad = client.get("/diary/public.key", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    assert 'error="invalid_token"' in bad.headers["WWW-Authenticate"]


# ---------------------------------------------------------------------- tokens and logs


def test_tokens_never_reach_a_log_line_or_a_body(auth_app, caplog):
    caplog.set_level(logging.DEBUG)
    audit_lines = []
    audit_logger = logging.getLogger("rainer.audit")

    class Keep(logging.Handler):
        def emit(self, record):
            audit_lines.append(record.getMessage())

    keep = Keep()
    audit_logger.addHandler(keep)
    try:
        tokens = _tokens(auth_app)
        client = auth_app.test_client()
        for token in tokens.values():
            for url in ("/diary/secret.key", "/diary", "/diary/-/whoami"):
                response = client.get(url, headers={"Authorization": f"Bearer {token}"})
                assert token.encode() not in response.data
            client.post("/diary/team-a.x/1", headers={"Authorization": f"Bearer {token}"},
                        data=b'{"password": "hunter2"}')
    finally:
        audit_logger.removeHandler(keep)
    everything = caplog.text + "\n".join(audit_lines)
    for token in tokens.values():
        assert token not in everything
        assert token[4:20] not in everything
    assert "hunter2" not in everything
    entries = [json.loads(line) for line in audit_lines]
    assert {e["decision"] for e in entries} >= {"committed", "denied", "unauthenticated"}
    committed = next(e for e in entries if e["decision"] == "committed")
    assert committed["identity"] == "wendy" and committed["key"] == "team-a.x"
    assert set(committed) == {"time", "identity", "peer", "method", "key", "version",
                              "decision", "reason", "request_id"}


def test_an_ignored_proxy_header_is_audited_and_counted(auth_app):
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(json.loads(record.getMessage()))

    keep = Keep()
    logging.getLogger("rainer.audit").addHandler(keep)
    try:
        response = auth_app.test_client().get(
            "/diary/team-a.x", headers={"X-Remote-User": "wendy"},
            environ_base={"REMOTE_ADDR": "10.0.0.5"},
        )
    finally:
        logging.getLogger("rainer.audit").removeHandler(keep)
    assert response.status_code == 401
    assert any(e["decision"] == "ignored-proxy-header" and e["peer"] == "10.0.0.5" for e in lines)
    metrics = auth_app.test_client().get("/metrics").data.decode()
    assert 'rainer_access_denied_total{reason="untrusted_proxy_header"}' in metrics


def test_a_line_break_in_an_author_cannot_forge_a_log_line(app, caplog):
    caplog.set_level(logging.INFO, logger="rainer_server")
    response = app.test_client().post(
        "/diary/k/1",
        headers={"X-Rainer-Author": quote("eve\nINFO rainer_server Saved commit forged"),
                 "X-Rainer-Header-Encoding": "percent"},
        data=b"{}",
    )
    assert response.status_code == 200
    saved = [r for r in caplog.records if r.getMessage().startswith("Saved commit k")]
    assert len(saved) == 1 and "\n" not in saved[0].getMessage()
    assert "eve\\nINFO" in saved[0].getMessage()


def test_revoking_a_token_refuses_it(auth_app):
    tokens = _tokens(auth_app)
    client = auth_app.test_client()
    headers = {"Authorization": f"Bearer {tokens['rita']}"}
    assert client.get("/diary/team-a.x", headers=headers).status_code in (200, 404)
    assert auth_app.extensions["rainer"].gate.tokens.revoke("rita")
    wait_until(lambda: client.get("/diary/public.key", headers=headers).status_code == 401,
               what="the revoked token refused", timeout=10)


def test_policy_reload_keeps_the_old_policy_on_a_bad_file(auth_app, tmp_path):
    gate = auth_app.extensions["rainer"].gate
    assert not gate.policy.may_read(None, "secret.key")
    (tmp_path / "policy.yaml").write_text("rules:\n  - keys: '*'\n    read: ['*']\n")
    assert gate.reload_policy()
    assert gate.policy.may_read(None, "secret.key")
    (tmp_path / "policy.yaml").write_text("rules: [")
    assert not gate.reload_policy()
    assert gate.policy.may_read(None, "secret.key")


def test_auth_settings_are_checked(tmp_path):
    from rainer_server.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="RAINER_POLICY: required"):
        create_app({"TESTING": True, "RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/r.db",
                    "RAINER_AUTH": "token"})
    with pytest.raises(ConfigurationError, match="RAINER_AUTH"):
        create_app({"TESTING": True, "RAINER_AUTH": "tokens"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: nope")
    with pytest.raises(ConfigurationError, match="bad.yaml: 'rules' must be"):
        create_app({"TESTING": True, "RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/r.db",
                    "RAINER_AUTH": "proxy", "RAINER_POLICY": str(bad), "RAINER_UI": "off"})
