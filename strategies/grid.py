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

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from fedsplitkd.clients.records import DESCRIBE, unbundle
from fedsplitkd.fleet.costs import DeviceTraffic
from fedsplitkd.protocol.rounds import sample_devices
from fedsplitkd.protocol.payload import PayloadError
from fedsplitkd import streams

POLL_S = 0.005  # the first pulls' interval
POLL_MAX_S = 0.1  # the longest: a reply late by seconds is pulled every 0.1 s


def poll_delay(waited_s: float, floor_s: float = POLL_S) -> float:
    """Seconds to sleep before the next pull, after ``waited_s`` without a reply: a tenth of the
    wait, within [floor_s, POLL_MAX_S]. A reply is seen at most ~10 % late, and a deployment's
    seconds-long messages are not met by 200 TLS pulls a second competing for the cores."""
    return min(POLL_MAX_S, max(floor_s, 0.1 * waited_s))


def tensor_bytes(content: RecordDict) -> int:
    return sum(a.numpy().nbytes for record in content.values() if isinstance(record, ArrayRecord)
               for a in record.values())


def deal(devices: list[int], online: list[int], nodes: dict[int, int]) -> dict[int, int]:
    """Virtual devices dealt round-robin to the online nodes (``online``: the device ids the
    nodes declared, ``nodes``: device id -> node id): device -> the node serving it."""
    return {d: nodes[online[i % len(online)]] for i, d in enumerate(devices)}


class NodeMap(dict):
    """Device (partition) id -> node id, and how many devices the nodes say there are."""

    declared: int = 0  # the largest num-partitions a node reported
    waited: bool = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.retired: set[int] = set()  # nodes a rejoined node replaced: never asked again


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
        unknown = [int(n) for n in connected if int(n) not in nodes.values() and int(n) not in nodes.retired]
        if unknown:
            queries = [Message(RecordDict(), dst_node_id=n, message_type=DESCRIBE) for n in unknown]
            claimed: set[int] = set()  # devices claimed in this pass: a second claim is a misconfiguration
            for reply in FastGrid(grid).send_and_receive(queries, timeout=timeout):
                node = reply.metadata.src_node_id
                config = None if reply.has_error() else reply.content.get("config")
                device = config.get("partition-id") if config is not None else None
                declared = config.get("num-partitions") if config is not None else None
                if not isinstance(device, int) or not isinstance(declared, int) or not 0 <= device < declared:
                    log(WARNING, "node %s left out: partition-id %r of num-partitions %r is not a "
                        "device", node, device, declared)
                    continue
                if device in claimed:
                    log(WARNING, "node %s left out: device %d is claimed by node %s too", node, device,
                        nodes[device])
                    continue
                if device in nodes:
                    # A node that died and came back registers anew: the node answering now
                    # serves the device (the old one may still be listed until its heartbeat expires).
                    log(WARNING, "device %d: node %s answers for it now, not node %s (a node that "
                        "rejoined)", device, node, nodes[device])
                    # The old node may stay listed until its heartbeat expires: asking it again
                    # each round would cost a query timeout.
                    nodes.retired.add(nodes[device])
                claimed.add(device)
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
    """Delegates to ``grid``; ``send_and_receive`` polls fast, fills ``traffic`` and, given
    ``fraction``, picks the devices that train.

    With ``fraction`` the strategy addresses its training messages (type ``train``) to every
    node, and only the devices drawn from the stream SplitKD samples from (``seed``) train:
    every method trains the same devices each round, and a run repeats exactly (Flower
    samples nodes with Python's unseeded ``random``). With ``virtual_devices`` the drawn
    devices are dealt round-robin to the nodes, as SplitKD deals them, and each node trains
    its share in one message (config ``devices``) and replies a section per device
    (``bundle``). Replies come back one per device in device order, so a strategy aggregates
    exactly what it would from a node per device.
    """

    def __init__(self, grid: Grid, nodes: dict[int, int] | None = None, virtual_devices: int = 0,
                 seed: int = 0, fraction: float | None = None):
        self.grid = grid
        self.nodes = nodes if nodes is not None else {}  # device id -> node id
        self.traffic: dict[int, DeviceTraffic] = {}
        self.virtual_devices, self.fraction = virtual_devices, fraction
        self.rng = streams.sampling(seed)

    @property
    def devices(self) -> dict[int, int]:
        """Node id -> the device it is (a node per device)."""
        return {n: d for d, n in self.nodes.items()}

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
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def _traffic(self, device: int) -> DeviceTraffic:
        return self.traffic.setdefault(device, DeviceTraffic())

    def _assign(self, train: list[Message]) -> list[tuple[Message, list[int]]]:
        """The round's training messages and the devices each trains (see the class)."""
        addressed = {m.metadata.dst_node_id: m for m in train}
        online = sorted(d for d, n in self.nodes.items() if n in addressed)
        if not online:
            return []
        if not self.virtual_devices:
            return [(addressed[self.nodes[d]], [d]) for d in sample_devices(online, self.fraction, self.rng)]
        shares: dict[int, list[int]] = {}
        dealt = deal(sample_devices(list(range(self.virtual_devices)), self.fraction, self.rng), online, self.nodes)
        for d, node in dealt.items():
            shares.setdefault(node, []).append(int(d))
        assigned = []
        for node, devices in shares.items():
            template = addressed[node].content
            content = RecordDict({**template, "config": ConfigRecord({**template["config"], "devices": devices})})
            assigned.append((Message(content, dst_node_id=node, message_type=MessageType.TRAIN), devices))
        return assigned

    def _per_device(self, reply: Message, sent: Message, devices: list[int]) -> list[tuple[int, Message]]:
        """A bundled reply as one reply per device it was asked to train (others are ignored)."""
        if reply.has_error():
            return [(d, Message(reply.error, reply_to=sent)) for d in devices]
        try:
            sections = unbundle(reply.content)
        except PayloadError as err:
            log(WARNING, "reply of node %s dropped: %s", reply.metadata.src_node_id, err)
            return []
        out = []
        for d in devices:
            section = sections.get(d)
            if section is None:
                log(WARNING, "device %s left out: the reply of node %s has no section for it",
                    d, reply.metadata.src_node_id)
            elif "error" in section:
                reason = section["error"].get("reason", "") if isinstance(section["error"], ConfigRecord) else ""
                out.append((d, Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(reason)), reply_to=sent)))
            else:
                out.append((d, Message(section, reply_to=sent)))
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if self.fraction is not None and train:
            others = [m for m in messages if m.metadata.message_type != MessageType.TRAIN]
            assigned = self._assign(train) + [(m, None) for m in others]
        else:
            assigned = [(m, None) for m in messages]
        device_of = self.devices  # node -> device, once: the property inverts the whole map
        for message, devices in assigned:
            for d in devices or [device_of.get(message.metadata.dst_node_id, message.metadata.dst_node_id)]:
                self._traffic(d).bytes_down += tensor_bytes(message.content)  # each device gets the model
                self._traffic(d).exchanges += 1
        sent = {}
        for (message, devices), mid in zip(assigned, self.grid.push_messages([m for m, _ in assigned])):
            if mid:
                sent[mid] = (message, devices)
        replies: list[tuple[int, Message]] = []
        start = time.monotonic()
        deadline = start + (timeout if timeout is not None else 3600.0)
        while sent and time.monotonic() < deadline:
            pulled = list(self.grid.pull_messages(list(sent)))
            for reply in pulled:
                mid, node = reply.metadata.reply_to_message_id, reply.metadata.src_node_id
                if mid not in sent or sent[mid][0].metadata.dst_node_id != node:
                    log(WARNING, "ignored a reply to message %s from node %s", mid, node)
                    continue
                message, devices = sent.pop(mid)
                if devices is None or not self.virtual_devices:
                    replies.append((device_of.get(node, node), reply))
                else:
                    replies += self._per_device(reply, message, devices)
            if sent and not pulled:
                time.sleep(poll_delay(time.monotonic() - start))
        for device, reply in replies:
            if not reply.has_error():
                traffic = self._traffic(device)
                traffic.bytes_up += tensor_bytes(reply.content)
                metrics = [r for r in reply.content.values() if isinstance(r, MetricRecord)]
                if metrics:  # samples trained on (all local epochs), for the FLOP count
                    traffic.samples += int(metrics[0].get("trained-samples", metrics[0].get("num-examples", 0)))
        # Device order: the aggregate is a float sum, and its order must not follow arrival.
        return [reply for _, reply in sorted(replies, key=lambda pair: pair[0])]
