"""The web console: browse keys, read a key and its history, compare versions, edit, revert.

Server-rendered pages (Jinja templates under ``web/templates/console``): every page works
without JavaScript; ``static/console/console.js`` only adds keyboard shortcuts. The console
reads and writes in-process, through the service's own storage and gate, and changes go
through ``web/commits.py``: exactly the API's rules (access, author, ordering, payload
format and schema, size, audit). An edit is always reviewed (a dry run) before it is
committed; a commit that lost the race is never written over the other one, it is shown
with both changes and a three-way merge.

Who is using it: with ``RAINER_AUTH=proxy`` the proxy's identity; with tokens, the token
given on the sign-in page, kept as its digest in a signed session cookie (``HttpOnly``,
``SameSite=Strict``, ``Secure`` over TLS) that this console sets apart from any session the
embedding app has. Every form carries the session's CSRF token; a post without it is refused.

No request hooks (``before_request`` and the like): the mirror fast path of
``web/middleware.py`` steps aside for apps that have any, so each view sets itself up.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import json
import logging
import re
import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import yaml
from flask import Blueprint
from flask import Flask
from flask import Response
from flask import abort
from flask import g
from flask import redirect
from flask import render_template
from flask import request
from flask import url_for
from itsdangerous import BadSignature
from itsdangerous import URLSafeTimedSerializer
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import NotFound

from rainer_server.version import __version__
from rainer_server.access import token_digest
from rainer_server.commit import Commit
from rainer_server.commit import format_mtime
from rainer_server.commit import parse_version
from rainer_server.commit import validate_key
from rainer_server.diff import diff_lines
from rainer_server.diff import side_by_side
from rainer_server.errors import AccessDenied
from rainer_server.errors import AuthenticationRequired
from rainer_server.errors import CommitNotFound
from rainer_server.errors import CommitOrderingError
from rainer_server.errors import CsrfRejected
from rainer_server.errors import InvalidCommit
from rainer_server.errors import PayloadRejected
from rainer_server.errors import StorageUnavailable
from rainer_server.merge import three_way_merge
from rainer_server.storage import HeadsPage
from rainer_server.storage import page_of_heads
from rainer_server.storage import paged_heads
from rainer_server.web.auth import CALLER_ENVIRON_KEY
from rainer_server.web.auth import Caller
from rainer_server.web.commits import check_write
from rainer_server.web.commits import save_commit
from rainer_server.web.commits import sign
from rainer_server.web.context import RainerContext
from rainer_server.web.context import get_rainer

log = logging.getLogger(__name__)

#: The console's cookie: apart from an embedding app's own Flask session.
COOKIE_NAME = "rainer_console"
#: A sign-in lasts this long at most (the token's own expiry and revocation end it sooner).
SESSION_MAX_AGE = timedelta(hours=12)
CSRF_FIELD = "csrf_token"
KEYS_PER_PAGE = 50
MAX_KEYS_PER_PAGE = 500
HISTORY_PER_PAGE = 20
#: Where a payload's parser says the trouble is: JSON's "line 3 column 5", YAML's "line 3,".
_LINE_IN_REASON = re.compile(r"\bline (\d+)")

# Named for Rainer: an embedding app may well have a "console" of its own.
bp = Blueprint(
    "rainer_console",
    __name__,
    template_folder="templates",
    static_folder="static/console",
    static_url_path="/static",
)


def register(app: Flask, rainer: RainerContext) -> None:
    """Mount the console at ``RAINER_UI_PREFIX``; ``rainer`` holds its settings."""
    settings = rainer.settings
    secret = settings.secret_key
    if not secret:
        # Only without access control (load_settings refuses the console with auth and no
        # key): a key per start signs the CSRF tokens. Under gunicorn the preloaded master
        # makes it, so every worker shares it; a restart ends the forms in flight.
        secret = secrets.token_urlsafe(32)
    rainer.console_sessions = URLSafeTimedSerializer(secret, salt="rainer-console-session")
    app.register_blueprint(bp, url_prefix=settings.ui_prefix)


# ---------------------------------------------------------------------- sessions and callers


@dataclasses.dataclass
class ConsoleSession:
    """What the console's cookie holds: the CSRF token, the signed-in token's digest, the
    author typed last (anonymous consoles), and messages for the next page."""

    csrf: str
    token: str | None = None
    author: str | None = None
    flashes: list[str] = dataclasses.field(default_factory=list)
    changed: bool = False

    def flash(self, message: str) -> None:
        self.flashes.append(message)
        self.changed = True


def _load_session(rainer: RainerContext) -> ConsoleSession:
    raw = request.cookies.get(COOKIE_NAME)
    if raw:
        try:
            data = rainer.console_sessions.loads(raw, max_age=SESSION_MAX_AGE.total_seconds())
        except BadSignature:  # forged, from another key, or too old: start again
            data = None
        if isinstance(data, dict) and isinstance(data.get("csrf"), str):
            return ConsoleSession(
                csrf=data["csrf"],
                token=data.get("token") if isinstance(data.get("token"), str) else None,
                author=data.get("author") if isinstance(data.get("author"), str) else None,
                flashes=[f for f in data.get("flashes", []) if isinstance(f, str)],
            )
    return ConsoleSession(csrf=secrets.token_urlsafe(32), changed=True)


def _save_session(rainer: RainerContext, session: ConsoleSession, response: Response) -> None:
    if not session.changed:
        return
    data: dict[str, Any] = {"csrf": session.csrf}
    if session.token:
        data["token"] = session.token
    if session.author:
        data["author"] = session.author
    if session.flashes:
        data["flashes"] = session.flashes
    response.set_cookie(
        COOKIE_NAME,
        rainer.console_sessions.dumps(data),
        path=rainer.settings.ui_prefix,
        httponly=True,
        # Over TLS only when served over TLS (gunicorn believes nginx's X-Forwarded-Proto);
        # a plain-HTTP console on loopback would otherwise never keep a session.
        secure=request.is_secure,
        samesite="Strict",
    )


def _caller(rainer: RainerContext, session: ConsoleSession) -> Caller:
    """Who is using the console: a trusted proxy's identity (or an API token sent as a
    header), else the token signed in on this console, else the anonymous caller."""
    environ = request.environ
    gate = rainer.gate
    caller = gate.caller(environ)
    if caller.identity is None and caller.invalid is None and session.token:
        identity = gate.tokens.identify_digest(session.token) if gate.tokens else None
        if identity is None:
            session.token = None
            session.flash("Your sign-in ended (the token expired or was revoked): sign in again.")
        else:
            caller = Caller(identity, "token", caller.peer)
            # The gate resolves each request's caller once, from here: every check of this
            # request (the commit rules included) sees the signed-in identity.
            environ[CALLER_ENVIRON_KEY] = caller
    return caller


@dataclasses.dataclass
class Page:
    """The request's console state, at ``g.console``."""

    rainer: RainerContext
    session: ConsoleSession
    caller: Caller

    @property
    def gate(self) -> Any:
        return self.rainer.gate

    def may_read(self, key: str) -> bool:
        return self.gate.may_read(self.caller, key)

    def may_write(self, key: str) -> bool:
        return self.caller.invalid is None and self.gate.policy.may_write(self.caller.identity, key)

    @property
    def may_write_anything(self) -> bool:
        return self.caller.invalid is None and any(
            rule.allows(self.caller.identity, write=True) for rule in self.gate.policy.rules
        )

    @property
    def needs_author(self) -> bool:
        """Anonymous writers (no access control) name themselves, as with the API."""
        return self.caller.identity is None


def console_view(view: Callable[..., Any]) -> Callable[..., Response]:
    """Set up a console view: session, caller, CSRF check on posts, security headers, and
    the session cookie on the way out (a decorator, not request hooks; see the module)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Response:
        rainer = get_rainer()
        session = _load_session(rainer)
        try:
            page = g.console = Page(rainer, session, ANONYMOUS_CALLER)
            page.caller = _caller(rainer, session)
            if request.method == "POST":
                _check_csrf(session)
            response = _as_response(view(*args, **kwargs))
        except HTTPException as exc:
            response = _error_page(exc.code or 500, exc.name, exc.description or exc.name)
        except CsrfRejected as exc:
            response = _error_page(400, "Form refused", str(exc))
        except AuthenticationRequired as exc:
            response = _unauthenticated(exc)
        except AccessDenied as exc:
            response = _error_page(403, "Not allowed", str(exc))
        except CommitNotFound as exc:
            response = _error_page(404, "Not found", str(exc))
        except StorageUnavailable:
            response = _error_page(503, "Database unavailable", "Try again in a few seconds.")
            response.headers["Retry-After"] = "5"
        except InvalidCommit as exc:
            response = _error_page(400, "Not possible", str(exc))
        _secure_headers(response)
        _save_session(rainer, session, response)
        return response

    return wrapper


ANONYMOUS_CALLER = Caller(None, None, None)


def _as_response(value: Any) -> Response:
    if isinstance(value, Response):
        return value
    if isinstance(value, tuple):
        body, status = value
        return Response(body, status, mimetype="text/html")
    return Response(value, 200, mimetype="text/html")


def _secure_headers(response: Response) -> None:
    headers = response.headers
    # Pages show configuration, which often holds secrets: never kept by a cache.
    if request.endpoint != "rainer_console.static":
        headers["Cache-Control"] = "no-store"
    headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "same-origin"


def _check_csrf(session: ConsoleSession) -> None:
    given = request.form.get(CSRF_FIELD, "")
    if not given or not hmac.compare_digest(given.encode(), session.csrf.encode()):
        log.warning("Console form refused: CSRF token missing or wrong (%s %s)", request.method,
                    request.path)
        raise CsrfRejected(
            "This form did not come from this console, or your session ended (CSRF check "
            "failed). Nothing was changed: go back, reload the page and try again."
        )


def _unauthenticated(exc: AuthenticationRequired) -> Response:
    page: Page = g.console
    if "token" in page.gate.modes and request.method == "GET":
        return redirect(url_for("rainer_console.sign_in", next=request.full_path.rstrip("?")))
    return _error_page(401, "Sign-in needed", str(exc))


def _error_page(status: int, title: str, message: str) -> Response:
    body = render_template("console/error.html", title=title, message=message, status=status)
    return Response(body, status, mimetype="text/html")


def _size(size: int | None) -> str:
    if size is None:
        return "deleted"
    if size < 1024:
        return f"{size} B"
    return f"{size / 1024:.1f} KiB"


@bp.context_processor
def _page_context() -> dict[str, Any]:
    # Names for this blueprint's templates only: an embedding app's templates keep theirs.
    page: Page | None = getattr(g, "console", None)
    flashes: list[str] = []
    if page is not None and page.session.flashes:
        flashes, page.session.flashes = page.session.flashes, []
        page.session.changed = True
    return {
        "page": page,
        "flashes": flashes,
        "rainer_version": __version__,
        "csrf_field": CSRF_FIELD,
        "csrf": page.session.csrf if page is not None else "",
        "fmt_time": format_mtime,
        "fmt_size": _size,
    }


# ---------------------------------------------------------------------- the keys


@bp.get("/")
@console_view
def keys() -> Any:
    page: Page = g.console
    page.gate.check(request.environ, None, write=False)  # a wrong token: 401 here too
    prefix = request.args.get("prefix", "")
    contains = request.args.get("q", "")
    deleted = request.args.get("deleted", "") in ("yes", "on", "1", "true")
    after = request.args.get("after") or None
    before = request.args.get("before") or None
    limit = _int_arg("limit", KEYS_PER_PAGE, 1, MAX_KEYS_PER_PAGE)
    storage = page.rainer.database_storage
    visible = None
    if page.gate.enabled:
        identity = page.caller.identity
        may_read = page.gate.policy.may_read
        visible = lambda key: may_read(identity, key)  # noqa: E731
    heads: HeadsPage = page_of_heads(
        storage,
        prefix=prefix,
        contains=contains,
        include_empty=deleted,
        after=after,
        before=before,
        limit=limit,
        visible=visible,
    )
    # Counting what one may read would read every head: only without a policy to apply.
    total = None
    if visible is None:
        total = paged_heads(storage).heads_count(prefix, contains, deleted)
    query = {"prefix": prefix, "q": contains, "deleted": "yes" if deleted else "", "limit": limit}
    query = {k: v for k, v in query.items() if v and (k != "limit" or v != KEYS_PER_PAGE)}
    return render_template(
        "console/keys.html",
        heads=heads,
        total=total,
        prefix=prefix,
        contains=contains,
        deleted=deleted,
        query=query,
    )


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    text = request.args.get(name)
    if not text:
        return default
    value = parse_version(text.strip())
    if value is None or not low <= value <= high:
        raise InvalidCommit(f"'{name}' must be a number from {low} to {high}")
    return value


def _version_arg(name: str) -> int | None:
    text = request.args.get(name) or request.form.get(name)
    if not text:
        return None
    value = parse_version(text.strip())
    if value is None or value < 1:
        raise InvalidCommit(f"'{name}' must be a version number (1, 2, ...)")
    return value


def _base_arg() -> int:
    """The version an edit started from: 0 for a new key."""
    text = request.form.get("base", "0").strip() or "0"
    value = parse_version(text)
    if value is None:
        raise InvalidCommit("'base' must be the version the edit started from (0 for a new key)")
    return value


# ---------------------------------------------------------------------- a key


def _readable(key: str) -> str:
    key = validate_key(key)
    g.console.gate.check(request.environ, key, write=False)
    return key


def _found(key: str, version: int | None = None) -> Commit:
    commit = g.console.rainer.database_storage.get(key, version)
    if commit is None:
        raise CommitNotFound(key, version)
    return commit


@dataclasses.dataclass
class PayloadView:
    """A payload as the page shows it: its exact text by line, and a formatted view."""

    lines: list[str]
    binary: bool
    formatted: str | None
    formatted_kind: str | None


def _payload_view(rainer: RainerContext, commit: Commit) -> PayloadView:
    data = commit.payload or b""
    try:
        text = data.decode("utf-8")
        binary = False
    except UnicodeDecodeError:
        text = data.decode("utf-8", "replace")
        binary = True
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    formatted = kind = None
    payload_format = rainer.settings.payload_format
    if not binary and data:
        formatted, kind = _formatted(text, payload_format)
        if formatted is not None and formatted.rstrip("\n") == text.rstrip("\n"):
            formatted = None  # already as formatted as it gets
    return PayloadView(lines, binary, formatted, kind)


def _formatted(text: str, payload_format: str) -> tuple[str | None, str | None]:
    """A pretty-printed view of a JSON or YAML payload (``None`` when it is neither)."""
    try:
        value = json.loads(text)
    except ValueError:
        pass
    else:
        return json.dumps(value, indent=2, ensure_ascii=False) + "\n", "JSON"
    if payload_format == "yaml":
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return None, None
        if isinstance(value, (dict, list)):
            return yaml.safe_dump(value, allow_unicode=True, sort_keys=False), "YAML"
    return None, None


@bp.get("/keys/<key>")
@console_view
def key_page(key: str) -> Any:
    page: Page = g.console
    key = _readable(key)
    head = _found(key)
    shown_version = _version_arg("version")
    shown = head if shown_version is None else _found(key, shown_version)
    before = _version_arg("before")
    storage = page.rainer.database_storage
    history = storage.history(key, limit=HISTORY_PER_PAGE, before=before)
    older = history[-1].version if history and history[-1].version > 1 else None
    restore_to = _last_non_empty(storage, key, head) if head.empty else None
    return render_template(
        "console/key.html",
        key=key,
        head=head,
        shown=shown,
        view=_payload_view(page.rainer, shown),
        history=history,
        older=older,
        newer=before is not None,
        restore_to=restore_to,
        may_write=page.may_write(key),
        revert_target=_revert_target,
    )


def _revert_target(head: Commit, commit: Commit) -> bool:
    """Whether a version is offered as a revert target: not the head itself."""
    return commit.version != head.version


def _last_non_empty(storage: Any, key: str, head: Commit) -> Commit | None:
    before = head.version
    while before > 1:
        page = storage.history(key, limit=100, before=before)
        for commit in page:
            if not commit.empty:
                return commit
        if len(page) < 100:
            return None
        before = page[-1].version
    return None


@bp.get("/keys/<key>/diff")
@console_view
def diff(key: str) -> Any:
    page: Page = g.console
    key = _readable(key)
    to_version = _version_arg("to")
    from_version = _version_arg("from")
    new = _found(key, to_version)
    if from_version is None:
        old = _found(key, new.version - 1) if new.version > 1 else None
    else:
        old = _found(key, from_version)
    split = request.args.get("view") == "split"
    whole = request.args.get("context") == "all"
    lines = diff_lines(old.payload if old else None, new.payload, None if whole else 3)
    head = _found(key)
    return render_template(
        "console/diff.html",
        key=key,
        old=old,
        new=new,
        head=head,
        lines=lines,
        rows=side_by_side(lines) if split else None,
        split=split,
        whole=whole,
        may_write=page.may_write(key),
        versions=range(head.version, 0, -1),
    )


# ---------------------------------------------------------------------- changes


def _text_of(commit: Commit | None) -> str:
    return (commit.payload or b"").decode("utf-8") if commit is not None else ""


def _editable(commit: Commit | None) -> bool:
    try:
        _text_of(commit)
    except UnicodeDecodeError:
        return False
    return True


def _form_payload(base: Commit | None) -> bytes:
    """The payload typed in the form. Browsers send a textarea's line breaks as CRLF: back
    to LF, unless the payload had CRLF line breaks to begin with."""
    text = request.form.get("payload", "")
    if base is None or b"\r\n" not in (base.payload or b""):
        text = text.replace("\r\n", "\n")
    return text.encode("utf-8")


def _author(page: Page) -> str | None:
    """The author to sign with: the identity's (``None``: sign() uses it), or, without
    access control, the name typed in the form or remembered from an earlier one."""
    if not page.needs_author:
        return None
    author = request.form.get("author", "").strip() or page.session.author or ""
    if not author:
        raise InvalidCommit("Say who you are: give your name as the author first")
    if author != page.session.author:
        page.session.author = author
        page.session.changed = True
    return author


@bp.post("/author")
@console_view
def set_author() -> Any:
    """Remember the name an anonymous user commits under (no access control)."""
    page: Page = g.console
    _author(page)
    page.session.flash(f"Your changes are signed {page.session.author}.")
    return redirect(_safe_next() or url_for("rainer_console.keys"), 303)


@bp.get("/new")
@console_view
def new_key() -> Any:
    page: Page = g.console
    if not page.may_write_anything:
        if page.caller.identity is None and page.gate.enabled:
            raise AuthenticationRequired()
        raise AccessDenied("You may not create keys")
    return render_template("console/edit.html", **_edit_context(None, None, "", "", None))


@bp.post("/new")
@console_view
def new_key_post() -> Any:
    key = request.form.get("key", "").strip()
    try:
        validate_key(key)
    except InvalidCommit as exc:
        context = _edit_context(None, None, request.form.get("payload", ""),
                                request.form.get("comment", ""), None)
        context["key_error"] = str(exc)
        context["new_key"] = key
        return render_template("console/edit.html", **context), 400
    return _change(key)


@bp.get("/keys/<key>/edit")
@console_view
def edit(key: str) -> Any:
    page: Page = g.console
    key = _readable(key)
    head = page.rainer.database_storage.get(key)
    check_write(page.rainer, request.environ, key, (head.version if head else 0) + 1)
    if not _editable(head):
        raise InvalidCommit("This payload is not UTF-8 text: change it through the API")
    text = "" if head is None or head.empty else _text_of(head)
    return render_template("console/edit.html", **_edit_context(key, head, text, "", None))


@bp.post("/keys/<key>/edit")
@console_view
def edit_post(key: str) -> Any:
    return _change(validate_key(key))


def _edit_context(
    key: str | None, base: Commit | None, text: str, comment: str, error: Any
) -> dict[str, Any]:
    return {
        "key": key,
        "base": base,
        "base_version": base.version if base else 0,
        "text": text,
        "comment": comment,
        "error": error,
        "error_line": _error_line(error),
        "lines": text.split("\n") if error is not None else None,
        "key_error": None,
        "new_key": None,
    }


def _error_line(error: Any) -> int | None:
    if isinstance(error, PayloadRejected):
        found = _LINE_IN_REASON.search(error.reason)
        if found:
            return int(found.group(1))
    return None


def _change(key: str) -> Any:
    """An edit's review (a dry run), its commit, or its return to the editor."""
    page: Page = g.console
    # Read too: a review and a conflict show the key's payloads.
    _readable(key)
    rainer = page.rainer
    base_version = _base_arg()
    storage = rainer.database_storage
    base = storage.get(key, base_version) if base_version else None
    if base_version and base is None:
        raise CommitNotFound(key, base_version)
    payload = _form_payload(base)
    text = payload.decode("utf-8")
    comment = request.form.get("comment", "")
    action = request.form.get("action", "review")
    if action == "edit":
        return render_template("console/edit.html", **_edit_context(key, base, text, comment, None))
    version = base_version + 1
    caller = check_write(rainer, request.environ, key, version)
    try:
        signature = sign(rainer, request.environ, caller, key, version, _author(page), None)
        commit = save_commit(
            rainer,
            request.environ,
            key,
            version,
            signature,
            payload,
            comment,
            dry_run=action != "commit",
        )
    except CommitOrderingError:
        return _conflict(key, base, payload, comment)
    except InvalidCommit as exc:  # the payload's format or schema, its size, the author
        context = _edit_context(key, base, text, comment, exc)
        return render_template("console/edit.html", **context), 400
    if action == "commit":
        page.session.flash(f"Committed version {commit.version} of {key}.")
        return redirect(url_for("rainer_console.key_page", key=key), 303)
    lines = diff_lines(base.payload if base else None, payload)
    return render_template(
        "console/review.html",
        key=key,
        base=base,
        base_version=base_version,
        commit=commit,
        lines=lines,
        text=text,
        comment=comment,
        unchanged=base is not None and not base.empty and base.payload == payload,
    )


def _conflict(key: str, base: Commit | None, yours: bytes, comment: str) -> Any:
    """Someone committed since the edit began: their change, yours, and the merge."""
    rainer = g.console.rainer
    storage = rainer.database_storage
    head = storage.get(key)
    if head is None:  # cannot happen (versions never go away), but never write blindly
        raise CommitNotFound(key)
    started = base.version if base else 0
    between = storage.history(key, limit=HISTORY_PER_PAGE, before=None)
    between = [c for c in between if c.version > started]
    merged = three_way_merge(
        base.payload if base else None,
        head.payload,
        yours,
        their_name=f"version {head.version} ({head.author})",
        your_name="your edit",
        base_name=f"version {started}",
    )
    return render_template(
        "console/conflict.html",
        key=key,
        base=base,
        started=started,
        head=head,
        between=between,
        theirs=diff_lines(base.payload if base else None, head.payload),
        yours_lines=diff_lines(base.payload if base else None, yours),
        merged=merged,
        merged_text=merged.payload.decode("utf-8", "replace"),
        merged_lines=diff_lines(head.payload, merged.payload),
        comment=comment,
    ), 409


@bp.post("/keys/<key>/revert")
@console_view
def revert(key: str) -> Any:
    page: Page = g.console
    key = _readable(key)
    target = _version_arg("revert_to")
    version = _version_arg("next")
    if target is None or version is None:
        raise InvalidCommit("A revert needs the version to revert to and the next version")
    rainer = page.rainer
    caller = check_write(rainer, request.environ, key, version)
    signature = sign(rainer, request.environ, caller, key, version, _author(page), None)
    comment = request.form.get("comment", "").strip() or None
    try:
        commit = save_commit(
            rainer, request.environ, key, version, signature, b"", comment, revert_to=target
        )
    except CommitOrderingError as exc:
        page.session.flash(
            f"Nothing was changed: {key} is at version {exc.expected_version - 1} now, not "
            f"{version - 1} as on the page you used. Check the newest version, then try again."
        )
        return redirect(url_for("rainer_console.key_page", key=key), 303)
    if commit.empty:
        page.session.flash(
            f"Deleted {key}: version {commit.version} is a tombstone, as version {target}."
        )
    else:
        page.session.flash(
            f"Version {commit.version} of {key} is version {target}'s payload again."
        )
    return redirect(url_for("rainer_console.key_page", key=key), 303)


@bp.get("/keys/<key>/delete")
@console_view
def delete(key: str) -> Any:
    page: Page = g.console
    key = _readable(key)
    head = _found(key)
    check_write(page.rainer, request.environ, key, head.version + 1)
    if head.empty:
        raise InvalidCommit(f"{key} is deleted already")
    return render_template("console/delete.html", key=key, head=head)


@bp.post("/keys/<key>/delete")
@console_view
def delete_post(key: str) -> Any:
    page: Page = g.console
    key = _readable(key)
    version = _version_arg("next")
    if version is None:
        raise InvalidCommit("A delete needs the next version")
    rainer = page.rainer
    caller = check_write(rainer, request.environ, key, version)
    signature = sign(rainer, request.environ, caller, key, version, _author(page), None)
    try:
        save_commit(rainer, request.environ, key, version, signature, None,
                    request.form.get("comment", "").strip())
    except CommitOrderingError as exc:
        page.session.flash(
            f"Nothing was deleted: {key} is at version {exc.expected_version - 1} now, not "
            f"{version - 1}. Check the newest version, then try again."
        )
        return redirect(url_for("rainer_console.key_page", key=key), 303)
    page.session.flash(
        f"Deleted {key} (version {version}). Its history stays: restore it any time."
    )
    return redirect(url_for("rainer_console.key_page", key=key), 303)


# ---------------------------------------------------------------------- signing in


@bp.get("/sign-in")
@console_view
def sign_in() -> Any:
    page: Page = g.console
    if "token" not in page.gate.modes:
        abort(404)
    return render_template("console/sign_in.html", next=_safe_next(), error=None)


@bp.post("/sign-in")
@console_view
def sign_in_post() -> Any:
    page: Page = g.console
    if "token" not in page.gate.modes:
        abort(404)
    token = request.form.get("token", "").strip()
    identity = page.gate.tokens.identify(token) if token else None
    if identity is None:
        log.info("Console sign-in refused from %s", request.remote_addr)
        error = "That token is wrong, expired or revoked."
        return render_template("console/sign_in.html", next=_safe_next(), error=error), 401
    session = page.session
    session.token = token_digest(token)
    # A new CSRF token with every sign-in: one seen before it proves nothing after it.
    session.csrf = secrets.token_urlsafe(32)
    session.flash(f"Signed in as {identity}.")
    return redirect(_safe_next() or url_for("rainer_console.keys"), 303)


@bp.post("/sign-out")
@console_view
def sign_out() -> Any:
    session = g.console.session
    session.token = None
    session.csrf = secrets.token_urlsafe(32)
    session.flash("Signed out.")
    return redirect(url_for("rainer_console.keys"), 303)


def _safe_next() -> str | None:
    """Where to go after signing in: a page of this console only (never another site)."""
    target = request.values.get("next") or ""
    parts = urlsplit(target)
    prefix = g.console.rainer.settings.ui_prefix
    inside = parts.path == prefix or parts.path.startswith(prefix + "/")
    if parts.scheme or parts.netloc or not inside or target.startswith("//"):
        return None
    return target


# ---------------------------------------------------------------------- anything else


@bp.route("/<path:rest>", methods=["GET", "POST"])
@console_view
def not_found(rest: str) -> Any:
    raise NotFound("There is no such page in the console.")
