"""deploy/nginx/rainer.conf's micro-cache for real: Debian's nginx in front of a live gunicorn.

What the cache may do: answer repeat reads of ``GET /diary/<key>``, ``/<key>/meta`` and
``GET /diary`` for at most a second, renew a copy with a 304 from the app; and what it must
never do: hand one caller what another may not read, answer a request with credentials, a
blocking read, the change feed, a write or any other path. nginx says what it did in
``X-Cache-Status`` (HIT, MISS, EXPIRED, REVALIDATED, UPDATING, BYPASS); gunicorn's access log
says what reached the app.

Needs /usr/sbin/nginx; without it the tests skip, and under CI=true fail.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from tests.conftest import service_missing
from tests.live import TEST_SECRET_KEY
from tests.test_gunicorn import Gunicorn
from tests.test_gunicorn import request
from tests.test_nginx import NGINX
from tests.test_nginx import Nginx
from tests.test_nginx import SITE
from tests.test_nginx import render
from tests.zkserver import free_port

AUTHOR = {"X-Rainer-Author": "alice"}
#: The cache keeps a copy until the end of the second it was made in: a read sent 1 s after a
#: commit was acknowledged gets the new version. nginx reads the clock once per event-loop
#: turn, so allow it that much lateness.
FRESH_WITHIN = 1.0
CLOCK_SLACK = 0.05

pytestmark = pytest.mark.gunicorn

POLICY = """
rules:
  - keys: "secret.*"
    read: [alice]
    write: [alice]
  - keys: "*"
    read: ["*"]
    write: [alice]
"""


class Site:
    """gunicorn with ``env`` and the shipped site in front of it."""

    def __init__(self, tmp_path, env: dict[str, str], workers: int) -> None:
        self.server = Gunicorn(
            {"RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/c.db", "RAINER_TEST_LOG_DIR": str(tmp_path), **env},
            workers=workers,
        )
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        port = free_port()
        self.nginx = Nginx(render(SITE.read_text(), port, self.server.port, prefix), prefix, port)
        self.base = f"http://127.0.0.1:{port}"
        self.api = self.base + "/diary"

    def start(self) -> None:
        self.server.wait_ready()
        self.nginx.wait_ready()

    def stop(self) -> None:
        self.nginx.stop()
        self.server.stop()

    def upstream_requests(self, request_line: str) -> int:
        """How many times gunicorn logged ``request_line`` (e.g. "GET /diary/svc")."""
        return len(re.findall(re.escape(f'"{request_line} HTTP/1.1"'), self.server.output()))

    def wait_logged(self, request_line: str, count: int, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while (seen := self.upstream_requests(request_line)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return seen


def _site(tmp_path, env: dict[str, str], workers: int = 2):
    if not os.access(NGINX, os.X_OK):
        service_missing(f"{NGINX} is missing (apt-get install nginx-light; scripts/test does)")
    site = Site(tmp_path, env, workers)
    try:
        site.start()
        yield site
    finally:
        site.stop()
        log = site.nginx.log()
        assert "[emerg]" not in log and "[alert]" not in log and "[crit]" not in log, log


@pytest.fixture
def site(tmp_path):
    yield from _site(tmp_path, {})


@pytest.fixture(params=["database", "mirror"])
def reading_site(request, tmp_path):
    """Reads answered from the database (no ZooKeeper), or from the ZooKeeper mirror (the
    WSGI fast path), as the README deploys it. One worker: when gunicorn answers a commit's
    version directly, every answer it gives after that is as new (two workers' mirrors may
    see a commit some milliseconds apart; that lag is the mirror's, not the cache's)."""
    env = {}
    if request.param == "mirror":
        env["RAINER_ZK_HOSTS"] = request.getfixturevalue("zk_chroot")
    yield from _site(tmp_path, env, workers=1)


@pytest.fixture
def auth_site(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    env = {"RAINER_AUTH": "token", "RAINER_POLICY": str(policy), "RAINER_SECRET_KEY": TEST_SECRET_KEY}
    # One worker: "nothing reached gunicorn before this request" can then be read in order
    # from its access log.
    yield from _site(tmp_path, env, workers=1)


def _post(site: Site, key: str, version: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
    status, _, body = request(f"{site.api}/{key}/{version}", payload, {**AUTHOR, **(headers or {})}, "POST")
    assert status == 200, (status, body)


def _until(condition, timeout: float = 10, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _hit(url: str, headers: dict[str, str] | None = None):
    """Read ``url`` until nginx answers it from the cache; that answer."""

    def read():
        answer = request(url, headers=headers)
        return answer if answer[1].get("X-Cache-Status") == "HIT" else None

    return _until(read, what=f"a cache hit on {url}")


# ---------------------------------------------------------------------- freshness


def test_a_commit_is_read_through_the_cache_within_a_second(reading_site):
    site = reading_site
    _post(site, "svc", 1, b'{"threads": 1}')
    urls = {
        "payload": f"{site.api}/svc",
        "meta": f"{site.api}/svc/meta",
        "listing": f"{site.api}",
    }
    # Each read is in the cache before the commit (with ZooKeeper: once the mirror has it).
    _until(lambda: request(urls["payload"])[1].get("X-Rainer-Version") == "1", what="version 1")
    for name, url in urls.items():
        status, headers, body = _hit(url)
        assert status == 200, (name, status, body)
        assert headers["Cache-Control"] == "public, max-age=1", (name, headers)
        assert "X-Accel-Expires" not in headers  # nginx's own header stays between it and the app

    def version(name: str, headers: dict[str, str], body: bytes) -> int:
        if name == "payload":
            return int(headers["X-Rainer-Version"])
        if name == "meta":
            return json.loads(body)["version"]
        return json.loads(body)["svc"]["version"]

    direct = f"http://127.0.0.1:{site.server.port}/diary/svc"
    for new in (2, 3):
        _post(site, "svc", new, b'{"threads": %d}' % new)
        # From the moment gunicorn itself answers the new version (at once without ZooKeeper,
        # once the mirror has it with), nginx may show the old one for at most a second.
        _until(lambda: request(direct)[1].get("X-Rainer-Version") == str(new), what=f"version {new}")
        acknowledged = time.monotonic()
        for name, url in urls.items():
            stale_sent = None
            deadline = acknowledged + 10
            while True:
                sent = time.monotonic()
                status, headers, body = request(url)
                assert status == 200, (name, status, body)
                if version(name, headers, body) == new:
                    break
                assert version(name, headers, body) == new - 1, (name, headers, body)
                stale_sent = sent
                assert time.monotonic() < deadline, f"{name}: version {new} never arrived"
                time.sleep(0.01)
            # The last read that still got the old version was sent within the second.
            if stale_sent is not None:
                assert stale_sent - acknowledged <= FRESH_WITHIN + CLOCK_SLACK, (name, stale_sent - acknowledged)


# ---------------------------------------------------------------------- revalidation


def test_an_expired_copy_is_renewed_with_a_304_and_clients_revalidate_too(site):
    _post(site, "svc", 1, b'{"threads": 1}')
    url = f"{site.api}/svc"
    status, headers, body = _hit(url)
    assert status == 200 and body == b'{"threads": 1}'
    tag = headers["ETag"]

    # Past its second the copy is asked for again with If-None-Match; the app answers 304
    # (no payload), nginx serves the copy it has, now renewed.
    status, headers, body = _until(
        lambda: (a := request(url))[1].get("X-Cache-Status") == "REVALIDATED" and a,
        what="a revalidated copy",
    )
    assert status == 200 and body == b'{"threads": 1}' and headers["ETag"] == tag
    _until(lambda: re.search(r'"GET /diary/svc HTTP/1\.1" 304 ', site.server.output()), what="the key's 304")

    # A client's own If-None-Match is answered 304 from the cache as from the app; another
    # tag gets the payload.
    status, headers, body = request(url, headers={"If-None-Match": tag})
    assert status == 304 and body == b""
    status, _, body = request(url, headers={"If-None-Match": '"v999"'})
    assert status == 200 and body == b'{"threads": 1}'

    # The listing has an ETag of its own content, renewed the same way.
    _hit(site.api)
    status, headers, body = _until(
        lambda: (a := request(site.api))[1].get("X-Cache-Status") == "REVALIDATED" and a,
        what="a revalidated listing",
    )
    assert status == 200 and json.loads(body)["svc"]["version"] == 1
    # gunicorn's worker writes its access log line after answering: wait for it.
    _until(lambda: re.search(r'"GET /diary HTTP/1\.1" 304 ', site.server.output()), what="the listing's 304")


# ---------------------------------------------------------------------- what bypasses


def test_uncached_requests_always_reach_the_app(site):
    _post(site, "svc", 1, b'{"threads": 1}')
    _hit(f"{site.api}/svc")  # the plain read is cached...
    # ...and none of these is, however often they come.
    bypassing = [
        ("/diary/svc?index=0", 200),  # a blocking read (index 0 answers at once)
        ("/diary/svc?index=0&wait=1s", 200),
        ("/diary?changes_since=0", 200),  # the change feed
        ("/diary?prefix=s", 200),  # any query string
        ("/diary/svc/1", 200),  # a version
        ("/diary/svc/history", 200),
        ("/diary/-/whoami", 200),
    ]
    for path, expected in bypassing:
        before = site.upstream_requests(f"GET {path}")
        for _ in range(3):
            status, headers, body = request(site.base + path)
            assert status == expected, (path, status, body)
            assert headers.get("X-Cache-Status") in (None, "BYPASS"), (path, headers)
        assert site.wait_logged(f"GET {path}", before + 3) == before + 3, path

    # Blocking reads and the feed say so to any other cache too.
    for path in ("/diary/svc?index=0", "/diary?index=0", "/diary?changes_since=0"):
        assert request(site.base + path)[1]["Cache-Control"] == "no-store", path

    # A blocking read is answered when the commit comes, not from a copy.
    status, headers, _ = request(f"{site.api}/svc")
    index = headers["X-Rainer-Index"]
    _post(site, "svc", 2, b'{"threads": 2}')
    status, headers, body = request(f"{site.api}/svc?index={index}&wait=5s")
    assert status == 200 and body == b'{"threads": 2}' and headers["X-Cache-Status"] == "BYPASS"
    feed = json.loads(request(f"{site.api}?changes_since=0")[2])
    assert [c["version"] for c in feed["changes"]] == [1, 2]

    # Writes go through every time (and are never answered from a copy).
    for version in (3, 4, 5):
        status, headers, body = request(f"{site.api}/svc/{version}", b"{}", AUTHOR, "POST")
        assert status == 200 and json.loads(body)["version"] == version
        assert headers.get("X-Cache-Status") in (None, "BYPASS"), headers
    # A write of a version that exists is refused each time: it reached the app.
    for _ in range(2):
        assert request(f"{site.api}/svc/5", b"{}", AUTHOR, "POST")[0] == 409

    # Credentials (a token, a cookie, a proxy's identity header) bypass the copy of a key
    # that is in the cache.
    _hit(f"{site.api}/svc")
    for headers in ({"Authorization": "Bearer rnr_x"}, {"Cookie": "rainer_console=x"}, {"X-Remote-User": "alice"}):
        status, answer_headers, _ = request(f"{site.api}/svc", headers=headers)
        assert answer_headers["X-Cache-Status"] == "BYPASS", (headers, answer_headers)
    statuses = re.findall(r'HTTP/1\.1" (\d{3}) ', site.server.output())
    assert statuses and not [s for s in statuses if s.startswith("5")], statuses


# ---------------------------------------------------------------------- who may read


def _tokens(tmp_path, env_db: str) -> dict[str, str]:
    from rainer_server import create_app

    policy = tmp_path / "policy.yaml"
    app = create_app({"TESTING": True, "RAINER_DATABASE_URL": env_db, "RAINER_AUTH": "token",
                      "RAINER_POLICY": str(policy), "RAINER_SECRET_KEY": TEST_SECRET_KEY})
    try:
        store = app.extensions["rainer"].gate.tokens
        return {name: store.create(name) for name in ("alice", "bob")}
    finally:
        app.extensions["rainer"].close()


def test_the_cache_never_hands_one_caller_what_another_may_not_read(auth_site, tmp_path):
    site = auth_site
    tokens = _tokens(tmp_path, f"sqlite:///{tmp_path}/c.db")
    alice = {"Authorization": f"Bearer {tokens['alice']}"}
    bob = {"Authorization": f"Bearer {tokens['bob']}"}
    _post(site, "secret.db", 1, b'"s3cret"', alice)
    _post(site, "public", 1, b'"hello"', alice)

    # alice reads the private key, its meta and her listing, again and again: never kept.
    for _ in range(3):
        for url in (f"{site.api}/secret.db", f"{site.api}/secret.db/meta", site.api):
            status, headers, body = request(url, headers=alice)
            assert status == 200 and (b"s3cret" in body or b"secret.db" in body), (url, status, body)
            assert headers["X-Cache-Status"] == "BYPASS", (url, headers)
            if url != site.api:
                assert headers["Cache-Control"] == "private, no-cache", (url, headers)
    # The app, asked directly, marks the private key's answers private.
    direct = f"http://127.0.0.1:{site.server.port}/diary"
    assert request(f"{direct}/secret.db", headers=alice)[1]["Cache-Control"] == "private, no-cache"
    assert request(direct, headers=alice)[1]["Cache-Control"] == "private, no-cache"

    # Right after, the anonymous caller, bob, and a bad token get refusals, every time, and
    # the anonymous listing does not show the key.
    for _ in range(3):
        status, headers, body = request(f"{site.api}/secret.db")
        assert status == 401 and b"s3cret" not in body, (status, headers, body)
        assert headers.get("X-Cache-Status") != "HIT"
        status, _, body = request(f"{site.api}/secret.db/meta")
        assert status == 401 and b"version" not in body
        status, _, body = request(f"{site.api}/secret.db", headers=bob)
        assert status == 403 and b"s3cret" not in body
        status, _, body = request(f"{site.api}/secret.db", headers={"Authorization": "Bearer rnr_wrong"})
        assert status == 401 and b"s3cret" not in body
        status, _, body = request(site.api)
        assert status == 200 and "secret.db" not in json.loads(body), body

    # The key anyone may read, and the anonymous listing, are shared...
    status, headers, body = _hit(f"{site.api}/public")
    assert body == b'"hello"' and headers["Cache-Control"] == "public, max-age=1"
    status, headers, body = _hit(site.api)
    assert json.loads(body).keys() == {"public"}
    # ...but never with a caller who has credentials: alice still sees her listing, a bad
    # token is still refused.
    status, headers, body = request(site.api, headers=alice)
    assert headers["X-Cache-Status"] == "BYPASS" and json.loads(body).keys() == {"public", "secret.db"}
    status, headers, _ = request(f"{site.api}/public", headers={"Authorization": "Bearer rnr_wrong"})
    assert status == 401 and headers["X-Cache-Status"] == "BYPASS"
    # An empty Authorization header is no credential, for nginx and the app alike: the
    # anonymous caller's answers, shared.
    status, headers, body = request(f"{site.api}/public", headers={"Authorization": ""})
    assert status == 200 and body == b'"hello"' and headers["X-Cache-Status"] != "BYPASS"
    assert request(f"{site.api}/secret.db", headers={"Authorization": ""})[0] == 401
    direct_empty = request(f"{direct}/public", headers={"Authorization": ""})
    assert direct_empty[0] == 200 and direct_empty[1]["Cache-Control"] == "public, max-age=1"

    # Nothing alice read was stored: the anonymous reads above all reached the app.
    # alice 3 times, once directly, then the anonymous caller, bob and a bad token 3 times each.
    # Then the empty header's read of it, refused by the app too.
    assert site.wait_logged("GET /diary/secret.db", 14) == 14
