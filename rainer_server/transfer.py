"""Moving whole histories in and out of any ``CommitStorage``, as JSON Lines.

One commit per line: its meta plus ``payload_base64`` (null for a tombstone), ordered by key
then version. Import is idempotent and all-or-nothing per key. Uses only the storage protocol,
so it works on a database, in memory, or over HTTP (``HttpCommitStorage``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import IO
from typing import Any

from rainer_server.commit import Commit
from rainer_server.commit import format_mtime
from rainer_server.errors import CommitOrderingError
from rainer_server.errors import ExportLineInvalid
from rainer_server.errors import InvalidCommit
from rainer_server.storage import CommitStorage

#: Commits read per ``history`` call when walking a key's whole history.
HISTORY_PAGE = 1000
#: Fields of an exported line: the meta, plus the payload.
EXPORT_FIELDS = frozenset(
    ("key", "version", "author", "comment", "mtime", "empty", "payload_base64", "identity")
)


def key_history(storage: CommitStorage, key: str, upto: int | None = None) -> list[Commit]:
    """Every commit of ``key`` (up to version ``upto``), oldest first, a page at a time."""
    commits: list[Commit] = []
    before = None if upto is None else upto + 1
    while before is None or before > 1:
        page = storage.history(key, limit=HISTORY_PAGE, before=before)
        commits.extend(page)
        if len(page) < HISTORY_PAGE:
            break
        before = page[-1].version
    commits.reverse()
    return commits


def all_commits(storage: CommitStorage, heads: Mapping[str, Commit]) -> Iterator[list[Commit]]:
    """Each key's history (oldest first) as of ``heads``, keys in order.

    Uses only the storage protocol (heads + history pages), so it works on any storage; a
    commit saved after ``heads`` was read is left out, so the export is a consistent snapshot
    per key.
    """
    for key in sorted(heads):
        yield key_history(storage, key, upto=heads[key].version)


# ---------------------------------------------------------------------- export


def export_line(commit: Commit) -> bytes:
    """One commit as a JSON Lines record: its meta, ``payload_base64`` (null when empty) and
    ``identity``, who really wrote it (null when the service ran without authentication)."""
    record: dict[str, Any] = commit.meta
    record["identity"] = commit.identity or None
    record["payload_base64"] = (
        None if commit.payload is None else base64.b64encode(commit.payload).decode("ascii")
    )
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


# ---------------------------------------------------------------------- import


def parse_export_line(line: bytes, number: int) -> Commit:
    """The commit of one exported line.

    :raises ExportLineInvalid: naming the line and what is wrong with it.
    """
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ExportLineInvalid(f"line {number}: not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ExportLineInvalid(f"line {number}: not a JSON object")
    unknown = sorted(set(record) - EXPORT_FIELDS)
    if unknown:
        raise ExportLineInvalid(f"line {number}: unknown field(s) {', '.join(unknown)}")
    identity = record.pop("identity", None)
    if identity is not None and not isinstance(identity, str):
        raise ExportLineInvalid(f"line {number}: identity must be a string or null")
    encoded = record.pop("payload_base64", None)
    try:
        payload = None if encoded is None else base64.b64decode(encoded, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise ExportLineInvalid(f"line {number}: bad payload_base64: {exc}") from None
    empty = record.get("empty", False)
    if empty is True and payload:
        raise ExportLineInvalid(f"line {number}: an empty commit cannot have a payload")
    if empty is False and payload is None:
        raise ExportLineInvalid(f"line {number}: payload_base64 is missing")
    try:
        return dataclasses.replace(Commit.from_meta(record, payload), identity=identity or "")
    except (InvalidCommit, TypeError) as exc:
        raise ExportLineInvalid(f"line {number}: {exc}") from None


def read_export(stream: IO[bytes]) -> list[Commit]:
    """Every commit of a JSON Lines export (blank lines are skipped)."""
    return [
        parse_export_line(line, number)
        for number, line in enumerate(stream, start=1)
        if line.strip()
    ]


@dataclasses.dataclass
class ImportReport:
    imported: int = 0
    skipped: int = 0
    keys_written: int = 0
    #: One message per refused key; nothing was written for those keys.
    errors: list[str] = dataclasses.field(default_factory=list)


def plan_key(
    storage: CommitStorage, key: str, commits: Mapping[int, Commit]
) -> tuple[list[Commit], int, list[str]]:
    """What importing ``commits`` (version -> commit) of ``key`` would do.

    :returns: (commits to save in order, commits already present, problems). With problems,
        nothing may be written for the key.
    """
    head = storage.get(key)
    head_version = head.version if head else 0
    present = [v for v in commits if v <= head_version]
    stored = {c.version: c for c in key_history(storage, key, upto=max(present))} if present else {}
    problems = []
    skipped = 0
    for version in sorted(present):
        if stored.get(version) == commits[version]:
            skipped += 1
        else:
            problems.append(
                f"{key!r} version {version}: differs from the commit already stored "
                f"(stored {_describe(stored.get(version))}, imported {_describe(commits[version])})"
            )
    new = [commits[v] for v in sorted(commits) if v > head_version]
    expected = head_version + 1
    for commit in new:
        if commit.version != expected:
            problems.append(
                f"{key!r}: version {expected} is missing (stored up to {head_version}, "
                f"imported from {new[0].version}): the history would have a gap"
            )
            break
        expected += 1
    return new, skipped, problems


def _describe(commit: Commit | None) -> str:
    if commit is None:
        return "nothing"
    size = "empty" if commit.payload is None else f"{len(commit.payload)} bytes"
    return f"{size} by {commit.author} at {format_mtime(commit.mtime)}"


def import_commits(
    storage: CommitStorage,
    commits: Iterable[Commit],
    problems: Mapping[str, list[str]] | None = None,
    dry_run: bool = False,
    progress: Callable[[str], object] | None = None,
) -> ImportReport:
    """Import ``commits`` key by key; idempotent.

    A key is written only if all its imported commits either equal the stored ones or extend
    its history without a gap; otherwise (or if ``problems`` names it) nothing of it is written.

    :param progress: called with each key as its turn comes.
    """
    report = ImportReport()
    by_key: dict[str, dict[int, Commit]] = {}
    key_problems: dict[str, list[str]] = {k: list(v) for k, v in (problems or {}).items()}
    for commit in commits:
        versions = by_key.setdefault(commit.key, {})
        seen = versions.get(commit.version)
        if seen is not None and seen != commit:
            key_problems.setdefault(commit.key, []).append(
                f"{commit.key!r} version {commit.version}: two different commits in the input"
            )
        versions[commit.version] = commit
    keys = sorted(set(by_key) | set(key_problems))
    for key in keys:
        if progress is not None:
            progress(key)
        if key in key_problems:
            report.errors.extend(key_problems[key])
            continue
        new, skipped, found = plan_key(storage, key, by_key[key])
        report.skipped += skipped
        if found:
            report.errors.extend(found)
            continue
        if not dry_run:
            try:
                for commit in new:
                    storage.save(commit)
            except CommitOrderingError as exc:  # someone wrote to the key meanwhile
                report.errors.append(f"{key!r}: {exc}; rerun the import")
                continue
        report.imported += len(new)
        report.keys_written += bool(new)
    return report
