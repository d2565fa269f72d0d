"""deploy/nginx/rainer-proxy-auth.conf for real: nginx checks who is calling (basic auth, or a
client certificate) over TLS and hands the name to a live gunicorn in X-Remote-User.

The certificates and the password file are made here, for loopback, with the ``openssl``
command line; each test starts its own nginx and gunicorn. Without nginx or openssl the tests
skip, and under CI=true fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import service_missing
from tests.test_gunicorn import Gunicorn
from tests.test_gunicorn import request as plain_request
from tests.test_nginx import NGINX
from tests.test_nginx import Nginx
from tests.test_nginx import nginx_conf
from tests.zkserver import free_port

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "deploy" / "nginx" / "rainer-proxy-auth.conf"
BURST = 50  # the site's "burst=50" on the API location

pytestmark = pytest.mark.gunicorn

POLICY = """
rules:
  - keys: "team-a.*"
    read: ["*"]
    write: [alice]
  - keys: "*"
    read: ["*"]
    write: [admin]
"""

PASSWORDS = {"alice": "wonderland", "bob": "builder"}


def replace_once(pattern: str, replacement: str, text: str) -> str:
    text, count = re.subn(pattern, lambda _: replacement, text, flags=re.MULTILINE)
    assert count == 1, f"{pattern!r} is not in {SITE} exactly once"
    return text


def render(
    tls_port: int, http_port: int, upstream_port: int, files: Path, client_certificates: bool
) -> str:
    """The site on loopback ports with the test's files for its placeholders.

    The rate limit becomes one request a minute (the burst stays), so that the burst runs out
    within a test however slowly the machine answers.
    """
    site = SITE.read_text()
    site = replace_once(r"^\s*listen 443 ssl;$", f"    listen 127.0.0.1:{tls_port} ssl;", site)
    site = replace_once(r"^\s*listen \[::\]:443 ssl;$", "", site)
    site = replace_once(r"^\s*listen 80;$", f"    listen 127.0.0.1:{http_port};", site)
    site = replace_once(r"^\s*listen \[::\]:80;$", "", site)
    site = replace_once(r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{upstream_port};", site)
    site = replace_once(
        r"ssl_certificate /etc/ssl/rainer/fullchain\.pem;",
        f"ssl_certificate {files / 'server.pem'};",
        site,
    )
    site = replace_once(
        r"ssl_certificate_key /etc/ssl/rainer/privkey\.pem;",
        f"ssl_certificate_key {files / 'server.key'};",
        site,
    )
    site = replace_once(
        r"auth_basic_user_file /etc/nginx/rainer\.htpasswd;",
        f"auth_basic_user_file {files / 'htpasswd'};",
        site,
    )
    site = replace_once(r"rate=10r/s;", "rate=1r/m;", site)
    site = replace_once(r"burst=50 nodelay;", f"burst={BURST} nodelay;", site)
    if client_certificates:
        # The variant as its comment says: uncomment two lines, delete the auth_basic ones,
        # and send the certificate's CN.
        site = replace_once(
            r"^(\s*)# ssl_client_certificate /etc/ssl/rainer/client-ca\.pem;$",
            f"    ssl_client_certificate {files / 'client-ca.pem'};",
            site,
        )
        site = replace_once(r"^(\s*)# ssl_verify_client on;$", "    ssl_verify_client on;", site)
        site = replace_once(r'^\s*auth_basic "Rainer";$', "", site)
        site = replace_once(r"^\s*auth_basic_user_file \S+;$", "", site)
        site = replace_once(
            r"proxy_set_header X-Remote-User \$remote_user;",
            "proxy_set_header X-Remote-User $rainer_client_cn;",
            site,
        )
    return site


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


NEW_KEY = ["-newkey", "rsa:2048", "-nodes", "-days", "1"]


def make_files(files: Path, client_certificates: bool) -> None:
    """A server certificate for 127.0.0.1 and a password file; client certificates on request:
    a client CA, certificates it signed, and one from a CA nginx does not trust."""
    files.mkdir()
    openssl(
        "req", "-x509", *NEW_KEY, "-subj", "/CN=localhost",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout", files / "server.key", "-out", files / "server.pem",
    )  # fmt: skip
    # alice's hash in nginx's own {SSHA} scheme, bob's as the README says (SHA-512 crypt).
    sha512 = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input=PASSWORDS["bob"], capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    (files / "htpasswd").write_text(f"alice:{ssha(PASSWORDS['alice'])}\nbob:{sha512}\n")
    if not client_certificates:
        return
    for ca in ("client-ca", "other-ca"):
        openssl(
            "req", "-x509", *NEW_KEY, "-subj", f"/CN=Rainer test {ca}",
            "-keyout", files / f"{ca}.key", "-out", files / f"{ca}.pem",
        )  # fmt: skip
    # $ssl_client_s_dn lists the subject backwards: alice's is "CN=alice,O=Example", sneaky's
    # "O=Example,CN=admin".
    for name, subject, ca in (
        ("alice", "/O=Example/CN=alice", "client-ca"),
        ("sneaky", "/CN=admin/O=Example", "client-ca"),
        ("mallory", "/O=Example/CN=alice", "other-ca"),
    ):
        openssl(
            "req", "-new", *NEW_KEY[:3], "-subj", subject,
            "-keyout", files / f"{name}.key", "-out", files / f"{name}.csr",
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", files / f"{name}.csr", "-days", "1", "-set_serial", "1",
            "-CA", files / f"{ca}.pem", "-CAkey", files / f"{ca}.key",
            "-out", files / f"{name}.pem",
        )  # fmt: skip


def ssha(password: str) -> str:
    """nginx's "{SSHA}" scheme: base64(sha1(password + salt) + salt)."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def basic(name: str, password: str | None = None) -> dict[str, str]:
    credentials = f"{name}:{PASSWORDS[name] if password is None else password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the 3xx itself is the answer


class Site:
    """nginx with this site in front of gunicorn, and HTTPS requests that trust its certificate."""

    def __init__(self, tmp_path: Path, auth: str, client_certificates: bool = False) -> None:
        self.tmp_path = tmp_path
        self.auth = auth
        self.client_certificates = client_certificates
        self.files = tmp_path / "files"
        self.server: Gunicorn | None = None
        self.nginx: Nginx | None = None

    def start(self) -> None:
        if not os.access(NGINX, os.X_OK):
            service_missing(f"{NGINX} is missing (apt-get install nginx-light; scripts/test does)")
        if shutil.which("openssl") is None:
            service_missing("the openssl command is missing (apt-get install openssl)")
        make_files(self.files, self.client_certificates)
        policy = self.tmp_path / "policy.yaml"
        policy.write_text(POLICY)
        self.server = Gunicorn(
            {
                "RAINER_DATABASE_URL": f"sqlite:///{self.tmp_path}/n.db",
                "RAINER_TEST_LOG_DIR": str(self.tmp_path),
                "RAINER_AUTH": self.auth,
                "RAINER_POLICY": str(policy),
                # The console is on by default; with auth on it needs a key to sign cookies.
                "RAINER_SECRET_KEY": "test-only-secret-key-0123456789abcdef",
            },
            workers=2,
        )
        prefix = self.tmp_path / "nginx"
        prefix.mkdir()
        self.tls_port, self.http_port = free_port(), free_port()
        self.base = f"https://127.0.0.1:{self.tls_port}"
        self.http_base = f"http://127.0.0.1:{self.http_port}"
        site = render(
            self.tls_port, self.http_port, self.server.port, self.files, self.client_certificates
        )
        self.nginx = Nginx(nginx_conf(site, prefix), prefix, self.tls_port)
        self.server.wait_ready()
        self.nginx.wait_ready()

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        if self.server is not None:
            self.server.stop()

    def context(self, certificate: str | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.files / "server.pem"))
        if certificate is not None:
            context.load_cert_chain(
                self.files / f"{certificate}.pem", self.files / f"{certificate}.key"
            )
        return context

    def request(self, path, data=None, headers=None, method=None, base=None, certificate=None):
        """(status, headers, body) of one request; redirects are answers, not followed."""
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=self.context(certificate)), _NoRedirect()
        )
        req = urllib.request.Request(
            (base or self.base) + path, data=data, headers=headers or {}, method=method
        )
        try:
            with opener.open(req, timeout=30) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    def error_log(self) -> str:
        assert self.nginx is not None
        return self.nginx.log()


@pytest.fixture(params=["proxy", "token,proxy"])
def site(request, tmp_path):
    site = Site(tmp_path, request.param)
    try:
        site.start()
        yield site
    finally:
        site.stop()


def test_basic_auth_names_the_caller(site):
    # No credentials, wrong ones, or a header naming someone: 401 from nginx, as JSON, with
    # the challenge a client needs. The app never sees these requests.
    for headers in (
        {},
        basic("alice", "guess"),
        {"X-Remote-User": "alice"},
        {"Authorization": "Bearer rnr_x"},
    ):
        status, answer, body = site.request("/diary/?turned=away", headers=headers)
        assert status == 401, (headers, status, body)
        assert answer["WWW-Authenticate"] == 'Basic realm="Rainer"'
        assert answer["Content-Type"] == "application/json"
        assert json.loads(body) == {"error": "Authentication required"}

    # alice, by the name nginx checked.
    status, answer, body = site.request("/diary/-/whoami", headers=basic("alice"))
    assert status == 200, body
    whoami = json.loads(body)
    assert (whoami["identity"], whoami["via"]) == ("alice", "proxy")
    assert answer["Strict-Transport-Security"] == "max-age=63072000"

    # The site clears Authorization anyway (nginx checked the password). Were a "Basic ..."
    # header passed on, the app would not take it for a token: with proxy mode on, another
    # scheme leaves the caller to the trusted proxy's header. Straight to gunicorn, from
    # 127.0.0.1 (a trusted proxy address), as nginx would pass it on:
    status, answer, body = plain_request(
        site.server.url + "/-/whoami", headers={**basic("alice"), "X-Remote-User": "alice"}
    )
    assert status == 200 and json.loads(body)["identity"] == "alice", body

    # She writes without X-Rainer-Author: the author is who she is.
    status, _, body = site.request("/diary/team-a.x/1", b'{"n": 1}', basic("alice"), "POST")
    assert status == 200, body
    assert json.loads(body)["author"] == "alice"

    # Naming someone else in X-Remote-User changes nothing: nginx replaces the header.
    spoofing = {**basic("alice"), "X-Remote-User": "bob"}
    assert json.loads(site.request("/diary/-/whoami", headers=spoofing)[2])["identity"] == "alice"
    status, _, body = site.request("/diary/team-a.x/2", b'{"n": 2}', spoofing, "POST")
    assert status == 200 and json.loads(body)["author"] == "alice", body

    # bob is someone, but the policy lets only alice write team-a.*: 403 from the app, and
    # calling himself alice does not help.
    for headers in (basic("bob"), {**basic("bob"), "X-Remote-User": "alice"}):
        status, _, body = site.request("/diary/team-a.x/3", b'{"n": 3}', headers, "POST")
        assert status == 403, (headers, status, body)
        assert json.loads(body) == {"error": "bob may not write team-a.x"}
    # He may read.
    status, answer, body = site.request("/diary/team-a.x", headers=basic("bob"))
    assert status == 200 and body == b'{"n": 2}' and answer["X-Rainer-Version"] == "2"

    # Plain HTTP: a permanent redirect to HTTPS (port 443), except the liveness check.
    status, answer, _ = site.request(
        "/diary/team-a.x?all=1", base=site.http_base, headers=basic("alice")
    )
    assert status == 301 and answer["Location"] == "https://127.0.0.1/diary/team-a.x?all=1"
    status, _, body = site.request("/healthz", base=site.http_base)
    assert status == 200 and json.loads(body) == {"status": "ok"}

    # Health without credentials; /metrics to loopback (we are) without them too.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert site.request(path)[0] == 200, path

    # A burst beyond limit_req: the API answers 429 as JSON, while health checks still pass.
    statuses = []
    for _ in range(BURST + 10):
        status, answer, body = site.request("/diary/team-a.x", headers=basic("bob"))
        statuses.append(status)
        if status == 429:
            assert json.loads(body) == {"error": "Too many requests: slow down"}
            assert answer["Content-Type"] == "application/json"
            assert answer["Retry-After"] == "1"
            assert answer["Strict-Transport-Security"] == "max-age=63072000"
    assert set(statuses) == {200, 429}, statuses
    assert statuses.count(200) <= BURST, statuses  # this test spent some of the burst before
    assert site.request("/healthz")[0] == 200
    assert site.request("/diary/-/whoami", headers=basic("alice"))[0] == 429

    assert "[emerg]" not in site.error_log() and "[alert]" not in site.error_log()
    assert "turned=away" not in site.server.output()
    statuses = re.findall(r'HTTP/1\.[01]" (\d{3}) ', site.server.output())
    assert statuses and not [s for s in statuses if s.startswith("5")], statuses


@pytest.fixture
def certificate_site(tmp_path):
    site = Site(tmp_path, "proxy", client_certificates=True)
    try:
        site.start()
        yield site
    finally:
        site.stop()


def test_client_certificate_variant(certificate_site):
    site = certificate_site
    # The CN of a certificate from the configured CA is the identity; X-Remote-User sent by
    # the client changes nothing, and no password is asked for.
    status, _, body = site.request(
        "/diary/-/whoami", headers={"X-Remote-User": "bob"}, certificate="alice"
    )
    assert status == 200, body
    assert (json.loads(body)["identity"], json.loads(body)["via"]) == ("alice", "proxy")
    status, _, body = site.request(
        "/diary/team-a.x/1", b"{}", {"X-Remote-User": "bob"}, "POST", certificate="alice"
    )
    assert status == 200 and json.loads(body)["author"] == "alice", body

    # A CN that is not the first part of the subject names nobody.
    status, _, body = site.request("/diary/-/whoami", certificate="sneaky")
    assert status == 200 and json.loads(body)["identity"] is None, body
    status, _, body = site.request(
        "/diary/team-a.x/2", b"{}", {"X-Rainer-Author": "admin"}, "POST", certificate="sneaky"
    )
    assert status == 401, body

    # No certificate, or one from another CA: nginx refuses (400) before the app hears of it.
    for certificate in (None, "mallory"):
        status, _, body = site.request(
            "/diary/-/whoami", headers={"X-Remote-User": "alice"}, certificate=certificate
        )
        assert status == 400, (certificate, status, body)
    # Liveness over plain HTTP needs no certificate.
    assert site.request("/healthz", base=site.http_base)[0] == 200
