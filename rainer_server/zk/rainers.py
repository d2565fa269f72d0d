"""The builder of a ZooKeeper-backed Rainer: keeper, keeper-publishing storage, auto-publisher."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kazoo.client import KazooClient
from kazoo.protocol.states import KazooState

from rainer_server.commit import Commit
from rainer_server.metrics import ZooKeeperMetrics
from rainer_server.payloads import KeyValueDeserialization
from rainer_server.storage import CommitStorage
from rainer_server.zk.keeper import DEFAULT_TIMEOUT
from rainer_server.zk.keeper import CommitKeeper
from rainer_server.zk.mirror import CommitMirror
from rainer_server.zk.publisher import AutoPublisher
from rainer_server.zk.publishing import keeper_publishing
from rainer_server.zk.repair import DriftRepair

log = logging.getLogger(__name__)


class Rainers:
    """The pieces that run together: use ``storage`` for writes, ``keeper`` for mirrors.

    ``start()`` starts the storage, then the drift repair, then joins the publisher election;
    ``stop()`` undoes them in reverse. Neither starts nor stops the kazoo client.
    """

    def __init__(
        self,
        storage: CommitStorage,
        keeper: CommitKeeper,
        auto_publisher: AutoPublisher,
        drift_repair: DriftRepair | None = None,
    ) -> None:
        self.storage = storage
        self.keeper = keeper
        self.auto_publisher = auto_publisher
        self.drift_repair = drift_repair

    @classmethod
    def create(
        cls,
        kazoo_client: KazooClient,
        base_path: str,
        underlying_storage: CommitStorage,
        period: float = 90.0,
        fuzz: float = 0.2,
        delay: bool = True,
        *,
        keeper_timeout: float | None = None,
        deserialization: KeyValueDeserialization | None = None,
        **publisher_kwargs: Any,
    ) -> Rainers:
        """Build (without starting) the keeper, keeper-publishing storage and auto-publisher.

        :param keeper_timeout: the longest one keeper call waits (``keeper.DEFAULT_TIMEOUT``).
        :param deserialization: the keeper's (and so its mirrors'), for typed ``value``s; give
            the underlying storage the same one for its reads.
        :param publisher_kwargs: passed on to ``AutoPublisher`` (``mirror``, ``identifier``, ...).
            Its ``mirror`` also lets the keeper-publishing storage update a key with one
            compare-and-set.
        """
        keeper = CommitKeeper(
            kazoo_client,
            base_path,
            timeout=DEFAULT_TIMEOUT if keeper_timeout is None else keeper_timeout,
            deserialization=deserialization,
        )
        storage = keeper_publishing(
            underlying_storage,
            keeper,
            mirror=publisher_kwargs.get("mirror"),
        )
        # The publisher reads the underlying storage: its heads are the truth to publish.
        auto_publisher = AutoPublisher(
            kazoo_client,
            keeper,
            underlying_storage,
            period=period,
            fuzz=fuzz,
            delay=delay,
            **publisher_kwargs,
        )
        # Like the publisher, it publishes the underlying storage's heads.
        drift_repair = DriftRepair(kazoo_client, keeper, underlying_storage)
        return cls(storage, keeper, auto_publisher, drift_repair)

    def start(self) -> None:
        self.storage.start()
        if self.drift_repair is not None:
            self.drift_repair.start()
        self.auto_publisher.start()

    def stop(self) -> None:
        try:
            self.auto_publisher.close()
            if self.drift_repair is not None:
                self.drift_repair.close()
        finally:
            self.storage.stop()

    def __enter__(self) -> Rainers:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Rainers({self.keeper!r})"

    def report_to(self, gauges: ZooKeeperMetrics, mirror: CommitMirror) -> None:
        """Keep this process's ZooKeeper, mirror and leadership gauges current.

        Call it before ``start()``, so that no leadership change is missed. The callbacks run
        on kazoo's and the mirror's threads: they only set gauges.
        """
        client = self.keeper.client

        def on_view(view: Mapping[str, Commit]) -> None:
            # Views are delivered only once the mirror is complete (last_update is set just
            # before); the call made at subscription time is the empty, incomplete one.
            gauges.observe_mirror(len(view), complete=mirror.last_update is not None)

        gauges.observe_leadership(False)
        gauges.observe_mirror(0, complete=False)
        client.add_listener(lambda state: gauges.observe_connection(state == KazooState.CONNECTED))
        gauges.observe_connection(client.state == KazooState.CONNECTED)
        mirror.subscribe(on_view)
        self.auto_publisher.leader_listeners.append(gauges.observe_leadership)
        self.auto_publisher.pass_listeners.append(gauges.observe_pass)


__all__ = ["Rainers"]
