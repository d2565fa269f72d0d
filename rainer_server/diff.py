"""How two payloads differ: one line diff, shown three ways.

``diff_lines`` compares two payloads line by line (a tombstone is an empty payload) and gives
``DiffLine`` s: hunk headers, context, removed and added lines, each with its old and new line
number. Everything that shows a diff starts from them, so the server, the console and the
``rainer`` command never disagree about what changed:

* ``unified_text``: the classic unified diff (``diff -u``, ``git diff``), the API's
  ``text/plain`` answer and what the command line prints;
* ``DiffLine.as_json``: the API's ``?format=json`` lines;
* ``side_by_side``: rows of (old, new) for the console's two-column view.

Pure code on the standard library: the core layer, imported by web/ and the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

from rainer_server.commit import Commit
from rainer_server.commit import format_mtime

#: Lines of unchanged context around each change, as ``diff -u``.
DEFAULT_CONTEXT = 3
#: What diff(1) prints after a line that has no newline at the end of the file.
NO_NEWLINE = "\\ No newline at end of file"

HUNK = "hunk"
CONTEXT = "context"
REMOVED = "removed"
ADDED = "added"


@dataclasses.dataclass(frozen=True, slots=True)
class DiffLine:
    """One line of a diff.

    ``old``/``new`` are 1-based line numbers in the old and new payload (``None`` where the
    line is not in that side, and for hunk headers); ``text`` has no line break;
    ``newline`` is false for a last line that has none.
    """

    kind: str
    old: int | None
    new: int | None
    text: str
    newline: bool = True

    @property
    def changed(self) -> bool:
        return self.kind in (REMOVED, ADDED)

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "old_line": self.old,
            "new_line": self.new,
            "text": self.text,
            "newline": self.newline,
        }


def payload_lines(payload: bytes | None) -> list[str]:
    """The lines of a payload, each with its line break (the last one may have none).

    A tombstone (``None``) has no lines; bytes that are not UTF-8 are shown with U+FFFD.
    """
    text = (payload or b"").decode("utf-8", "replace")
    # Only "\n" breaks a line, as diff(1) and git see it (str.splitlines would also break on
    # form feeds and Unicode separators, and the line numbers would then disagree with them).
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    return lines + [parts[-1]] if parts[-1] else lines


def diff_lines(
    old: bytes | None, new: bytes | None, context: int | None = DEFAULT_CONTEXT
) -> list[DiffLine]:
    """The diff of two payloads as hunks of lines; empty when they have the same lines.

    :param context: unchanged lines kept around each change; ``None`` keeps every line (one
        hunk holding the whole payload).
    """
    a = payload_lines(old)
    b = payload_lines(new)
    if a == b:
        return []
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    if context is None:
        groups: Iterable[list[tuple[str, int, int, int, int]]] = [matcher.get_opcodes()]
    else:
        groups = matcher.get_grouped_opcodes(context)
    out: list[DiffLine] = []
    for group in groups:
        first, last = group[0], group[-1]
        header = "@@ -{} +{} @@".format(
            _range(first[1], last[2]), _range(first[3], last[4])
        )
        out.append(DiffLine(HUNK, None, None, header))
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                for offset, line in enumerate(a[i1:i2]):
                    out.append(_line(CONTEXT, i1 + offset + 1, j1 + offset + 1, line))
                continue
            for offset, line in enumerate(a[i1:i2]):
                out.append(_line(REMOVED, i1 + offset + 1, None, line))
            for offset, line in enumerate(b[j1:j2]):
                out.append(_line(ADDED, None, j1 + offset + 1, line))
    return out


def _line(kind: str, old: int | None, new: int | None, line: str) -> DiffLine:
    if line.endswith("\n"):
        return DiffLine(kind, old, new, line[:-1])
    return DiffLine(kind, old, new, line, newline=False)


def _range(start: int, stop: int) -> str:
    # As difflib's (and diff -u's) ranges: "3" for one line, "3,0"/"2,0" for none.
    begin = start + 1
    length = stop - start
    if length == 1:
        return f"{begin}"
    if not length:
        begin -= 1
    return f"{begin},{length}"


def side_name(key: str, commit: Commit | None) -> str:
    """How a diff's header names one side: key, version, author and time (and whether it is
    a tombstone); ``None`` is the nothing before version 1."""
    if commit is None:
        return f"{key} (nothing before version 1)"
    deleted = " (deleted)" if commit.empty else ""
    return (
        f"{key} version {commit.version}{deleted} by {commit.author} "
        f"at {format_mtime(commit.mtime)}"
    )


Style = Callable[..., str]


def _plain(text: str, **_: Any) -> str:
    return text


_MARKS = {CONTEXT: " ", REMOVED: "-", ADDED: "+"}


def unified_text(
    lines: Sequence[DiffLine],
    old_name: str,
    new_name: str,
    style: Style = _plain,
    always_header: bool = False,
) -> str:
    """``lines`` as a unified diff with ``---``/``+++`` headers naming both sides.

    ``style(text, fg=..., bold=...)`` colours each line (``click.style`` on a terminal).
    Returns ``""`` for no lines, unless ``always_header``: then the two header lines.
    """
    if not lines and not always_header:
        return ""
    out = [style(f"--- {old_name}", bold=True), "\n", style(f"+++ {new_name}", bold=True), "\n"]
    for line in lines:
        if line.kind == HUNK:
            out += [style(line.text, fg="cyan"), "\n"]
            continue
        text = _MARKS[line.kind] + line.text
        if line.kind == REMOVED:
            text = style(text, fg="red")
        elif line.kind == ADDED:
            text = style(text, fg="green")
        out += [text, "\n"]
        if not line.newline:
            out += [NO_NEWLINE, "\n"]
    return "".join(out)


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One row of a side-by-side diff: the old line (left) and the new line (right).

    A hunk header fills both sides (``hunk``); a line only removed or only added leaves the
    other side ``None``.
    """

    old: DiffLine | None
    new: DiffLine | None
    hunk: DiffLine | None = None


def side_by_side(lines: Sequence[DiffLine]) -> list[Row]:
    """``lines`` in two columns: each run of removed lines beside the added lines that
    replace it, line for line, as side-by-side diff tools show a change."""
    rows: list[Row] = []
    removed: list[DiffLine] = []
    added: list[DiffLine] = []

    def flush() -> None:
        for index in range(max(len(removed), len(added))):
            rows.append(
                Row(
                    removed[index] if index < len(removed) else None,
                    added[index] if index < len(added) else None,
                )
            )
        removed.clear()
        added.clear()

    for line in lines:
        if line.kind == REMOVED:
            if added:  # a new change run (removals after additions): close the previous one
                flush()
            removed.append(line)
        elif line.kind == ADDED:
            added.append(line)
        else:
            flush()
            if line.kind == HUNK:
                rows.append(Row(None, None, hunk=line))
            else:
                rows.append(Row(line, line))
    flush()
    return rows


def changed_line_numbers(lines: Iterable[DiffLine]) -> tuple[set[int], set[int]]:
    """The old line numbers removed and the new line numbers added (to highlight them)."""
    old: set[int] = set()
    new: set[int] = set()
    for line in lines:
        if line.kind == REMOVED and line.old is not None:
            old.add(line.old)
        elif line.kind == ADDED and line.new is not None:
            new.add(line.new)
    return old, new
