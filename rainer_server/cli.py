"""The ``rainer`` command: read and change configuration on a Rainer server.

Commands and output shapes follow the published ``pyrainer`` tool (spec §6), with what it
lacked: ``--url`` from ``RAINER_URL``, an author that works without a terminal, ``revert``,
one request per page for ``log``, colour and a pager only on a terminal, and one line on
stderr (never a traceback) when the server or the network fails.

Talks to the server through ``rainer_server.client`` only: no Flask, peewee or kazoo.
"""

from __future__ import annotations

import datetime as dt
import getpass
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import click
import yaml

from rainer_server.version import __version__
from rainer_server.client import RainerClient
from rainer_server.commit import Commit
from rainer_server.commit import format_mtime
from rainer_server.errors import AccessDenied
from rainer_server.errors import AuthenticationRequired
from rainer_server.errors import CommitNotFound
from rainer_server.errors import CommitOrderingError
from rainer_server.errors import RainerError
from rainer_server.merge import three_way_merge
from rainer_server.render import colour_wanted
from rainer_server.render import isatty
from rainer_server.render import paged_output
from rainer_server.render import render_log
from rainer_server.render import style_diff_text
from rainer_server.render import styler
from rainer_server.render import unified_diff

#: Header fields a prepared commit may carry (pyrainer writes author, comment and version).
HEADER_FIELDS = frozenset(("author", "comment", "version", "empty", "mtime", "key"))
LOG_PAGE_SIZE = 100


# ---------------------------------------------------------------------- text helpers


def prepare_text(
    version: int, author: str, comment: str, payload: bytes | None, empty: bool = False
) -> bytes:
    """A commit as text to edit: a YAML header, ``---``, then the payload (pyrainer's shape)."""
    header: dict[str, Any] = {"author": author, "comment": comment, "version": version}
    if empty:
        header["empty"] = True
    text = yaml.safe_dump(header, default_flow_style=False, allow_unicode=True, sort_keys=True)
    return text.encode("utf-8") + b"---\n" + (payload or b"")


def parse_prepared(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Split a prepared commit into its header mapping and its payload bytes.

    The payload is everything after the first ``---`` line, byte for byte.

    :raises click.ClickException: when there is no ``---`` line or the header is not YAML.
    """
    if data.startswith(b"---\n"):  # an explicit YAML document start before the header
        data = data[4:]
    head, separator, payload = data.partition(b"\n---\n")
    if not separator:
        if data.endswith(b"\n---"):
            head, payload = data[:-4], b""
        else:
            raise click.ClickException(
                "not a prepared commit: expected a YAML header, a '---' line, then the payload"
            )
    try:
        header = yaml.safe_load(head.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())
        raise click.ClickException(f"the header is not valid YAML: {reason}") from None
    if not isinstance(header, dict):
        raise click.ClickException("the header must be a YAML mapping (author, comment, version)")
    return header, payload


def header_meta(
    key: str, header: Mapping[str, Any], default_author: Callable[[], str]
) -> dict[str, Any]:
    """The meta to post for a prepared commit's header.

    :raises click.ClickException: naming the bad field.
    """
    unknown = sorted(str(name) for name in header if name not in HEADER_FIELDS)
    if unknown:
        raise click.ClickException(f"unknown field(s) in the header: {', '.join(unknown)}")
    if "key" in header and header["key"] != key:
        raise click.ClickException(f"the header is for key {header['key']!r}, not {key!r}")
    version = header.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise click.ClickException("the header needs 'version', a positive integer")
    empty = header.get("empty", False)
    if not isinstance(empty, bool):
        raise click.ClickException("'empty' in the header must be true or false")
    author = header.get("author")
    comment = header.get("comment")
    meta: dict[str, Any] = {
        "key": key,
        "version": version,
        "author": default_author() if author is None else str(author),
        "comment": "" if comment is None else str(comment),
        "empty": empty,
    }
    mtime = header.get("mtime")
    if isinstance(mtime, dt.datetime):  # YAML reads unquoted timestamps as datetimes
        meta["mtime"] = mtime if mtime.tzinfo else mtime.replace(tzinfo=dt.timezone.utc)
    elif mtime is not None:
        meta["mtime"] = str(mtime)
    return meta


# ---------------------------------------------------------------------- output


def _echo_bytes(data: bytes) -> None:
    click.echo(data, nl=False)


def _echo_meta(meta: Mapping[str, Any]) -> None:
    click.echo(json.dumps(meta, ensure_ascii=False))


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, indent=2))


_YES = ("y", "yes")
_NO = ("n", "no")


def ask_yes_no(question: str) -> bool:
    """Ask until the answer is yes or no (``y``/``n`` will do, in any case).

    :raises click.ClickException: when standard input ends without an answer.
    """
    prompt = question
    while True:
        click.echo(prompt, nl=False)
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            click.echo()
            raise click.ClickException("no answer on standard input; nothing was committed")
        answer = line.strip()
        if not isatty(sys.stdin):  # a terminal echoes the answer; keep piped transcripts readable
            click.echo(answer)
        if answer.lower() in _YES + _NO:
            return answer.lower() in _YES
        prompt = "Please type 'yes' or 'no' (or y/n): "


# ---------------------------------------------------------------------- the session


class Session:
    """What every command needs: the client, who is committing, how to print."""

    def __init__(
        self, url: str | None, timeout: float, token: str | None = None, retry_for: float = 30.0
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.token = token
        self.retry_for = retry_for
        self._client: RainerClient | None = None
        self.style = styler(colour_wanted(sys.stdout))

    @property
    def client(self) -> RainerClient:
        if self._client is None:
            if not self.url:
                raise click.UsageError("no server URL: pass --url or set RAINER_URL")
            try:
                self._client = RainerClient(
                    self.url, timeout=self.timeout, token=self.token, retry_for=self.retry_for
                )
            except ValueError as exc:
                raise click.UsageError(str(exc)) from None
        return self._client

    def author(self) -> str:
        """``RAINER_AUTHOR``; else, with a token, the identity the server sees (which is what
        it will record); else the login name. Works without a terminal (cron, CI)."""
        author = os.environ.get("RAINER_AUTHOR")
        if author:
            return author
        if self.token:
            identity = self.client.whoami().get("identity")
            if identity:
                return str(identity)
        try:
            return getpass.getuser()
        except Exception:  # no LOGNAME/USER and no passwd entry (containers); KeyError/OSError
            raise click.ClickException("cannot tell who you are: set RAINER_AUTHOR") from None

    def next_version(self, key: str) -> int:
        try:
            return int(self.client.get_metadata(key)["version"]) + 1
        except CommitNotFound:
            return 1

    def confirm_and_post(
        self,
        key: str,
        old: Commit | None,
        meta: dict[str, Any],
        payload: bytes | None,
        yes: bool = False,
        checked: bool = False,
    ) -> str:
        """Dry-run the commit (every check the server makes, nothing written; unless the
        caller did: ``checked``), show the diff, ask (unless ``yes``), then post.

        :returns: ``"posted"``, ``"unchanged"`` (nothing to post) or ``"declined"``.
        :raises CommitOrderingError: from the dry run or the post, when someone else
            committed first.
        """
        empty = bool(meta.get("empty"))
        new_payload = None if empty else payload or b""
        if _unchanged(old, empty, new_payload):
            click.echo("No change, not committing.")
            return "unchanged"
        # Refusals (a payload the server will not take, a lost race, no right to write) come
        # before the question, not after the answer.
        if not checked:
            self.client.post_commit(meta, new_payload, dry_run=True)
        click.echo(
            unified_diff(
                old.payload if old else None,
                new_payload,
                f"{key} (current)",
                f"{key} (new)",
                self.style,
            ),
            nl=False,
            color=True,
        )
        if yes:
            click.echo(f"Committing to {self.client.commit_uri(key)} (--yes).")
        elif not ask_yes_no(f"Commit to {self.client.commit_uri(key)} (yes/no)? "):
            click.echo("OK, not committing.")
            return "declined"
        _echo_meta(self.client.post_commit(meta, new_payload))
        return "posted"


def _unchanged(old: Commit | None, empty: bool, payload: bytes | None) -> bool:
    if empty:  # a tombstone over nothing, or over a tombstone
        return old is None or old.empty
    if old is None or old.empty:  # a new (or deleted) key left blank: nothing to create
        return not payload
    return old.payload == payload


def describe_conflict(exc: CommitOrderingError) -> str:
    head = exc.expected_version - 1
    if exc.provided_version > exc.expected_version:
        return (
            f"version {exc.provided_version} of {exc.key!r} would leave a gap: "
            f"the next version is {exc.expected_version}"
        )
    return (
        f"conflict: {exc.key!r} is already at version {head}, so version "
        f"{exc.provided_version} was refused (someone else committed first?)"
    )


class _RainerGroup(click.Group):
    """Turns Rainer's errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CommitOrderingError as exc:
            raise click.ClickException(describe_conflict(exc)) from None
        except AuthenticationRequired as exc:
            raise click.ClickException(
                f"not authenticated: {getattr(exc, 'message', exc)} "
                "(give a token with --token-file or RAINER_TOKEN)"
            ) from None
        except AccessDenied as exc:
            raise click.ClickException(f"forbidden: {getattr(exc, 'message', exc)}") from None
        except RainerError as exc:
            raise click.ClickException(str(exc)) from None


pass_session = click.make_pass_decorator(Session)
KEY = click.argument("key")
OPTIONAL_VERSION = click.argument("version", type=click.IntRange(min=1), required=False)


@click.group(cls=_RainerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="rainer", message="%(prog)s %(version)s")
@click.option(
    "--url",
    envvar="RAINER_URL",
    show_envvar=True,
    metavar="URL",
    help="The API root, e.g. http://config.example.com:8080/diary.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the server.",
)
@click.option(
    "--retry-for",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long reads keep retrying while the server is unavailable (0: never).",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, exists=True),
    metavar="PATH",
    help="A file holding your API token (else RAINER_TOKEN).",
)
@click.pass_context
def rainer(
    ctx: click.Context, url: str | None, timeout: float, retry_for: float, token_file: str | None
) -> None:
    """Read and change configuration kept in a Rainer server.

    The author of commits is RAINER_AUTHOR, else (with a token) the identity the server sees,
    else your login name.
    """
    token = os.environ.get("RAINER_TOKEN") or None
    if token_file is not None:
        with open(token_file, encoding="utf-8") as file:
            token = file.read().strip() or None
    ctx.obj = Session(url, timeout, token, retry_for)


@rainer.command("list")
@click.option("-A", "--all", "show_all", is_flag=True, help="Include uncommitted (empty) keys.")
@click.option("--json", "as_json", is_flag=True, help="Print key -> meta as one JSON object.")
@pass_session
def list_command(session: Session, show_all: bool, as_json: bool) -> None:
    """List keys: KEY<TAB>VERSION<TAB>URL, sorted by key."""
    listing = session.client.list(all=show_all)
    if as_json:
        _echo_json({key: listing[key] for key in sorted(listing)})
        return
    for key in sorted(listing):
        version = listing[key]["version"]
        click.echo(f"{key}\t{version}\t{session.client.commit_uri(key, version)}")


@rainer.command()
@KEY
@OPTIONAL_VERSION
@click.option("--meta", is_flag=True, help="Print the meta (version, author, time...) instead.")
@click.option("--json", "as_json", is_flag=True, help="With --meta: as a JSON object.")
@pass_session
def show(session: Session, key: str, version: int | None, meta: bool, as_json: bool) -> None:
    """Print the payload of KEY (at VERSION), byte for byte; or its meta."""
    if as_json and not meta:
        raise click.UsageError("--json goes with --meta (the payload is printed as it is)")
    if meta:
        found = session.client.get_metadata(key, version)
        if as_json:
            _echo_json(found)
            return
        for name in ("key", "version", "author", "mtime", "empty", "comment"):
            value = found.get(name)
            text = str(value).replace("\n", "\n  ") if name == "comment" else value
            click.echo(f"{name}: {'yes' if value is True else 'no' if value is False else text}")
        return
    commit = session.client.get_commit(key, version)
    if commit.payload is None:
        click.echo(f"rainer: {key} version {commit.version} is empty (uncommitted)", err=True)
        return
    _echo_bytes(commit.payload)
    if isatty(sys.stdout) and commit.payload and not commit.payload.endswith(b"\n"):
        click.echo()


@rainer.command()
@KEY
@OPTIONAL_VERSION
@pass_session
def prepare(session: Session, key: str, version: int | None) -> None:
    """Print the next commit of KEY as text to edit and feed to `rainer commit`."""
    commit = session.client.get_commit(key, version)
    _echo_bytes(prepare_text(commit.version + 1, session.author(), "", commit.payload))


@rainer.command()
@KEY
@click.argument("file", type=click.File("rb"), required=False)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_session
def commit(session: Session, key: str, file: Any, yes: bool) -> None:
    """Post a prepared commit (YAML header, ---, payload) from FILE or stdin to KEY.

    The server checks it first (a dry run), the diff is shown, and you are asked; --yes
    posts without asking. A commit read from stdin needs --yes (stdin cannot answer too).
    """
    if file is None and not yes:
        raise click.UsageError(
            "the commit comes on standard input, which cannot answer the question too: "
            "give the file as an argument, or pass --yes"
        )
    source = file if file is not None else click.get_binary_stream("stdin")
    header, payload = parse_prepared(source.read())
    meta = header_meta(key, header, session.author)
    try:
        current: Commit | None = session.client.get_commit(key)
    except CommitNotFound:
        current = None
    new_payload = None if meta["empty"] else payload
    # The server's verdict first: a document prepared from an old version is a conflict
    # even when its payload happens to equal the newest one.
    session.client.post_commit(meta, new_payload, dry_run=True)
    session.confirm_and_post(key, current, meta, new_payload, yes, checked=True)


@rainer.command("commit-value")
@KEY
@click.argument("version", type=click.IntRange(min=1), required=False)
@click.option("-m", "--message", required=True, help="The commit comment.")
@pass_session
def commit_value(session: Session, key: str, version: int | None, message: str) -> None:
    """Post stdin as the payload of KEY, as VERSION (default: the next version)."""
    if isatty(sys.stdin):
        click.echo("Reading the payload from standard input; end it with Ctrl-D.", err=True)
    payload = click.get_binary_stream("stdin").read()
    number = version if version is not None else session.next_version(key)
    meta = {"key": key, "version": number, "author": session.author(), "comment": message}
    _echo_meta(session.client.post_commit(meta, payload))


@rainer.command()
@KEY
@OPTIONAL_VERSION
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("-m", "--message", default="", help="The commit comment.")
@pass_session
def uncommit(session: Session, key: str, version: int | None, yes: bool, message: str) -> None:
    """Post an empty commit (a tombstone) as the version after KEY's newest (or VERSION)."""
    old = session.client.get_commit(key, version)
    meta = {
        "key": key,
        "version": old.version + 1,
        "author": session.author(),
        "comment": message,
        "empty": True,
    }
    if yes:
        if old.empty:
            click.echo("No change, not committing.")
            return
        _echo_meta(session.client.post_commit(meta, None))
        return
    session.confirm_and_post(key, old, meta, None)


@rainer.command()
@KEY
@click.argument("version", type=click.IntRange(min=1))
@click.option("-m", "--message", default="", help="Why (added to the comment).")
@pass_session
def revert(session: Session, key: str, version: int, message: str) -> None:
    """Commit VERSION's payload as KEY's next version ("Revert to version VERSION: MESSAGE").

    The server copies the payload (POST ?revert_to=VERSION): a tombstone if VERSION was one.
    """
    target = session.client.get_commit(key, version)
    head = session.client.get_commit(key)
    if head.payload == target.payload:
        click.echo(f"No change, not committing: version {head.version} already has that payload.")
        return
    comment = f"Revert to version {version}" + (f": {message}" if message else "")
    _echo_meta(session.client.revert(key, head.version + 1, version, session.author(), comment))


@rainer.command()
@KEY
@click.argument("from_version", metavar="[V1", type=click.IntRange(min=1), required=False)
@click.argument("to_version", metavar="[V2]]", type=click.IntRange(min=1), required=False)
@click.option("--json", "as_json", is_flag=True, help="Both metas and the lines, as JSON.")
@click.option("-U", "--unified", "context", type=click.IntRange(min=0), default=None,
              help="Lines of context around each change (default 3).")
@pass_session
def diff(
    session: Session,
    key: str,
    from_version: int | None,
    to_version: int | None,
    as_json: bool,
    context: int | None,
) -> None:
    """Show what changed in KEY: its last change; with V1, from V1 to the newest version;
    with V1 and V2, from V1 to V2. The server makes the diff (GET /<key>/diff)."""
    answer = session.client.diff(key, from_version, to_version, as_json=as_json, context=context)
    if as_json:
        _echo_json(answer)
        return
    click.echo(style_diff_text(answer, session.style), nl=False, color=True)


@rainer.command()
@KEY
@OPTIONAL_VERSION
@click.option("--json", "as_json", is_flag=True, help="The metas (and identities) as a JSON list.")
@pass_session
def log(session: Session, key: str, version: int | None, as_json: bool) -> None:
    """Show the history of KEY (from VERSION down), newest first, with diffs.

    Paged with $PAGER (default less) and coloured only on a terminal; NO_COLOR turns colour off.
    """
    before = None if version is None else version + 1
    if as_json:
        entries = []
        while before is None or before > 1:
            page = session.client.history(key, limit=1000, before=before)
            entries += page
            if len(page) < 1000:
                break
            before = page[-1]["version"]
        if not entries or (version is not None and entries[0]["version"] != version):
            raise CommitNotFound(key, version)
        _echo_json(entries)
        return
    walk = session.client.iter_history(key, before=before, page_size=LOG_PAGE_SIZE)
    first = next(walk, None)  # errors (unknown key) before the pager starts
    if first is None or (version is not None and first.version != version):
        raise CommitNotFound(key, version)
    with paged_output() as write:
        for text in render_log(itertools.chain([first], walk), session.style):
            write(text)


#: A line that only a three-way merge's conflict writes (git's markers).
_CONFLICT_MARKER = re.compile(rb"^(<<<<<<<|>>>>>>>)( |$)", re.MULTILINE)


@rainer.command()
@KEY
@OPTIONAL_VERSION
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_session
def edit(session: Session, key: str, version: int | None, yes: bool) -> None:
    """Edit the next commit of KEY in $VISUAL/$EDITOR, review the diff, then post it.

    A key that does not exist yet starts at version 1. The server checks the commit before
    you are asked (a dry run). If someone else committed meanwhile, your change is merged
    onto theirs (three-way: the version you started from, theirs, yours): a clean merge is
    shown and asked about; a conflict reopens the editor with <<<<<<< markers to resolve.
    If nothing is posted, your edited file is kept and its path printed.
    """
    client = session.client
    try:
        base: Commit | None = client.get_commit(key, version)
    except CommitNotFound:
        if version is not None:
            raise
        base = None
    start = base.version if base else 0
    document = prepare_text(start + 1, session.author(), "", base.payload if base else None)
    path = _scratch_file(key, document)

    def keep(message: str) -> click.ClickException:
        click.echo(f"Your work is saved in: {path}")
        return click.ClickException(f"{message}; your edit is saved in {path}")

    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    open_editor = True
    while True:
        if open_editor:
            try:
                status = subprocess.call([*shlex.split(editor), path])
            except (OSError, ValueError) as exc:
                raise keep(f"cannot run editor {editor!r}: {exc}") from None
            if status != 0:
                raise keep(f"editor {editor!r} exited with status {status}")
        with open(path, "rb") as edited:
            header, payload = parse_prepared_or_keep(edited.read(), keep)
        try:
            meta = header_meta(key, header, session.author)
        except click.ClickException as exc:
            raise keep(exc.message) from None
        if not meta["empty"] and _CONFLICT_MARKER.search(payload):
            raise keep("the file still has conflict markers (<<<<<<< ... >>>>>>>): resolve them")
        try:
            outcome = session.confirm_and_post(key, base, meta, payload, yes)
        except CommitOrderingError as exc:
            theirs = _explain_conflict(session, key, base, exc)
            started = base.version if base else 0
            if theirs is None or theirs.version <= started:
                raise keep(describe_conflict(exc)) from None
            open_editor = not _merge_into(path, base, theirs, meta, payload)
            base = theirs
            continue
        except RainerError as exc:
            raise keep(str(exc)) from None
        except click.ClickException as exc:
            raise keep(exc.message) from None
        except (KeyboardInterrupt, click.Abort):
            click.echo(f"\nYour work is saved in: {path}")
            raise click.Abort() from None
        break
    if outcome == "declined":
        click.echo(f"Your work is saved in: {path}")
    else:
        os.unlink(path)


def _merge_into(
    path: str, base: Commit | None, theirs: Commit, meta: Mapping[str, Any], yours: bytes
) -> bool:
    """Merge your edit onto ``theirs`` (three-way, from ``base``) into the file at ``path``,
    as the version after theirs. Returns whether it merged cleanly."""
    started = base.version if base else 0
    empty = bool(meta.get("empty"))
    merged = three_way_merge(
        base.payload if base else None,
        theirs.payload,
        None if empty else yours,
        their_name=f"version {theirs.version} ({theirs.author})",
        your_name="your edit",
        base_name=f"version {started}",
    )
    if empty and merged.clean:
        payload: bytes | None = None  # still a tombstone: nothing of theirs to keep
    else:
        payload = merged.payload
    document = prepare_text(
        theirs.version + 1, str(meta["author"]), str(meta.get("comment") or ""), payload,
        empty=payload is None,
    )
    with open(path, "wb") as file:
        file.write(document)
    if merged.clean:
        click.echo(f"Your change merges cleanly onto version {theirs.version}:")
        return True
    places = "place" if merged.conflicts == 1 else "places"
    click.echo(
        f"Your change and theirs touch the same lines ({merged.conflicts} {places}): "
        "resolve the lines between <<<<<<< and >>>>>>> in the editor."
    )
    return False


def parse_prepared_or_keep(
    data: bytes, keep: Callable[[str], click.ClickException]
) -> tuple[dict[str, Any], bytes]:
    try:
        return parse_prepared(data)
    except click.ClickException as exc:
        raise keep(exc.message) from None


def _scratch_file(key: str, document: bytes) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:50]
    fd, path = tempfile.mkstemp(prefix=f"rainer-{safe}-", suffix=".yaml")
    with os.fdopen(fd, "wb") as scratch:
        scratch.write(document)
    return path


def _explain_conflict(
    session: Session, key: str, base: Commit | None, exc: CommitOrderingError
) -> Commit | None:
    """Tell the user who committed first and show their change; return their commit."""
    try:
        theirs: Commit | None = session.client.get_commit(key)
    except RainerError:
        theirs = None
    started = base.version if base else 0
    if theirs is None or theirs.version <= started:
        click.echo(f"Could not commit: {describe_conflict(exc)}.")
        return None
    click.echo(
        f"Someone else committed {key} first: version {theirs.version} by {theirs.author} "
        f"({format_mtime(theirs.mtime)}); you started from version {started}."
    )
    if theirs.comment:
        click.echo("".join(f"  {line}\n" for line in theirs.comment.split("\n")), nl=False)
    click.echo("Their change:")
    click.echo(
        unified_diff(
            base.payload if base else None,
            theirs.payload,
            f"{key} {started}",
            f"{key} {theirs.version}",
            session.style,
        ),
        nl=False,
        color=True,
    )
    return theirs


@rainer.command()
@click.argument("key", required=False)
@click.option("--prefix", "-p", metavar="PREFIX", help="Watch every key starting with PREFIX.")
@click.option("--index", type=click.IntRange(min=0), help="Start after this index (default: now).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (meta + index).")
@click.option(
    "--exec",
    "command",
    metavar="CMD",
    help="Run CMD (with sh -c) on each change, with RAINER_KEY, RAINER_VERSION, RAINER_INDEX, "
    "RAINER_EMPTY and RAINER_PAYLOAD_PATH (a file holding the payload) in its environment.",
)
@pass_session
def watch(
    session: Session,
    key: str | None,
    prefix: str | None,
    index: int | None,
    as_json: bool,
    command: str | None,
) -> None:
    """Print one line per change of KEY (or of the keys under --prefix) as it happens.

    INDEX<TAB>KEY<TAB>VERSION<TAB>AUTHOR<TAB>updated|deleted per change. A dropped connection
    or a restarted server is retried, resuming where it stopped. Ctrl-C ends it.
    """
    if key is not None and prefix is not None:
        raise click.UsageError("give a KEY or --prefix, not both")
    if key is None and prefix is None:
        raise click.UsageError("give a KEY or --prefix (--prefix '' watches every key)")
    try:
        for change in session.client.watch(key=key, prefix=prefix, index=index):
            if as_json:
                click.echo(json.dumps({**change.meta, "index": change.index}, ensure_ascii=False))
            else:
                what = "deleted" if change.empty else "updated"
                author = change.author.replace("\t", " ").replace("\n", " ")
                click.echo(f"{change.index}\t{change.key}\t{change.version}\t{author}\t{what}")
            sys.stdout.flush()
            if command is not None:
                _run_on_change(command, change)
    except KeyboardInterrupt:
        # Ctrl-C is how a watch ends: no traceback, and what was printed stands.
        click.echo("", err=True)


def _run_on_change(command: str, change: Commit) -> None:
    """Run ``command`` for one change (as ``consul watch`` and confd handlers run): the key,
    version and index in the environment, the payload in a file removed afterwards."""
    fd, path = tempfile.mkstemp(prefix="rainer-watch-")
    try:
        with os.fdopen(fd, "wb") as payload:
            payload.write(change.payload or b"")
        environment = {
            **os.environ,
            "RAINER_KEY": change.key,
            "RAINER_VERSION": str(change.version),
            "RAINER_INDEX": str(change.index),
            "RAINER_EMPTY": "yes" if change.empty else "no",
            "RAINER_PAYLOAD_PATH": path,
        }
        status = subprocess.call(["/bin/sh", "-c", command], env=environment)
        if status != 0:
            click.echo(
                f"rainer: {command!r} exited with status {status} for {change.key} "
                f"version {change.version}",
                err=True,
            )
    finally:
        os.unlink(path)


@rainer.command()
@click.argument("key", required=False)
@pass_session
def whoami(session: Session, key: str | None) -> None:
    """Print the identity the server sees for your credentials, and what it may do on KEY."""
    answer = session.client.whoami(key)
    identity = answer.get("identity")
    via = answer.get("via")
    line = f"{identity} (via {via})" if identity else "anonymous"
    if answer.get("act_as"):
        line += ", may act as other authors"
    click.echo(line)
    if key is not None:
        rights = [r for r in ("read", "write") if answer.get(r)]
        click.echo(f"{key}: {' and '.join(rights) if rights else 'no access'}")


def main(argv: list[str] | None = None) -> None:
    """The ``rainer`` console script."""
    rainer.main(args=argv, prog_name="rainer")


if __name__ == "__main__":
    main()
