"""Flower strategy for split knowledge distillation (Message API)."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from fedsplitkd.clients.records import from_records, to_records
from fedsplitkd.experiment import sample_devices
from fedsplitkd.payload import WEIGHTS, Payload, PayloadError, pack
from fedsplitkd.runtime import load_numpy_state, state_to_numpy
from fedsplitkd.server import RoundStats, SplitKDServer, exchange

FORWARD = f"{MessageType.TRAIN}.split_forward"
BACKWARD = f"{MessageType.TRAIN}.split_backward"


class GridTransport:
    """Carries protocol payloads as Flower Messages over a Grid, polling for replies.

    Polls every ``poll_interval`` seconds: the SuperLink grid's own ``send_and_receive``
    sleeps 3 s between polls, which would dominate every exchange.
    """

    def __init__(self, grid: Grid, timeout: float, poll_interval: float = 0.005,
                 message_type: str | None = None):
        self.grid, self.timeout, self.poll_interval = grid, timeout, poll_interval
        self.message_type = message_type
        self.pending: dict[str, tuple[int, float]] = {}  # message id -> (node id, deadline)

    def send(self, requests: dict[Hashable, Payload]) -> None:
        messages = [Message(to_records(r), dst_node_id=int(node),
                            message_type=self.message_type or (BACKWARD if "grads" in r else FORWARD))
                    for node, r in requests.items()]
        deadline = time.monotonic() + self.timeout
        for mid, message in zip(self.grid.push_messages(messages), messages):
            # A message the SuperLink refused gets no id; it times out like a lost one.
            self.pending[mid or f"refused-{message.metadata.dst_node_id}"] = (
                message.metadata.dst_node_id, deadline if mid else 0.0)

    def receive(self) -> dict[Hashable, Payload | str]:
        replies: dict[Hashable, Payload | str] = {}
        while not replies and self.pending:
            for reply in self.grid.pull_messages([m for m in self.pending if not m.startswith("refused-")]):
                mid = reply.metadata.reply_to_message_id
                node = self.pending.get(mid, (None,))[0]
                if node is None or reply.metadata.src_node_id != node:
                    log(WARNING, "ignored a reply to message %s from node %s", mid, reply.metadata.src_node_id)
                    continue
                del self.pending[mid]
                if reply.has_error():
                    replies[node] = f"ClientApp error: {reply.error.reason}"
                    continue
                try:
                    replies[node] = from_records(reply.content)
                except PayloadError as err:
                    replies[node] = f"invalid records: {err}"
            now = time.monotonic()
            for mid, (node, deadline) in list(self.pending.items()):
                if now >= deadline:
                    del self.pending[mid]
                    replies[node] = f"no reply within {self.timeout:.0f} s"
            if not replies:
                time.sleep(self.poll_interval)
        return replies


class SplitKD(Strategy):
    """Split knowledge distillation: devices hold the student's lower part, the edge the rest.

    Each round, sampled nodes receive the global device part and exchange activations
    for cut-layer gradients with the edge server (``SplitKDServer``: student upper part,
    frozen teacher, KD + CE loss) in chunks of ``exchange-batches`` minibatches, then
    return their device parts, which are averaged weighted by examples.

    The ArrayRecord this strategy takes and returns is the whole student.

    Parameters
    ----------
    server : SplitKDServer
        The edge server (student upper part, teacher, payload checks, accounting).
    fraction_train, fraction_evaluate : float
        Fractions of connected nodes sampled for training / split evaluation.
    min_nodes : int
        Nodes that must be connected before the first round starts.
    poll_interval : float
        Seconds between polls for replies (see ``GridTransport``).
    seed : int
        Seed of the node sampling.
    """

    def __init__(self, server: SplitKDServer, fraction_train: float = 1.0,
                 fraction_evaluate: float = 0.0, min_nodes: int = 1, poll_interval: float = 0.005,
                 seed: int = 0) -> None:
        self.server = server
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_nodes = min_nodes
        self.poll_interval = poll_interval
        # Separate streams: evaluation sampling must not shift which devices train.
        self.train_rng, self.evaluate_rng = (np.random.default_rng([seed, i]) for i in (0, 1))
        self.device_ids: dict[int, int] = {}  # node id -> device (partition) id
        self.query_timeout = 60.0
        self.last_stats: RoundStats | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> Sampling: fraction train %.2f | evaluate %.2f | min nodes %d",
            self.fraction_train, self.fraction_evaluate, self.min_nodes)
        log(INFO, "\t└──> Cut '%s', teacher input '%s', exchange-batches %d",
            self.server.cut, self.server.mode, self.server.cfg["exchange-batches"])

    # ---- Strategy API -------------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float, rng: np.random.Generator) -> list[int]:
        """Sample nodes in device (partition) order, so runs repeat whatever the node ids."""
        _, nodes = sample_nodes(grid, self.min_nodes, 0)  # waits until min_nodes are connected
        unknown = [int(n) for n in nodes if int(n) not in self.device_ids]
        if unknown:
            transport = GridTransport(grid, self.query_timeout, self.poll_interval, MessageType.QUERY)
            for node, reply in exchange(transport, {n: {} for n in unknown}).items():
                if isinstance(reply, dict) and isinstance(reply.get("partition-id"), int):
                    self.device_ids[node] = reply["partition-id"]
                else:
                    log(WARNING, "node %s did not say which device it is: %s", node, reply)
        known = sorted((n for n in map(int, nodes) if n in self.device_ids),
                       key=lambda n: (self.device_ids[n], n))
        return [int(n) for n in sample_devices(known, fraction, rng)] if known else []

    def _load(self, arrays: ArrayRecord) -> None:
        load_numpy_state(self.server.student, {k: v.numpy() for k, v in arrays.items()})

    def _arrays(self) -> ArrayRecord:
        return ArrayRecord(torch_state_dict=self.server.student.state_dict())

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The round's first messages: the global device part for each sampled node."""
        self._load(arrays)
        requests = self.server.first_requests(self._sample(grid, self.fraction_train, self.train_rng), server_round)
        return [Message(to_records(r), dst_node_id=n, message_type=FORWARD) for n, r in requests.items()]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the device parts carried by final replies (weighted by examples)."""
        finals = []
        for reply in replies:
            try:
                if reply.has_error():
                    raise PayloadError(reply.error.reason)
                payload = from_records(reply.content)
                finals.append((self.server.check_final(payload, server_round), int(payload["num-examples"])))
            except PayloadError as err:
                log(WARNING, "round %d: final reply of node %s dropped: %s", server_round,
                    reply.metadata.src_node_id, err)
        if not finals:
            return None, None
        self.server.aggregate(finals)
        return self._arrays(), MetricRecord({"num-examples": sum(n for _, n in finals)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Split evaluation: the device part to a sample of nodes (none when fraction is 0)."""
        if self.fraction_evaluate == 0.0:
            return []
        self._load(arrays)
        request = self._evaluate_request(server_round)
        return [Message(to_records(request), dst_node_id=n, message_type=MessageType.EVALUATE)
                for n in self._sample(grid, self.fraction_evaluate, self.evaluate_rng)]

    def _evaluate_request(self, server_round: int) -> Payload:
        return {"round": server_round, **pack(WEIGHTS, state_to_numpy(self.server.device_part))}

    def _evaluate_metrics(self, replies: dict[Hashable, Payload | str], server_round: int) -> MetricRecord | None:
        accuracy, loss, n = self.server.evaluate_replies(replies, server_round)
        return MetricRecord({"val_accuracy": accuracy, "val_loss": loss, "num-examples": n}) if n else None

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Accuracy and loss of the whole student over the devices' validation activations."""
        payloads: dict[Hashable, Payload | str] = {}
        for reply in replies:
            try:
                payloads[reply.metadata.src_node_id] = (
                    reply.error.reason if reply.has_error() else from_records(reply.content))
            except PayloadError as err:
                payloads[reply.metadata.src_node_id] = str(err)
        return self._evaluate_metrics(payloads, server_round)

    # ---- the round loop -----------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3,
              timeout: float = 600.0, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              on_round: Callable[[int, RoundStats, Result], None] | None = None) -> Result:
        """Run ``num_rounds`` split-KD rounds; ``on_round`` sees each round's stats as it ends."""
        log(INFO, "Starting SplitKD strategy:")
        self.summary()
        if initial_arrays is not None:
            self._load(initial_arrays)
        result = Result(arrays=self._arrays())
        if evaluate_fn and (res := evaluate_fn(0, result.arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = res
        for server_round in range(1, num_rounds + 1):
            nodes = self._sample(grid, self.fraction_train, self.train_rng)
            transport = GridTransport(grid, timeout, self.poll_interval)
            stats = self.server.run_round(transport, nodes, server_round)
            self.last_stats = stats
            result.arrays = self._arrays()
            result.train_metrics_clientapp[server_round] = MetricRecord({
                "train_loss": stats.train_loss, "bytes_up": stats.bytes_up,
                "bytes_down": stats.bytes_down, "completed": stats.completed})
            if self.fraction_evaluate > 0.0:
                request = self._evaluate_request(server_round)
                nodes = self._sample(grid, self.fraction_evaluate, self.evaluate_rng)
                transport = GridTransport(grid, timeout, self.poll_interval, MessageType.EVALUATE)
                replies = exchange(transport, {n: request for n in nodes})
                if (res := self._evaluate_metrics(replies, server_round)) is not None:
                    result.evaluate_metrics_clientapp[server_round] = res
            if evaluate_fn and (res := evaluate_fn(server_round, result.arrays)) is not None:
                result.evaluate_metrics_serverapp[server_round] = res
            if on_round:
                on_round(server_round, stats, result)
        return result
