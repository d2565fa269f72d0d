"""The ``X-Rainer-*`` headers that carry a commit's meta, as the server writes and reads them
and as the client does: one encoding, one place.

Header values must be printable ASCII to survive WSGI, ``http.client`` and proxies (CR/LF
would split a header; other control characters are refused). When the key, author or comment
is not printable ASCII (a multi-line comment, a non-Latin name), all three are
percent-encoded UTF-8 and ``X-Rainer-Header-Encoding: percent`` says so: without the marker, a
``%`` in a value is just a ``%``, which is what the original and pyrainer send.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote
from urllib.parse import unquote

from rainer_server.commit import Commit
from rainer_server.commit import format_mtime
from rainer_server.errors import InvalidCommit

HEADER_ENCODING = "X-Rainer-Header-Encoding"
TEXT_HEADERS = ("X-Rainer-Key", "X-Rainer-Author", "X-Rainer-Comment")
# Printable ASCII but '%': what a percent-encoded header value may keep as is.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def encode_text_headers(values: Mapping[str, str]) -> dict[str, str]:
    """Header values for text fields, all percent-encoded (with the marker) when any needs it."""
    if all(text.isascii() and text.isprintable() for text in values.values()):
        return dict(values)
    encoded = {name: quote(text, safe=_HEADER_SAFE) for name, text in values.items()}
    encoded[HEADER_ENCODING] = "percent"
    return encoded


def commit_headers(commit: Commit) -> dict[str, str]:
    """The meta of ``commit`` as response headers (``GET /<key>``)."""
    headers = {
        "X-Rainer-Version": str(commit.version),
        "X-Rainer-Modified-Time": format_mtime(commit.mtime),
        "X-Rainer-Empty": "Yes" if commit.empty else "No",
    }
    headers.update(
        encode_text_headers(dict(zip(TEXT_HEADERS, (commit.key, commit.author, commit.comment))))
    )
    return headers


def is_percent_encoded(marker: str | None) -> bool:
    """Whether the ``X-Rainer-Header-Encoding`` value ``marker`` says the texts are encoded.

    :raises InvalidCommit: for an encoding other than ``percent``.
    """
    if marker is None:
        return False
    if marker.strip().lower() != "percent":
        raise InvalidCommit(f"Malformed header: {HEADER_ENCODING} (only 'percent' is known)")
    return True


def decode_text_header(name: str, value: str, percent: bool) -> str:
    """The text of header ``name`` as received (WSGI and ``http.client`` give latin-1 strings).

    Percent-encoded values are UTF-8. Raw values are read as UTF-8 when they are valid UTF-8,
    else as latin-1, which is what pyrainer sends.

    :raises InvalidCommit: when a percent-encoded value is not UTF-8.
    """
    if percent:
        try:
            return unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise InvalidCommit(f"Malformed header: {name} (not percent-encoded UTF-8)") from None
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value
