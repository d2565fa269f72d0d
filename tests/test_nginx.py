"""deploy/nginx/rainer.conf for real: Debian's nginx on a loopback port in front of a live
gunicorn, answering a POST, a GET, a 413 and a 409 as the service does without it.

Needs /usr/sbin/nginx (``scripts/test`` installs nginx-light when it is missing); installs
nothing itself. Without it the test skips, and under CI=true fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import service_missing
from tests.test_gunicorn import Gunicorn
from tests.zkserver import free_port
from tests.test_gunicorn import request

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "deploy" / "nginx" / "rainer.conf"
NGINX = "/usr/sbin/nginx"
LIMIT = 524288  # RAINER_MAX_PAYLOAD_BYTES's default, and the site's client_max_body_size 512k
AUTHOR = {"X-Rainer-Author": "alice"}

pytestmark = pytest.mark.gunicorn


def render(site: str, listen_port: int, upstream_port: int, prefix: Path) -> str:
    """The site inside a minimal nginx.conf of its own: loopback port, files under prefix."""

    def replace_once(pattern: str, replacement: str, text: str) -> str:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert count == 1, f"{pattern!r} is not in {SITE} exactly once"
        return text

    site = replace_once(r"^\s*listen 80;$", f"    listen 127.0.0.1:{listen_port};", site)
    site = replace_once(r"^\s*listen \[::\]:80;$", "", site)
    site = replace_once(r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{upstream_port};", site)
    site = replace_once(r"proxy_cache_path /var/cache/nginx/rainer ", f"proxy_cache_path {prefix / 'cache'} ", site)
    return nginx_conf(site, prefix)


def nginx_conf(site: str, prefix: Path) -> str:
    """An nginx.conf of its own around ``site``: logs and temporary files under ``prefix``."""
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx's workers would run as "nobody" and could not use the test's private
    # temporary directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
events {{ worker_connections 64; }}
http {{
    access_log {prefix / "access.log"};
{temp_paths}
{site}
}}
"""


class Nginx:
    def __init__(self, conf: str, prefix: Path, port: int) -> None:
        self.prefix = prefix
        self.port = port
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(conf)
        self.error_log = prefix / "error.log"
        self.process = subprocess.Popen(
            [
                NGINX, "-p", str(prefix), "-c", str(self.conf), "-e", str(self.error_log),
                "-g", f"daemon off; pid {prefix / 'nginx.pid'};",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx not listening: {self.log()}")

    def log(self) -> str:
        return self.error_log.read_text() if self.error_log.exists() else ""

    def stop(self) -> None:
        self.process.send_signal(signal.SIGQUIT)  # graceful
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def proxied(tmp_path):
    if not os.access(NGINX, os.X_OK):
        service_missing(f"{NGINX} is missing (apt-get install nginx-light; scripts/test does)")
    server = Gunicorn({"RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/n.db", "RAINER_TEST_LOG_DIR": str(tmp_path)})
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    nginx = Nginx(render(SITE.read_text(), port, server.port, prefix), prefix, port)
    try:
        server.wait_ready()
        nginx.wait_ready()
        yield f"http://127.0.0.1:{port}", server, nginx
    finally:
        nginx.stop()
        server.stop()


def test_nginx_site_in_front_of_gunicorn(proxied):
    base, server, nginx = proxied
    api = base + "/diary"

    # POST and GET, with the client's address forwarded.
    status, _, body = request(
        f"{api}/svc/1", b'{"threads": 4}', {**AUTHOR, "X-Forwarded-For": "203.0.113.7"}, "POST"
    )
    assert status == 200 and json.loads(body)["version"] == 1
    status, headers, body = request(f"{api}/svc")
    assert status == 200 and body == b'{"threads": 4}' and headers["X-Rainer-Version"] == "1"
    assert headers["Server"].startswith("nginx")

    # 409 passes through with the original's body.
    status, _, body = request(f"{api}/svc/1", b"{}", AUTHOR, "POST")
    assert status == 409
    assert json.loads(body) == {"conflict": {"key": "svc", "expectedVersion": 2, "providedVersion": 1}}

    # The limits match: exactly RAINER_MAX_PAYLOAD_BYTES is saved, one byte more is 413 (from
    # nginx, in the app's JSON shape), never a 5xx, and nothing is saved.
    at_limit = b'"' + b"a" * (LIMIT - 2) + b'"'
    assert len(at_limit) == LIMIT
    assert request(f"{api}/big/1", at_limit, AUTHOR, "POST")[0] == 200
    over = b'"' + b"a" * (LIMIT - 1) + b'"'
    status, headers, body = request(f"{api}/big/2", over, AUTHOR, "POST")
    assert status == 413, (status, body)
    assert json.loads(body) == {"error": f"Payload too large: the limit is {LIMIT} bytes"}
    status, _, _ = request(f"{api}/big/2")
    assert status == 404
    status, _, body = request(f"{api}/big2/1", b"[" + b"1," * 400000 + b"1]", AUTHOR, "POST")
    assert status == 413

    # Percent-encoded keys reach the app as sent.
    key = quote("été 2026", safe="")
    assert request(f"{api}/{key}/1", b"[]", AUTHOR, "POST")[0] == 200
    assert request(f"{api}/{key}")[2] == b"[]"

    # Health and metrics through the proxy (/metrics: loopback only, as we are).
    assert request(base + "/healthz")[0] == 200
    assert request(base + "/readyz")[0] == 200
    status, _, body = request(base + "/metrics")
    assert status == 200 and b"rainer_commits_saved_total 3.0" in body

    # gunicorn logged the forwarded client address.
    output = server.output()
    assert re.search(r'203\.0\.113\.7, 127\.0\.0\.1 .*"POST /diary/svc/1 HTTP/1\.[01]" 200', output), output
    statuses = re.findall(r'HTTP/1\.[01]" (\d{3}) ', output)
    assert statuses and not [s for s in statuses if s.startswith("5")], statuses
    assert "[emerg]" not in nginx.log() and "[alert]" not in nginx.log()
