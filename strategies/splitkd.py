"""Flower strategy for split knowledge distillation (Message API)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from logging import INFO

from torch import nn
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log

from fedsplitkd.fleet.costs import CostModel
from fedsplitkd.fleet.schedule import Scheduler
from fedsplitkd.config import DEFAULTS, ConfigError, RunConfig
from fedsplitkd.library import Blocks, OptimizerFactory, SplitKDConfig, as_run_config, edge_server, teacher_accuracy
from fedsplitkd.splitkd_config import CONFIG_APP_KEYS
from fedsplitkd.protocol.rounds import Evaluation, train
from fedsplitkd.protocol.runtime import load_numpy_state
from fedsplitkd.protocol.server import RoundStats, SplitKDServer
from fedsplitkd.strategies.grid import NodeMap
from fedsplitkd.strategies.transport import GridFleet
from fedsplitkd import streams


class SplitKD(Strategy):
    """Split knowledge distillation: devices hold the student's lower part, the edge the rest.

    Each round, sampled nodes receive the global device part and exchange activations
    for cut-layer gradients with the edge server (``SplitKDServer``: student upper part,
    frozen teacher, KD + CE loss) in chunks of ``exchange-batches`` minibatches, then
    return their device parts, which are averaged weighted by examples.

    The ArrayRecord this strategy takes and returns is the whole student. ``start`` has
    Flower's signature and result; its loop is ``fedsplitkd.protocol.rounds.train`` over the
    grid's devices, the same loop as the in-process run. A split round is many request/reply
    turns per device, which Flower's one-shot configure/aggregate hooks cannot express, so
    SplitKD has no such hooks to call: ``configure_train`` and the others refuse.

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
        self.rngs = {"train": streams.sampling(seed), "evaluate": streams.evaluate_sampling(seed)}
        self.nodes = NodeMap()  # device (partition) id -> node id
        self.last_stats: RoundStats | None = None
        self.evaluation: Evaluation | None = None  # the last round's split evaluation, if any
        # Rounds done before this run (a resumed run): ``start`` counts from 1 again, as Flower does.
        self.round_offset = 0
        self.virtual_devices = virtual_devices
        self.teacher_accuracy: float | None = None  # from_models measures it when given test data

    @classmethod
    def from_models(cls, student: Blocks, input_shape: tuple[int, ...], teacher: nn.Module | None = None,
                    teacher_embedding: nn.Module | None = None,
                    config: SplitKDConfig | RunConfig | Mapping[str, Any] | None = None,
                    optimizer: OptimizerFactory | None = None, costs: CostModel | None = None, *,
                    test_data: Iterable | None = None,
                    evaluate_teacher: Callable[[nn.Module], float] | None = None,
                    keys: tuple[str, str] = ("img", "label")) -> SplitKD:
        """Split-KD over the user's own student and teacher (``fedsplitkd.library.edge_server``).

        ``student`` is an ``nn.Sequential`` of named blocks (or ``(name, module)`` pairs);
        the whole student is what ``start`` takes as ``initial_arrays`` and returns. One node
        per device: each names its partition id in its node config. ``config`` is a
        ``SplitKDConfig``, a ``RunConfig`` or a Flower run config (its protocol keys).

        The teacher's test accuracy, what the student is measured against, is measured once
        here when ``test_data`` (batches as ``SplitDevice`` reads them, ``keys`` naming a dict
        batch's input and label) or ``evaluate_teacher`` (the user's own test: the whole teacher,
        inputs to logits, in eval mode -> its accuracy) is given: logged, kept in
        ``strategy.teacher_accuracy`` and logged again beside the final round.
        """
        cfg = as_run_config(config)
        for key in CONFIG_APP_KEYS:  # a RunConfig may carry the config app's wiring: say it is not served
            if cfg[key] != DEFAULTS[key]:
                raise ConfigError(f"run-config {key!r} = {cfg[key]!r}: the config app's, not the library's "
                                  "(SplitKD.from_models serves one node per device and keeps no checkpoints)")
        server = edge_server(student, input_shape, teacher, teacher_embedding, cfg, optimizer, costs)
        strategy = cls(server, cfg.train.fraction_train, cfg.train.fraction_evaluate, cfg.fleet.min_nodes,
                       cfg.faults.round_timeout, seed=cfg.train.seed)
        if test_data is not None or evaluate_teacher is not None:
            # without KD (kd_alpha = kd_feature_weight = 0) no teacher stays on the server; the user's modules are measured then
            # (their train/eval modes restored).
            whole = server.teacher if server.teacher is not None else (
                nn.Sequential(teacher_embedding, teacher) if teacher is not None and teacher_embedding is not None
                else None)
            if whole is None:
                raise ValueError("SplitKD.from_models 'test_data'/'evaluate_teacher': there is no teacher to "
                                 "measure (give teacher and teacher_embedding)")
            strategy.teacher_accuracy = teacher_accuracy(whole, test_data, evaluate_teacher, keys)
            log(INFO, "fedsplitkd: teacher test accuracy %.4f", strategy.teacher_accuracy)
        return strategy

    def summary(self) -> None:
        log(INFO, "\t├──> Sampling: fraction train %.2f | evaluate %.2f | min nodes %d",
            self.fraction_train, self.fraction_evaluate, self.min_nodes)
        log(INFO, "\t└──> Cut '%s', teacher input '%s', exchange-batches %d%s",
            self.server.cut, self.server.mode, self.server.cfg.split.exchange_batches,
            "" if self.teacher_accuracy is None else f", teacher test accuracy {self.teacher_accuracy:.4f}")

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              overlap: Callable[[int], bool] = lambda server_round: False) -> Result:
        """Run ``num_rounds`` split rounds from ``initial_arrays`` (the whole student).

        As ``Strategy.start``: ``evaluate_fn(round, arrays)`` is called before the first
        round and after each; the result holds the final student and every round's metrics.
        ``timeout`` bounds each reply here as ``round_timeout`` does; the configs are unused
        (the run config carries the protocol's settings to the devices). Where ``overlap(r)``
        holds (r counted from 1 as ``evaluate_fn`` sees it), round r's ``evaluate_fn`` runs once
        round r+1's first requests are out, while the devices compute (``rounds.train``): the
        student it gets is the same, but the scheduler has planned round r+1 already.
        """
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        load_numpy_state(self.server.student, {k: v.numpy() for k, v in initial_arrays.items()})
        result = Result(arrays=initial_arrays)
        if evaluate_fn and (record := evaluate_fn(0, initial_arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = record
        fleet = GridFleet(grid, self.nodes, self.min_nodes, min(timeout, self.round_timeout), self.poll_interval,
                          self.virtual_devices)
        started = time.time()

        def on_round(server_round: int, stats: RoundStats, evaluation: Evaluation | None) -> None:
            current = server_round - self.round_offset  # Flower's count, from 1
            log(INFO, "[ROUND %s/%s]", current, num_rounds)
            self.last_stats, self.evaluation = stats, evaluation
            result.arrays = ArrayRecord(torch_state_dict=self.server.student.state_dict())
            result.train_metrics_clientapp[current] = _train_record(stats)
            if evaluation is not None:
                result.evaluate_metrics_clientapp[current] = self.last_evaluation
            if evaluate_fn and (record := evaluate_fn(current, result.arrays)) is not None:
                result.evaluate_metrics_serverapp[current] = record

        train(self.scheduler, fleet, range(self.round_offset + 1, self.round_offset + num_rounds + 1), self.rngs,
              self.fraction_train, self.fraction_evaluate, on_round,
              lambda server_round: overlap(server_round - self.round_offset))
        log(INFO, "Strategy execution finished in %.2fs", time.time() - started)
        if self.teacher_accuracy is not None:  # what the student is measured against, as the config app reports
            log(INFO, "fedsplitkd: teacher test accuracy %.4f", self.teacher_accuracy)
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        return result

    @property
    def last_evaluation(self) -> MetricRecord | None:
        """The last round's split evaluation as Flower's record (what ``Result`` holds)."""
        if self.evaluation is None:
            return None
        return MetricRecord({"val_accuracy": self.evaluation.accuracy, "val_loss": self.evaluation.loss,
                             "num-examples": self.evaluation.samples, "dropped_evaluate": self.evaluation.dropped})

    # Flower's one-shot hooks: a split round is not one message per node, so ``start`` never
    # calls them, and a caller that drives them by hand gets told so.
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        raise NotImplementedError(_HOOKS)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raise NotImplementedError(_HOOKS)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        raise NotImplementedError(_HOOKS)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        raise NotImplementedError(_HOOKS)


_HOOKS = ("SplitKD rounds are many exchanges per device, not one message per node: "
          "run them with SplitKD.start (fedsplitkd.protocol.rounds.train)")


def _train_record(stats: RoundStats) -> MetricRecord:
    return MetricRecord({"train_loss": stats.train_loss, "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down,
                         "devices": stats.devices, "completed": stats.completed, "num-examples": stats.samples})
