"""Admin commands: ``flask --app wsgi rainer <command>``, run beside the service on its storage.

``export``/``import`` move whole histories as JSON Lines (one commit per line: its meta plus
``payload_base64``, ordered by key then version); ``import --legacy-table`` copies the history
out of an original Scala Rainer table in the same database.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import IO
from typing import Any

import click
from flask.cli import AppGroup

from rainer_server.cli import colour_wanted
from rainer_server.cli import paged_output
from rainer_server.cli import render_log
from rainer_server.cli import styler
from rainer_server.commit import Commit
from rainer_server.commit import format_mtime
from rainer_server.errors import CommitNotFound
from rainer_server.errors import CommitOrderingError
from rainer_server.errors import InvalidCommit
from rainer_server.errors import RainerError
from rainer_server.extension import get_rainer
from rainer_server.storage import CommitStorage

#: Commits read per ``history`` call when walking a key's whole history.
HISTORY_PAGE = 1000
#: Fields of an exported line: the meta, plus the payload.
EXPORT_FIELDS = frozenset(
    ("key", "version", "author", "comment", "mtime", "empty", "payload_base64")
)
_SQL_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


class _AdminGroup(AppGroup):
    """Rainer's errors (e.g. an unreachable database) as one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RainerError as exc:
            raise click.ClickException(str(exc)) from None


rainer_cli = _AdminGroup("rainer", help="Rainer admin commands.")


def _storage() -> CommitStorage:
    # The database itself: an admin command must not join the publisher election or open a
    # mirror (what the service's keeper-publishing storage would do when ZooKeeper is set).
    return get_rainer().database_storage


@rainer_cli.command("init-db")
def init_db() -> None:
    """Create the journal table when missing."""
    rainer = get_rainer()
    rainer.database_storage.start()
    click.echo(f"Journal table {rainer.settings.table!r} is ready.")


# ---------------------------------------------------------------------- reading


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


@contextlib.contextmanager
def _progress(length: int, label: str) -> Iterator[Any]:
    """A progress bar on stderr when it is a terminal; otherwise nothing is drawn."""
    if _isatty(sys.stderr) and length:
        with click.progressbar(length=length, label=label, file=sys.stderr) as bar:
            yield bar
    else:
        yield _NoProgress()


class _NoProgress:
    def update(self, n: int) -> None:
        pass


def _isatty(stream: IO[Any]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@rainer_cli.command("list")
@click.option("-A", "--all", "show_all", is_flag=True, help="Include keys whose head is empty.")
def list_command(show_all: bool) -> None:
    """List heads: KEY<TAB>VERSION<TAB>MTIME<TAB>AUTHOR, sorted by key."""
    heads = _storage().heads()
    for key in sorted(heads):
        commit = heads[key]
        if commit.empty and not show_all:
            continue
        suffix = "\t(empty)" if commit.empty else ""
        click.echo(
            f"{key}\t{commit.version}\t{format_mtime(commit.mtime)}\t{commit.author}{suffix}"
        )


@rainer_cli.command()
@click.argument("key")
@click.argument("version", type=click.IntRange(min=1), required=False)
@click.option("--meta", is_flag=True, help="Print the meta as JSON instead of the payload.")
def show(key: str, version: int | None, meta: bool) -> None:
    """Print the payload of KEY (at VERSION), byte for byte."""
    commit = _storage().get(key, version)
    if commit is None:
        raise CommitNotFound(key, version)
    if meta:
        click.echo(json.dumps(commit.meta, ensure_ascii=False))
    elif commit.payload is None:
        click.echo(f"{key} version {commit.version} is empty (uncommitted)", err=True)
    else:
        click.echo(commit.payload, nl=False)


@rainer_cli.command()
@click.argument("key")
def log(key: str) -> None:
    """Show the history of KEY, newest first, with diffs (as `rainer log`)."""
    storage = _storage()
    first = storage.history(key, limit=HISTORY_PAGE)
    if not first:
        raise CommitNotFound(key)

    def walk() -> Iterator[Commit]:
        page = first
        while page:
            yield from page
            if len(page) < HISTORY_PAGE:
                return
            page = storage.history(key, limit=HISTORY_PAGE, before=page[-1].version)

    with paged_output() as write:
        for text in render_log(walk(), styler(colour_wanted(sys.stdout))):
            write(text)


# ---------------------------------------------------------------------- export


def export_line(commit: Commit) -> bytes:
    """One commit as a JSON Lines record: its meta plus ``payload_base64`` (null when empty)."""
    record: dict[str, Any] = commit.meta
    record["payload_base64"] = (
        None if commit.payload is None else base64.b64encode(commit.payload).decode("ascii")
    )
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


@rainer_cli.command()
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, writable=True), help="Write here, not stdout."
)
def export(output: str | None) -> None:
    """Write every commit as JSON Lines, ordered by key, then version."""
    storage = _storage()
    heads = storage.heads()
    count = 0
    with _export_target(output) as out, _progress(len(heads), "Exporting") as bar:
        for history in all_commits(storage, heads):
            for commit in history:
                out.write(export_line(commit))
            count += len(history)
            bar.update(1)
    click.echo(f"Exported {count} commits of {len(heads)} keys.", err=True)


@contextlib.contextmanager
def _export_target(path: str | None) -> Iterator[IO[bytes]]:
    if path is None:
        stdout = click.get_binary_stream("stdout")
        yield stdout
        stdout.flush()
        return
    # Written beside the target and renamed at the end: a failed export leaves no half file.
    partial = f"{path}.partial"
    try:
        with open(partial, "wb") as out:
            yield out
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


# ---------------------------------------------------------------------- import


class ImportInputError(click.ClickException):
    """The input cannot be read as commits; nothing was imported."""


def parse_export_line(line: bytes, number: int) -> Commit:
    """The commit of one exported line.

    :raises ImportInputError: naming the line and what is wrong with it.
    """
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ImportInputError(f"line {number}: not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ImportInputError(f"line {number}: not a JSON object")
    unknown = sorted(set(record) - EXPORT_FIELDS)
    if unknown:
        raise ImportInputError(f"line {number}: unknown field(s) {', '.join(unknown)}")
    encoded = record.pop("payload_base64", None)
    try:
        payload = None if encoded is None else base64.b64decode(encoded, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise ImportInputError(f"line {number}: bad payload_base64: {exc}") from None
    empty = record.get("empty", False)
    if empty is True and payload:
        raise ImportInputError(f"line {number}: an empty commit cannot have a payload")
    if empty is False and payload is None:
        raise ImportInputError(f"line {number}: payload_base64 is missing")
    try:
        return Commit.from_meta(record, payload)
    except (InvalidCommit, TypeError) as exc:
        raise ImportInputError(f"line {number}: {exc}") from None


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
) -> ImportReport:
    """Import ``commits`` key by key; idempotent.

    A key is written only if all its imported commits either equal the stored ones or extend
    its history without a gap; otherwise (or if ``problems`` names it) nothing of it is written.
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
    with _progress(len(keys), "Importing") as bar:
        for key in keys:
            bar.update(1)
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


def legacy_commits(table: str) -> tuple[list[Commit], dict[str, list[str]]]:
    """Every commit of an original Scala Rainer table in the service's database.

    The table holds ``name``, ``version``, ``payload`` (the whole commit in the wire format)
    and ``is_empty``. A row that does not parse, or disagrees with its columns, makes its key
    a problem (nothing of that key is imported).
    """
    from peewee import DatabaseError

    from rainer_server.storage.db import open_database

    rainer = get_rainer()
    if not _SQL_IDENTIFIER.match(table):
        raise click.BadParameter("must be a plain SQL table name", param_hint="--legacy-table")
    if table == rainer.settings.table:
        raise click.BadParameter(
            f"{table!r} is the journal table itself (RAINER_TABLE)", param_hint="--legacy-table"
        )
    database = open_database(rainer.settings.database_url)
    quote = database.quote or '""'
    name = f"{quote[0]}{table}{quote[-1]}"
    try:
        database.connect(reuse_if_open=True)
        rows = database.execute_sql(
            f"SELECT name, version, payload, is_empty FROM {name} ORDER BY name, version"
        ).fetchall()
    except DatabaseError as exc:
        raise click.ClickException(
            f"cannot read legacy table {table!r}: {_one_line(exc)}"
        ) from None
    finally:
        database.close()
    commits: list[Commit] = []
    problems: dict[str, list[str]] = {}
    for raw_name, version, blob, is_empty in rows:
        key = (
            bytes(raw_name).decode("utf-8", "replace")
            if not isinstance(raw_name, str)
            else raw_name
        )
        where = f"legacy row ({key!r}, {version})"
        try:
            commit = Commit.deserialize(bytes(blob or b""))
        except InvalidCommit as exc:
            problems.setdefault(key, []).append(f"{where}: {exc}")
            continue
        if (commit.key, commit.version) != (key, version):
            problems.setdefault(key, []).append(
                f"{where}: holds the commit of ({commit.key!r}, {commit.version})"
            )
        elif bool(is_empty) != commit.empty:
            problems.setdefault(key, []).append(
                f"{where}: is_empty={int(bool(is_empty))} but the commit says empty={commit.empty}"
            )
        else:
            commits.append(commit)
    return commits, problems


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[-1] if exc.args else exc) or type(exc).__name__
    return " ".join(text.split())


@rainer_cli.command("import")
@click.argument("source", type=click.File("rb"), default="-", required=False)
@click.option(
    "--legacy-table",
    metavar="NAME",
    help="Copy the history out of an original Rainer table in the same database instead.",
)
@click.option("--dry-run", is_flag=True, help="Check everything, write nothing.")
def import_command(source: IO[bytes], legacy_table: str | None, dry_run: bool) -> None:
    """Import commits from a JSON Lines export (SOURCE, default stdin).

    Idempotent: commits already stored and identical are skipped. A key whose imported
    commits differ from stored ones, or would leave a gap in its history, is not written at
    all; the others are, and the command exits non-zero naming the refused ones.
    """
    storage = _storage()
    if legacy_table is not None:
        commits, problems = legacy_commits(legacy_table)
    else:
        commits, problems = read_export(source), {}
    report = import_commits(storage, commits, problems, dry_run=dry_run)
    for error in report.errors:
        click.echo(f"Error: {error}", err=True)
    verb = "Would import" if dry_run else "Imported"
    click.echo(
        f"{verb} {report.imported} commits of {report.keys_written} keys; "
        f"{report.skipped} already present."
    )
    if report.imported and not dry_run and get_rainer().settings.zk_hosts:
        click.echo(
            "ZooKeeper gets these commits from the elected publisher within "
            "RAINER_PUBLISH_PERIOD; `flask rainer publish` does it now."
        )
    if report.errors:
        raise click.ClickException(f"{len(report.errors)} problem(s); those keys were not imported")


# ---------------------------------------------------------------------- ZooKeeper


@contextlib.contextmanager
def _keeper() -> Iterator[Any]:
    """A ``CommitKeeper`` on a started kazoo client, per the settings; stopped afterwards."""
    from rainer_server.keeper import CommitKeeper
    from rainer_server.keeper import make_kazoo_client

    settings = get_rainer().settings
    if not settings.zk_hosts:
        raise click.ClickException("RAINER_ZK_HOSTS is not set: there is no ZooKeeper to talk to")
    client = make_kazoo_client(settings.zk_hosts, settings.zk_session_timeout)
    try:
        client.start(timeout=settings.zk_session_timeout)
    except Exception as exc:  # kazoo's timeout, or a bad hosts string
        client.close()
        raise click.ClickException(
            f"cannot connect to ZooKeeper at {settings.zk_hosts}: {_one_line(exc)}"
        ) from None
    try:
        yield CommitKeeper(client, settings.zk_path)
    finally:
        client.stop()
        client.close()


@rainer_cli.command()
def publish() -> None:
    """Publish every head to ZooKeeper now (one pass, as the elected publisher does)."""
    from rainer_server.errors import KeeperError

    heads = _storage().heads()
    counts = dict.fromkeys(("created", "updated", "deleted", "unchanged", "refused", "failed"), 0)
    with _keeper() as keeper:
        # Read ZooKeeper once (pipelined) so unchanged keys cost no round trip each.
        present = set(keeper.keys())
        published = keeper.heads()
        with _progress(len(heads), "Publishing") as bar:
            for key in sorted(heads):
                bar.update(1)
                commit = heads[key]
                known = published.get(key)
                if known == commit or (commit.empty and key not in present):
                    counts["unchanged"] += 1
                    continue
                try:
                    counts[keeper.save(commit).value] += 1
                except RainerError as exc:
                    # Unreachable ZooKeeper: failed. A newer or different commit there (never
                    # rolled back), a commit too large or a key ZooKeeper refuses: refused.
                    outcome = "failed" if type(exc) is KeeperError else "refused"
                    click.echo(f"{outcome.capitalize()}: {key}: {exc}", err=True)
                    counts[outcome] += 1
    click.echo(", ".join(f"{n} {name}" for name, n in counts.items()))
    if counts["refused"] or counts["failed"]:
        raise click.ClickException("some keys were not published (see above)")


@rainer_cli.command()
def check() -> None:
    """Compare every znode with the database head; print the drift; exit 1 if there is any."""
    heads = _storage().heads()
    with _keeper() as keeper:
        present = set(keeper.keys())
        published = keeper.heads()
    drift = []
    for key in sorted(present | set(heads)):
        head = heads.get(key)
        znode = published.get(key)
        zk_version = f"ZooKeeper has version {znode.version}" if znode else ""
        if key in present and znode is None:
            drift.append((key, "unparseable", "the znode does not hold a commit"))
        elif head is None:
            drift.append((key, "unknown", f"{zk_version}, the database none"))
        elif head.empty:
            if znode is not None:
                drift.append(
                    (key, "not deleted", f"{zk_version}, the database {head.version} (empty)")
                )
        elif znode is None:
            drift.append(
                (key, "missing", f"the database has version {head.version}, ZooKeeper none")
            )
        elif znode != head:
            if znode.version == head.version:
                state = "differs"
            else:
                state = "behind" if znode.version < head.version else "ahead"
            drift.append((key, state, f"{zk_version}, the database {head.version}"))
    for key, state, detail in drift:
        click.echo(f"{state}\t{key}\t{detail}")
    click.echo(f"{len(present | set(heads))} keys checked: {len(drift)} drifting.", err=True)
    if drift:
        raise SystemExit(1)
