"""A Grid that polls fast and accounts traffic per device, for any Flower strategy.

The SuperLink grid's ``send_and_receive`` sleeps 3 s between polls, which dominates a
simulated round; this wrapper polls every few milliseconds. It also records, per device,
the tensor bytes each message carried and the examples each reply reports, so Flower's
own strategies (FedAvg, FedProx) are priced by the same cost model as split-KD.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from fedsplitkd.costs import DeviceTraffic
from fedsplitkd.experiment import sample_devices

POLL_S = 0.005


def tensor_bytes(content: RecordDict) -> int:
    return sum(a.numpy().nbytes for record in content.values() if isinstance(record, ArrayRecord)
               for a in record.values())


class NodeMap(dict):
    """Device (partition) id -> node id, and how many devices the nodes say there are."""

    declared: int = 0  # the largest num-partitions a node reported
    waited: bool = False


def discover(grid: Grid, nodes: NodeMap, min_nodes: int, timeout: float = 60.0, wait_s: float = 600.0) -> list[int]:
    """Device ids of the connected nodes, asking each new node once which device it is.

    ``nodes`` is updated in place. Waits for ``min_nodes`` connected nodes; with
    ``min_nodes = 0``, the first call waits (up to ``wait_s``) until every device the
    nodes declare (their num-partitions) is known: Flower may start the ServerApp before
    a large federation has registered, and sampling from part of it would change the run.
    """
    deadline = time.monotonic() + wait_s
    while True:
        _, connected = sample_nodes(grid, max(1, min_nodes), 0)
        unknown = [int(n) for n in connected if int(n) not in nodes.values()]
        if unknown:
            queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
            for reply in FastGrid(grid).send_and_receive(queries, timeout=timeout):
                node = reply.metadata.src_node_id
                config = None if reply.has_error() else reply.content.get("config")
                device = config.get("partition-id") if config is not None else None
                declared = config.get("num-partitions") if config is not None else None
                if not isinstance(device, int) or not isinstance(declared, int) or not 0 <= device < declared \
                        or device in nodes:
                    log(WARNING, "node %s left out: partition-id %r of num-partitions %r is not a free "
                        "device", node, device, declared)
                    continue
                if nodes.declared and declared != nodes.declared:
                    log(WARNING, "node %s declares num-partitions %d, others %d: their data may overlap",
                        node, declared, nodes.declared)
                nodes[device] = node
                nodes.declared = max(nodes.declared, declared)
        if min_nodes or nodes.waited or len(nodes) >= nodes.declared:
            break
        if time.monotonic() >= deadline:
            log(WARNING, "%d of %d declared devices registered after %.0f s: going on without the rest",
                len(nodes), nodes.declared, wait_s)
            break
        log(INFO, "waiting for nodes: %d of %d declared devices registered", len(nodes), nodes.declared)
        time.sleep(1.0)
    nodes.waited = True
    online = set(map(int, connected))
    return sorted(d for d, n in nodes.items() if n in online)


class FastGrid(Grid):
    """Delegates to ``grid``; ``send_and_receive`` polls fast and fills ``traffic``."""

    def __init__(self, grid: Grid, nodes: dict[int, int] | None = None, virtual_devices: int = 0,
                 seed: int = 0):
        self.grid = grid
        self.devices = {n: d for d, n in (nodes or {}).items()}  # node id -> device id
        self.traffic: dict[int, DeviceTraffic] = {}
        # Virtual devices: each batch of training messages is given devices sampled from
        # the fleet (the nodes serve them), the same stream SplitKD samples from.
        self.virtual_devices, self.rng = virtual_devices, np.random.default_rng([seed, 0])

    def _name_devices(self, messages: list[Message]) -> None:
        train = [m for m in messages if m.metadata.message_type.startswith(MessageType.TRAIN)]
        if not self.virtual_devices or not train:
            return
        devices = sample_devices(list(range(self.virtual_devices)), len(train) / self.virtual_devices, self.rng)
        for message, device in zip(train, devices):
            message.content["config"]["device"] = int(device)
            self.devices[message.metadata.dst_node_id] = int(device)

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._name_devices(messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def _traffic(self, node: int) -> DeviceTraffic:
        return self.traffic.setdefault(self.devices.get(node, node), DeviceTraffic())

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._name_devices(messages)
        for m in messages:
            self._traffic(m.metadata.dst_node_id).bytes_down += tensor_bytes(m.content)
            self._traffic(m.metadata.dst_node_id).exchanges += 1
        pending = {mid for mid in self.grid.push_messages(messages) if mid}
        replies: list[Message] = []
        deadline = time.monotonic() + (timeout if timeout is not None else 3600.0)
        while pending and time.monotonic() < deadline:
            pulled = list(self.grid.pull_messages(pending))
            for reply in pulled:
                pending.discard(reply.metadata.reply_to_message_id)
                if not reply.has_error():
                    traffic = self._traffic(reply.metadata.src_node_id)
                    traffic.bytes_up += tensor_bytes(reply.content)
                    metrics = [r for r in reply.content.values() if isinstance(r, MetricRecord)]
                    if metrics:  # samples trained on (all local epochs), for the FLOP count
                        traffic.samples += int(metrics[0].get("trained-samples", metrics[0].get("num-examples", 0)))
            replies += pulled
            if pending and not pulled:
                time.sleep(POLL_S)
        return replies
