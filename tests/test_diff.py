"""The one diff (rainer_server.diff) and the three-way merge (rainer_server.merge), as pure code."""

from __future__ import annotations

import difflib

import pytest

from rainer_server.diff import ADDED
from rainer_server.diff import CONTEXT
from rainer_server.diff import HUNK
from rainer_server.diff import REMOVED
from rainer_server.diff import DiffLine
from rainer_server.diff import changed_line_numbers
from rainer_server.diff import diff_lines
from rainer_server.diff import side_by_side
from rainer_server.diff import unified_text
from rainer_server.merge import three_way_merge

OLD = b"".join(b"line %d\n" % n for n in range(1, 21))
NEW = OLD.replace(b"line 2\n", b"line two\n").replace(b"line 15\n", b"") + b"line 21\n"


def test_lines_carry_both_line_numbers():
    lines = diff_lines(b'{\n  "size": 10\n}\n', b'{\n  "size": 20,\n  "max": 30\n}\n')
    assert lines == [
        DiffLine(HUNK, None, None, "@@ -1,3 +1,4 @@"),
        DiffLine(CONTEXT, 1, 1, "{"),
        DiffLine(REMOVED, 2, None, '  "size": 10'),
        DiffLine(ADDED, None, 2, '  "size": 20,'),
        DiffLine(ADDED, None, 3, '  "max": 30'),
        DiffLine(CONTEXT, 3, 4, "}"),
    ]
    assert lines[2].as_json() == {
        "kind": "removed", "old_line": 2, "new_line": None, "text": '  "size": 10', "newline": True,
    }
    assert changed_line_numbers(lines) == ({2}, {2, 3})


@pytest.mark.parametrize(
    "old, new",
    [
        (OLD, NEW),
        (b"", b"a\nb\n"),
        (b"a\nb\n", b""),
        (b"a\nb", b"a\nb\n"),
        (b"x\r\ny\r\n", b"x\r\nz\r\n"),
        (b"same\n" * 50 + b"a\n", b"same\n" * 50 + b"b\n"),
    ],
)
def test_unified_text_is_what_diff_u_prints(old, new):
    text = unified_text(diff_lines(old, new), "k 1", "k 2")
    # difflib.unified_diff is diff -u's format; a line without a newline gets diff's marker.
    expected = ""
    for line in difflib.unified_diff(
        old.decode().splitlines(keepends=True), new.decode().splitlines(keepends=True), "k 1", "k 2"
    ):
        expected += line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
    assert text == expected


def test_equal_payloads_and_tombstones():
    assert diff_lines(b"a\n", b"a\n") == []
    assert diff_lines(None, None) == []
    assert unified_text([], "a", "b") == ""
    # A tombstone diffs as an empty payload.
    assert [line.kind for line in diff_lines(b"a\n", None)] == [HUNK, REMOVED]
    assert diff_lines(None, b"a\n")[0].text == "@@ -0,0 +1 @@"


def test_undecodable_bytes_do_not_break_the_diff():
    lines = diff_lines(b"\xff\xfe\n", b"ok\n")
    assert lines[1].text == "\ufffd\ufffd" and lines[2].text == "ok"


def test_whole_payload_context():
    lines = diff_lines(OLD, NEW, context=None)
    assert lines[0].kind == HUNK and lines[0].text == "@@ -1,20 +1,20 @@"
    assert sum(1 for line in lines if line.kind == CONTEXT) == 18


def test_side_by_side_pairs_a_change_with_its_replacement():
    rows = side_by_side(diff_lines(b"a\nb\nc\nd\n", b"a\nB\nc\nx\ny\n"))
    shown = [
        (r.hunk.text if r.hunk else None,
         r.old.text if r.old else None, r.new.text if r.new else None)
        for r in rows
    ]
    assert shown == [
        ("@@ -1,4 +1,5 @@", None, None),
        (None, "a", "a"),
        (None, "b", "B"),
        (None, "c", "c"),
        (None, "d", "x"),
        (None, None, "y"),
    ]


def test_a_clean_three_way_merge_keeps_both_changes():
    base = b'{\n  "a": 1,\n  "b": 2,\n  "c": 3\n}\n'
    theirs = base.replace(b'"a": 1', b'"a": 10')
    yours = base.replace(b'"c": 3', b'"c": 30')
    result = three_way_merge(base, theirs, yours)
    assert result.clean and result.conflicts == 0
    assert result.payload == b'{\n  "a": 10,\n  "b": 2,\n  "c": 30\n}\n'


def test_a_conflict_has_markers_naming_each_side():
    result = three_way_merge(b"a\n", b"b\n", b"c", "version 2 (bob)", "your edit", "version 1")
    assert not result.clean and result.conflicts == 1
    assert result.payload == (
        b"<<<<<<< version 2 (bob)\nb\n||||||| version 1\na\n=======\nc\n>>>>>>> your edit\n"
    )


def test_merging_with_tombstones():
    # They deleted the key (no lines), you edited it: a conflict, never a silent choice.
    assert not three_way_merge(b"a\n", None, b"b\n").clean
    assert three_way_merge(None, None, b"new\n").payload == b"new\n"
