"""Who may do what: the access policy (``RAINER_POLICY``), identities, and API tokens.

Pure code, no I/O but reading the policy file: the web layer asks ``policy.may_read(identity,
key)`` on every request, so a policy is compiled once per load into sets and one regular
expression per rule, and the rule that decides a key is remembered.

The policy file (YAML)::

    groups:
      sre: [alice, bob]
    rules:                      # the first rule whose glob matches the key decides;
      - keys: "payments.*"      # no match = denied. fnmatch-style, case-sensitive,
        read: [sre, carol]      # over the whole key.
        write: [carol]
      - keys: "*"
        read: ["*"]             # "*" = anyone, anonymous included;
        write: [sre]            # "authenticated" = any identity
    act_as: [deploy-bot]        # may commit as another author and set the mtime

Names in ``read``/``write``/``act_as`` are identities or groups; a name that is a group means
its members.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import yaml

from rainer_server.errors import ConfigurationError

#: Anyone, the anonymous caller included.
ANYONE = "*"
#: Any caller with an identity (a valid token, or a trusted proxy's header).
AUTHENTICATED = "authenticated"
#: Tokens start with this, so a leaked one is recognisable (secret scanners, log reviews).
TOKEN_PREFIX = "rnr_"
_TOKEN_BYTES = 32
#: How many keys' deciding rules a policy remembers; past that it starts again (keys are
#: unbounded, the memory is not).
_RULE_CACHE_SIZE = 100_000
#: What an identity or group may be called: printable, no spaces, at most 255 characters.
NAME_PATTERN = re.compile(r"[^\s\x00-\x1f\x7f]{1,255}\Z")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One ``rules`` entry, compiled: who may read and write the keys its glob matches."""

    keys: str
    read: frozenset[str]
    write: frozenset[str]
    read_anyone: bool
    read_authenticated: bool
    write_anyone: bool
    write_authenticated: bool

    def allows(self, identity: str | None, write: bool) -> bool:
        if write:
            anyone, authenticated, names = (
                self.write_anyone,
                self.write_authenticated,
                self.write,
            )
        else:
            anyone, authenticated, names = self.read_anyone, self.read_authenticated, self.read
        if anyone:
            return True
        if identity is None:
            return False
        return authenticated or identity in names


class Policy:
    """A compiled access policy. Build with ``Policy.load(path)`` or ``Policy.parse(text)``."""

    def __init__(
        self,
        rules: Iterable[Rule],
        act_as: frozenset[str] = frozenset(),
        groups: Mapping[str, frozenset[str]] | None = None,
        source: str = "<policy>",
    ) -> None:
        self.rules = tuple(rules)
        self.act_as = act_as
        self.groups = dict(groups or {})
        self.source = source
        # One alternation with a named group per rule: the first rule to match is the
        # leftmost alternative, found in a single regex search.
        self._pattern = re.compile(
            "|".join(
                f"(?P<r{i}>{fnmatch.translate(rule.keys)})" for i, rule in enumerate(self.rules)
            )
            or r"(?!)"
        )
        self._decided: dict[str, Rule | None] = {}

    @classmethod
    def allow_all(cls) -> Policy:
        """What ``RAINER_AUTH=none`` means: anyone reads and writes every key."""
        return cls([_compile_rule("*", [ANYONE], [ANYONE], {})], source="RAINER_AUTH=none")

    @classmethod
    def load(cls, path: str) -> Policy:
        """:raises ConfigurationError: one line naming the file and what is wrong in it."""
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"Invalid setting RAINER_POLICY: cannot read {path}: {exc}") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, source: str = "<policy>") -> Policy:
        """:raises ConfigurationError: one line naming ``source`` and what is wrong."""
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise _invalid(source, "not YAML: " + " ".join(str(exc).split())) from None
        if not isinstance(document, dict):
            raise _invalid(source, "must be a mapping with 'rules' (and 'groups', 'act_as')")
        unknown = sorted(str(k) for k in document if k not in ("groups", "rules", "act_as"))
        if unknown:
            raise _invalid(source, f"unknown field(s) {', '.join(unknown)}")
        groups = _groups(source, document.get("groups") or {})
        rules_doc = document.get("rules")
        if not isinstance(rules_doc, list) or not rules_doc:
            raise _invalid(source, "'rules' must be a non-empty list")
        rules = []
        for number, entry in enumerate(rules_doc, start=1):
            if not isinstance(entry, dict) or not isinstance(entry.get("keys"), str):
                raise _invalid(source, f"rule {number} needs 'keys', a glob string")
            extra = sorted(str(k) for k in entry if k not in ("keys", "read", "write"))
            if extra:
                raise _invalid(source, f"rule {number}: unknown field(s) {', '.join(extra)}")
            read = _names(source, f"rule {number} 'read'", entry.get("read", []))
            write = _names(source, f"rule {number} 'write'", entry.get("write", []))
            rules.append(_compile_rule(entry["keys"], read, write, groups))
        act_as_names = _names(source, "'act_as'", document.get("act_as") or [])
        if ANYONE in act_as_names or AUTHENTICATED in act_as_names:
            raise _invalid(source, "'act_as' must name identities or groups, not '*'")
        return cls(rules, _expand(act_as_names, groups), groups, source)

    def rule_for(self, key: str) -> Rule | None:
        """The rule that decides ``key`` (the first whose glob matches), or ``None``."""
        try:
            return self._decided[key]
        except KeyError:
            pass
        match = self._pattern.fullmatch(key)
        # fnmatch globs end in \Z, so the alternation's match is the whole key.
        rule = None if match is None else self.rules[int(match.lastgroup[1:])]  # type: ignore[index]
        if len(self._decided) >= _RULE_CACHE_SIZE:
            self._decided = {}
        self._decided[key] = rule
        return rule

    def may_read(self, identity: str | None, key: str) -> bool:
        rule = self.rule_for(key)
        return rule is not None and rule.allows(identity, write=False)

    def may_write(self, identity: str | None, key: str) -> bool:
        rule = self.rule_for(key)
        return rule is not None and rule.allows(identity, write=True)

    def anyone_may_read(self, key: str) -> bool:
        """Whether the anonymous caller may read ``key``: its answers may then be shared
        (an edge cache, pyrainer without credentials)."""
        rule = self.rule_for(key)
        return rule is not None and rule.read_anyone

    def may_act_as(self, identity: str | None) -> bool:
        """Whether ``identity`` may commit under another author and set the mtime."""
        return identity is not None and identity in self.act_as

    def __repr__(self) -> str:
        return f"Policy({self.source!r}, {len(self.rules)} rules)"


def _invalid(source: str, detail: str) -> ConfigurationError:
    return ConfigurationError(f"Invalid setting RAINER_POLICY: {source}: {detail}")


def _names(source: str, where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(source, f"{where} must be a list of names")
    for name in value:
        if not NAME_PATTERN.match(name):
            raise _invalid(source, f"{where}: {name!r} is not a valid name")
    return value


def _groups(source: str, value: Any) -> dict[str, frozenset[str]]:
    if not isinstance(value, dict):
        raise _invalid(source, "'groups' must map group names to lists of identities")
    groups = {}
    for name, members in value.items():
        if not isinstance(name, str) or name in (ANYONE, AUTHENTICATED):
            raise _invalid(source, f"group name {name!r} is not allowed")
        groups[name] = frozenset(_names(source, f"group {name!r}", members))
    return groups


def _expand(names: Iterable[str], groups: Mapping[str, frozenset[str]]) -> frozenset[str]:
    expanded: set[str] = set()
    for name in names:
        expanded |= groups.get(name, {name})
    return frozenset(expanded)


def _compile_rule(
    keys: str, read: list[str], write: list[str], groups: Mapping[str, frozenset[str]]
) -> Rule:
    return Rule(
        keys=keys,
        read=_expand((n for n in read if n not in (ANYONE, AUTHENTICATED)), groups),
        write=_expand((n for n in write if n not in (ANYONE, AUTHENTICATED)), groups),
        read_anyone=ANYONE in read,
        read_authenticated=AUTHENTICATED in read,
        write_anyone=ANYONE in write,
        write_authenticated=AUTHENTICATED in write,
    )


# ---------------------------------------------------------------------- tokens


def new_token() -> str:
    """A fresh API token: the prefix and 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)


def token_digest(token: str) -> str:
    """What is stored for a token: its SHA-256. Tokens carry 256 random bits, so a fast hash
    is as safe as a slow one here, and lets every request be checked cheaply."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def digests_match(given: str, stored: str) -> bool:
    """Compare two digests in constant time."""
    return hmac.compare_digest(given.encode("ascii", "replace"), stored.encode("ascii", "replace"))
