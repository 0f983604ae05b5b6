"""Flower strategy for split knowledge distillation (Message API)."""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable
from logging import INFO, WARNING

import numpy as np
from torch import nn
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedsplitkd.clients.records import (BACKWARD, FORWARD, SPLIT_EVALUATE, from_bundle, from_records, to_bundle,
                                       to_records)
from fedsplitkd.fleet.costs import CostModel
from fedsplitkd.protocol.device import BACKWARD_KIND
from fedsplitkd.run.experiment import sample_devices
from fedsplitkd.library import Blocks, OptimizerFactory, SplitKDConfig, edge_server
from fedsplitkd.protocol.payload import WEIGHTS, Payload, PayloadError, pack
from fedsplitkd.protocol.runtime import load_numpy_state, state_to_numpy
from fedsplitkd.fleet.schedule import Scheduler
from fedsplitkd.strategies.grid import NodeMap, discover, poll_delay
from fedsplitkd.protocol.server import RoundStats, SplitKDServer, exchange
from fedsplitkd import streams


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
        """Who keeps a device's teacher embedding: its node when nodes serve bundles."""
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
        for (keys, message), mid in zip(batches, self.grid.push_messages([m for _, m in batches])):
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


class SplitKD(Strategy):
    """Split knowledge distillation: devices hold the student's lower part, the edge the rest.

    Each round, sampled nodes receive the global device part and exchange activations
    for cut-layer gradients with the edge server (``SplitKDServer``: student upper part,
    frozen teacher, KD + CE loss) in chunks of ``exchange-batches`` minibatches, then
    return their device parts, which are averaged weighted by examples.

    The ArrayRecord this strategy takes and returns is the whole student, and Flower's
    own ``Strategy.start`` loop runs it: ``configure_train`` drives the round's exchanges.

    Parameters
    ----------
    server : SplitKDServer or Scheduler
        The edge server (student upper part, teacher, payload checks, accounting), or a
        ``Scheduler`` over it that runs clusters in sequence at their cuts.
    fraction_train, fraction_evaluate : float
        Fractions of connected nodes sampled for training / split evaluation.
    min_nodes : int
        Nodes that must be connected before a round starts; 0 waits (up to
        ``round_timeout``, once) for every device the nodes declare (num-partitions).
    round_timeout : float
        Seconds to wait for any one reply before the device counts as failed.
    poll_interval : float
        Seconds between polls for replies (see ``GridTransport``).
    seed : int
        Seed of the node sampling.
    virtual_devices : int
        0: one node per device (its partition id). N > 0: a fleet of N virtual devices;
        each round the sampled devices are dealt round-robin to the connected nodes, and
        each node serves its share in one message per exchange (``GridTransport``
        bundles), so N may far exceed the nodes and the devices per round may too.
    """

    def __init__(self, server: SplitKDServer | Scheduler, fraction_train: float = 1.0,
                 fraction_evaluate: float = 0.0, min_nodes: int = 0, round_timeout: float = 600.0,
                 poll_interval: float = 0.005, seed: int = 0, virtual_devices: int = 0) -> None:
        # The scheduler runs clusters in sequence at their cuts; a bare server is one cluster.
        self.scheduler = server if isinstance(server, Scheduler) else Scheduler(server, server.cfg, 0)
        self.server = self.scheduler.server
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_nodes = min_nodes
        self.round_timeout = round_timeout
        self.poll_interval = poll_interval
        # Separate streams: evaluation sampling must not shift which devices train.
        self.train_rng, self.evaluate_rng = streams.sampling(seed), streams.evaluate_sampling(seed)
        self.nodes = NodeMap()  # device (partition) id -> node id
        self.last_stats: RoundStats | None = None
        self.last_evaluation: MetricRecord | None = None
        # Rounds done before this run (a resumed run): Flower counts its loop from 1 again.
        self.round_offset = 0
        self.virtual_devices = virtual_devices
        self.holding_teacher: set[int] = set()  # nodes that hold the teacher's embedding (virtual)

    @classmethod
    def from_models(cls, student: Blocks, input_shape: tuple[int, ...], teacher: nn.Module | None = None,
                    teacher_embedding: nn.Module | None = None, config: SplitKDConfig | None = None,
                    optimizer: OptimizerFactory | None = None, costs: CostModel | None = None) -> SplitKD:
        """Split-KD over the user's own student and teacher (``fedsplitkd.library.edge_server``).

        ``student`` is an ``nn.Sequential`` of named blocks (or ``(name, module)`` pairs);
        the whole student is what ``start`` takes as ``initial_arrays`` and returns. One node
        per device: each names its partition id in its node config.
        """
        config = config or SplitKDConfig()
        server = edge_server(student, input_shape, teacher, teacher_embedding, config, optimizer, costs)
        return cls(server, config.fraction_train, config.fraction_evaluate, config.min_nodes,
                   config.round_timeout, seed=config.seed)

    def summary(self) -> None:
        log(INFO, "\t├──> Sampling: fraction train %.2f | evaluate %.2f | min nodes %d",
            self.fraction_train, self.fraction_evaluate, self.min_nodes)
        log(INFO, "\t└──> Cut '%s', teacher input '%s', exchange-batches %d",
            self.server.cut, self.server.mode, self.server.cfg.split.exchange_batches)

    def _sample(self, grid: Grid, fraction: float, rng: np.random.Generator) -> tuple[list[int], dict[int, int]]:
        """Sample device ids (so runs repeat whatever ids the nodes get) and the node serving each."""
        # The first query starts a ClientApp that imports torch and loads its data: a slow
        # device gets the same patience as any reply.
        online = discover(grid, self.nodes, self.min_nodes, self.round_timeout, self.round_timeout)
        if not self.virtual_devices:
            return (sample_devices(online, fraction, rng) if online else []), self.nodes
        if not online:
            return [], {}
        devices = sample_devices(list(range(self.virtual_devices)), fraction, rng)
        # Dealt round-robin: a node serves its share of the devices in one message per exchange.
        return devices, {d: self.nodes[online[i % len(online)]] for i, d in enumerate(devices)}

    def _run_round(self, transport: GridTransport, devices: list[int], served_by: dict[int, int],
                   server_round: int) -> RoundStats:
        if not self.virtual_devices:
            return self.scheduler.run_round(transport, devices, server_round)
        # The teacher's embedding is the same for every device: what matters is whether
        # the serving node holds it, whichever device it served before.
        held = self.server.has_teacher  # shared by the servers of every cut: update in place
        held.clear()
        held.update(d for d, n in served_by.items() if n in self.holding_teacher)
        stats = self.scheduler.run_round(transport, devices, server_round)
        self.holding_teacher -= set(served_by.values())
        self.holding_teacher |= {served_by[d] for d in held if d in served_by}
        return stats

    def _load(self, arrays: ArrayRecord) -> None:
        load_numpy_state(self.server.student, {k: v.numpy() for k, v in arrays.items()})

    def _arrays(self) -> ArrayRecord:
        return ArrayRecord(torch_state_dict=self.server.student.state_dict())

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Run the round's split exchanges with the sampled nodes; no messages are left to send.

        A split round is many request/reply turns (activations up, gradients down, device
        parts up), which Flower's one-shot configure/aggregate loop cannot express: they
        run here, over ``grid``, and ``aggregate_train`` hands back the result.
        """
        server_round += self.round_offset
        self._load(arrays)
        devices, served_by = self._sample(grid, self.fraction_train, self.train_rng)
        self.scheduler.fleet_size = self.virtual_devices or len(self.nodes)
        transport = GridTransport(grid, self.round_timeout, self.poll_interval, nodes=served_by,
                                  bundle=bool(self.virtual_devices))
        self.last_stats = self._run_round(transport, devices, served_by, server_round)
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The whole student after the round (device parts averaged by samples trained on)."""
        stats = self.last_stats
        if stats is None:
            return None, None
        return self._arrays(), MetricRecord({
            "train_loss": stats.train_loss, "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down,
            "devices": stats.devices, "completed": stats.completed, "num-examples": stats.samples})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Split evaluation on a sample of nodes' validation splits (skipped at fraction 0)."""
        self.last_evaluation = None
        server_round += self.round_offset
        if self.fraction_evaluate > 0.0:
            self._load(arrays)
            request = {"round": server_round, **pack(WEIGHTS, state_to_numpy(self.server.device_part))}
            devices, served_by = self._sample(grid, self.fraction_evaluate, self.evaluate_rng)
            transport = GridTransport(grid, self.round_timeout, self.poll_interval, SPLIT_EVALUATE,
                                      nodes=served_by, bundle=bool(self.virtual_devices))
            accuracy, loss, n, dropped = self.server.evaluate_replies(
                exchange(transport, {d: request for d in devices}), server_round)
            self.last_evaluation = MetricRecord({"val_accuracy": accuracy, "val_loss": loss,
                                                 "num-examples": n, "dropped_evaluate": dropped})
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Accuracy and loss of the whole student over the devices' validation activations."""
        return self.last_evaluation
