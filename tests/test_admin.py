"""``flask rainer …`` admin commands over SQLite and MySQL: list/show/log, export and import."""

from __future__ import annotations

import base64
import json
import os
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from rainer_server import create_app
from rainer_server.commit import Commit
from tests.live import run_in_pty
from tests.storage_contract import T0

FLASK = [sys.executable, "-m", "flask", "--app", "wsgi"]


def make_commit(key, version, payload=b'{"a": 1}', author="alice", comment="", minutes=0):
    return Commit(key, version, payload, author, comment, T0 + timedelta(minutes=minutes))


# A history with what exports must keep: tombstones and revivals, binary and empty payloads,
# multi-line and non-ASCII metadata, keys that differ only in case or accents.
HISTORY = [
    make_commit("web", 1, b'{\n  "threads": 4  \n}\n', comment="first\nsecond line"),
    make_commit("web", 2, b'{"threads": 8}', author="Zoë ☃", minutes=1),
    make_commit("web", 3, None, comment="retired", minutes=2),
    make_commit("web", 4, b"{}", comment="back", minutes=3),
    make_commit("Web", 1, bytes(range(256))),
    make_commit("é", 1, b""),
    make_commit("e\u0301", 1, b"[]"),
    make_commit("z" * 255, 1, b"1"),
]


def fill(storage, commits=HISTORY):
    for commit in commits:
        storage.save(commit)


@pytest.fixture
def storage(app):
    return app.extensions["rainer"].database_storage


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def other_app(app_config, tmp_path, request):
    """A second app over a fresh, empty database of the same kind."""
    if "RAINER_TABLE" in app_config:
        config = {**app_config, "RAINER_TABLE": "t_" + uuid.uuid4().hex[:12]}

        def drop():
            database = other.extensions["rainer"].database_storage.database
            database.connect(reuse_if_open=True)
            database.execute_sql(f"DROP TABLE IF EXISTS {config['RAINER_TABLE']}")

        request.addfinalizer(drop)
    else:
        config = {"RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/other.db"}
    other = create_app({"TESTING": True, **config})
    yield other
    other.extensions["rainer"].close()


def invoke(app, *args, input=None):
    result = app.test_cli_runner().invoke(args=["rainer", *args], input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# ---------------------------------------------------------------------- reading


def test_init_db(app):
    result = invoke(app, "init-db")
    assert result.exit_code == 0 and "is ready" in result.output


def test_list_show_log(app, storage):
    fill(storage)
    listing = invoke(app, "list").stdout.splitlines()
    assert listing[0] == "Web\t1\t2014-01-02T03:04:05.006Z\talice"
    assert [line.split("\t")[0] for line in listing] == sorted(k for k in {c.key for c in HISTORY})
    storage.save(make_commit("gone", 1))
    storage.save(make_commit("gone", 2, None))
    assert "gone" not in invoke(app, "list").stdout
    assert "gone\t2\t2014-01-02T03:04:05.006Z\talice\t(empty)" in invoke(app, "list", "-A").stdout
    assert invoke(app, "show", "web", "1").stdout_bytes == HISTORY[0].payload
    assert invoke(app, "show", "Web").stdout_bytes == bytes(range(256))
    assert json.loads(invoke(app, "show", "web", "--meta").stdout)["comment"] == "back"
    log = invoke(app, "log", "web").stdout
    assert log.startswith("commit 4\nAuthor: alice\n")
    assert "commit 3 (empty)" in log and "  first\n  second line\n" in log
    assert '+{"threads": 8}' in log and "\x1b[" not in log
    missing = invoke(app, "show", "nope")
    assert missing.exit_code == 1 and "Key not found: nope" in missing.stderr


def test_unreachable_database_is_one_line(tmp_path):
    app = create_app({"TESTING": True, "RAINER_DATABASE_URL": "mysql://root@127.0.0.1:9/rainer"})
    result = invoke(app, "list")
    assert result.exit_code == 1
    assert (
        result.stderr.startswith("Error: Database unavailable") and "Traceback" not in result.output
    )


# ---------------------------------------------------------------------- export and import


def test_export_is_json_lines_ordered_by_key_then_version(app, storage):
    fill(storage, reversed([c for c in HISTORY if c.key != "web"]))  # saved in another order
    fill(storage, [c for c in HISTORY if c.key == "web"])
    result = invoke(app, "export")
    assert result.exit_code == 0
    lines = result.stdout_bytes.splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["key"], r["version"]) for r in records] == sorted(
        (c.key, c.version) for c in HISTORY
    )
    tomb = next(r for r in records if r["key"] == "web" and r["version"] == 3)
    assert tomb == {
        "key": "web",
        "version": 3,
        "author": "alice",
        "comment": "retired",
        "mtime": "2014-01-02T03:06:05.006Z",
        "empty": True,
        "payload_base64": None,
        "identity": None,  # written without authentication
    }
    binary = next(r for r in records if r["key"] == "Web")
    assert base64.b64decode(binary["payload_base64"]) == bytes(range(256))
    assert "Exported 8 commits of 5 keys." in result.stderr


def test_export_import_export_gives_identical_bytes(app, storage, other_app, tmp_path):
    fill(storage)
    target = tmp_path / "rainer.jsonl"
    assert invoke(app, "export", "-o", str(target)).exit_code == 0
    exported = target.read_bytes()
    assert not Path(f"{target}.partial").exists()

    first = invoke(other_app, "import", str(target))
    assert first.exit_code == 0, first.output
    assert first.stdout.strip() == "Imported 8 commits of 5 keys; 0 already present."
    assert invoke(other_app, "export").stdout_bytes == exported

    # Importing again (from stdin this time) changes nothing.
    token = other_app.extensions["rainer"].database_storage.heads_token()
    again = invoke(other_app, "import", input=exported)
    assert again.exit_code == 0
    assert again.stdout.strip() == "Imported 0 commits of 0 keys; 8 already present."
    assert other_app.extensions["rainer"].database_storage.heads_token() == token
    assert invoke(other_app, "export").stdout_bytes == exported


def test_import_extends_histories_and_refuses_conflicts_and_gaps(app, storage):
    fill(storage, [make_commit("extend", 1), make_commit("clash", 1), make_commit("clash", 2)])
    lines = b"".join(
        export_line(c)
        for c in [
            make_commit("extend", 1),
            make_commit("extend", 2, b"[2]"),
            make_commit("clash", 1),
            make_commit("clash", 2, b'{"other": true}'),
            make_commit("clash", 3),
            make_commit("gap", 1),
            make_commit("gap", 3),
            make_commit("fresh", 1),
        ]
    )
    dry = invoke(app, "import", "--dry-run", input=lines)
    assert (
        dry.exit_code == 1 and "Would import 2 commits of 2 keys; 2 already present." in dry.stdout
    )
    assert storage.get("fresh") is None

    result = invoke(app, "import", input=lines)
    assert result.exit_code == 1
    assert result.stdout.strip() == "Imported 2 commits of 2 keys; 2 already present."
    errors = result.stderr.splitlines()
    assert errors[0].startswith("Error: 'clash' version 2: differs from the commit already stored")
    assert errors[1].startswith("Error: 'gap': version 2 is missing")
    assert errors[-1] == "Error: 2 problem(s); those keys were not imported"
    assert storage.get("extend").version == 2 and storage.get("fresh").version == 1
    assert storage.get("clash").version == 2 and storage.get("clash").payload == b'{"a": 1}'
    assert storage.get("gap") is None


VALID = {
    "key": "k",
    "version": 1,
    "author": "a",
    "comment": "",
    "mtime": "2014-01-01T00:00:00Z",
    "empty": False,
    "payload_base64": "",
}


def record(**changes):
    """A valid export line with ``changes`` (a value of ``...`` removes the field)."""
    fields = {k: v for k, v in {**VALID, **changes}.items() if v is not ...}
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    "line, message",
    [
        (b"{not json", "line 2: not JSON"),
        (b"[1]", "line 2: not a JSON object"),
        (record(key="a/b"), "line 2: Key must not contain '/'"),
        (record(key=""), "line 2: Key must be nonempty"),
        (record(version=0), "line 2: Version must be between"),
        (record(version="1"), "line 2: Version must be an integer"),
        (record(payload_base64="!!"), "line 2: bad payload_base64"),
        (record(payload_base64=...), "line 2: payload_base64 is missing"),
        (
            record(empty=True, payload_base64="e30="),
            "line 2: an empty commit cannot have a payload",
        ),
        (record(mtime="yesterday"), "line 2: Malformed field"),
        (record(comment=...), "line 2: Missing field: comment"),
        (record(extra=1), "line 2: unknown field(s) extra"),
    ],
)
def test_bad_input_imports_nothing(app, storage, line, message):
    result = invoke(app, "import", input=export_line(make_commit("ok", 1)) + line + b"\n")
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert storage.heads() == {}


def export_line(commit):
    from rainer_server.transfer import export_line

    return export_line(commit)


# ---------------------------------------------------------------------- the original's table


@pytest.fixture
def legacy_table(app, request):
    name = "legacy_" + uuid.uuid4().hex[:8]
    database = app.extensions["rainer"].database_storage.database
    database.connect(reuse_if_open=True)
    database.execute_sql(
        # The original Scala Rainer's DDL (spec §3).
        f"CREATE TABLE {name} (name VARBINARY(255) NOT NULL, version INT NOT NULL, "
        f"payload MEDIUMBLOB NOT NULL, is_empty TINYINT NOT NULL, PRIMARY KEY (name, version))"
    )

    def drop():
        database.connect(reuse_if_open=True)
        database.execute_sql(f"DROP TABLE IF EXISTS {name}")

    request.addfinalizer(drop)
    return name


def test_import_from_the_original_table(app, storage, legacy_table):
    database = storage.database
    rows = [(c.key.encode(), c.version, c.serialize(), int(c.empty)) for c in HISTORY]
    rows += [
        (b"broken", 1, make_commit("broken", 1).serialize(), 0),
        (b"broken", 2, b"12\n{not a commit\n", 0),
        (b"broken", 3, make_commit("broken", 3).serialize(), 0),
        (b"liar", 1, make_commit("other", 1).serialize(), 0),
    ]
    param = database.param
    with database.atomic():
        for row in rows:
            database.execute_sql(
                f"INSERT INTO {legacy_table} VALUES ({param}, {param}, {param}, {param})", row
            )
    result = invoke(app, "import", "--legacy-table", legacy_table)
    assert result.exit_code == 1, result.output
    assert result.stdout.strip() == "Imported 8 commits of 5 keys; 0 already present."
    assert "legacy row ('broken', 2): Malformed commit" in result.stderr
    assert "legacy row ('liar', 1): holds the commit of ('other', 1)" in result.stderr
    for commit in HISTORY:
        assert storage.get(commit.key, commit.version) == commit
    assert storage.get("broken") is None and storage.get("liar") is None
    # Idempotent, like any import.
    again = invoke(app, "import", "--legacy-table", legacy_table)
    assert "Imported 0 commits of 0 keys; 8 already present." in again.stdout


def test_legacy_table_names_are_checked(app):
    for bad, message in (
        ("x; DROP TABLE y", "plain SQL table name"),
        ("nope_none", "cannot read legacy table"),
    ):
        result = invoke(app, "import", "--legacy-table", bad)
        assert result.exit_code != 0 and message in result.output, result.output
    journal = app.extensions["rainer"].settings.table
    result = invoke(app, "import", "--legacy-table", journal)
    assert result.exit_code != 0 and "journal table itself" in result.output


# ---------------------------------------------------------------------- a terminal


def test_progress_bar_only_on_a_terminal(tmp_path):
    url = f"sqlite:///{tmp_path}/rainer.db"
    app = create_app({"TESTING": True, "RAINER_DATABASE_URL": url})
    fill(app.extensions["rainer"].database_storage)
    app.extensions["rainer"].close()
    target = tmp_path / "out.jsonl"
    env = {**os.environ, "RAINER_DATABASE_URL": url, "TERM": "xterm"}
    status, output = run_in_pty([*FLASK, "rainer", "export", "-o", str(target)], env, timeout=60)
    assert status == 0, output
    assert b"Exporting" in output and b"100%" in output
    assert len(target.read_bytes().splitlines()) == len(HISTORY)
    piped = invoke(create_app({"TESTING": True, "RAINER_DATABASE_URL": url}), "export")
    assert "Exporting" not in piped.stderr


# ---------------------------------------------------------------------- ZooKeeper


def test_publish_and_check_need_zookeeper_settings(app):
    for command in ("publish", "check"):
        result = invoke(app, command)
        assert result.exit_code == 1 and "RAINER_ZK_HOSTS is not set" in result.stderr


@pytest.fixture
def zk_app(zk_chroot, tmp_path):
    app = create_app(
        {
            "TESTING": True,
            "RAINER_DATABASE_URL": f"sqlite:///{tmp_path}/rainer.db",
            "RAINER_ZK_HOSTS": zk_chroot,
            "RAINER_ZK_PATH": "/rainer",
        }
    )
    yield app
    app.extensions["rainer"].close()


@pytest.mark.zookeeper
def test_publish_then_check(zk_app, zk):
    app = zk_app
    storage = app.extensions["rainer"].database_storage
    fill(storage, [make_commit("a", 1), make_commit("a", 2, b"[2]"), make_commit("web", 1)])
    fill(storage, [make_commit("gone", 1), make_commit("gone", 2, None), make_commit("x", 1)])

    before = invoke(app, "check")
    assert before.exit_code == 1
    assert before.stdout.splitlines() == [
        "missing\ta\tthe database has version 2, ZooKeeper none",
        "missing\tweb\tthe database has version 1, ZooKeeper none",
        "missing\tx\tthe database has version 1, ZooKeeper none",
    ]

    first = invoke(app, "publish")
    assert first.exit_code == 0, first.output
    assert (
        first.stdout.strip() == "3 created, 0 updated, 0 deleted, 1 unchanged, 0 refused, 0 failed"
    )
    assert Commit.deserialize(zk.get("/rainer/data/a")[0]) == storage.get("a")
    synced = invoke(app, "check")
    assert synced.exit_code == 0 and synced.stdout == ""
    assert "4 keys checked: 0 drifting." in synced.stderr

    # Drift: the database moves on, someone else writes ZooKeeper.
    storage.save(make_commit("a", 3, b"[3]"))
    storage.save(make_commit("web", 2, None))
    zk.set("/rainer/data/x", make_commit("x", 5, b'{"newer": 1}').serialize())
    zk.create("/rainer/data/stray", make_commit("stray", 1).serialize())
    zk.create("/rainer/data/junk", b"not a commit")
    drift = invoke(app, "check")
    assert drift.exit_code == 1
    assert drift.stdout.splitlines() == [
        "behind\ta\tZooKeeper has version 2, the database 3",
        "unparseable\tjunk\tthe znode does not hold a commit",
        "unknown\tstray\tZooKeeper has version 1, the database none",
        "not deleted\tweb\tZooKeeper has version 1, the database 2 (empty)",
        "ahead\tx\tZooKeeper has version 5, the database 1",
    ]

    second = invoke(app, "publish")
    assert second.exit_code == 1
    assert (
        second.stdout.strip() == "0 created, 1 updated, 1 deleted, 1 unchanged, 1 refused, 0 failed"
    )
    assert "Refused: x: Refusing to update commit x" in second.stderr
    assert zk.exists("/rainer/data/web") is None
    assert Commit.deserialize(zk.get("/rainer/data/x")[0]).version == 5  # never rolled back
    # Admin commands work on the database: they never join the election nor open a mirror.
    assert app.extensions["rainer"].rainers is None


@pytest.mark.zookeeper
def test_publish_records_deletions_and_check_reports_a_head_they_block(zk_app, zk):
    app = zk_app
    storage = app.extensions["rainer"].database_storage
    fill(storage, [make_commit("gone", 1), make_commit("gone", 2, None), make_commit("a", 1)])
    first = invoke(app, "publish")
    assert first.exit_code == 0, first.output
    assert first.stdout.strip() == (
        "1 created, 0 updated, 0 deleted, 1 unchanged, 0 refused, 0 failed"
    )
    # The tombstone of a key ZooKeeper never had is recorded all the same...
    assert Commit.deserialize(zk.get("/rainer/deleted/gone")[0]) == storage.get("gone")
    assert zk.exists("/rainer/data/gone") is None
    assert invoke(app, "check").exit_code == 0
    # ...and once recorded, the next publish leaves it alone.
    _, before = zk.get("/rainer/deleted/gone")
    assert "2 unchanged" in invoke(app, "publish").stdout
    assert zk.get("/rainer/deleted/gone")[1].mzxid == before.mzxid

    # A database restored from a backup older than a deletion: ZooKeeper refuses to bring the
    # key back, and check says why the key is missing.
    zk.delete("/rainer/data/a")
    zk.create("/rainer/deleted/a", make_commit("a", 2, None).serialize())
    drift = invoke(app, "check")
    assert drift.exit_code == 1
    assert drift.stdout.splitlines() == [
        "deleted\ta\tZooKeeper records its deletion at version 2, the database has version 1"
    ]
    refused = invoke(app, "publish")
    assert refused.exit_code == 1 and "Refused: a: Refusing to create commit a" in refused.stderr
    assert zk.exists("/rainer/data/a") is None
