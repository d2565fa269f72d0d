"""Commits: the immutable unit of configuration, its key rules and its wire format.

Pure code, no I/O. The wire format (spec §2) is byte-compatible with the original Scala
Rainer, so znodes and DB blobs written by a JVM Rainer parse here and ours parse there::

    <length of header in bytes>\\n<header JSON>\\n<payload bytes>\\n

A commit read through a storage, keeper, mirror or client built with a deserialization (see
``rainer_server.payloads``) also has a typed ``value``, deserialized on first use.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Mapping
from datetime import datetime
from datetime import timezone
from typing import TYPE_CHECKING
from typing import Any
from typing import Self
from typing import cast

from rainer_server.errors import InvalidCommit
from rainer_server.errors import PayloadDeserializationError
from rainer_server.errors import PayloadRejected

if TYPE_CHECKING:
    # Types only: payloads.py imports marshmallow and PyYAML, which the client and the
    # ``rainer`` command (importing this module) must not pay for.
    from rainer_server.payloads import KeyValueDeserialization
    from rainer_server.payloads import KeyValueSerialization

MAX_KEY_BYTES = 255
# C0 controls, DEL and C1 controls: they break headers, terminals and log lines.
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")
_ASCII_DECIMAL = re.compile(r"[0-9]+\Z")
_CANONICAL_DECIMAL = re.compile(r"(?:0|[1-9][0-9]*)\Z")
# A version beyond a signed 32-bit int cannot be stored (the original used a Java Int).
MAX_VERSION = 2**31 - 1


def validate_key(key: object) -> str:
    """Return ``key`` when it is a valid commit key.

    :raises InvalidCommit: with a message naming the rule it breaks.
    """
    if not isinstance(key, str):
        raise InvalidCommit("Key must be a string")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidCommit("Key must be valid UTF-8") from None
    if not encoded:
        raise InvalidCommit("Key must be nonempty")
    if len(encoded) > MAX_KEY_BYTES:
        raise InvalidCommit(f"Key must be at most {MAX_KEY_BYTES} bytes of UTF-8")
    if "/" in key:
        raise InvalidCommit("Key must not contain '/'")
    if key in (".", ".."):
        raise InvalidCommit("Key must not be '.' or '..'")
    if _CONTROL_CHARACTERS.search(key):
        raise InvalidCommit("Key must not contain control characters")
    return key


def parse_version(text: str) -> int | None:
    """Parse plain ASCII decimal digits, as in the wire format's header length (what a JVM
    Rainer writes is read as leniently as before) and in answers read by the client.

    Returns ``None`` for anything else (``int()`` would accept ``"٣"``, ``" 3"`` or ``"+3"``).
    """
    if not _ASCII_DECIMAL.match(text):
        return None
    return int(text)


def parse_canonical_version(text: str) -> int | None:
    """Parse a version as a request names it (URL, ``X-Rainer-Version``): ASCII decimal
    digits without leading zeros, so each version has exactly one spelling (``"01"`` is not
    ``1``; ``"0"`` itself is canonical).

    Returns ``None`` for anything else.
    """
    if not _CANONICAL_DECIMAL.match(text):
        return None
    return int(text)


def parse_mtime(text: str) -> datetime:
    """Parse an ISO-8601 timestamp into UTC; one without a zone is taken as UTC.

    :raises ValueError: when ``text`` is not ISO-8601 or not representable in UTC.
    """
    parsed = datetime.fromisoformat(text.strip())
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(f"timestamp out of range: {text!r}") from None


def format_mtime(mtime: datetime) -> str:
    """Format as the original did (Joda's ``toString``): milliseconds and ``Z`` for UTC."""
    text = mtime.isoformat(timespec="milliseconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _normalise_mtime(mtime: datetime) -> datetime:
    # Milliseconds in UTC is what every store and wire keeps; normalising here makes a commit
    # equal to itself after any round trip (DB, znode, HTTP headers).
    if mtime.tzinfo is None:
        raise InvalidCommit("mtime must be timezone-aware")
    try:
        utc = mtime.astimezone(timezone.utc)
    except OverflowError:
        raise InvalidCommit("mtime out of range") from None
    return utc.replace(microsecond=utc.microsecond // 1000 * 1000)


def now() -> datetime:
    return _normalise_mtime(datetime.now(timezone.utc))


# Where a commit keeps its deserialized value (or the deserialization's error), in its
# instance dict: not a dataclass field, so equality, hashing, repr and replace() ignore it.
_VALUE = "_value"
# One lock for every commit's first deserialization, so that readers racing on a new commit
# (request threads on a mirror) deserialize it once; a lock per commit would cost memory on
# every commit of a 100k-key mirror. Reentrant: a deserialization may read another value.
_VALUE_LOCK = threading.RLock()


@dataclasses.dataclass(frozen=True)
class Commit:
    """One version of one key. ``payload is None`` marks a tombstone (an *empty* commit).

    ``deserialization`` is how ``value`` reads the payload; it is not part of the commit
    (equality, hashing and repr ignore it), only of how this reader sees it.
    """

    key: str
    version: int
    payload: bytes | None
    author: str
    comment: str
    mtime: datetime
    #: Who really wrote it: the authenticated caller ("" when the service runs without
    #: authentication). Kept by the journal, not part of the wire format nor of equality.
    identity: str = dataclasses.field(default="", compare=False, kw_only=True)
    #: Where the commit stands in the journal's global order (``None`` until a storage has
    #: kept it): strictly increasing in the order commits become visible, so a reader given
    #: index N that asks for what came after N misses nothing. Kept by the journal, not part
    #: of the wire format, the meta JSON of one key, nor of equality.
    index: int | None = dataclasses.field(default=None, compare=False, kw_only=True)
    deserialization: KeyValueDeserialization | None = dataclasses.field(
        default=None, compare=False, repr=False, kw_only=True
    )

    def __post_init__(self) -> None:
        validate_key(self.key)
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise InvalidCommit("Version must be an integer")
        if not 1 <= self.version <= MAX_VERSION:
            raise InvalidCommit(f"Version must be between 1 and {MAX_VERSION}")
        if self.payload is not None and not isinstance(self.payload, bytes):
            if isinstance(self.payload, (bytearray, memoryview)):
                object.__setattr__(self, "payload", bytes(self.payload))
            else:
                raise InvalidCommit("Payload must be bytes or None")
        if not isinstance(self.author, str) or not isinstance(self.comment, str):
            raise InvalidCommit("Author and comment must be strings")
        if not isinstance(self.identity, str):
            raise InvalidCommit("Identity must be a string")
        if self.index is not None and (isinstance(self.index, bool) or not isinstance(self.index, int)):
            raise InvalidCommit("Index must be an integer")
        object.__setattr__(self, "mtime", _normalise_mtime(self.mtime))

    @classmethod
    def from_bytes(
        cls,
        key: str,
        version: int,
        payload: bytes | None,
        author: str,
        comment: str,
        mtime: datetime | None = None,
    ) -> Self:
        """Make a commit; ``mtime`` defaults to now."""
        return cls(key, version, payload, author, comment, now() if mtime is None else mtime)

    @classmethod
    def from_value(
        cls,
        key: str,
        version: int,
        value: Any,
        author: str,
        comment: str,
        mtime: datetime | None = None,
        *,
        serialization: KeyValueSerialization,
    ) -> Self:
        """Make a commit whose payload is ``serialization.serialize(key, value)``.

        ``value=None`` makes a tombstone. When ``serialization`` is also a deserialization (as
        every format of ``rainer_server.payloads`` is), the commit reads its ``value`` back
        with it, from the bytes, as any reader of the saved commit will.

        :raises PayloadRejected: (from our formats) when ``value`` cannot be written.
        """
        validate_key(key)
        payload = None if value is None else serialization.serialize(key, value)
        # Duck-typed: the Protocol lives in payloads.py, which is not imported at run time.
        reader: KeyValueDeserialization | None = None
        if callable(getattr(serialization, "deserialize", None)):
            reader = cast("KeyValueDeserialization", serialization)
        return cls(
            key,
            version,
            payload,
            author,
            comment,
            now() if mtime is None else mtime,
            deserialization=reader,
        )

    def with_index(self, index: int | None) -> Self:
        """This commit as kept at ``index`` in a journal's global order."""
        if index == self.index:
            return self
        return dataclasses.replace(self, index=index)

    def with_deserialization(self, deserialization: KeyValueDeserialization | None) -> Self:
        """This commit, read with ``deserialization`` (the commit itself when it already is)."""
        if deserialization is self.deserialization:
            return self
        return dataclasses.replace(self, deserialization=deserialization)

    @property
    def empty(self) -> bool:
        return self.payload is None

    @property
    def value(self) -> Any:
        """The payload as a value: ``None`` for a tombstone, else ``deserialization``'s value of
        it (the payload bytes themselves when the commit has no deserialization).

        Deserialized at the first read, then cached for the life of this commit object, so
        every reader of one commit shares one value: treat it as read-only.

        :raises PayloadDeserializationError: when the deserialization refuses the payload (at
            every read; it is tried once).
        """
        payload = self.payload
        deserialization = self.deserialization
        if payload is None or deserialization is None:
            return payload
        cached = self.__dict__.get(_VALUE)
        if cached is None:
            with _VALUE_LOCK:
                cached = self.__dict__.get(_VALUE)
                if cached is None:
                    try:
                        cached = (deserialization.deserialize(self.key, payload), None)
                    except Exception as exc:
                        # Any exception: a user's deserialization may raise whatever its
                        # parser does, and readers should catch one type (the cause says what).
                        cached = (None, exc)
                    object.__setattr__(self, _VALUE, cached)
        value, error = cached
        if error is None:
            return value
        if isinstance(error, PayloadRejected):
            raise PayloadDeserializationError(
                self.key, self.version, error.reason, error.messages
            ) from error
        reason = str(error) or type(error).__name__
        raise PayloadDeserializationError(self.key, self.version, reason) from error

    @property
    def meta(self) -> dict[str, Any]:
        """The metadata mapping of the HTTP API and the wire header."""
        return {
            "key": self.key,
            "version": self.version,
            "author": self.author,
            "comment": self.comment,
            "mtime": format_mtime(self.mtime),
            "empty": self.empty,
        }

    @classmethod
    def from_meta(
        cls,
        meta: Mapping[str, Any],
        payload: bytes | None,
        deserialization: KeyValueDeserialization | None = None,
    ) -> Self:
        """Build a commit from a meta mapping (a missing ``empty`` means false).

        :raises InvalidCommit: when a field is missing or of the wrong type.
        """
        try:
            empty = meta.get("empty", False)
            if not isinstance(empty, bool):
                raise InvalidCommit("'empty' must be a boolean")
            mtime = meta["mtime"]
            if not isinstance(mtime, str):
                raise InvalidCommit("'mtime' must be a string")
            return cls(
                key=meta["key"],
                version=meta["version"],
                payload=None if empty else (payload or b""),
                author=meta["author"],
                comment=meta["comment"],
                mtime=parse_mtime(mtime),
                deserialization=deserialization,
            )
        except KeyError as exc:
            raise InvalidCommit(f"Missing field: {exc.args[0]}") from None
        except ValueError as exc:  # also InvalidCommit, which is a ValueError
            if isinstance(exc, InvalidCommit):
                raise
            raise InvalidCommit(f"Malformed field: {exc}") from exc

    def serialize(self) -> bytes:
        """Encode in the wire format (spec §2)."""
        header = json.dumps(self.meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return b"%d\n%s\n%s\n" % (len(header), header, self.payload or b"")

    @classmethod
    def deserialize(
        cls, data: bytes, deserialization: KeyValueDeserialization | None = None
    ) -> Self:
        """Decode the wire format (the commit's ``value`` then reads with ``deserialization``).

        :raises InvalidCommit: when ``data`` is not a commit in the wire format.
        """
        data = bytes(data)
        newline = data.find(b"\n")
        length = parse_version(data[:newline].decode("ascii", "replace")) if newline > 0 else None
        if length is None:
            raise InvalidCommit("Malformed commit: no header length")
        start = newline + 1
        end = start + length
        if len(data) < end + 2 or data[end : end + 1] != b"\n" or not data.endswith(b"\n"):
            raise InvalidCommit("Malformed commit: truncated")
        try:
            header = json.loads(data[start:end])
        except ValueError as exc:
            raise InvalidCommit(f"Malformed commit header: {exc}") from exc
        if not isinstance(header, dict):
            raise InvalidCommit("Malformed commit header: not an object")
        return cls.from_meta(header, data[end + 1 : -1], deserialization)

    def __repr__(self) -> str:
        size = "empty" if self.payload is None else f"{len(self.payload)} bytes"
        return (
            f"Commit(key={self.key!r}, version={self.version}, [{size}], "
            f"author={self.author!r}, comment={self.comment!r}, mtime={format_mtime(self.mtime)})"
        )
