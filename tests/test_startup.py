"""Starting the service for real (gunicorn as the README runs it, ``flask --app wsgi`` and a
bare ``import wsgi``): a bad setting, or a database that refuses the configured one, stops
each with status 1 and one line on stderr; a database that is down does not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

import pytest

from rainer_server.storage.db import open_database
from tests.test_gunicorn import Gunicorn
from tests.test_gunicorn import request
from tests.zkserver import free_port

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = {
    # The README's command, from the root of a checkout.
    "gunicorn": ["-m", "gunicorn", "-c", "config/gunicorn.conf.py", "wsgi:app"],
    "flask": ["-m", "flask", "--app", "wsgi", "rainer", "init-db"],
    "import": ["-c", "import wsgi"],
}
# What a wheel installs, runnable from anywhere.
PACKAGED_GUNICORN = ["-m", "gunicorn", "-c", "python:rainer_server.gunicorn_conf", "rainer_server.wsgi:app"]


def environment(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The test's environment without any RAINER_* setting of the caller's, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAINER_") or k.startswith("RAINER_TEST_")}
    # Where gunicorn would listen if it started after all: never a port in use.
    env["RAINER_BIND"] = f"127.0.0.1:{free_port()}"
    env["RAINER_DATABASE_URL"] = f"sqlite:///{tmp_path}/rainer.db"
    env.update(settings)
    return env


def start(command: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    args = PACKAGED_GUNICORN if command == "gunicorn-packaged" else COMMANDS[command]
    try:
        return subprocess.run(
            [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{command} did not stop: {exc.stderr}")


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 1, result
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rainer: Invalid setting "), lines
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0]


def settings_file(tmp_path: Path, source: str) -> str:
    path = tmp_path / "rainer_settings.py"
    path.write_text(source)
    return str(path)


BAD_SETTINGS = {
    "workers": (lambda tmp: {"RAINER_WORKERS": "two"}, ["RAINER_WORKERS: Not a valid integer."]),
    "bind": (lambda tmp: {"RAINER_BIND": "localhost"}, ["RAINER_BIND: must be host:port"]),
    "health routes": (lambda tmp: {"RAINER_HEALTH_ROUTES": "maybe"}, ["RAINER_HEALTH_ROUTES"]),
    "missing file": (
        lambda tmp: {"RAINER_CONFIG": str(tmp / "missing.py")},
        ["RAINER_CONFIG: cannot read", "missing.py: No such file or directory"],
    ),
    "syntax error": (
        lambda tmp: {"RAINER_CONFIG": settings_file(tmp, "RAINER_TABLE = 'x'\nRAINER_WORKERS = (\n")},
        ["RAINER_CONFIG: ", "rainer_settings.py line 2: '(' was never closed"],
    ),
    "bad value in the file": (
        lambda tmp: {"RAINER_CONFIG": settings_file(tmp, "RAINER_MAX_PAYLOAD_BYTES = 'lots'\n")},
        ["RAINER_MAX_PAYLOAD_BYTES: Not a valid integer."],
    ),
    "sqlite file that cannot be opened": (
        lambda tmp: {"RAINER_DATABASE_URL": f"sqlite:///{tmp}/no/such/directory/rainer.db"},
        ["RAINER_DATABASE_URL: unable to open database file"],
    ),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_a_bad_setting_stops_startup_with_one_line(tmp_path, command, case):
    settings, fragments = BAD_SETTINGS[case]
    assert_refused(start(command, environment(tmp_path, **settings(tmp_path))), *fragments)


def test_the_packaged_gunicorn_settings_refuse_the_same_way(tmp_path):
    result = start("gunicorn-packaged", environment(tmp_path, RAINER_WORKERS="0"), cwd=tmp_path)
    assert_refused(result, "RAINER_WORKERS: Must be greater than or equal to 1")


# ---------------------------------------------------------------------- MySQL refusing


def mysql_url_with(url: str, user: str | None = None, password: str | None = None, database: str | None = None) -> str:
    parts = urlsplit(url)
    user = parts.username if user is None else user
    password = parts.password if password is None else password
    credentials = user + (f":{password}" if password else "")
    netloc = f"{credentials}@{parts.hostname}:{parts.port or 3306}"
    path = parts.path if database is None else f"/{database}"
    return urlunsplit((parts.scheme, netloc, path, parts.query, ""))


@pytest.fixture
def mysql_user(mysql_url):
    """A throw-away MySQL user with a password and no rights on the test database."""
    import pymysql

    parts = urlsplit(mysql_url)
    user, password = "rainer_t_" + uuid.uuid4().hex[:8], "pw-" + uuid.uuid4().hex[:12]
    admin = pymysql.connect(
        host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
        password=parts.password or "", autocommit=True,
    )
    try:
        with admin.cursor() as cursor:
            cursor.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (user, password))
        yield user, password
    finally:
        with admin.cursor() as cursor:
            cursor.execute("DROP USER IF EXISTS %s@'%%'", (user,))
        admin.close()


@pytest.mark.mysql
@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_database_stops_startup(mysql_url, tmp_path, command):
    url = mysql_url_with(mysql_url, database="rainer_no_such_" + uuid.uuid4().hex[:8])
    result = start(command, environment(tmp_path, RAINER_DATABASE_URL=url))
    assert_refused(result, "RAINER_DATABASE_URL: Unknown database 'rainer_no_such_", "(MySQL error 1049)")


@pytest.mark.mysql
@pytest.mark.parametrize("command", COMMANDS)
def test_a_wrong_password_stops_startup_without_showing_it(mysql_url, mysql_user, tmp_path, command):
    user, _ = mysql_user
    url = mysql_url_with(mysql_url, user=user, password="wrong-pw-4711")
    result = start(command, environment(tmp_path, RAINER_DATABASE_URL=url))
    assert_refused(result, "RAINER_DATABASE_URL: Access denied for user", "(MySQL error 1045)")
    assert "wrong-pw-4711" not in result.stderr


@pytest.mark.mysql
@pytest.mark.parametrize("command", ["import"])
def test_a_wrong_root_password_stops_startup(mysql_url, tmp_path, command):
    # The test server lets root@127.0.0.1 in with an empty password (scripts/with-services).
    url = mysql_url_with(mysql_url, user="root", password="not-roots-password")
    result = start(command, environment(tmp_path, RAINER_DATABASE_URL=url))
    assert_refused(result, "Access denied for user 'root'", "(MySQL error 1045)")


@pytest.mark.mysql
@pytest.mark.parametrize("command", COMMANDS)
def test_a_user_without_rights_on_the_database_stops_startup(mysql_url, mysql_user, tmp_path, command):
    user, password = mysql_user
    url = mysql_url_with(mysql_url, user=user, password=password)
    result = start(command, environment(tmp_path, RAINER_DATABASE_URL=url))
    assert_refused(result, f"Access denied for user '{user}'", "(MySQL error 1044)")
    assert password not in result.stderr


# ---------------------------------------------------------------------- what does not stop it


def test_an_unreachable_database_only_warns(tmp_path):
    port = free_port()  # nothing listens there
    env = environment(tmp_path, RAINER_DATABASE_URL=f"mysql://rainer:pw-77@127.0.0.1:{port}/rainer")
    result = start("import", env)
    assert result.returncode == 0, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Database unavailable at startup, starting anyway"), lines
    assert "Can't connect to MySQL server on '127.0.0.1'" in lines[0] and "pw-77" not in lines[0]


def test_unknown_names_warn_in_one_line_each_and_known_ones_not_at_all(tmp_path):
    env = environment(
        tmp_path,
        RAINER_DATABSE_URL="sqlite:///typo.db",
        RAINER_URL="http://127.0.0.1:8080/diary",
        RAINER_TOKEN="t",
        RAINER_AUTHOR="alice",
        RAINER_TEST_SOMETHING="1",
    )
    result = start("import", env)
    assert result.returncode == 0, result
    assert result.stderr.splitlines() == [
        "Unknown setting RAINER_DATABSE_URL in the environment is ignored (did you mean RAINER_DATABASE_URL?)"
    ]


def wait_listening(url: str, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "gunicorn exited"
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"nothing answers at {url}")


def test_gunicorn_takes_bind_and_workers_from_the_settings(tmp_path):
    port = free_port()
    env = environment(tmp_path, RAINER_BIND=f"127.0.0.1:{port}", RAINER_WORKERS="1", RAINER_DATABSE_URL="x")
    log = open(tmp_path / "gunicorn.log", "w+")
    process = subprocess.Popen(
        [sys.executable, *COMMANDS["gunicorn"]], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_listening(f"http://127.0.0.1:{port}/healthz", process)
    finally:
        process.terminate()
        process.wait(30)
        log.seek(0)
        output = log.read()
        log.close()
    assert output.count("Booting worker") == 1, output
    warnings = [line for line in output.splitlines() if "RAINER_DATABSE_URL" in line]
    # Once, from the master, in gunicorn's format like the rest of its log.
    assert len(warnings) == 1 and "[WARNING] Unknown setting RAINER_DATABSE_URL" in warnings[0], output


@pytest.mark.mysql
def test_the_master_keeps_no_database_connection(mysql_url, tmp_path):
    """The startup check connects in the master and closes again, before the workers fork."""
    table = "t_" + uuid.uuid4().hex[:12]
    server = Gunicorn(
        {"RAINER_DATABASE_URL": mysql_url, "RAINER_TABLE": table, "RAINER_TEST_LOG_DIR": str(tmp_path)}, workers=1
    )
    try:
        server.wait_ready()
        assert request(server.url + "/")[0] == 200  # the worker connects; the master must not
        port = urlsplit(mysql_url).port or 3306
        worker = int(Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()[0])
        assert database_sockets(worker, port) == 1  # the probe sees connections where they are
        assert database_sockets(server.process.pid, port) == 0
    finally:
        server.stop()
        database = open_database(mysql_url)
        database.execute_sql(f"DROP TABLE IF EXISTS {table}")
        database.close()


def database_sockets(pid: int, port: int) -> int:
    """How many TCP connections to ``port`` the process ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[9] in inodes:
                count += 1
    return count
