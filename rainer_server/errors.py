"""The domain errors of Rainer, every one of them.

They carry no HTTP knowledge: ``web/api.py`` maps them to status codes in one place, and the
client maps status codes back to them, so callers catch one set of types whether the
storage is local or remote.
"""

from __future__ import annotations

from typing import Any


class RainerError(Exception):
    """Base class of every error Rainer raises on purpose."""


class InvalidCommit(RainerError, ValueError):
    """A key, version, header or payload that can never be saved as given."""


class PayloadTooLarge(InvalidCommit):
    """A payload over the configured size limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"Payload too large: the limit is {limit} bytes")
        self.limit = limit


class PayloadRejected(InvalidCommit):
    """A payload that does not deserialize, or fails its key's schema (``messages``)."""

    def __init__(self, reason: str, messages: Any = None) -> None:
        super().__init__(f"Malformed input: {reason}")
        self.reason = reason
        self.messages = messages


class PayloadDeserializationError(RainerError, ValueError):
    """A commit's payload that the reader's deserialization refuses, raised by ``commit.value``.

    Not an ``InvalidCommit``: the commit is stored and listed as usual; only this reader cannot
    make a value of it. The deserialization's own error is the ``__cause__``.
    """

    def __init__(self, key: str, version: int, reason: str, messages: Any = None) -> None:
        super().__init__(f"Cannot deserialize the payload of {key} version {version}: {reason}")
        self.key = key
        self.version = version
        self.reason = reason
        #: A schema's field errors, as ``PayloadRejected.messages``.
        self.messages = messages

    def __reduce__(self):  # pickling needs our signature, as CommitOrderingError's
        return type(self), (self.key, self.version, self.reason, self.messages)


class CommitNotFound(RainerError, LookupError):
    """No commit with that key (or that key and version)."""

    def __init__(self, key: str, version: int | None = None) -> None:
        where = key if version is None else f"{key} version {version}"
        super().__init__(f"Key not found: {where}")
        self.key = key
        self.version = version


class CommitOrderingError(RainerError):
    """A commit whose version is not exactly the key's head version + 1."""

    def __init__(self, key: str, expected_version: int, provided_version: int) -> None:
        super().__init__(
            f"Expected version {expected_version} for key {key!r}, got {provided_version}"
        )
        self.key = key
        self.expected_version = expected_version
        self.provided_version = provided_version

    def __reduce__(self):  # keep pickling (multiprocessing tests) working with our signature
        return type(self), (self.key, self.expected_version, self.provided_version)


class ConcurrentCommitError(RainerError):
    """ZooKeeper holds a different commit at the same or a newer version (no rollbacks)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class LostCompareAndSet(ConcurrentCommitError):
    """Another writer changed the key's znodes between the keeper's read and its write.

    Unlike a refusal, deciding again on fresh reads may succeed.
    """


class StorageUnavailable(RainerError):
    """The system of record cannot be reached right now; retrying later may work.

    ``str()`` is safe to show a client; ``detail`` (the driver's reason, which may name hosts)
    is for the log line of whoever handles the error.
    """

    def __init__(self, message: str = "Database unavailable", detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail

    def __reduce__(self):  # keep pickling working with the keyword
        return type(self), (str(self), self.detail)


class KeeperError(RainerError):
    """ZooKeeper could not be read or written."""


class CommitTooLarge(KeeperError):
    """A commit that serializes larger than the keeper's ``max_znode_bytes``."""

    def __init__(self, key: str, version: int, size: int, limit: int) -> None:
        super().__init__(
            f"Commit {key} (version[{version}]) is too big for ZooKeeper: "
            f"{size} bytes, the limit is {limit}"
        )
        self.key = key
        self.size = size
        self.limit = limit


class ConfigurationError(RainerError):
    """A setting has a value the service cannot run with."""


class ExportLineInvalid(InvalidCommit):
    """A line of a JSON Lines export that is not a commit; nothing was imported."""


class AuthenticationRequired(RainerError):
    """No credentials where they are needed, or credentials that prove nothing (a wrong,
    expired or revoked token)."""

    def __init__(self, message: str = "Authentication required", invalid_token: bool = False) -> None:
        super().__init__(message)
        self.invalid_token = invalid_token


class AccessDenied(RainerError):
    """An identity the policy does not allow this (read or write this key, act as another
    author, set the time)."""


class CsrfRejected(RainerError):
    """A web console form posted without this session's CSRF token: made elsewhere (a forged
    cross-site post), or from a session that has ended. Nothing is changed."""


# ---------------------------------------------------------------------- over HTTP
# What RainerClient raises: each is also the domain error of its status, so callers catch one
# set of types whether the storage is local or remote.


class RainerHTTPError(RainerError):
    """The server answered with an error status (other than a 409 conflict or a 404 key).

    :ivar status: the HTTP status code.
    :ivar message: the server's error message (its JSON ``error``, else the body's start).
    :ivar url: the URL requested.
    """

    def __init__(self, status: int, message: str, url: str) -> None:
        super().__init__(f"HTTP {status} from {url}: {message}")
        self.status = status
        self.message = message
        self.url = url

    def __reduce__(self):  # pickling with this signature, whatever the mixed-in class says
        return type(self), (self.status, self.message, self.url)

    #: Seconds the server asked to wait before trying again (``Retry-After``), if it did.
    retry_after: float | None = None

    @classmethod
    def retried(cls, last: RainerHTTPError, tries: int, seconds: float) -> RainerHTTPError:
        """``last``, saying that retrying did not help."""
        return cls(last.status, f"{last.message} (gave up after {tries} tries in {seconds:g} s)",
                   last.url)


class RainerBadRequest(RainerHTTPError, InvalidCommit):
    """400/413: the server refused the request as invalid (bad key, payload, header...)."""


class RainerUnavailable(RainerHTTPError, StorageUnavailable):
    """503: the server's storage is unreachable right now; retrying later may work."""


class RainerUnauthorized(RainerHTTPError, AuthenticationRequired):
    """401: no credentials where they are needed, or a wrong, expired or revoked token."""


class RainerForbidden(RainerHTTPError, AccessDenied):
    """403: the identity may not do this (read or write this key, set this author or time)."""


class RainerConnectionError(RainerError, ConnectionError):
    """The server could not be reached, or the connection broke before an answer."""

    def __init__(self, url: str, reason: object) -> None:
        super().__init__(f"Cannot reach Rainer at {url}: {reason}")
        self.url = url
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.url, self.reason)

    @classmethod
    def retried(cls, last: RainerConnectionError, tries: int, seconds: float) -> RainerConnectionError:
        """``last``, saying that retrying did not help."""
        error = cls(last.url, f"{last.reason} (gave up after {tries} tries in {seconds:g} s)")
        return error
