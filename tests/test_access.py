"""The access policy and the audit helpers, without a server."""

from __future__ import annotations

import json
import logging

import pytest

from rainer_server.access import Policy
from rainer_server.access import digests_match
from rainer_server.access import new_token
from rainer_server.access import token_digest
from rainer_server.audit import EscapeControlCharacters
from rainer_server.audit import escape_controls
from rainer_server.errors import ConfigurationError

POLICY = """
groups:
  sre: [alice, bob]
rules:
  - keys: "payments.*"
    read: [sre, carol]
    write: [carol]
  - keys: "team-a.*"
    read: [authenticated]
    write: [dora]
  - keys: "*"
    read: ["*"]
    write: [sre]
act_as: [deploy-bot]
"""


@pytest.fixture
def policy():
    return Policy.parse(POLICY, "policy.yaml")


@pytest.mark.parametrize(
    "identity, key, read, write",
    [
        (None, "payments.card", False, False),
        ("alice", "payments.card", True, False),  # via the group
        ("carol", "payments.card", True, True),
        ("dave", "payments.card", False, False),
        (None, "team-a.x", False, False),  # authenticated only
        ("dave", "team-a.x", True, False),
        ("dora", "team-a.x", True, True),
        # Near misses fall through to the catch-all rule, never into team-a's.
        ("dora", "team-a-evil.x", True, False),
        ("dora", "TEAM-A.x", True, False),
        ("dora", "team-a%2Ex", True, False),
        (None, "anything", True, False),
        ("bob", "anything", True, True),
        ("payments.card", "payments", True, False),
    ],
)
def test_the_first_matching_rule_decides(policy, identity, key, read, write):
    assert policy.may_read(identity, key) is read
    assert policy.may_write(identity, key) is write


def test_no_matching_rule_denies():
    policy = Policy.parse("rules:\n  - keys: 'a.*'\n    read: ['*']\n    write: ['*']\n")
    assert policy.may_read("anyone", "a.b")
    assert not policy.may_read("anyone", "b")
    assert not policy.may_write(None, "b")
    assert policy.rule_for("b") is None


def test_act_as_and_anyone_may_read(policy):
    assert policy.may_act_as("deploy-bot")
    assert not policy.may_act_as("alice") and not policy.may_act_as(None)
    assert policy.anyone_may_read("web.pool")
    assert not policy.anyone_may_read("payments.card")
    assert not policy.anyone_may_read("team-a.x")


def test_allow_all_is_what_auth_none_means():
    policy = Policy.allow_all()
    assert policy.may_read(None, "x") and policy.may_write(None, "x")
    assert policy.anyone_may_read("payments.card")


@pytest.mark.parametrize(
    "text, message",
    [
        ("rules: [", "not YAML"),
        ("- a", "must be a mapping"),
        ("groups: {}", "'rules' must be a non-empty list"),
        ("rules:\n  - read: ['*']", "rule 1 needs 'keys'"),
        ("rules:\n  - keys: '*'\n    read: '*'", "rule 1 'read' must be a list"),
        ("rules:\n  - keys: '*'\n    raed: ['*']", "unknown field(s) raed"),
        ("rule: []", "unknown field(s) rule"),
        ("rules:\n  - keys: '*'\nact_as: ['*']", "'act_as' must name identities"),
        ("groups:\n  '*': [a]\nrules:\n  - keys: '*'", "group name '*' is not allowed"),
        ("rules:\n  - keys: '*'\n    read: ['two words']", "is not a valid name"),
    ],
)
def test_a_bad_policy_is_one_line_naming_the_file(text, message):
    with pytest.raises(ConfigurationError) as info:
        Policy.parse(text, "/etc/rainer/policy.yaml")
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith("Invalid setting RAINER_POLICY: /etc/rainer/policy.yaml: ")
    assert message in line


def test_a_missing_policy_file(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot read"):
        Policy.load(str(tmp_path / "nope.yaml"))


def test_the_rule_cache_stays_bounded(policy, monkeypatch):
    import rainer_server.access as access

    monkeypatch.setattr(access, "_RULE_CACHE_SIZE", 10)
    for n in range(100):
        assert policy.may_read(None, f"k{n}")
    assert len(policy._decided) <= 10


def test_tokens_are_random_and_stored_as_digests():
    first, second = new_token(), new_token()
    assert first != second and first.startswith("rnr_") and len(first) > 40
    digest = token_digest(first)
    assert first not in digest and len(digest) == 64
    assert digests_match(digest, token_digest(first))
    assert not digests_match(digest, token_digest(second))


def test_control_characters_are_escaped():
    assert escape_controls("plain") == "plain"
    assert escape_controls("eve\nINFO forged") == "eve\\nINFO forged"
    assert escape_controls("a\x1b[31mred\u2028b\x85") == "a\\u001b[31mred\\u2028b\\u0085"


def test_the_log_filter_escapes_the_formatted_message():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "by %s", ("eve\nforged",), None)
    assert EscapeControlCharacters().filter(record)
    assert record.getMessage() == "by eve\\nforged"
    assert json.loads(json.dumps(record.getMessage())) == "by eve\\nforged"
