"""Split-KD's requests as Flower Messages: the fleet of devices behind a Grid, and its transport.

``GridFleet`` is the ``fedsplitkd.protocol.rounds.Fleet`` of a Flower run: it finds the nodes
(``discover``), samples the round's devices (one node per device, or a fleet of virtual devices
dealt to the nodes) and hands out a ``GridTransport`` that carries their requests.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from logging import WARNING

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore import log

from fedsplitkd.clients import timing
from fedsplitkd.clients.records import (BACKWARD, FORWARD, SPLIT_EVALUATE, from_bundle, from_records, to_bundle,
                                       to_records)
from fedsplitkd.protocol.device import BACKWARD_KIND
from fedsplitkd.protocol.payload import Payload, PayloadError
from fedsplitkd.protocol.rounds import sample_devices
from fedsplitkd.strategies.grid import NodeMap, deal, discover, poll_delay


class GridTransport:
    """Carries protocol payloads as Flower Messages over a Grid, polling for replies.

    Requests and replies are keyed by device id; ``nodes`` maps each device to the node
    that serves it (``None``: the keys are node ids). With ``bundle`` (virtual devices)
    the requests for the devices of one node travel in one message and come back in one
    reply, a section per device (``to_bundle``): message count follows the nodes, not
    the devices. Polls from every ``poll_interval`` seconds, backing off to a tenth of the
    wait so far: the SuperLink grid's own ``send_and_receive`` sleeps 3 s between polls,
    which would dominate every exchange.

    A node has at most one message in flight. Flower's simulation engine hands a node its
    next message without waiting for the one before; each runs on a copy of the node's
    ``context`` taken when it starts and writes the whole context back when it ends, so
    two overlapping messages lose one's device state (a device would then apply gradients
    to another chunk). Requests for a busy node wait here and leave together when it answers.
    A node that does not answer in time gets nothing more this round: it may still be running.
    """

    def __init__(self, grid: Grid, timeout: float, poll_interval: float = 0.005,
                 message_type: str | None = None, nodes: dict[Hashable, int] | None = None,
                 bundle: bool = False):
        self.grid, self.timeout, self.poll_interval = grid, timeout, poll_interval
        self.message_type, self.nodes, self.bundle = message_type, nodes, bundle
        self.pending: dict[str, tuple[list[Hashable], int, float]] = {}  # message id -> (keys, node, deadline)
        self.queued: dict[int, dict[Hashable, Payload]] = {}  # node -> requests waiting for it
        self.busy: set[int] = set()  # nodes with a message in flight
        self.lost: set[int] = set()  # nodes that did not answer in time

    def holder(self, key: Hashable) -> Hashable:
        """Who receives a device's requests, in one message with the others it holds, and keeps
        its teacher embedding: its node when nodes serve bundles, else the device itself."""
        return self.nodes[key] if self.bundle else key

    def _node(self, key: Hashable) -> int:
        return int(self.nodes[key] if self.nodes else key)

    def _type(self, requests: list[Payload]) -> str:
        return self.message_type or (BACKWARD if all(r.get("kind") == BACKWARD_KIND for r in requests) else FORWARD)

    def send(self, requests: dict[Hashable, Payload]) -> None:
        for key, request in requests.items():
            self.queued.setdefault(self._node(key), {})[key] = request
        self._push([node for node in self.queued if node not in self.busy])

    def _push(self, nodes: list[int]) -> None:
        """One message to each of ``nodes`` (free ones): all its queued devices when it serves
        bundles, else its first queued request."""
        batches = []
        for node in nodes:
            queued = self.queued[node]
            keys = list(queued) if self.bundle else [next(iter(queued))]
            requests = [queued.pop(k) for k in keys]
            if not queued:
                del self.queued[node]
            content = to_bundle(dict(zip(map(int, keys), requests))) if self.bundle else to_records(requests[0])
            batches.append((keys, Message(content, dst_node_id=node, message_type=self._type(requests))))
        if not batches:
            return
        deadline = time.monotonic() + self.timeout
        ids = list(self.grid.push_messages([m for _, m in batches]))
        timing.event("push", messages=[[m.metadata.dst_node_id, m.metadata.message_type] for _, m in batches])
        for (keys, message), mid in zip(batches, ids):
            node = message.metadata.dst_node_id
            # A message the SuperLink refused gets no id; it times out like a lost one.
            self.pending[mid or f"refused-{keys[0]}"] = (keys, node, deadline if mid else 0.0)
            if mid:
                self.busy.add(node)

    def _open(self, reply: Message, keys: list[Hashable]) -> dict[Hashable, Payload | str]:
        """Each device's payload in a reply, or why it counts as failed."""
        if reply.has_error():
            return {key: f"ClientApp error: {reply.error.reason}" for key in keys}
        try:
            if not self.bundle:
                return {keys[0]: from_records(reply.content)}
            sections = from_bundle(reply.content)
        except PayloadError as err:
            return {key: f"invalid records: {err}" for key in keys}
        opened: dict[Hashable, Payload | str] = {}
        for key in keys:
            section = sections.get(int(key))
            if section is None:
                opened[key] = "invalid records: the reply has no section for this device"
            elif isinstance(section, PayloadError):
                opened[key] = f"invalid records: {section}"
            elif "error" in section:
                opened[key] = f"ClientApp error: {section['error']}"
            else:
                opened[key] = section
        return opened

    def receive(self) -> dict[Hashable, Payload | str]:
        replies: dict[Hashable, Payload | str] = {}
        start = time.monotonic()
        while not replies and self.pending:
            freed = set()
            for reply in self.grid.pull_messages([m for m in self.pending if not m.startswith("refused-")]):
                mid = reply.metadata.reply_to_message_id
                keys, node, _ = self.pending.get(mid, ([], None, 0.0))
                if node is None or reply.metadata.src_node_id != node:
                    log(WARNING, "ignored a reply to message %s from node %s", mid, reply.metadata.src_node_id)
                    continue
                del self.pending[mid]
                timing.event("reply", node=node)
                freed.add(node)
                replies.update(self._open(reply, keys))
            now = time.monotonic()
            for mid, (keys, node, deadline) in list(self.pending.items()):
                if now >= deadline:
                    del self.pending[mid]
                    replies.update({key: f"no reply within {self.timeout:.0f} s" for key in keys})
                    if node in self.busy:
                        self.lost.add(node)
            for node in self.lost & set(self.queued):
                replies.update({key: f"node {node} did not answer an earlier message in time"
                                for key in self.queued.pop(node)})
            self.busy -= freed
            self._push([node for node in freed if node in self.queued])
            if not replies:
                time.sleep(poll_delay(time.monotonic() - start, self.poll_interval))
        return replies


class GridFleet:
    """The devices behind a Flower Grid (``fedsplitkd.protocol.rounds.Fleet``).

    ``virtual_devices`` = 0: one node per device, named by its partition id (``nodes`` maps
    device ids to node ids, filled by ``discover``). N > 0: a fleet of N virtual devices; each
    sample is dealt round-robin to the connected nodes, and each node serves its share in one
    message per exchange (``GridTransport`` bundles), so N may far exceed the nodes.
    """

    def __init__(self, grid: Grid, nodes: NodeMap, min_nodes: int, timeout: float, poll_interval: float = 0.005,
                 virtual_devices: int = 0):
        self.grid, self.nodes, self.min_nodes = grid, nodes, min_nodes
        self.timeout, self.poll_interval, self.virtual_devices = timeout, poll_interval, virtual_devices
        self.served_by: dict[int, int] = {}  # the last sample's device -> node

    @property
    def size(self) -> int:
        return self.virtual_devices or len(self.nodes)

    def sample(self, fraction: float, rng: np.random.Generator) -> list[int]:
        """Device ids (so runs repeat whatever ids the nodes get); remembers the node serving each."""
        # The first query starts a ClientApp that imports torch and loads its data: a slow
        # device gets the same patience as any reply.
        online = discover(self.grid, self.nodes, self.min_nodes, self.timeout, self.timeout)
        if not online:
            self.served_by = {}
            return []
        if not self.virtual_devices:
            self.served_by = self.nodes
            return sample_devices(online, fraction, rng)
        devices = sample_devices(list(range(self.virtual_devices)), fraction, rng)
        self.served_by = deal(devices, online, self.nodes)  # a node serves its share in one message
        return devices

    def transport(self, devices: list[Hashable], evaluate: bool = False) -> GridTransport:
        return GridTransport(self.grid, self.timeout, self.poll_interval, SPLIT_EVALUATE if evaluate else None,
                             nodes=self.served_by, bundle=bool(self.virtual_devices))
