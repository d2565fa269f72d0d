"""The ``rainer`` command as a user drives it: a subprocess with stdin, answers, an editor, a pty.

The server is live (real HTTP); SQLite is enough here, the backends are covered elsewhere.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

from rainer_server.commit import Commit
from tests.live import rainer_command
from tests.live import rainer_env
from tests.live import run_in_pty
from tests.live import run_rainer
from tests.live import sqlite_live_server  # noqa: F401 (fixture)
from tests.storage_contract import T0

ANSI = re.compile(rb"\x1b\[[0-9;]*m")

EDITOR = textwrap.dedent(
    """
    import json, os, sys, urllib.request
    path = sys.argv[-1]
    with open(os.environ["EDIT_RECORD"], "a") as record:
        record.write(json.dumps(sys.argv[1:]) + "\\n")
    text = open(path, encoding="utf-8").read()
    for old, new in json.loads(os.environ.get("EDIT_REPLACE", "[]")):
        text = text.replace(old, new)
    open(path, "w", encoding="utf-8").write(text)
    calls = sum(1 for _ in open(os.environ["EDIT_RECORD"]))
    if calls > 1 and os.environ.get("EDIT_RESOLVE") is not None:  # the merge reopened us
        head, sep, rest = text.partition("<<<<<<< ")
        _, _, tail = rest.partition(">>>>>>> your edit\\n")
        text = head + os.environ["EDIT_RESOLVE"] + tail
        open(path, "w", encoding="utf-8").write(text)
    race = os.environ.get("EDIT_RACE")  # someone else commits while we edit (the first time)
    if race and calls == 1:
        url, body = race.split(" ", 1)
        headers = {"X-Rainer-Author": "bob", "X-Rainer-Comment": "hotfix"}
        request = urllib.request.Request(url, data=body.encode(), headers=headers)
        urllib.request.urlopen(request).read()
    sys.exit(int(os.environ.get("EDIT_EXIT", "0")))
    """
)

PAGER = textwrap.dedent(
    """
    import sys
    data = sys.stdin.buffer.read()
    sys.stdout.buffer.write(b"<<paged>>\\n" + data + b"<<end>>\\n")
    """
)


@pytest.fixture
def server(sqlite_live_server):  # noqa: F811
    return sqlite_live_server


@pytest.fixture
def store(server):
    """The server's storage, to set up history without going through the command line."""
    return server.app.extensions["rainer"].database_storage


@pytest.fixture
def scripts(tmp_path):
    editor = tmp_path / "editor.py"
    editor.write_text(EDITOR)
    pager = tmp_path / "pager.py"
    pager.write_text(PAGER)
    return {"editor": editor, "pager": pager, "record": tmp_path / "editor-calls.jsonl"}


def rainer(server, *args, **kwargs):
    return run_rainer(*args, url=server.url, **kwargs)


def save(store, key, version, payload=b'{"a": 1}\n', author="alice", comment=""):
    store.save(Commit(key, version, payload, author, comment, T0))


def assert_one_line_error(result, text, status=1):
    assert result.returncode == status, result
    assert result.stdout == b"" or status == 1
    err = result.stderr.decode()
    assert text in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def edit_env(scripts, replace=(), **extra):
    return {
        "EDITOR": f"{sys.executable} {scripts['editor']}",
        "EDIT_RECORD": str(scripts["record"]),
        "EDIT_REPLACE": json.dumps(list(replace)),
        "TMPDIR": str(scripts["record"].parent),  # where edit keeps its scratch files
        **extra,
    }


def saved_path(output: bytes) -> Path:
    match = re.search(rb"Your work is saved in: (\S+)", output)
    assert match, output
    return Path(match.group(1).decode())


# ---------------------------------------------------------------------- reading


def test_list_is_tab_separated_and_sorted(server, store):
    save(store, "web", 1)
    save(store, "web", 2)
    save(store, "api", 1)
    save(store, "gone", 1)
    store.save(Commit("gone", 2, None, "a", "", T0))
    result = rainer(server, "list")
    assert result.returncode == 0, result
    assert result.stdout.decode().splitlines() == [
        f"api\t1\t{server.url}/api/1",
        f"web\t2\t{server.url}/web/2",
    ]
    assert b"gone\t2\t" in rainer(server, "list", "-A").stdout
    assert rainer(server, "list", "--all").stdout.count(b"\n") == 3


def test_show_prints_the_payload_byte_for_byte(server, store):
    save(store, "k", 1, b'{"v": 1}')
    save(store, "k", 2, b'{\n  "v": 2, "\xc3\xa9": true\n}\n')
    store.save(Commit("k", 3, None, "a", "", T0))
    assert rainer(server, "show", "k", "1").stdout == b'{"v": 1}'
    assert rainer(server, "show", "k", "2").stdout == b'{\n  "v": 2, "\xc3\xa9": true\n}\n'
    empty = rainer(server, "show", "k")
    assert empty.returncode == 0 and empty.stdout == b""
    assert b"k version 3 is empty" in empty.stderr


def test_prepare_then_commit(server, store):
    save(store, "svc", 1, b'{"threads": 4}\n')
    prepared = rainer(server, "prepare", "svc")
    assert (
        prepared.stdout == b"author: tester\ncomment: ''\nversion: 2\n---\n" + b'{"threads": 4}\n'
    )
    edited = prepared.stdout.replace(b"comment: ''", b"comment: more threads").replace(b"4", b"8")
    result = rainer(server, "commit", "svc", "--yes", input=edited)
    assert result.returncode == 0, result
    out = result.stdout.decode()
    assert '-{"threads": 4}\n+{"threads": 8}\n' in out and "(--yes)" in out
    meta = json.loads(out.splitlines()[-1])
    assert (meta["version"], meta["author"], meta["comment"]) == (2, "tester", "more threads")
    assert store.get("svc").payload == b'{"threads": 8}\n'
    # The same document again is now out of date: a conflict, one line, exit 1.
    assert_one_line_error(rainer(server, "commit", "svc", "-y", input=edited), "already at version 2")
    # pyrainer's documents may copy one key's value to another (the header has no key).
    copied = rainer(server, "commit", "copy", "-y", input=edited.replace(b"version: 2", b"version: 1"))
    assert copied.returncode == 0 and store.get("copy").payload == b'{"threads": 8}\n'


def test_commit_rejects_malformed_documents(server):
    assert_one_line_error(rainer(server, "commit", "k", "-y", input=b'{"a": 1}'), "not a prepared commit")
    assert_one_line_error(
        rainer(server, "commit", "k", "-y", input=b"version: [\n---\n{}"), "header is not valid YAML"
    )
    assert_one_line_error(
        rainer(server, "commit", "k", "-y", input=b"author: a\n---\n{}"), "needs 'version'"
    )



def test_commit_keeps_a_multi_line_comment(server, store):
    result = rainer(server, "commit", "k", "--yes", input=b"version: 1\ncomment: |\n  two\n  lines\n---\n{}")
    assert result.returncode == 0, result
    assert store.get("k").comment.rstrip("\n") == "two\nlines"


def test_commit_value_posts_the_next_version(server, store):
    first = rainer(server, "commit-value", "new", "-m", "first", input=b'{"n": 1}')
    assert first.returncode == 0, first
    assert json.loads(first.stdout)["version"] == 1
    second = rainer(server, "commit-value", "new", "-m", "second", input=b'{"n": 2}')
    assert json.loads(second.stdout)["version"] == 2
    explicit = rainer(server, "commit-value", "new", "3", "--message", "third", input=b'{"n": 3}')
    assert json.loads(explicit.stdout)["version"] == 3
    assert store.get("new").payload == b'{"n": 3}' and store.get("new").comment == "third"
    assert_one_line_error(
        rainer(server, "commit-value", "new", "3", "-m", "again", input=b"{}"),
        "'new' is already at version 3",
    )
    assert_one_line_error(
        rainer(server, "commit-value", "new", "-m", "bad", input=b"not json"),
        "HTTP 400 from",
    )
    missing_message = rainer(server, "commit-value", "new", input=b"{}")
    assert missing_message.returncode == 2 and b"--message" in missing_message.stderr


def test_author_without_rainer_author_or_a_terminal(server, store):
    env = {"RAINER_AUTHOR": None, "LOGNAME": "cronjob", "USER": "cronjob"}
    result = rainer(server, "commit-value", "k", "-m", "from cron", input=b"{}", env=env)
    assert result.returncode == 0, result
    assert store.get("k").author == "cronjob"


def test_url_comes_from_rainer_url_or_the_option(server, store):
    save(store, "k", 1)
    usage = run_rainer("--help")
    for command in ("list", "show", "prepare", "commit", "commit-value", "uncommit", "edit", "log"):
        assert f"  {command} ".encode() in usage.stdout
    assert b"revert" in usage.stdout and b"RAINER_URL" in usage.stdout
    no_url = run_rainer("list")
    assert (
        no_url.returncode == 2 and b"no server URL: pass --url or set RAINER_URL" in no_url.stderr
    )
    via_option = run_rainer("--url", server.url, "list")
    assert via_option.returncode == 0 and via_option.stdout.startswith(b"k\t1\t")


def test_network_and_http_errors_are_one_line(server, tmp_path):
    assert_one_line_error(
        # Reads retry a refused connection for --retry-for (30 s by default): not here.
        run_rainer("--retry-for", "0", "list", url="http://127.0.0.1:9/diary"),
        "Cannot reach Rainer at http://127.0.0.1:9/diary",
    )
    assert_one_line_error(rainer(server, "show", "missing"), "Key not found: missing")
    assert_one_line_error(rainer(server, "log", "missing"), "Key not found: missing")
    wrong = run_rainer("list", url=server.url.rsplit("/", 1)[0])
    assert_one_line_error(wrong, "HTTP 404")


# ---------------------------------------------------------------------- uncommit and revert


def test_uncommit_asks_first(server, store):
    save(store, "k", 1, b'{"a": 1}\n')
    declined = rainer(server, "uncommit", "k", input=b"maybe\nno\n")
    assert declined.returncode == 0, declined
    out = declined.stdout.decode()
    assert '-{"a": 1}' in out and f"Commit to {server.url}/k (yes/no)? " in out
    assert "Please type 'yes' or 'no' (or y/n): " in out and "OK, not committing." in out
    assert store.get("k").version == 1
    assert_one_line_error(rainer(server, "uncommit", "k", input=b""), "no answer on standard input")
    accepted = rainer(server, "uncommit", "k", input=b"yes\n")
    assert accepted.returncode == 0
    assert store.get("k").empty and store.get("k").version == 2
    again = rainer(server, "uncommit", "k", "-y")
    assert again.returncode == 0 and b"No change, not committing." in again.stdout
    assert store.get("k").version == 2


def test_uncommit_yes_skips_the_question(server, store):
    save(store, "k", 1)
    result = rainer(server, "uncommit", "k", "-y", "-m", "retired")
    meta = json.loads(result.stdout)
    assert meta["empty"] is True and meta["version"] == 2 and meta["comment"] == "retired"


def test_revert_posts_an_old_payload_as_the_next_version(server, store):
    save(store, "k", 1, b'{"good": true}')
    save(store, "k", 2, b'{"good": false}')
    result = rainer(server, "revert", "k", "1", "-m", "2 broke logins")
    assert result.returncode == 0, result
    meta = json.loads(result.stdout)
    assert meta["version"] == 3 and meta["comment"] == "Revert to version 1: 2 broke logins"
    assert store.get("k").payload == b'{"good": true}' and store.get("k").author == "tester"
    # Through the revert route: the server copied the payload.
    assert any("/k/3?revert_to=1" in r for r in server.requests)
    plain = rainer(server, "revert", "k", "2")
    assert json.loads(plain.stdout)["comment"] == "Revert to version 2"
    unchanged = rainer(server, "revert", "k", "4")
    assert b"No change" in unchanged.stdout and store.get("k").version == 4
    assert_one_line_error(rainer(server, "revert", "k", "9"), "Key not found: k version 9")


def test_diff_shows_a_change_between_any_two_versions(server, store):
    save(store, "k", 1, b'{\n  "a": 1\n}\n', author="alice")
    save(store, "k", 2, b'{\n  "a": 2\n}\n', author="bob")
    save(store, "k", 3, b'{\n  "a": 3\n}\n', author="carol")
    last = rainer(server, "diff", "k")
    assert last.returncode == 0, last
    assert last.stdout.decode() == (
        "--- k version 2 by bob at 2014-01-02T03:04:05.006Z\n"
        "+++ k version 3 by carol at 2014-01-02T03:04:05.006Z\n"
        "@@ -1,3 +1,3 @@\n {\n-  \"a\": 2\n+  \"a\": 3\n }\n"
    )
    since = rainer(server, "diff", "k", "1").stdout.decode()
    assert since.startswith("--- k version 1 by alice") and "+++ k version 3 by carol" in since
    between = rainer(server, "diff", "k", "1", "2").stdout.decode()
    assert '-  "a": 1\n+  "a": 2\n' in between
    as_json = json.loads(rainer(server, "diff", "k", "1", "2", "--json").stdout)
    assert as_json["from"]["version"] == 1 and as_json["to"]["author"] == "bob"
    assert [line["kind"] for line in as_json["lines"]] == ["hunk", "context", "removed", "added", "context"]
    assert "@@ -2 +2 @@" in rainer(server, "diff", "k", "1", "2", "-U", "0").stdout.decode()
    assert_one_line_error(rainer(server, "diff", "k", "9"), "Key not found")
    assert_one_line_error(rainer(server, "diff", "nothing"), "Key not found")


def test_json_output_of_list_show_and_log(server, store):
    save(store, "k", 1, b"{}", comment="first")
    store.save(Commit("k", 2, b'{"b": 1}', "bob", "two\nlines", T0, identity="bob"))
    save(store, "other", 1)
    listing = json.loads(rainer(server, "list", "--json").stdout)
    assert list(listing) == ["k", "other"] and listing["k"]["version"] == 2
    meta = json.loads(rainer(server, "show", "k", "--meta", "--json").stdout)
    assert meta == {"key": "k", "version": 2, "author": "bob", "comment": "two\nlines",
                    "mtime": "2014-01-02T03:04:05.006Z", "empty": False}
    assert json.loads(rainer(server, "show", "k", "1", "--meta", "--json").stdout)["comment"] == "first"
    readable = rainer(server, "show", "k", "--meta").stdout.decode()
    assert "version: 2\n" in readable and "author: bob\n" in readable
    assert "comment: two\n  lines\n" in readable and "empty: no\n" in readable
    log = json.loads(rainer(server, "log", "k", "--json").stdout)
    assert [(e["version"], e["identity"]) for e in log] == [(2, "bob"), (1, None)]
    assert [e["version"] for e in json.loads(rainer(server, "log", "k", "1", "--json").stdout)] == [1]
    assert rainer(server, "show", "k", "--json").returncode == 2


def test_commit_dry_runs_then_asks(server, store, tmp_path):
    save(store, "svc", 1, b'{"threads": 4}\n')
    document = tmp_path / "svc.yaml"
    document.write_bytes(b"version: 2\ncomment: more\n---\n" + b'{"threads": 8}\n')
    declined = rainer(server, "commit", "svc", str(document), input=b"n\n")
    assert declined.returncode == 0 and b"OK, not committing." in declined.stdout
    assert b'+{"threads": 8}' in declined.stdout and store.get("svc").version == 1
    accepted = rainer(server, "commit", "svc", str(document), input=b"Y\n")
    assert accepted.returncode == 0 and store.get("svc").payload == b'{"threads": 8}\n'
    # A refusal comes before the question: nothing is asked, nothing posted.
    document.write_bytes(b"version: 3\n---\n{not json\n")
    refused = rainer(server, "commit", "svc", str(document), input=b"y\n")
    assert_one_line_error(refused, "Malformed input")
    assert store.get("svc").version == 2
    # stdin cannot be both the commit and the answer.
    piped = rainer(server, "commit", "svc", input=b"version: 3\n---\n{}")
    assert piped.returncode == 2 and b"pass --yes" in piped.stderr
    assert store.get("svc").version == 2


def test_edit_yes_skips_the_question_and_a_refusal_keeps_the_file(server, store, scripts):
    save(store, "svc", 1, b'{"threads": 4}\n')
    result = rainer(server, "edit", "svc", "--yes", env=edit_env(scripts, [["4", "8"]]))
    assert result.returncode == 0, result
    assert b"(yes/no)" not in result.stdout and store.get("svc").version == 2
    bad = rainer(server, "edit", "svc", "-y", env=edit_env(scripts, [['{"threads"', "{threads"]]))
    assert bad.returncode == 1 and b"Malformed input" in bad.stderr
    assert b"{threads: 8}" in saved_path(bad.stdout).read_bytes()
    assert store.get("svc").version == 2


# ---------------------------------------------------------------------- log


def test_log_piped_is_plain_text_without_pager(server, store, scripts):
    save(store, "k", 1, b'{"a": 1}\n', comment="first")
    save(store, "k", 2, b'{"a": 2}\n', author="bob", comment="two\nlines")
    store.save(Commit("k", 3, None, "carol", "", T0))
    server.requests.clear()
    result = rainer(server, "log", "k", env={"PAGER": f"{sys.executable} {scripts['pager']}"})
    assert result.returncode == 0, result
    assert not ANSI.search(result.stdout) and b"<<paged>>" not in result.stdout
    assert result.stdout.decode() == textwrap.dedent(
        """\
        commit 3 (empty)
        Author: carol
        Date:   2014-01-02T03:04:05.006Z

        --- k 2
        +++ k 3
        @@ -1 +0,0 @@
        -{"a": 2}

        commit 2
        Author: bob
        Date:   2014-01-02T03:04:05.006Z

          two
          lines

        --- k 1
        +++ k 2
        @@ -1 +1 @@
        -{"a": 1}
        +{"a": 2}

        commit 1
        Author: alice
        Date:   2014-01-02T03:04:05.006Z

          first

        --- k 0
        +++ k 1
        @@ -0,0 +1 @@
        +{"a": 1}

        """
    )
    # One history page, payloads included: no request per version.
    assert len(server.requests) == 1 and server.requests[0].startswith("GET /diary/k/history?")
    from_version = rainer(server, "log", "k", "2").stdout.decode()
    assert from_version.startswith("commit 2\n") and "commit 3" not in from_version


def test_log_fetches_one_page_per_hundred_versions(server, store):
    for version in range(1, 151):
        save(store, "long", version, b'{"v": %d}' % version)
    server.requests.clear()
    result = rainer(server, "log", "long")
    assert result.stdout.count(b"\ncommit ") + 1 == 150
    assert [r.split("?")[0] for r in server.requests] == ["GET /diary/long/history"] * 2


# ---------------------------------------------------------------------- edit


def test_edit_shows_the_diff_and_posts_on_yes(server, store, scripts):
    save(store, "svc", 1, b'{"threads": 4}\n')
    env = edit_env(scripts, [["4", "8"], ["comment: ''", "comment: more threads"]])
    result = rainer(server, "edit", "svc", input=b"yes\n", env=env)
    assert result.returncode == 0, result
    out = result.stdout.decode()
    assert (
        '--- svc (current)\n+++ svc (new)\n@@ -1 +1 @@\n-{"threads": 4}\n+{"threads": 8}\n' in out
    )
    assert f"Commit to {server.url}/svc (yes/no)? yes\n" in out
    assert json.loads(out.splitlines()[-1])["comment"] == "more threads"
    assert store.get("svc").payload == b'{"threads": 8}\n' and store.get("svc").version == 2
    assert "saved in" not in out
    assert not ANSI.search(result.stdout)


def test_edit_keeps_the_file_when_the_answer_is_no(server, store, scripts):
    save(store, "svc", 1, b'{"threads": 4}\n')
    result = rainer(server, "edit", "svc", input=b"no\n", env=edit_env(scripts, [["4", "16"]]))
    assert result.returncode == 0 and b"OK, not committing." in result.stdout
    path = saved_path(result.stdout)
    assert b'{"threads": 16}' in path.read_bytes()
    path.unlink()
    assert store.get("svc").version == 1


def test_edit_without_changes_commits_nothing(server, store, scripts):
    save(store, "svc", 1)
    result = rainer(server, "edit", "svc", env=edit_env(scripts))
    assert result.returncode == 0 and b"No change, not committing." in result.stdout
    assert store.get("svc").version == 1
    store.save(Commit("svc", 2, None, "a", "", T0))
    deleted = rainer(server, "edit", "svc", env=edit_env(scripts))
    assert deleted.returncode == 0 and b"No change, not committing." in deleted.stdout
    assert store.get("svc").version == 2


def test_edit_a_missing_key_starts_at_version_1(server, store, scripts):
    env = edit_env(scripts, [["---\n", '---\n{"fresh": true}\n']])
    result = rainer(server, "edit", "brand-new", input=b"yes\n", env=env)
    assert result.returncode == 0, result
    assert b"version: 1" not in result.stdout  # the header is in the file, not printed
    assert store.get("brand-new").version == 1
    assert store.get("brand-new").payload == b'{"fresh": true}\n'


def test_edit_uses_visual_with_arguments(server, store, scripts):
    save(store, "svc", 1)
    env = edit_env(scripts, [["1", "2"]])
    env["VISUAL"] = f"{sys.executable} {scripts['editor']} --wait 'two words'"
    env["EDITOR"] = "false"
    result = rainer(server, "edit", "svc", input=b"yes\n", env=env)
    assert result.returncode == 0, result
    (argv,) = [json.loads(line) for line in scripts["record"].read_text().splitlines()]
    assert argv[:2] == ["--wait", "two words"] and argv[2].endswith(".yaml")


def test_edit_merges_a_change_someone_else_made_meanwhile(server, store, scripts):
    base = b'{\n  "threads": 4,\n  "queue": 10,\n  "retries": 3,\n  "timeout": 5\n}\n'
    save(store, "svc", 1, base)
    theirs = base.replace(b"5", b"9").decode()
    env = edit_env(scripts, [["4", "8"]], EDIT_RACE=f"{server.url}/svc/2 {theirs}")
    result = rainer(server, "edit", "svc", input=b"y\n", env=env)
    assert result.returncode == 0, result
    out = result.stdout.decode()
    assert "Someone else committed svc first: version 2 by bob" in out and "  hotfix\n" in out
    assert '-  "timeout": 5\n+  "timeout": 9\n' in out  # their change
    assert "Your change merges cleanly onto version 2:" in out
    assert '-  "threads": 4,\n+  "threads": 8,\n' in out.split("merges cleanly")[1]
    assert json.loads(out.splitlines()[-1])["version"] == 3
    assert store.get("svc").payload == base.replace(b"4", b"8").replace(b"5", b"9")
    # One editor session: a clean merge needs no second look in the editor.
    assert len(scripts["record"].read_text().splitlines()) == 1


def test_edit_reopens_the_editor_on_a_conflict(server, store, scripts):
    save(store, "svc", 1, b'{"threads": 4}\n')
    env = edit_env(scripts, [["4", "8"]], EDIT_RACE=f'{server.url}/svc/2 {{"threads": 6}}\n',
                   EDIT_RESOLVE='{"threads": 7}\n')
    result = rainer(server, "edit", "svc", input=b"yes\n", env=env)
    assert result.returncode == 0, result
    out = result.stdout.decode()
    assert "Someone else committed svc first: version 2 by bob" in out
    assert (
        'Their change:\n--- svc 1\n+++ svc 2\n@@ -1 +1 @@\n-{"threads": 4}\n+{"threads": 6}\n'
        in out
    )
    assert "touch the same lines (1 place)" in out
    assert len(scripts["record"].read_text().splitlines()) == 2
    assert store.get("svc").payload == b'{"threads": 7}\n' and store.get("svc").version == 3


def test_edit_keeps_a_file_left_with_conflict_markers(server, store, scripts):
    save(store, "svc", 1, b'{"threads": 4}\n')
    env = edit_env(scripts, [["4", "8"]], EDIT_RACE=f'{server.url}/svc/2 {{"threads": 6}}\n')
    result = rainer(server, "edit", "svc", input=b"yes\n", env=env)
    assert result.returncode == 1, result
    assert b"still has conflict markers" in result.stderr
    path = saved_path(result.stdout)
    kept = path.read_bytes()
    assert b"version: 3\n" in kept and b"<<<<<<< version 2 (bob)\n" in kept
    assert b'{"threads": 8}\n>>>>>>> your edit\n' in kept
    assert store.get("svc").version == 2
    # Resolved by hand, the file commits as it is.
    fixed = kept.split(b"---\n")[0] + b'---\n{"threads": 7}\n'
    assert rainer(server, "commit", "svc", "--yes", input=fixed).returncode == 0
    assert store.get("svc").payload == b'{"threads": 7}\n'
    path.unlink()


def test_edit_keeps_the_file_when_the_editor_fails(server, store, scripts):
    save(store, "svc", 1)
    result = rainer(server, "edit", "svc", env=edit_env(scripts, EDIT_EXIT="3"))
    assert result.returncode == 1
    assert b"exited with status 3" in result.stderr
    saved_path(result.stdout).unlink()
    missing = rainer(server, "edit", "svc", env={**edit_env(scripts), "EDITOR": "no-such-editor"})
    assert missing.returncode == 1 and b"cannot run editor" in missing.stderr
    saved_path(missing.stdout).unlink()


# ---------------------------------------------------------------------- a real terminal


def test_log_on_a_terminal_is_coloured_and_paged(server, store, scripts):
    save(store, "k", 1, b'{"a": 1}\n')
    save(store, "k", 2, b'{"a": 2}\n')
    env = rainer_env(server.url, PAGER=f"{sys.executable} {scripts['pager']}")
    status, output = run_in_pty([*rainer_command(), "log", "k"], env)
    assert status == 0, output
    assert b"<<paged>>" in output and b"<<end>>" in output
    assert b"\x1b[33mcommit 2\x1b[0m" in output
    assert b'\x1b[31m-{"a": 1}\x1b[0m' in output and b'\x1b[32m+{"a": 2}\x1b[0m' in output
    status, plain = run_in_pty(
        [*rainer_command(), "log", "k"], {**env, "NO_COLOR": "1", "PAGER": ""}
    )
    assert status == 0 and b"commit 2" in plain
    assert not ANSI.search(plain) and b"<<paged>>" not in plain


def test_edit_on_a_terminal(server, store, scripts):
    save(store, "svc", 1, b'{"threads": 4}\n')
    env = rainer_env(server.url, **edit_env(scripts, [["4", "8"]]))
    status, output = run_in_pty(
        [*rainer_command(), "edit", "svc"], env, answers={b"(yes/no)? ": b"yes\n"}
    )
    assert status == 0, output
    assert b'\x1b[32m+{"threads": 8}\x1b[0m' in output
    assert store.get("svc").payload == b'{"threads": 8}\n'
