"""The checker: what the clients were told, against what the journal and ZooKeeper hold.

After a run it takes a dump of the journal (``SELECT`` from the table, straight from the
primary) and of every znode under ``<zk_path>/data`` (straight from the ensemble), and reads
the history the clients recorded (``history.py``). It counts:

acknowledged
    distinct (key, version) pairs some client got a 200 for.
lost
    acknowledged commits that are not in the journal, or are there with another payload.
duplicated
    (key, version) pairs acknowledged more than once, or stored more than once.
gaps
    keys whose journal versions are not exactly 1..n with one head, the newest.
resurrected deletes
    keys whose journal head is a tombstone but whose znode exists at the end; and znodes
    written (znode mtime) after a tombstone of a newer version had been acknowledged, seen by
    a monitor polling ZooKeeper during the run: an old commit of a deleted key published again.
    (A znode written after a newer *non-empty* commit was acknowledged is a "stale publish",
    listed beside them: harmless until the next pass; and a znode seen going back to a lower
    version without being deleted in between is a "znode rollback", which the keeper's
    compare-and-set must make impossible.)
version decreases
    a client read a key and later read an older version of it.
max staleness
    how long after an acknowledgement a read (through that target) still answered an older
    version: the read's start minus the ack of the oldest newer version. Zero when no read was
    stale; bounded below by how often the readers look.
5xx
    answers from 500 to 599 (and, separately, requests with no HTTP answer at all).

plus drift: znodes that disagree with the journal's heads at the end (missing, behind,
ahead, differing, not deleted, unknown to the journal).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import shutil
import threading
import time
from collections import Counter
from collections import defaultdict
from pathlib import Path
from typing import Any

from rainer_server.commit import Commit
from tests.faults.history import digest
from tests.faults.history import http


# ---------------------------------------------------------------------- dumps


def dump_journal(db, database: str, table: str, prefix: str) -> list[dict]:
    """Every journal row of the keys under ``prefix``: key, version, tombstone, head flag and
    payload hash."""
    raw = prefix.encode("utf-8")
    rows = db.execute(
        f"SELECT `key`, version, is_empty, is_head, payload FROM `{table}` "
        "WHERE LEFT(`key`, %s) = %s ORDER BY `key`, version",
        (len(raw), raw), database,
    )
    return [
        {"k": bytes(key).decode("utf-8"), "v": version, "e": bool(is_empty),
         "head": bool(is_head), "h": digest(None if is_empty else bytes(payload or b""))}
        for key, version, is_empty, is_head, payload in rows
    ]


def _znode_entry(key: str, data: bytes, stat: Any) -> dict:
    entry = {"k": key, "mtime": stat.mtime / 1000.0, "mzxid": stat.mzxid}
    try:
        commit = Commit.deserialize(data)
    except Exception:
        entry["bad"] = True
        return entry
    entry.update(v=commit.version, e=commit.empty, h=digest(commit.payload))
    return entry


def dump_znodes(admin, zk_path: str, prefix: str) -> dict[str, dict]:
    """key -> the znode's commit (version, hash, mtime), for every znode under ``prefix``."""
    from kazoo.exceptions import NoNodeError

    data_path = zk_path + "/data"
    try:
        children = [c for c in admin.get_children(data_path) if c.startswith(prefix)]
    except NoNodeError:
        return {}
    pending = [(key, admin.get_async(f"{data_path}/{key}")) for key in children]
    znodes = {}
    for key, result in pending:
        try:
            data, stat = result.get(timeout=10)
        except NoNodeError:
            continue
        znodes[key] = _znode_entry(key, data, stat)
    return znodes


class ZnodeMonitor(threading.Thread):
    """Polls every znode under ``prefix`` (straight from the ensemble) and records each new
    state: ``{"k", "v", "h", "mtime", "seen"}`` or ``{"k", "v": None, "seen"}`` when gone.

    Polling, not watches: a resurrected znode lives until the next publisher pass (a period),
    far longer than the poll interval, and its mtime says when it was written.
    """

    def __init__(self, admin, zk_path: str, prefix: str, interval: float = 0.2) -> None:
        super().__init__(name="znode-monitor", daemon=True)
        self.admin = admin
        self.zk_path = zk_path
        self.prefix = prefix
        self.interval = interval
        self.observations: list[dict] = []
        self._last: dict[str, Any] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                znodes = dump_znodes(self.admin, self.zk_path, self.prefix)
            except Exception:
                continue  # ensemble unreachable: nothing to see until it is back
            now = time.time()
            for key, entry in znodes.items():
                if self._last.get(key) != entry.get("mzxid"):
                    self._last[key] = entry.get("mzxid")
                    self.observations.append({**entry, "seen": now})
            for key in [k for k in self._last if k not in znodes and self._last[k] is not None]:
                self._last[key] = None
                self.observations.append({"k": key, "v": None, "seen": now})

    def stop(self) -> list[dict]:
        self._halt.set()
        self.join(30)
        return self.observations


# ---------------------------------------------------------------------- the report


@dataclasses.dataclass
class Report:
    scenario: str
    requests: int = 0
    acknowledged: int = 0
    lost: list[dict] = dataclasses.field(default_factory=list)
    duplicated: list[dict] = dataclasses.field(default_factory=list)
    gaps: list[dict] = dataclasses.field(default_factory=list)
    resurrected: list[dict] = dataclasses.field(default_factory=list)
    stale_publishes: list[dict] = dataclasses.field(default_factory=list)
    znode_rollbacks: list[dict] = dataclasses.field(default_factory=list)
    decreases: list[dict] = dataclasses.field(default_factory=list)
    stale_reads: int = 0
    max_staleness: float = 0.0
    staleness_by_target: dict[str, float] = dataclasses.field(default_factory=dict)
    worst_stale_read: dict | None = None
    server_errors: int = 0
    server_errors_by: dict[str, int] = dataclasses.field(default_factory=dict)
    no_answer: int = 0
    drift: list[dict] = dataclasses.field(default_factory=list)
    decreases_by_target: dict[str, int] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        staleness = ", ".join(f"{t} {s:.2f}" for t, s in sorted(self.staleness_by_target.items()))
        return (
            f"acknowledged {self.acknowledged}, lost {len(self.lost)}, duplicated "
            f"{len(self.duplicated)}, gaps {len(self.gaps)}, resurrected deletes "
            f"{len(self.resurrected)}, version decreases {len(self.decreases)}, max staleness "
            f"{self.max_staleness:.2f} s ({staleness or '-'}), 5xx {self.server_errors}"
            f"{' ' + str(self.server_errors_by) if self.server_errors else ''}, no answer "
            f"{self.no_answer}, drift {len(self.drift)}, requests {self.requests}"
        )

    def details(self, limit: int = 10) -> str:
        lines = [self.summary()]
        names = ("lost", "duplicated", "gaps", "resurrected", "stale_publishes",
                 "znode_rollbacks", "decreases", "drift")
        for name in names:
            items = getattr(self, name)
            if items:
                lines.append(f"  {name} ({len(items)}):")
                lines.extend(f"    {json.dumps(item, sort_keys=True)}" for item in items[:limit])
        if self.worst_stale_read:
            lines.append(f"  worst stale read: {json.dumps(self.worst_stale_read, sort_keys=True)}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check(scenario: str, entries: list[dict], journal: list[dict], znodes: dict[str, dict],
          observations: list[dict] = ()) -> Report:
    """Judge a history against the journal and ZooKeeper dumps (see the module docstring)."""
    report = Report(scenario, requests=len(entries))

    # -- acknowledged, lost, duplicated
    acks: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for e in entries:
        if e["op"] in ("write", "race") and e["s"] == 200:
            acks[(e["k"], e["v"])].append(e)
    rows: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in journal:
        rows[(row["k"], row["v"])].append(row)
    report.acknowledged = len(acks)
    for (key, version), acked in sorted(acks.items()):
        stored = rows.get((key, version), [])
        for ack in acked:
            if not any(r["h"] == ack["h"] and r["e"] == ack["e"] for r in stored):
                report.lost.append({"k": key, "v": version, "acked_at": ack["t1"], "by": ack["c"],
                                    "journal": [r["h"] for r in stored] or None})
        if len(acked) > 1:
            report.duplicated.append({"k": key, "v": version, "acks": [a["c"] for a in acked]})
    for (key, version), stored in sorted(rows.items()):
        if len(stored) > 1:
            report.duplicated.append({"k": key, "v": version, "journal_rows": len(stored)})

    # -- gaps, heads
    by_key: dict[str, list[dict]] = defaultdict(list)
    for row in journal:
        by_key[row["k"]].append(row)
    heads: dict[str, dict] = {}
    for key, key_rows in sorted(by_key.items()):
        versions = sorted(r["v"] for r in key_rows)
        flagged = [r for r in key_rows if r["head"]]
        newest = max(key_rows, key=lambda r: r["v"])
        heads[key] = newest
        if versions != list(range(1, len(versions) + 1)) or flagged != [newest]:
            missing = sorted(set(range(1, versions[-1] + 1)) - set(versions))
            report.gaps.append({"k": key, "missing": missing[:20],
                                "heads": [r["v"] for r in flagged]})

    # -- drift and resurrected deletes at the end
    for key in sorted(set(heads) | set(znodes)):
        head, znode = heads.get(key), znodes.get(key)
        state = None
        if head is None:
            state = "unknown"
        elif head["e"]:
            if znode is not None:
                state = "not deleted"
                report.resurrected.append({"k": key, "tombstone": head["v"],
                                           "znode": znode.get("v"), "at": "end"})
        elif znode is None:
            state = "missing"
        elif znode.get("bad"):
            state = "unparseable"
        elif znode["v"] < head["v"]:
            state = "behind"
        elif znode["v"] > head["v"]:
            state = "ahead"
        elif znode["h"] != head["h"]:
            state = "differs"
        if state:
            report.drift.append({"k": key, "state": state, "journal": head and head["v"],
                                 "znode": znode and znode.get("v")})

    # -- znodes written after a newer commit was acknowledged (monitor)
    acks_by_key: dict[str, list[tuple[float, int, bool]]] = defaultdict(list)
    for (key, version), acked in acks.items():
        for ack in acked:
            acks_by_key[key].append((ack["t1"], version, ack["e"]))
    for key in acks_by_key:
        acks_by_key[key].sort()
    seen = set()
    previous: dict[str, int | None] = {}
    for obs in observations:
        key, version = obs["k"], obs.get("v")
        if version is not None and previous.get(key) is not None and version < previous[key]:
            report.znode_rollbacks.append({"k": key, "from": previous[key], "to": version,
                                           "written": obs["mtime"]})
        previous[key] = version
        if version is None:
            continue
        newer = [(t, v, empty) for t, v, empty in acks_by_key.get(key, ())
                 if v > version and t < obs["mtime"]]
        if not newer or (key, obs.get("mzxid")) in seen:
            continue
        seen.add((key, obs.get("mzxid")))
        t, v, empty = max(newer, key=lambda a: a[1])
        item = {"k": key, "znode": version, "written": obs["mtime"], "newer_acked": v,
                "acked_at": t, "newer_is_tombstone": empty}
        (report.resurrected if empty else report.stale_publishes).append(item)

    # -- reads: version decreases and staleness
    ack_times: dict[str, list[float]] = {}
    ack_max: dict[str, list[int]] = {}
    for key, key_acks in acks_by_key.items():
        ack_times[key] = [t for t, _, _ in key_acks]
        running, maxima = 0, []
        for _, v, _ in key_acks:
            running = max(running, v)
            maxima.append(running)
        ack_max[key] = maxima
    last_seen: dict[tuple[str, str], dict] = {}
    decreases_by_target: Counter = Counter()
    staleness: dict[str, float] = {}
    for e in sorted((e for e in entries if e["op"] == "read" and e.get("v") is not None),
                    key=lambda e: e["t0"]):
        key, version = e["k"], e["v"]
        previous = last_seen.get((e["c"], key))
        if previous is not None and version < previous["v"]:
            report.decreases.append({"c": e["c"], "t": e["t"], "k": key, "from": previous["v"],
                                     "to": version, "at": e["t0"], "cached": e.get("cached")})
            decreases_by_target[e["t"]] += 1
        last_seen[(e["c"], key)] = e
        times = ack_times.get(key)
        if not times:
            continue
        done = bisect.bisect_right(times, e["t0"])
        if done == 0 or ack_max[key][done - 1] <= version:
            continue
        first_newer = bisect.bisect_right(ack_max[key], version, 0, done)
        stale = e["t0"] - times[first_newer]
        report.stale_reads += 1
        staleness[e["t"]] = max(staleness.get(e["t"], 0.0), stale)
        if stale > report.max_staleness:
            report.max_staleness = stale
            report.worst_stale_read = {**e, "stale_for": round(stale, 3),
                                       "newer_acked": ack_max[key][first_newer]}
    report.staleness_by_target = {t: round(s, 3) for t, s in staleness.items()}
    report.decreases_by_target = dict(decreases_by_target)

    # -- errors
    errors: Counter = Counter()
    for e in entries:
        if 500 <= e["s"] < 600:
            errors[f"{e['op']} {e['s']}"] += 1
        elif e["s"] == 0:
            report.no_answer += 1
    report.server_errors = sum(errors.values())
    report.server_errors_by = dict(errors)
    return report


# ---------------------------------------------------------------------- convergence


def mirror_listing(url: str, prefix: str) -> dict[str, int] | None:
    """key -> version of a host's ``GET /diary`` when it came from the mirror, else None."""
    status, headers, body, _ = http("GET", url + "/diary", timeout=5)
    if status != 200 or headers.get("x-rainer-cached") != "Yes":
        return None
    return {k: meta["version"] for k, meta in json.loads(body).items() if k.startswith(prefix)}


def convergence_gap(journal: list[dict], znodes: dict[str, dict], listings: list[dict | None]
                    ) -> list[str]:
    """What still differs between the journal's heads, ZooKeeper and the hosts' mirrors."""
    heads: dict[str, dict] = {}
    for row in journal:
        if row["k"] not in heads or row["v"] > heads[row["k"]]["v"]:
            heads[row["k"]] = row
    expected = {k: r["v"] for k, r in heads.items() if not r["e"]}
    problems = []
    published = {k: z.get("v") for k, z in znodes.items()}
    if published != expected:
        diff = {k for k in set(published) | set(expected) if published.get(k) != expected.get(k)}
        problems.append(f"znodes differ on {sorted(diff)[:5]}")
    for n, listing in enumerate(listings):
        if listing is None:
            problems.append(f"listing {n} not from the mirror")
        elif listing != expected:
            diff = {k for k in set(listing) | set(expected) if listing.get(k) != expected.get(k)}
            problems.append(f"listing {n} differs on {sorted(diff)[:5]}")
    return problems


# ---------------------------------------------------------------------- artifacts


def save_artifacts(directory: Path, *, history, journal, znodes, observations, report,
                   logs: dict[str, tuple[Path, int]]) -> Path:
    """Write everything a failed check needs to be understood, and return the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    history.save(directory / "history.jsonl")
    (directory / "journal.json").write_text(json.dumps(journal, indent=0))
    (directory / "znodes.json").write_text(json.dumps(znodes, indent=0, sort_keys=True))
    (directory / "znode-observations.json").write_text(json.dumps(observations, indent=0))
    (directory / "report.txt").write_text(report.details(limit=1000) + "\n")
    for name, (path, offset) in logs.items():
        try:
            with open(path, "rb") as source, open(directory / name, "wb") as sink:
                source.seek(offset)
                shutil.copyfileobj(source, sink)
        except OSError:
            continue
    return directory


def log_offsets(paths: dict[str, Path]) -> dict[str, tuple[Path, int]]:
    """The current size of each log: a failed scenario keeps only what it wrote."""
    offsets = {}
    for name, path in paths.items():
        try:
            offsets[name] = (path, path.stat().st_size)
        except OSError:
            offsets[name] = (path, 0)
    return offsets
