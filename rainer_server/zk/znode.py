"""The znode layout shared with the original JVM Rainer (spec §5), and how a znode's bytes
become a commit.

    <base>/data/<key>     the key's latest non-empty commit, in the wire format of spec §2
    <base>/deleted/<key>  while the key is deleted: its tombstone, in the same wire format
                          (ours only; the original neither reads nor writes it)
    <base>/election/      kazoo/Curator leader election of the auto-publishers
"""

from __future__ import annotations

from rainer_server.commit import Commit
from rainer_server.errors import InvalidCommit
from rainer_server.payloads import KeyValueDeserialization


def join(parent: str, child: str) -> str:
    return parent.rstrip("/") + "/" + child


def describe_size(data: bytes) -> str:
    # A znode's payload may hold secrets: log its size only, never its bytes.
    return f"[{len(data)} bytes]"


def parse_znode(
    key: str, data: bytes, deserialization: KeyValueDeserialization | None = None
) -> Commit:
    """Parse a znode's data as the commit of ``key`` (whose ``value`` reads with
    ``deserialization``; the payload is not deserialized here).

    :raises InvalidCommit: when the data is not a commit in the wire format, or is the commit
        of another key (the original refused those too).
    """
    commit = Commit.deserialize(data, deserialization)
    if commit.key != key:
        raise InvalidCommit(f"Commit has wrong name: expected '{key}', got '{commit.key}'")
    return commit
