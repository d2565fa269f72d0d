"""Settings: one schema for every RAINER_* setting (gunicorn's too), the RAINER_CONFIG file,
unknown names, and the embedded extension reading the same sources as the service."""

from __future__ import annotations

import logging

import pytest
from flask import Flask

from rainer_server import ConfigurationError
from rainer_server import MemoryCommitStorage
from rainer_server import Rainer
from rainer_server import create_app
from rainer_server import gunicorn_hooks
from rainer_server.settings import DEFAULTS
from rainer_server.settings import NAMES
from rainer_server.settings import OTHER_NAMES
from rainer_server.settings import configured_values
from rainer_server.settings import load_settings
from rainer_server.settings import read_settings_file
from rainer_server.settings import unknown_setting_messages

AUTHOR = {"X-Rainer-Author": "alice"}


def invalid(name: str, value) -> str:
    with pytest.raises(ConfigurationError) as info:
        load_settings({name: value})
    message = str(info.value)
    assert message.startswith(f"Invalid setting RAINER_{name.upper()}: ") and "\n" not in message
    return message


# ---------------------------------------------------------------------- the schema


def test_gunicorn_settings_are_in_the_one_schema():
    assert {"RAINER_BIND", "RAINER_WORKERS", "RAINER_HEALTH_ROUTES"} <= set(NAMES)
    assert DEFAULTS["RAINER_BIND"] == "127.0.0.1:8080" and DEFAULTS["RAINER_WORKERS"] == 2
    settings = load_settings({"bind": "0.0.0.0:9000", "workers": "4", "health_routes": "false"})
    assert (settings.bind, settings.workers, settings.health_routes) == ("0.0.0.0:9000", 4, False)


@pytest.mark.parametrize("bind", ["127.0.0.1:8080", "localhost:1", "[::1]:8080", "unix:/run/rainer.sock", "fd://3"])
def test_bind_takes_gunicorns_forms(bind):
    assert load_settings({"bind": bind}).bind == bind


@pytest.mark.parametrize("bind", ["", "localhost", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:70000", ":8080", "a b:80"])
def test_bad_bind(bind):
    assert "host:port" in invalid("bind", bind)


@pytest.mark.parametrize("workers", ["two", "0", "-1", "2.5", ""])
def test_bad_workers(workers):
    invalid("workers", workers)


def test_database_timeout_is_a_setting():
    # What it bounds, under gevent: tests/test_db_hang.py.
    assert DEFAULTS["RAINER_DATABASE_TIMEOUT"] == 2.0
    assert load_settings({"database_timeout": "0.5"}).database_timeout == 0.5


@pytest.mark.parametrize("value", ["0", "-1", "26", "soon", ""])
def test_bad_database_timeout(value):
    # Above 25 s a hung database would meet gunicorn's 30 s worker timeout first.
    invalid("database_timeout", value)


def test_bad_health_routes():
    assert "Not a valid boolean" in invalid("health_routes", "maybe")


@pytest.mark.parametrize(
    "url, reason",
    [
        ("mysql://rainer:s3cret-pw@db.internal:3306", "names no database"),
        ("mysql://rainer:s3cret-pw@db.internal:3306/", "names no database"),
        ("mysql://rainer:s3cret-pw@db.internal:port/rainer", "port"),
        ("postgres://rainer:s3cret-pw@db.internal/rainer", "must be sqlite"),
    ],
)
def test_bad_database_urls_are_refused_without_repeating_the_password(url, reason):
    message = invalid("database_url", url)
    assert reason in message and "s3cret-pw" not in message and "db.internal" not in message


# ---------------------------------------------------------------------- the settings file


def test_settings_file_gives_its_upper_case_names(tmp_path):
    path = tmp_path / "rainer.py"
    path.write_text("import os\nRAINER_TABLE = 'file_t'\nSECRET_KEY = 'k'\nlower = 1\n")
    assert read_settings_file(str(path)) == {"RAINER_TABLE": "file_t", "SECRET_KEY": "k"}


@pytest.mark.parametrize(
    "source, expected",
    [
        ("RAINER_TABLE = 'a'\nRAINER_WORKERS = (\n", "line 2: '(' was never closed"),
        ("RAINER_TABLE = 'a'\n\nRAINER_WORKERS = undefined_name\n", "line 3: NameError: name 'undefined_name' is not defined"),
        ("x = 1\nraise RuntimeError('two\\nlines')\n", "line 2: RuntimeError: two lines"),
    ],
)
def test_a_settings_file_that_does_not_run_is_one_line(tmp_path, source, expected):
    path = tmp_path / "rainer.py"
    path.write_text(source)
    with pytest.raises(ConfigurationError) as info:
        configured_values({"RAINER_CONFIG": str(path)})
    assert str(info.value) == f"Invalid setting RAINER_CONFIG: {path} {expected}"


def test_a_missing_settings_file_is_refused(tmp_path):
    with pytest.raises(ConfigurationError) as info:
        configured_values({"RAINER_CONFIG": str(tmp_path / "nope.py")})
    assert str(info.value) == f"Invalid setting RAINER_CONFIG: cannot read {tmp_path}/nope.py: No such file or directory"


def test_the_environment_wins_over_the_file(tmp_path):
    path = tmp_path / "rainer.py"
    path.write_text("RAINER_TABLE = 'file_t'\nRAINER_ZK_PATH = '/file'\n")
    values = configured_values({"RAINER_CONFIG": str(path), "RAINER_TABLE": "env_t", "PATH": "/bin"})
    assert values == {"RAINER_TABLE": "env_t", "RAINER_ZK_PATH": "/file"}


# ---------------------------------------------------------------------- unknown names


def test_unknown_names_are_named_with_the_closest_known_one(tmp_path):
    path = tmp_path / "rainer.py"
    path.write_text("RAINER_TABEL = 'x'\n")
    environ = {
        "RAINER_CONFIG": str(path),
        "RAINER_DATABSE_URL": "sqlite:///x.db",
        "RAINER_WORKER": "3",
        "RAINER_FROBNICATE": "1",
        # Not settings of the service, but set beside them: never reported.
        "RAINER_URL": "http://rainer:8080/diary",
        "RAINER_TOKEN": "t",
        "RAINER_AUTHOR": "alice",
        "RAINER_PROMETHEUS_MASTER": "1:",
        "RAINER_TEST_MYSQL_URL": "mysql://x/y",
        "RAINER_TEST_ANYTHING": "1",
        "OTHER": "1",
    }
    warnings: list[str] = []
    values = configured_values(environ, warn=warnings.append)
    assert warnings == [
        f"Unknown setting RAINER_TABEL in {path} is ignored (did you mean RAINER_TABLE?)",
        "Unknown setting RAINER_DATABSE_URL in the environment is ignored (did you mean RAINER_DATABASE_URL?)",
        "Unknown setting RAINER_FROBNICATE in the environment is ignored",
        "Unknown setting RAINER_WORKER in the environment is ignored (did you mean RAINER_WORKERS?)",
    ]
    assert values == {}


def test_the_metrics_mark_of_the_gunicorn_hooks_is_a_known_name():
    assert gunicorn_hooks._METRICS_MARK in OTHER_NAMES
    assert unknown_setting_messages([gunicorn_hooks._METRICS_MARK], "env") == []


def test_create_app_warns_once_per_unknown_name(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("RAINER_DATABASE_URL", f"sqlite:///{tmp_path}/r.db")
    monkeypatch.setenv("RAINER_URL_PREFX", "/x")
    with caplog.at_level(logging.WARNING, logger="rainer_server"):
        app = create_app()
    warnings = [r.getMessage() for r in caplog.records if "RAINER_URL_PREFX" in r.getMessage()]
    assert warnings == [
        "Unknown setting RAINER_URL_PREFX in the environment is ignored (did you mean RAINER_URL_PREFIX?)"
    ]
    assert app.extensions["rainer"].settings.url_prefix == "/diary"


# ---------------------------------------------------------------------- the embedded extension


def host_app() -> Flask:
    host = Flask("host")

    @host.get("/hello")
    def hello():
        return "hi"

    return host


def test_the_extension_reads_the_environment_unless_the_app_sets_it(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAINER_DATABASE_URL", f"sqlite:///{tmp_path}/from-env.db")
    monkeypatch.setenv("RAINER_URL_PREFIX", "/from-env")
    monkeypatch.setenv("RAINER_TABLE", "env_table")
    host = host_app()
    host.config["RAINER_TABLE"] = "host_table"
    rainer = Rainer(host)
    try:
        assert rainer.settings.url_prefix == "/from-env"
        assert rainer.settings.table == "host_table"  # the app's config wins
        client = host.test_client()
        assert client.post("/from-env/k/1", data=b"{}", headers=AUTHOR).status_code == 200
        assert (tmp_path / "from-env.db").exists()
        assert not (tmp_path / "rainer.db").exists()
    finally:
        rainer.close()


def test_the_extension_reads_the_settings_file(monkeypatch, tmp_path):
    path = tmp_path / "rainer.py"
    path.write_text("RAINER_URL_PREFIX = '/from-file'\n")
    monkeypatch.setenv("RAINER_CONFIG", str(path))
    rainer = Rainer(host_app(), storage=MemoryCommitStorage())
    assert rainer.settings.url_prefix == "/from-file"


def test_the_extension_can_be_told_to_read_the_apps_config_alone(monkeypatch):
    monkeypatch.setenv("RAINER_URL_PREFIX", "/from-env")
    rainer = Rainer(host_app(), storage=MemoryCommitStorage(), environ={})
    assert rainer.settings.url_prefix == "/diary"


def test_the_extension_refuses_a_bad_setting_from_the_environment(monkeypatch):
    monkeypatch.setenv("RAINER_MAX_PAYLOAD_BYTES", "lots")
    with pytest.raises(ConfigurationError) as info:
        Rainer(host_app(), storage=MemoryCommitStorage())
    assert "RAINER_MAX_PAYLOAD_BYTES" in str(info.value)


def test_the_extension_names_unknown_names_in_the_apps_config(caplog):
    host = host_app()
    host.config["RAINER_URL_PREFX"] = "/x"
    with caplog.at_level(logging.WARNING, logger="rainer_server"):
        Rainer(host, storage=MemoryCommitStorage(), environ={})
    assert (
        "Unknown setting RAINER_URL_PREFX in the app's config is ignored (did you mean RAINER_URL_PREFIX?)"
        in caplog.messages
    )


def test_the_extension_keeps_the_apps_own_health_route_and_says_so(caplog):
    host = host_app()

    @host.get("/healthz")
    def own_health():
        return {"mine": True}

    with caplog.at_level(logging.WARNING, logger="rainer_server"):
        Rainer(host, storage=MemoryCommitStorage(), environ={})
    assert [m for m in caplog.messages if "/healthz" in m] == [
        "Not adding Rainer's /healthz: the app already routes it to own_health "
        "(set RAINER_HEALTH_ROUTES=false to add none of /healthz, /readyz, /metrics)"
    ]
    client = host.test_client()
    assert client.get("/healthz").get_json() == {"mine": True}
    assert client.get("/readyz").get_json() == {"status": "ok", "checks": {"database": "ok"}}
    assert client.get("/metrics").status_code == 200


def test_the_extension_adds_no_health_routes_when_told_not_to(caplog):
    host = host_app()

    @host.get("/metrics")
    def own_metrics():
        return "mine"

    host.config["RAINER_HEALTH_ROUTES"] = False
    with caplog.at_level(logging.WARNING, logger="rainer_server"):
        Rainer(host, storage=MemoryCommitStorage(), environ={})
    assert caplog.messages == []
    client = host.test_client()
    assert client.get("/healthz").status_code == 404
    assert client.get("/readyz").status_code == 404
    assert client.get("/metrics").data == b"mine"
    assert client.post("/diary/k/1", data=b"{}", headers=AUTHOR).status_code == 200


# ---------------------------------------------------------------------- the console's settings


def test_console_settings_and_their_defaults():
    settings = load_settings({})
    assert (settings.ui, settings.ui_prefix, settings.secret_key) == (True, "/ui", None)
    assert {"RAINER_UI", "RAINER_UI_PREFIX", "RAINER_SECRET_KEY"} <= set(NAMES)
    assert load_settings({"ui": "off"}).ui is False and load_settings({"ui": "on"}).ui is True
    assert load_settings({"ui_prefix": "/console/v1"}).ui_prefix == "/console/v1"
    assert "must start with '/'" in invalid("ui_prefix", "ui")
    assert "must start with '/'" in invalid("ui_prefix", "/ui/")
    assert "must start with '/'" in invalid("ui_prefix", "")
    invalid("ui", "maybe")


def test_the_secret_key_is_required_with_the_console_and_auth_on():
    policy = {"auth": "token", "policy": "/etc/rainer/policy.yaml"}
    with pytest.raises(ConfigurationError) as info:
        load_settings(policy)
    assert str(info.value).startswith("Invalid setting RAINER_SECRET_KEY: required when the console")
    assert "RAINER_UI=off" in str(info.value)
    # Not with the console off, nor without auth; an empty value is no key.
    assert load_settings({**policy, "ui": "off"}).secret_key is None
    assert load_settings({"auth": "none"}).secret_key is None
    with pytest.raises(ConfigurationError, match="RAINER_SECRET_KEY: required"):
        load_settings({**policy, "secret_key": ""})
    key = "k" * 32
    settings = load_settings({**policy, "secret_key": key})
    assert settings.secret_key == key and key not in repr(settings)


def test_a_short_secret_key_is_refused_without_repeating_it():
    message = invalid("secret_key", "hunter2")
    assert "at least 32 characters" in message and "hunter2" not in message


def test_the_console_cannot_sit_inside_the_api_prefix():
    assert "inside the API's RAINER_URL_PREFIX /diary" in invalid_pair(
        {"ui_prefix": "/diary/ui"}, "ui_prefix")
    assert "RAINER_URL_PREFIX" in invalid_pair({"ui_prefix": "/diary"}, "ui_prefix")
    assert load_settings({"ui_prefix": "/diary-ui"}).ui_prefix == "/diary-ui"
    assert load_settings({"ui_prefix": "/diary/ui", "ui": "off"}).ui is False


def invalid_pair(values, name):
    with pytest.raises(ConfigurationError) as info:
        load_settings(values)
    assert str(info.value).startswith(f"Invalid setting RAINER_{name.upper()}: ")
    return str(info.value)
