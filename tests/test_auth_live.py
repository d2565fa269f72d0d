"""Access control as operators and users meet it: the admin token commands, verify, the
``rainer`` command and the clients against a live server, pyrainer under a policy, and
gunicorn refusing to expose anonymous writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from rainer_server.client import RainerClient
from rainer_server.client import RainerForbidden
from rainer_server.client import RainerUnauthorized
from rainer_server.errors import AccessDenied
from rainer_server.errors import AuthenticationRequired
from tests.live import TEST_SECRET_KEY
from tests.live import run_rainer
from tests.live import start_live_server
from tests.test_admin import invoke
from tests.test_gunicorn import ROOT
from tests.test_gunicorn import Gunicorn
from tests.test_gunicorn import request
from tests.zk_support import wait_until
from tests.zkserver import free_port

POLICY = """
rules:
  - keys: "team-a.*"
    read: [alice, bob]
    write: [alice]
  - keys: "*"
    read: ["*"]
    write: [alice]
act_as: [deploy-bot]
"""


@pytest.fixture
def auth_config(app_config, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    return {**app_config, "RAINER_AUTH": "token", "RAINER_POLICY": str(policy),
            "RAINER_SECRET_KEY": TEST_SECRET_KEY}


@pytest.fixture
def auth_app(auth_config):
    from rainer_server import create_app

    app = create_app({"TESTING": True, **auth_config})
    yield app
    app.extensions["rainer"].close()


# ---------------------------------------------------------------------- flask rainer token


def test_token_create_prints_only_the_token_and_list_never_shows_it(auth_app):
    created = invoke(auth_app, "token", "create", "alice", "--expires", "90d")
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert token.startswith("rnr_") and "\n" not in token and len(token) > 40
    assert "alice" in created.stderr and token not in created.stderr
    listed = invoke(auth_app, "token", "list")
    assert listed.exit_code == 0
    name, created_at, expires, last_used, state = listed.stdout.strip().split("\t")
    assert (name, last_used, state) == ("alice", "never", "valid") and expires != "never"
    assert token not in listed.output
    # The token works, and using it shows up in the list.
    client = auth_app.test_client()
    assert client.get("/diary/-/whoami", headers={"Authorization": f"Bearer {token}"}).get_json()[
        "identity"
    ] == "alice"
    assert invoke(auth_app, "token", "list").stdout.split("\t")[3] != "never"
    again = invoke(auth_app, "token", "create", "alice")
    assert again.exit_code == 1 and "already has a token" in again.stderr
    revoked = invoke(auth_app, "token", "revoke", "alice")
    assert revoked.exit_code == 0
    assert invoke(auth_app, "token", "list").stdout.strip().endswith("revoked")
    assert invoke(auth_app, "token", "revoke", "alice").exit_code == 1
    assert invoke(auth_app, "token", "create", "alice").exit_code == 0  # a new one after revoke


@pytest.mark.parametrize("bad", ["90", "1y", "-3d", "0h", "soon"])
def test_token_expiry_must_be_a_duration(auth_app, bad):
    result = invoke(auth_app, "token", "create", "x", "--expires", bad)
    assert result.exit_code == 2 and "30s, 15m, 12h or 90d" in result.output


def test_token_commands_need_tokens_on(app):
    result = invoke(app, "token", "create", "alice")
    assert result.exit_code == 1 and "RAINER_AUTH=token" in result.stderr


# ---------------------------------------------------------------------- flask rainer verify


def test_verify_finds_an_sql_edit(auth_app):
    token = invoke(auth_app, "token", "create", "alice").stdout.strip()
    client = auth_app.test_client()
    for version in (1, 2, 3):
        assert client.post(f"/diary/web.pool/{version}", data=b'{"size": %d}' % version,
                           headers={"Authorization": f"Bearer {token}"}).status_code == 200
    clean = invoke(auth_app, "verify")
    assert clean.exit_code == 0 and "matches" in clean.stderr
    storage = auth_app.extensions["rainer"].database_storage
    param = storage.database.param
    quote = storage.database.quote or '""'
    storage.database.execute_sql(
        f"UPDATE {storage.table_name} SET author = {param} "
        f"WHERE {quote[0]}key{quote[-1]} = {param} AND version = 2",
        ("mallory", b"web.pool"),
    )
    broken = invoke(auth_app, "verify")
    assert broken.exit_code == 1
    assert broken.stdout.strip() == "chain mismatch\tweb.pool\tversion 2"


# ---------------------------------------------------------------------- clients and rainer


@pytest.fixture
def server(auth_config):
    server = start_live_server(auth_config)
    yield server
    server.stop()


def _token(server, name):
    return server.app.extensions["rainer"].gate.tokens.create(name)


def test_the_client_sends_its_token_and_raises_typed_errors(server):
    alice = RainerClient(server.url, token=_token(server, "alice"))
    bob = RainerClient(server.url, token=_token(server, "bob"))
    anonymous = RainerClient(server.url)
    assert alice.whoami("team-a.x") == {"identity": "alice", "via": "token", "auth": ["token"],
                                         "act_as": False, "key": "team-a.x", "read": True,
                                         "write": True}
    meta = alice.post_commit({"key": "team-a.x", "version": 1, "author": "alice"}, b"{}")
    assert meta["author"] == "alice"
    assert bob.get_value("team-a.x") == b"{}"
    with pytest.raises(RainerForbidden) as denied:
        bob.post_commit({"key": "team-a.x", "version": 2, "author": "bob"}, b"{}")
    assert isinstance(denied.value, AccessDenied) and denied.value.status == 403
    with pytest.raises(RainerUnauthorized) as unauthenticated:
        anonymous.get_value("team-a.x")
    assert isinstance(unauthenticated.value, AuthenticationRequired)
    with pytest.raises(RainerUnauthorized):
        RainerClient(server.url, token="rnr_wrong").list()
    assert "token" not in repr(alice).lower()


def test_the_rainer_command_uses_a_token_file_or_rainer_token(server, tmp_path):
    token = _token(server, "alice")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    who = run_rainer("--token-file", str(token_file), "whoami", "team-a.x", url=server.url,
                     env={"RAINER_AUTHOR": None})
    assert who.returncode == 0, who.stderr
    assert who.stdout.decode().splitlines() == ["alice (via token)", "team-a.x: read and write"]
    # RAINER_TOKEN, and the author defaults to the identity the server sees.
    posted = run_rainer("commit-value", "team-a.x", "-m", "first", input=b'{"a": 1}',
                        url=server.url, env={"RAINER_TOKEN": token, "RAINER_AUTHOR": None})
    assert posted.returncode == 0, posted.stderr
    assert b'"author": "alice"' in posted.stdout
    anonymous = run_rainer("show", "team-a.x", url=server.url)
    assert anonymous.returncode == 1
    assert anonymous.stderr.decode().strip().startswith("Error: not authenticated:")
    assert len(anonymous.stderr.decode().strip().splitlines()) == 1
    bob = run_rainer("commit-value", "team-a.x", "-m", "x", input=b"{}", url=server.url,
                     env={"RAINER_TOKEN": _token(server, "bob"), "RAINER_AUTHOR": None})
    assert bob.returncode == 1
    assert bob.stderr.decode().strip().startswith("Error: forbidden: bob may not write team-a.x")
    assert run_rainer("whoami", url=server.url).stdout.decode().strip() == "anonymous"


def test_pyrainer_reads_under_a_policy_that_lets_anyone_read(server):
    from pyrainer.http import RainerClient as PyRainerClient

    RainerClient(server.url, token=_token(server, "alice")).post_commit(
        {"key": "web.pool", "version": 1, "author": "alice"}, b'{"size": 1}'
    )
    theirs = PyRainerClient(server.url)
    assert theirs.get_value("web.pool") == b'{"size": 1}'
    assert theirs.get_metadata("web.pool")["author"] == "alice"
    assert list(theirs.list()) == ["web.pool"]


# ---------------------------------------------------------------------- gunicorn


def _run_gunicorn(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py", *args, "wsgi:app"],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )


def test_gunicorn_refuses_a_network_bind_without_rainer_auth(tmp_path):
    port = free_port()
    env = {"RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/r.db"}
    env.pop("RAINER_AUTH", None)
    result = _run_gunicorn({**env, "RAINER_BIND": f"0.0.0.0:{port}"})
    assert result.returncode != 0
    refusal = [line for line in result.stderr.splitlines() if line.startswith("rainer:")]
    assert refusal == [
        f"rainer: listening on 0.0.0.0:{port} needs RAINER_AUTH: choose token, proxy or "
        "token,proxy (with RAINER_POLICY), or RAINER_AUTH=none to keep anonymous writes"
    ]
    assert "Traceback" not in result.stderr
    # The command line's --bind counts as much as RAINER_BIND.
    flag = _run_gunicorn(env, "--bind", f"[::]:{port}")
    assert flag.returncode != 0 and f"listening on [::]:{port} needs RAINER_AUTH" in flag.stderr


def test_policy_reload_on_hup_without_dropping_requests(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - keys: '*'\n    read: [alice]\n    write: [alice]\n")
    server = Gunicorn({"RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/r.db", "RAINER_AUTH": "proxy",
                       "RAINER_POLICY": str(policy), "RAINER_SECRET_KEY": TEST_SECRET_KEY, "RAINER_TEST_LOG_DIR": str(tmp_path)},
                      workers=2)
    try:
        server.wait_ready()
        bob = {"X-Remote-User": "bob"}
        assert request(server.url + "/-/whoami?key=k", headers=bob)[0] == 200
        assert request(server.url + "/k", headers=bob)[0] == 403
        policy.write_text("rules:\n  - keys: '*'\n    read: [alice, bob]\n    write: [alice]\n")
        os.kill(server.process.pid, signal.SIGHUP)
        seen = []

        def bob_may_read():
            status = request(server.url + "/-/whoami?key=k", headers=bob)
            seen.append(status[0])
            return status[0] == 200 and b'"read": true' in status[2]

        wait_until(bob_may_read, what="the new policy in force", timeout=30)
        assert set(seen) == {200}  # every request during the reload was answered
        # A broken file on the next HUP keeps the policy in force.
        policy.write_text("rules: [")
        os.kill(server.process.pid, signal.SIGHUP)
        wait_until(lambda: "Keeping the current access policy" in server.output(),
                   what="the refusal logged", timeout=30)
        assert b'"read": true' in request(server.url + "/-/whoami?key=k", headers=bob)[2]
    finally:
        server.stop()
