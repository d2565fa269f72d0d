"""Admin commands: ``flask --app wsgi rainer <command>``, run beside the service on its storage.

``export``/``import`` move whole histories as JSON Lines (one commit per line: its meta plus
``payload_base64``, ordered by key then version); ``import --legacy-table`` copies the history
out of an original Scala Rainer table in the same database.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from datetime import datetime
from datetime import timedelta
from datetime import timezone
from collections.abc import Iterator
from typing import IO
from typing import Any

import click
from flask.cli import AppGroup

from rainer_server.access import NAME_PATTERN as _NAME
from rainer_server.commit import Commit
from rainer_server.commit import format_mtime
from rainer_server.errors import CommitNotFound
from rainer_server.errors import RainerError
from rainer_server.render import colour_wanted
from rainer_server.render import isatty
from rainer_server.render import paged_output
from rainer_server.render import render_log
from rainer_server.render import styler
from rainer_server.storage import CommitStorage
from rainer_server.storage.db import open_database
from rainer_server.storage.db import read_legacy_table
from rainer_server.storage.tokens import DbTokenStore
from rainer_server.transfer import HISTORY_PAGE
from rainer_server.transfer import all_commits
from rainer_server.transfer import export_line
from rainer_server.transfer import import_commits
from rainer_server.transfer import read_export
from rainer_server.web.context import get_rainer
from rainer_server.zk.keeper import CommitKeeper
from rainer_server.zk.keeper import make_kazoo_client
from rainer_server.zk.publisher import PublishCounts
from rainer_server.zk.publisher import publish_heads



class _AdminGroup(AppGroup):
    """Rainer's errors (e.g. an unreachable database, a bad export line) as one line and
    exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RainerError as exc:
            # The operator's own terminal: the driver's reason helps and leaks nothing.
            detail = getattr(exc, "detail", None)
            raise click.ClickException(f"{exc}: {detail}" if detail else str(exc)) from None


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
    if rainer.gate.tokens is not None:
        rainer.gate.tokens.start()
    click.echo(f"Journal table {rainer.settings.table!r} is ready.")


@contextlib.contextmanager
def _progress(length: int, label: str) -> Iterator[Any]:
    """A progress bar on stderr when it is a terminal; otherwise nothing is drawn."""
    if isatty(sys.stderr) and length:
        with click.progressbar(length=length, label=label, file=sys.stderr) as bar:
            yield bar
    else:
        yield _NoProgress()


class _NoProgress:
    def update(self, n: int) -> None:
        pass


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


def _legacy_commits(table: str) -> tuple[list[Commit], dict[str, list[str]]]:
    settings = get_rainer().settings
    if table == settings.table:
        raise click.BadParameter(
            f"{table!r} is the journal table itself (RAINER_TABLE)", param_hint="--legacy-table"
        )
    try:
        return read_legacy_table(open_database(settings.database_url), table)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--legacy-table") from None


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
        commits, problems = _legacy_commits(legacy_table)
    else:
        commits, problems = read_export(source), {}
    keys = {commit.key for commit in commits} | set(problems)
    with _progress(len(keys), "Importing") as bar:
        report = import_commits(
            storage, commits, problems, dry_run=dry_run, progress=lambda key: bar.update(1)
        )
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
    settings = get_rainer().settings
    if not settings.zk_hosts:
        raise click.ClickException("RAINER_ZK_HOSTS is not set: there is no ZooKeeper to talk to")
    client = make_kazoo_client(settings.zk_hosts, settings.zk_session_timeout)
    try:
        client.start(timeout=settings.zk_session_timeout)
    except Exception as exc:  # kazoo's timeout, or a bad hosts string
        client.close()
        reason = " ".join(str(exc).split())
        raise click.ClickException(
            f"cannot connect to ZooKeeper at {settings.zk_hosts}: {reason}"
        ) from None
    try:
        yield CommitKeeper(client, settings.zk_path)
    finally:
        client.stop()
        client.close()


@rainer_cli.command()
def publish() -> None:
    """Publish every head to ZooKeeper now (one pass, as the elected publisher does)."""
    heads = _storage().heads()
    counts = PublishCounts()

    def report(key: str, outcome: str, error: Exception) -> None:
        click.echo(f"{outcome.capitalize()}: {key}: {error}", err=True)

    with _keeper() as keeper:
        # Read ZooKeeper once (pipelined) so unchanged keys cost no round trip each.
        present = set(keeper.keys())
        published = keeper.heads()
        deleted = keeper.deletions()
        with _progress(len(heads), "Publishing") as bar:
            publish_heads(
                keeper,
                {key: heads[key] for key in sorted(heads)},
                counts,
                published=published,
                deleted=deleted,
                unparseable=present - published.keys(),
                on_problem=report,
                on_key=lambda key: bar.update(1),
                lock_head=getattr(_storage(), "locked_head", None),
            )
    click.echo(
        f"{counts.created} created, {counts.updated} updated, {counts.deleted} deleted, "
        f"{counts.unchanged} unchanged, {counts.refused} refused, {counts.failed} failed"
        + (" (aborted)" if counts.aborted else "")
    )
    if counts.refused or counts.failed or counts.aborted:
        raise click.ClickException("some keys were not published (see above)")


@rainer_cli.command()
def check() -> None:
    """Compare every znode with the database head; print the drift; exit 1 if there is any."""
    heads = _storage().heads()
    with _keeper() as keeper:
        present = set(keeper.keys())
        published = keeper.heads()
        deleted = keeper.deletions()
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
        elif znode is None and key in deleted and deleted[key].version >= head.version:
            # The publisher refuses to create it (a database restored from an older backup?).
            drift.append(
                (
                    key,
                    "deleted",
                    f"ZooKeeper records its deletion at version {deleted[key].version}, "
                    f"the database has version {head.version}",
                )
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


@rainer_cli.command()
def verify() -> None:
    """Check every key's tamper-evident chain; exit 1 naming the first bad row of each key."""
    storage = _storage()
    verify_rows = getattr(storage, "verify", None)
    if verify_rows is None:
        raise click.ClickException("this storage keeps no chain (only the database journal does)")
    problems = 0
    for key, version, problem in verify_rows():
        problems += 1
        click.echo(f"{problem}\t{key}\tversion {version}")
    if problems:
        click.echo(
            f"{problems} key(s) do not match their chain: the journal was changed outside Rainer.",
            err=True,
        )
        raise SystemExit(1)
    click.echo("Every key's chain matches.", err=True)


# ---------------------------------------------------------------------- tokens


@rainer_cli.group()
def token() -> None:
    """API tokens: create (shown once), list, revoke."""


def _tokens() -> DbTokenStore:
    tokens = get_rainer().gate.tokens
    if tokens is None:
        raise click.ClickException("tokens are off: set RAINER_AUTH=token (or token,proxy)")
    return tokens


_DURATION = re.compile(r"([1-9][0-9]{0,6})([smhd])\Z")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _lifetime(_ctx: Any, _param: Any, value: str | None) -> timedelta | None:
    if value is None:
        return None
    match = _DURATION.match(value.strip())
    if match is None:
        raise click.BadParameter("a number and a unit: 30s, 15m, 12h or 90d")
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


@token.command("create")
@click.argument("name")
@click.option("--expires", callback=_lifetime, metavar="DURATION", help="e.g. 30s, 12h, 90d.")
def token_create(name: str, expires: timedelta | None) -> None:
    """Create a token for identity NAME and print it (only the token, on stdout, once)."""
    if not _NAME.match(name):
        raise click.BadParameter("printable, no spaces, at most 255 characters", param_hint="NAME")
    secret = _tokens().create(name, expires)
    click.echo(secret)
    until = "never expires" if expires is None else f"expires in {expires}"
    click.echo(f"Token for {name} created ({until}); it is not shown again.", err=True)


@token.command("list")
def token_list() -> None:
    """NAME<TAB>CREATED<TAB>EXPIRES<TAB>LAST USED<TAB>STATE; never the tokens."""
    now = datetime.now(timezone.utc)
    for info in _tokens().list():
        state = "revoked" if info.revoked else "valid" if info.valid_at(now) else "expired"
        click.echo(
            "\t".join(
                (
                    info.name,
                    format_mtime(info.created),
                    format_mtime(info.expires) if info.expires else "never",
                    format_mtime(info.last_used) if info.last_used else "never",
                    state,
                )
            )
        )


@token.command("revoke")
@click.argument("name")
def token_revoke(name: str) -> None:
    """Revoke NAME's token: every worker refuses it within seconds."""
    if not _tokens().revoke(name):
        raise click.ClickException(f"{name!r} has no valid token")
    click.echo(f"Token of {name} revoked.", err=True)
