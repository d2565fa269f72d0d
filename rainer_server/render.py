"""How commits look on a terminal: diffs, ``git log -p``-like logs, colour and a pager.

Shared by the ``rainer`` command and the ``flask rainer`` admin commands; the diff itself is
``rainer_server.diff``'s, which the server and the console use too.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from typing import IO
from typing import Any

import click

from rainer_server.commit import Commit
from rainer_server.commit import format_mtime
from rainer_server.diff import diff_lines
from rainer_server.diff import unified_text

DEFAULT_PAGER = "less"
# less: quit when the log fits on one screen, pass colours through, don't clear the screen.
DEFAULT_LESS = "FRX"

Style = Callable[..., str]


def _plain(text: str, **_: Any) -> str:
    return text


def colour_wanted(stream: IO[Any]) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set (no-color.org)."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return isatty(stream)


def isatty(stream: IO[Any]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def styler(colour: bool) -> Style:
    return click.style if colour else _plain


def unified_diff(
    old: bytes | None, new: bytes | None, old_name: str, new_name: str, style: Style = _plain
) -> str:
    """A unified diff of two payloads, marking a missing final newline as diff(1) does
    (``rainer_server.diff``: the same lines the server and the console show)."""
    return unified_text(diff_lines(old, new), old_name, new_name, style)


def style_diff_text(text: str, style: Style) -> str:
    """Colour a unified diff given as text (the server's ``GET /<key>/diff``) as
    ``unified_diff`` colours its own."""
    out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        end = line[len(body):]
        if line.startswith(("--- ", "+++ ")):
            body = style(body, bold=True)
        elif line.startswith("@@"):
            body = style(body, fg="cyan")
        elif line.startswith("-"):
            body = style(body, fg="red")
        elif line.startswith("+"):
            body = style(body, fg="green")
        out.append(body + end)
    return "".join(out)


def render_log(commits: Iterable[Commit], style: Style = _plain) -> Iterator[str]:
    """``git log -p``-like text for commits given newest first (spec §6's ``log``).

    Each entry diffs a version against the next one in ``commits`` (its predecessor), the
    oldest against nothing.
    """
    walk = iter(commits)
    current = next(walk, None)
    while current is not None:
        older = next(walk, None)
        title = f"commit {current.version}" + (" (empty)" if current.empty else "")
        lines = [
            style(title, fg="yellow"),
            f"Author: {current.author}",
            f"Date:   {format_mtime(current.mtime)}",
            "",
        ]
        if current.comment:
            lines += [f"  {line}" for line in current.comment.split("\n")] + [""]
        text = "\n".join(lines) + "\n"
        previous = older if older is not None and older.version == current.version - 1 else None
        text += unified_diff(
            previous.payload if previous else None,
            current.payload,
            f"{current.key} {current.version - 1}",
            f"{current.key} {current.version}",
            style,
        )
        yield text + "\n"
        current = older


@contextlib.contextmanager
def paged_output() -> Iterator[Callable[[str], None]]:
    """Yield a function writing text to ``$PAGER`` (default ``less``) on a terminal, else stdout.

    ``PAGER=""`` turns the pager off. Quitting the pager early stops the output quietly.
    """
    command = os.environ.get("PAGER", DEFAULT_PAGER)
    argv = shlex.split(command) if command.strip() else []
    if not argv or not isatty(sys.stdout):
        yield lambda text: click.echo(text, nl=False, color=True)
        return
    sys.stdout.flush()
    env = dict(os.environ)
    env.setdefault("LESS", DEFAULT_LESS)
    try:
        pager = subprocess.Popen(argv, stdin=subprocess.PIPE, env=env)
    except OSError as exc:
        click.echo(f"rainer: cannot run pager {command!r}: {exc}", err=True)
        yield lambda text: click.echo(text, nl=False, color=True)
        return
    # Ctrl-C belongs to the pager while it runs (as with git); we only wait for it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    stream = io.TextIOWrapper(pager.stdin, encoding="utf-8", errors="replace")  # type: ignore[arg-type]
    try:
        yield stream.write
        stream.close()
    except BrokenPipeError:  # the user quit the pager
        pass
    finally:
        with contextlib.suppress(BrokenPipeError, ValueError):
            stream.close()
        pager.wait()
        signal.signal(signal.SIGINT, previous)
