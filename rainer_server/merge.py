"""Three-way merge of payloads, for an edit that lost the race to another commit.

``base`` is the version the edit started from, ``theirs`` the head that was committed
meanwhile, ``yours`` the edit. The merge itself is ``merge3``'s (the line merge of bzr and
breezy), not ours: when the two changes touch different lines the result has both; when they
touch the same lines the result holds git-style conflict markers and ``clean`` is false.

Core layer: the console and the ``rainer`` command both merge with it.
"""

from __future__ import annotations

import dataclasses

import merge3

from rainer_server.diff import payload_lines


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """``payload``: the merged bytes (with conflict markers unless ``clean``)."""

    payload: bytes
    clean: bool
    conflicts: int


def three_way_merge(
    base: bytes | None,
    theirs: bytes | None,
    yours: bytes | None,
    their_name: str = "theirs",
    your_name: str = "yours",
    base_name: str = "base",
) -> MergeResult:
    """Merge ``yours`` and ``theirs``, both changed from ``base`` (``None``: a tombstone, no
    lines).

    :param their_name: what the conflict markers call each side, e.g. ``version 7 (bob)``.
    """
    sides = [payload_lines(base), payload_lines(theirs), payload_lines(yours)]
    merger = merge3.Merge3(*sides)
    conflicts = sum(1 for group in merger.merge_groups() if group[0] == "conflict")
    if conflicts:
        # A marker must start a line of its own: end every side's last line for it.
        sides = [[*lines[:-1], lines[-1] + "\n"] if lines and not lines[-1].endswith("\n")
                 else lines for lines in sides]
        merger = merge3.Merge3(*sides)
    lines = merger.merge_lines(
        name_a=their_name,
        name_b=your_name,
        name_base=base_name,
        start_marker="<<<<<<<",
        mid_marker="=======",
        end_marker=">>>>>>>",
        # Show the base too (diff3 style) only when there is a conflict to resolve.
        base_marker="|||||||" if conflicts else None,
    )
    return MergeResult("".join(lines).encode("utf-8"), conflicts == 0, conflicts)
