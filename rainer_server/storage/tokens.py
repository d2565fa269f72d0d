"""API tokens: who they name, when they expire, when they were last used; never the token.

A token is shown once, when it is created; the table keeps its SHA-256 (``access.token_digest``).
Requests look tokens up by digest, through a short per-process cache, so a cached read with a
token costs a dict lookup, not a query: a revoked or expired token stops working on every
worker within ``CACHE_SECONDS``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import datetime
from datetime import timedelta
from datetime import timezone
from typing import TypeVar

import peewee
from peewee import IntegrityError

from rainer_server.access import digests_match
from rainer_server.access import new_token
from rainer_server.access import token_digest
from rainer_server.errors import InvalidCommit
from rainer_server.storage.db import run_on

T = TypeVar("T")

#: How long a worker trusts what it last read about a token.
CACHE_SECONDS = 2.0
#: ``last_used`` is written at most this often per token (a write per request would cost more
#: than the request).
LAST_USED_EVERY = timedelta(seconds=60)


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    name: str
    created: datetime
    expires: datetime | None
    last_used: datetime | None
    revoked: bool

    def valid_at(self, moment: datetime) -> bool:
        return not self.revoked and (self.expires is None or moment < self.expires)


def _utc(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _db_time(moment: datetime) -> datetime:
    # Stored naive in UTC: DATETIME columns keep no zone on MySQL, nor text on SQLite.
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


class DbTokenStore:
    """Tokens in ``<journal table>_tokens`` of the journal's database."""

    def __init__(
        self,
        database: peewee.Database,
        table_name: str,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.database = database
        self.table_name = table_name
        self._clock = clock

        class TokenRow(peewee.Model):
            name = peewee.CharField(max_length=255, primary_key=True)
            digest = peewee.CharField(max_length=64, unique=True)
            created = peewee.DateTimeField()
            expires = peewee.DateTimeField(null=True)
            last_used = peewee.DateTimeField(null=True)
            revoked = peewee.BooleanField(default=False)

        TokenRow._meta.database = database
        TokenRow._meta.set_table_name(table_name)
        self._row = TokenRow
        self._started = False
        # digest -> (when read, the identity or None)
        self._cache: dict[str, tuple[float, TokenInfo | None]] = {}

    def start(self) -> None:
        """Create the token table when missing (done on first use too)."""
        run_on(self.database, lambda: self._row.create_table(safe=True))
        self._started = True

    def _run(self, operation: Callable[[], T]) -> T:
        if not self._started:
            self.start()
        return run_on(self.database, operation)

    # ------------------------------------------------------------------ admin

    def create(self, name: str, lifetime: timedelta | None = None) -> str:
        """A new token for identity ``name``; the only time the token itself is seen.

        :raises InvalidCommit: when ``name`` already has a token that is not revoked.
        """
        token = new_token()
        now = self._clock()
        row = self._row

        def insert() -> None:
            with self.database.atomic():
                existing = row.get_or_none(row.name == name)
                if existing is not None:
                    if not existing.revoked:
                        raise InvalidCommit(f"{name!r} already has a token: revoke it first")
                    existing.delete_instance()
                row.create(
                    name=name,
                    digest=token_digest(token),
                    created=_db_time(now),
                    expires=None if lifetime is None else _db_time(now + lifetime),
                )

        try:
            self._run(insert)
        except IntegrityError:
            raise InvalidCommit(f"{name!r} already has a token: revoke it first") from None
        return token

    def revoke(self, name: str) -> bool:
        """Revoke ``name``'s token; ``False`` when it has none."""
        row = self._row
        changed = self._run(
            lambda: row.update(revoked=True)
            .where((row.name == name) & (row.revoked == False))  # noqa: E712
            .execute()
        )
        return bool(changed)

    def list(self) -> list[TokenInfo]:
        rows = self._run(lambda: list(self._row.select().order_by(self._row.name)))
        return [self._info(r) for r in rows]

    # ------------------------------------------------------------------ requests

    def identify(self, token: str) -> str | None:
        """The identity ``token`` names, or ``None`` for a wrong, expired or revoked token."""
        return self.identify_digest(token_digest(token))

    def identify_digest(self, digest: str) -> str | None:
        """As ``identify``, from the token's digest (what the console's session keeps: a
        session cookie must not carry the token itself)."""
        now_mono = time.monotonic()
        cached = self._cache.get(digest)
        if cached is None or now_mono - cached[0] > CACHE_SECONDS:
            info = self._lookup(digest)
            if len(self._cache) > 10_000:
                self._cache = {}
            self._cache[digest] = cached = (now_mono, info)
        info = cached[1]
        now = self._clock()
        if info is None or not info.valid_at(now):
            return None
        if info.last_used is None or now - info.last_used > LAST_USED_EVERY:
            self._touch(info.name, now)
        return info.name

    def _lookup(self, digest: str) -> TokenInfo | None:
        row = self._row
        found = self._run(lambda: row.get_or_none(row.digest == digest))
        # The index found it by digest; the constant-time comparison is what decides.
        if found is None or not digests_match(digest, found.digest):
            return None
        return self._info(found)

    def _touch(self, name: str, now: datetime) -> None:
        row = self._row
        self._run(
            lambda: row.update(last_used=_db_time(now)).where(row.name == name).execute()
        )
        for digest, (when, info) in list(self._cache.items()):
            if info is not None and info.name == name:
                self._cache[digest] = (when, dataclasses.replace(info, last_used=now))

    @staticmethod
    def _info(found: peewee.Model) -> TokenInfo:
        return TokenInfo(
            name=found.name,
            created=_utc(found.created),  # type: ignore[arg-type]
            expires=_utc(found.expires),
            last_used=_utc(found.last_used),
            revoked=bool(found.revoked),
        )
