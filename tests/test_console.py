"""The web console through Flask's test client: every page without JavaScript, the same rules
as the API, identities, CSRF, settings, and the wheel carrying the templates.

tests/test_console_browser.py drives the same pages in a real browser.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rainer_server import create_app
from rainer_server.commit import Commit
from rainer_server.errors import ConfigurationError
from tests.live import ROOT
from tests.live import TEST_SECRET_KEY
from tests.storage_contract import T0

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def text_of(response) -> str:
    """The page's text without tags, whitespace squeezed (what a reader sees)."""
    body = re.sub(r"<script.*?</script>|<style.*?</style>", " ", response.data.decode(), flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def csrf(client, path="/ui/") -> str:
    found = CSRF.search(client.get(path).data.decode())
    assert found, "no CSRF token on " + path
    return found.group(1)


def save(app, key, version, payload, author="alice", comment=""):
    app.extensions["rainer"].database_storage.save(Commit(key, version, payload, author, comment, T0))


@pytest.fixture
def console(app):
    """An app without access control, its client, and web.pool with three versions."""
    save(app, "web.pool", 1, b'{"size": 10}\n', comment="first pool size")
    save(app, "web.pool", 2, b'{\n  "size": 20,\n  "max": 30\n}\n', author="bob")
    save(app, "web.pool", 3, b'{\n  "size": 25,\n  "max": 30\n}\n', author="carol", comment="less")
    client = app.test_client()
    token = csrf(client)
    assert client.post("/ui/author", data={"csrf_token": token, "author": "tester"}).status_code == 303
    client.csrf = token
    return client


def form(client, **fields):
    return {"csrf_token": client.csrf, **fields}


# ---------------------------------------------------------------------- reading


def test_the_keys_page_lists_heads_and_filters_them(app, console):
    save(app, "db.main", 1, b"{}")
    save(app, "gone", 1, b"{}")
    save(app, "gone", 2, None)
    page = console.get("/ui/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    text = text_of(page)
    assert "db.main" in text and "web.pool 3 carol" in text and "gone" not in text
    assert "2 keys." in text
    assert "web.pool" in text_of(console.get("/ui/?prefix=web"))
    assert "db.main" not in text_of(console.get("/ui/?prefix=web"))
    assert "db.main" in text_of(console.get("/ui/?q=main"))
    assert "No keys match" in text_of(console.get("/ui/?prefix=WEB"))
    deleted = text_of(console.get("/ui/?deleted=yes"))
    assert "gone deleted 2" in deleted and "3 keys." in deleted


def listed(response) -> list[str]:
    return [html.unescape(k) for k in re.findall(r'<td class="key"><a [^>]*>([^<]+)</a>', response.data.decode())]


def test_the_keys_page_is_paged_on_the_server(app, console):
    for n in range(120):
        save(app, f"k.{n:03d}", 1, b"1")
    first = console.get("/ui/?prefix=k.")
    assert listed(first) == [f"k.{n:03d}" for n in range(50)]
    assert "Previous keys" not in text_of(first)
    after = re.search(r'href="([^"]*after=k\.049[^"]*)"', first.data.decode()).group(1)
    second = console.get(html.unescape(after))
    assert listed(second) == [f"k.{n:03d}" for n in range(50, 100)]
    back = html.unescape(re.search(r'href="([^"]*before=k\.050[^"]*)"', second.data.decode()).group(1))
    assert "prefix=k." in back and listed(console.get(back)) == listed(first)
    last = console.get("/ui/?prefix=k.&after=k.099")
    assert listed(last)[-1] == "k.119" and "Next keys" not in text_of(last)
    assert listed(console.get("/ui/?prefix=k.&limit=10")) == [f"k.{n:03d}" for n in range(10)]
    assert console.get("/ui/?limit=100000").status_code == 400


def test_the_key_page_shows_payload_meta_and_history(console):
    page = console.get("/ui/keys/web.pool")
    assert page.status_code == 200
    body = page.data.decode()
    text = text_of(page)
    assert "Current version (3)" in text and "carol" in text and "less" in text
    # Line numbers with anchors, the exact bytes and a formatted view of the JSON.
    assert 'id="L2"' in body and "Formatted (JSON)" not in text  # already formatted
    assert "Revert to this" in text and "Edit" in text and "Delete" in text
    one = console.get("/ui/keys/web.pool?version=1")
    assert "Version 1 (the newest is 3)" in text_of(one)
    assert "Formatted (JSON)" in text_of(one)  # {"size": 10} on one line
    assert "Revert to version 1" in text_of(one)
    assert console.get("/ui/keys/nothing").status_code == 404
    assert console.get("/ui/keys/web.pool?version=9").status_code == 404
    assert console.get("/ui/keys/web.pool?version=x").status_code == 400


def test_history_is_paged(app, console):
    for version in range(4, 46):
        save(app, "web.pool", version, b'{"size": %d}' % version)
    first = text_of(console.get("/ui/keys/web.pool"))
    assert "Older versions" in first and "Show version 45" not in first
    page = console.get("/ui/keys/web.pool").data.decode()
    assert 'aria-label="Show version 26"' in page and 'aria-label="Show version 25"' not in page
    older = console.get("/ui/keys/web.pool?before=26").data.decode()
    assert 'aria-label="Show version 25"' in older and 'aria-label="Show version 6"' in older
    assert "Newest versions" in text_of(console.get("/ui/keys/web.pool?before=26"))


def test_a_diff_highlights_changed_lines_unified_and_side_by_side(console):
    unified = console.get("/ui/keys/web.pool/diff?from=1&to=2")
    assert unified.status_code == 200
    body = unified.data.decode()
    assert '<tr class="removed">' in body and '<tr class="added">' in body
    assert 'removed: {"size": 10}' in text_of(unified) and 'added: "max": 30' in text_of(unified)
    assert "Changes from version 1 to version 2" in text_of(unified)
    split = console.get("/ui/keys/web.pool/diff?from=1&to=2&view=split").data.decode()
    assert 'class="diff split"' in split and 'class="code removed"' in split
    last = text_of(console.get("/ui/keys/web.pool/diff"))
    assert "Changes from version 2 to version 3" in last
    whole = console.get("/ui/keys/web.pool/diff?from=2&to=3&context=all").data.decode()
    assert "Whole payload" in whole
    first = text_of(console.get("/ui/keys/web.pool/diff?to=1"))
    assert "Changes from nothing to version 1" in first


# ---------------------------------------------------------------------- changing


def test_edit_review_then_commit(app, console):
    edit = console.get("/ui/keys/web.pool/edit")
    assert edit.status_code == 200 and "this will be version 4" in text_of(edit)
    payload = '{\r\n  "size": 40,\r\n  "max": 30\r\n}\r\n'  # as a browser sends a textarea
    review = console.post("/ui/keys/web.pool/edit", data=form(
        console, base="3", payload=payload, comment="more", action="review"))
    assert review.status_code == 200
    text = text_of(review)
    assert "Review: version 4 of web.pool" in text and "The dry run passed" in text
    assert '<tr class="removed">' in review.data.decode()
    storage = app.extensions["rainer"].database_storage
    assert storage.get("web.pool").version == 3  # a review stores nothing
    committed = console.post("/ui/keys/web.pool/edit", data=form(
        console, base="3", payload=payload, comment="more", action="commit"))
    assert committed.status_code == 303 and committed.headers["Location"].endswith("/ui/keys/web.pool")
    head = storage.get("web.pool")
    assert head.version == 4 and head.payload == b'{\n  "size": 40,\n  "max": 30\n}\n'
    assert (head.author, head.comment) == ("tester", "more")
    assert "Committed version 4 of web.pool." in text_of(console.get("/ui/keys/web.pool"))


def test_a_validation_error_is_shown_next_to_its_line(app, console):
    bad = '{\n  "size": 40\n  "max": 30\n}\n'
    review = console.post("/ui/keys/web.pool/edit", data=form(
        console, base="3", payload=bad, action="review"))
    assert review.status_code == 400
    body = review.data.decode()
    assert "Not committed: Malformed input: Expecting &#39;,&#39; delimiter: line 3" in body
    assert re.search(r'<tr id="L3" class="error-line">.*?line 3 column 3', body, re.S)
    # The form keeps what was typed.
    assert "  &#34;max&#34;: 30" in body
    assert app.extensions["rainer"].database_storage.get("web.pool").version == 3


def test_a_conflicting_edit_shows_both_changes_and_merges_cleanly(app, console):
    base = b'{\n  "size": 25,\n  "min": 1,\n  "step": 2,\n  "max": 30\n}\n'
    save(app, "web.pool", 4, base, author="carol")
    save(app, "web.pool", 5, base.replace(b"30", b"35"), author="dave", comment="raise max")
    mine = base.decode().replace("25", "40")
    answer = console.post("/ui/keys/web.pool/edit", data=form(
        console, base="4", payload=mine, comment="mine", action="commit"))
    assert answer.status_code == 409
    text = text_of(answer)
    assert "Someone changed web.pool while you were editing" in text
    assert "Version 5 by dave: raise max" in text
    assert "Both changes merge cleanly" in text
    body = answer.data.decode()
    assert '<input type="hidden" name="base" value="5">' in body
    merged = re.search(r'<textarea id="payload"[^>]*>\n(.*?)</textarea>', body, re.S).group(1)
    expected = base.replace(b"25", b"40").replace(b"30", b"35").decode()
    assert html.unescape(merged) == expected
    assert app.extensions["rainer"].database_storage.get("web.pool").version == 5
    # Committing the merge (after its review) is an ordinary commit of version 6.
    done = console.post("/ui/keys/web.pool/edit", data=form(
        console, base="5", payload=html.unescape(merged), comment="mine", action="commit"))
    assert done.status_code == 303
    assert app.extensions["rainer"].database_storage.get("web.pool").payload == expected.encode()


def test_a_conflict_that_does_not_merge_shows_markers_and_is_never_committed(app, console):
    save(app, "web.pool", 4, b'{\n  "size": 26,\n  "max": 30\n}\n', author="dave")
    answer = console.post("/ui/keys/web.pool/edit", data=form(
        console, base="3", payload='{\n  "size": 40,\n  "max": 30\n}\n', action="review"))
    assert answer.status_code == 409
    text = text_of(answer)
    assert "The changes conflict (1 place)" in text
    body = html.unescape(answer.data.decode())
    assert "<<<<<<< version 4 (dave)\n" in body and ">>>>>>> your edit\n" in body
    # Reviewing the markers as they are fails validation: no silent overwrite.
    markers = re.search(r'<textarea id="payload"[^>]*>\n(.*?)</textarea>', body, re.S).group(1)
    refused = console.post("/ui/keys/web.pool/edit", data=form(
        console, base="4", payload=markers, action="commit"))
    assert refused.status_code == 400 and "Malformed input" in text_of(refused)
    assert app.extensions["rainer"].database_storage.get("web.pool").version == 4


def test_revert_delete_and_restore(app, console):
    storage = app.extensions["rainer"].database_storage
    reverted = console.post("/ui/keys/web.pool/revert", data=form(console, revert_to="1", next="4"))
    assert reverted.status_code == 303
    head = storage.get("web.pool")
    assert (head.version, head.payload, head.comment) == (4, b'{"size": 10}\n', "Revert to version 1")
    assert "Version 4 of web.pool is version 1's payload again." in text_of(console.get("/ui/keys/web.pool"))
    stale = console.post("/ui/keys/web.pool/revert", data=form(console, revert_to="2", next="4"))
    assert stale.status_code == 303 and storage.get("web.pool").version == 4
    assert "Nothing was changed: web.pool is at version 4 now" in text_of(console.get("/ui/keys/web.pool"))
    confirm = console.get("/ui/keys/web.pool/delete")
    assert confirm.status_code == 200 and "Delete web.pool?" in text_of(confirm)
    deleted = console.post("/ui/keys/web.pool/delete", data=form(console, next="5", comment="retired"))
    assert deleted.status_code == 303 and storage.get("web.pool").empty
    page = text_of(console.get("/ui/keys/web.pool"))
    assert "This key is deleted (version 5)" in page and "Restore version 4" in page
    restored = console.post("/ui/keys/web.pool/revert", data=form(console, revert_to="4", next="6"))
    assert restored.status_code == 303
    assert storage.get("web.pool").payload == b'{"size": 10}\n' and storage.get("web.pool").version == 6


def test_a_new_key(app, console):
    assert console.get("/ui/new").status_code == 200
    bad = console.post("/ui/new", data=form(console, key="a/b", payload="{}", action="review"))
    assert bad.status_code == 400 and "Key must not contain" in text_of(bad)
    review = console.post("/ui/new", data=form(console, key="fresh", payload='{"on": true}', action="review"))
    assert review.status_code == 200 and "Review: version 1 of fresh" in text_of(review)
    done = console.post("/ui/keys/fresh/edit", data=form(
        console, base="0", payload='{"on": true}', action="commit"))
    assert done.status_code == 303
    assert app.extensions["rainer"].database_storage.get("fresh").payload == b'{"on": true}'


def test_anonymous_changes_need_an_author(app):
    save(app, "k", 1, b"{}")
    client = app.test_client()
    token = csrf(client)
    refused = client.post("/ui/keys/k/revert", data={"csrf_token": token, "revert_to": "1", "next": "2"})
    assert refused.status_code == 400 and "give your name" in text_of(refused)
    assert app.extensions["rainer"].database_storage.get("k").version == 1


# ---------------------------------------------------------------------- CSRF and headers


def test_a_forged_form_post_is_refused(app, console):
    storage = app.extensions["rainer"].database_storage
    forged = [
        {"revert_to": "1", "next": "4"},
        {"revert_to": "1", "next": "4", "csrf_token": ""},
        {"revert_to": "1", "next": "4", "csrf_token": csrf(app.test_client())},  # another session's
    ]
    for fields in forged:
        answer = console.post("/ui/keys/web.pool/revert", data=fields)
        assert answer.status_code == 400 and "CSRF check failed" in text_of(answer)
    # A browser elsewhere posting without the console's cookie at all.
    stranger = app.test_client().post("/ui/keys/web.pool/delete", data={"next": "4"})
    assert stranger.status_code == 400
    assert storage.get("web.pool").version == 3


def test_pages_are_never_cached_and_forbid_framing(console):
    page = console.get("/ui/keys/web.pool")
    assert page.headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert console.get("/ui/static/console.css").status_code == 200
    assert console.get("/ui/static/console.js").status_code == 200
    assert console.get("/ui/no/such/page").status_code == 404


def test_the_session_cookie_flags(app):
    client = app.test_client()
    plain = client.get("/ui/").headers["Set-Cookie"]
    assert "HttpOnly" in plain and "SameSite=Strict" in plain and "Path=/ui" in plain
    assert "Secure" not in plain
    tls = app.test_client().get("/ui/", base_url="https://localhost").headers["Set-Cookie"]
    assert "Secure" in tls and "HttpOnly" in tls and "SameSite=Strict" in tls


# ---------------------------------------------------------------------- identities


POLICY = """
rules:
  - keys: "secret.*"
    read: [admin]
    write: [admin]
  - keys: "*"
    read: ["*"]
    write: [writer, admin]
"""


def guarded_app(app_config, tmp_path, auth="token,proxy"):
    (tmp_path / "policy.yaml").write_text(POLICY)
    app = create_app({
        "TESTING": True, **app_config, "RAINER_AUTH": auth,
        "RAINER_POLICY": str(tmp_path / "policy.yaml"), "RAINER_SECRET_KEY": TEST_SECRET_KEY,
    })
    save(app, "open.k", 1, b'{"v": 1}')
    save(app, "open.k", 2, b'{"v": 2}')
    save(app, "secret.k", 1, b'{"v": "hidden"}')
    return app


@pytest.fixture
def guarded(app_config, tmp_path):
    app = guarded_app(app_config, tmp_path)
    yield app
    app.extensions["rainer"].close()


def sign_in(client, token):
    return client.post("/ui/sign-in", data={"csrf_token": csrf(client, "/ui/sign-in"), "token": token})


def test_sign_in_with_a_token(guarded):
    tokens = guarded.extensions["rainer"].gate.tokens
    writer = tokens.create("writer")
    client = guarded.test_client()
    anonymous = text_of(client.get("/ui/"))
    assert "Not signed in" in anonymous and "open.k" in anonymous and "secret.k" not in anonymous
    # A page that needs an identity sends to the sign-in form, and back after it.
    redirected = client.get("/ui/keys/secret.k")
    assert redirected.status_code == 302 and "/ui/sign-in?next=" in redirected.headers["Location"]
    wrong = sign_in(client, "rnr_wrong")
    assert wrong.status_code == 401 and "wrong, expired or revoked" in text_of(wrong)
    signed = client.post("/ui/sign-in", data={
        "csrf_token": csrf(client, "/ui/sign-in"), "token": writer, "next": "/ui/keys/open.k"})
    assert signed.status_code == 303 and signed.headers["Location"].endswith("/ui/keys/open.k")
    cookie = signed.headers["Set-Cookie"]
    assert writer not in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = text_of(client.get("/ui/keys/open.k"))
    assert "Signed in as writer (via token)" in page and "Signed in as writer." in page
    assert "Edit" in page and "Revert to this" in page
    # The commit's author and identity are the signed-in identity.
    token = csrf(client, "/ui/keys/open.k")
    assert client.post("/ui/keys/open.k/revert", data={
        "csrf_token": token, "revert_to": "1", "next": "3"}).status_code == 303
    head = guarded.extensions["rainer"].database_storage.get("open.k")
    assert (head.version, head.author, head.identity) == (3, "writer", "writer")
    # Signing out ends it; a revoked token ends it too.
    assert client.post("/ui/sign-out", data={"csrf_token": token}).status_code == 303
    assert "Not signed in" in text_of(client.get("/ui/"))
    assert sign_in(client, writer).status_code == 303
    assert tokens.revoke("writer")
    tokens._cache.clear()  # what CACHE_SECONDS does on its own
    assert "Your sign-in ended" in text_of(client.get("/ui/"))


def test_a_forbidden_action_is_not_offered_and_refused_if_forced(guarded):
    tokens = guarded.extensions["rainer"].gate.tokens
    reader = tokens.create("reader")
    client = guarded.test_client()
    assert sign_in(client, reader).status_code == 303
    page = text_of(client.get("/ui/keys/open.k"))
    assert "Signed in as reader" in page
    for action in ("Edit", "Delete", "Revert to this", "Revert to version", "New key"):
        assert action not in page, action
    assert "Revert to version" not in text_of(client.get("/ui/keys/open.k/diff?from=1&to=2"))
    assert client.get("/ui/keys/secret.k").status_code == 403
    assert "secret.k" not in text_of(client.get("/ui/"))
    token = csrf(client)
    forced = [
        ("/ui/keys/open.k/revert", {"revert_to": "1", "next": "3"}),
        ("/ui/keys/open.k/delete", {"next": "3"}),
        ("/ui/keys/open.k/edit", {"base": "2", "payload": "{}", "action": "commit"}),
        ("/ui/keys/open.k/edit", {"base": "2", "payload": "{}", "action": "review"}),
        ("/ui/new", {"key": "open.new", "payload": "{}", "action": "commit"}),
    ]
    for url, fields in forced:
        answer = client.post(url, data={"csrf_token": token, **fields})
        assert answer.status_code == 403, url
        assert "reader may not write open." in text_of(answer)
    assert client.get("/ui/keys/open.k/edit").status_code == 403
    assert client.get("/ui/new").status_code == 403
    assert guarded.extensions["rainer"].database_storage.get("open.k").version == 2
    assert guarded.extensions["rainer"].database_storage.get("open.new") is None


def test_the_proxy_identity_is_the_consoles(guarded):
    client = guarded.test_client()
    as_admin = {"X-Remote-User": "admin"}
    page = client.get("/ui/keys/secret.k", headers=as_admin)
    assert page.status_code == 200 and "Signed in as admin (via proxy)" in text_of(page)
    assert "Sign out" not in text_of(page)
    token = CSRF.search(client.get("/ui/keys/secret.k/delete", headers=as_admin).data.decode()).group(1)
    answer = client.post("/ui/keys/secret.k/delete", headers=as_admin,
                         data={"csrf_token": token, "next": "2"})
    assert answer.status_code == 303
    head = guarded.extensions["rainer"].database_storage.get("secret.k")
    assert head.empty and head.author == "admin" and head.identity == "admin"
    # The header from an untrusted address is ignored, as on the API.
    assert client.get("/ui/keys/secret.k", headers=as_admin,
                      environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 302


def test_without_tokens_there_is_no_sign_in(app_config, tmp_path):
    app = guarded_app(app_config, tmp_path, auth="proxy")
    try:
        client = app.test_client()
        assert client.get("/ui/sign-in").status_code == 404
        assert client.get("/ui/keys/secret.k").status_code == 401
    finally:
        app.extensions["rainer"].close()


# ---------------------------------------------------------------------- settings and packaging


def test_the_console_can_be_turned_off_or_moved(tmp_path):
    url = f"sqlite:///{tmp_path}/r.db"
    off = create_app({"TESTING": True, "RAINER_DATABASE_URL": url, "RAINER_UI": "off"})
    answer = off.test_client().get("/ui/")
    assert answer.status_code == 404 and answer.mimetype == "application/json"
    moved = create_app({"TESTING": True, "RAINER_DATABASE_URL": url, "RAINER_UI_PREFIX": "/console"})
    assert moved.test_client().get("/console/").status_code == 200
    assert moved.test_client().get("/ui/").status_code == 404
    with pytest.raises(ConfigurationError, match="RAINER_SECRET_KEY: required"):
        create_app({"TESTING": True, "RAINER_DATABASE_URL": url, "RAINER_AUTH": "token",
                    "RAINER_POLICY": str(tmp_path / "p.yaml")})


def test_the_console_adds_no_request_hooks(app):
    """The mirror fast path (web/middleware.py) stays on: it steps aside for request hooks."""
    for registry in (app.before_request_funcs, app.after_request_funcs,
                     app.teardown_request_funcs, app.url_value_preprocessors):
        assert not any(registry.values()), registry


def test_a_wheel_install_serves_the_console(tmp_path):
    """Templates and static files are package data: a wheel installed elsewhere serves them."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("rainer_server-*.whl")
    target = tmp_path / "installed"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    code = (
        "import rainer_server, sys\n"
        "from rainer_server import create_app\n"
        f"assert rainer_server.__file__.startswith({str(target)!r}), rainer_server.__file__\n"
        "app = create_app({'TESTING': True, 'RAINER_DATABASE_URL': 'sqlite:///r.db'})\n"
        "c = app.test_client()\n"
        "for path in ('/ui/', '/ui/static/console.css', '/ui/static/console.js', '/ui/new'):\n"
        "    r = c.get(path)\n"
        "    assert r.status_code == 200, (path, r.status_code, r.data[:300])\n"
        "print('served')\n"
    )
    # -S: no site-packages .pth files, so the editable install of this checkout cannot
    # shadow the wheel; the dependencies come from the same directories, named explicitly.
    paths = [str(target)] + [p for p in sys.path if p and "site-packages" in p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    run = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "served" in run.stdout, run.stderr
    assert Path(target, "rainer_server/web/templates/console/key.html").is_file()
