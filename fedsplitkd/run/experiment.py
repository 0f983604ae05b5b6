"""Assemble a split-KD experiment from a run config, and run it in one process.

The ServerApp and the in-process reference share ``build``, the round loop
(``fedsplitkd.protocol.rounds.train``) and ``metrics_row``; they differ only in the fleet
that carries the requests.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsplitkd import config as config_lib
from fedsplitkd.fleet.costs import CostModel
from fedsplitkd.data.datasets import Dataset, load_dataset, server_splits, take
from fedsplitkd.protocol.device import device_setup
from fedsplitkd.models.zoo import SplitModel, student_for
from fedsplitkd.protocol.runtime import evaluate, scores, torch_device
from fedsplitkd.protocol.teacher_memo import frozen_logits
from fedsplitkd.fleet.schedule import Scheduler
from fedsplitkd.library import edge_server
from fedsplitkd.protocol.rounds import Evaluation, InProcessFleet, train
from fedsplitkd.protocol.server import RoundStats, SplitKDServer
from fedsplitkd.models.teacher import get_teacher
from fedsplitkd.run.health import Health, top_class_share
from fedsplitkd import streams

log = logging.getLogger("fedsplitkd")


@dataclass
class Experiment:
    cfg: config_lib.RunConfig
    dataset: Dataset
    student: SplitModel
    teacher: SplitModel | None
    server: SplitKDServer
    scheduler: Scheduler
    device_rows: list = field(default_factory=list)  # the cost model's per-device rows, all rounds
    holdout: tuple[np.ndarray, np.ndarray] | None = None  # the server's validation split (x, y)
    health: Health | None = None  # whether the run learns (summary.json's health fields)
    # (round, predicted-class counts) of the last test pass: the health check reads it, not a second pass
    predicted: tuple[int, np.ndarray] | None = None

    def check_health(self, row: dict) -> None:
        """Follow the run's health; log a warning the first time it diverges or stops learning.
        Methods with a model per device (their accuracy is the devices' mean) are judged on
        their loss alone: the global student is not what they train. A round left untested
        (``evaluate-every``) is judged on its device drops alone."""
        if self.health is None:
            self.health = Health(self.dataset.num_classes)
        tested = self.tested(row["round"])
        per_device = self.cfg.method.name in ("local", "fd", "fedgkt")
        share = float("nan") if per_device or not tested else top_class_share(self._predicted(row["round"]))
        warning = self.health.update(row, share, tested)
        if warning:
            log.warning("fedsplitkd: %s", warning)

    def tested(self, server_round: int) -> bool:
        """Whether round ``server_round`` is tested: round 0, every ``evaluate-every``-th and the last."""
        return server_round % self.cfg.train.evaluate_every == 0 or server_round >= self.cfg.train.num_rounds

    def evaluate(self, server_round: int = 0) -> tuple[float, float]:
        """The student on the test split; NaN in a round left untested."""
        if not self.tested(server_round):
            return float("nan"), float("nan")
        accuracy, loss, predicted = scores(self.student, self.dataset.x_test, self.dataset.y_test)
        self.predicted = (server_round, predicted)
        return accuracy, loss

    def _predicted(self, server_round: int) -> np.ndarray:
        """The student's predicted-class counts on the test split in ``server_round``: those of
        that round's ``evaluate``, else a test pass now."""
        if self.predicted is None or self.predicted[0] != server_round:
            self.evaluate(server_round)
        return self.predicted[1]

    def evaluate_holdout(self, server_round: int = 0) -> tuple[float, float]:
        """The student on the server's holdout split (NaN without one, or in a round left
        untested): what model selection reads."""
        if self.holdout is None or not len(self.holdout[1]) or not self.tested(server_round):
            return float("nan"), float("nan")
        return evaluate(self.student, *self.holdout)

    @functools.cached_property
    def teacher_accuracy(self) -> float:
        """The teacher's test accuracy (NaN for a run without one), what the student is measured against."""
        if not self.teacher:
            return float("nan")
        logits = frozen_logits(self.teacher, self.dataset.x_test)  # a frozen teacher's: memoised in benchmarks
        return float((logits.argmax(-1) == self.dataset.y_test).mean())


def build(cfg) -> Experiment:
    """Load the data, get the teacher, initialise the student and the edge server."""
    dataset = load_dataset(cfg)
    if dataset.sequence and cfg.method.name in ("fd", "fedgkt"):
        raise ValueError(f"run-config 'method' = {cfg.method.name!r} shares per-class logits and has no "
                         f"form for dataset '{dataset.name}' (a next token per position)")
    public, holdout, _ = server_splits(len(dataset.y_train), cfg.data.public_fraction, cfg.data.holdout_fraction,
                                       cfg.train.seed)
    teacher = None
    if cfg.split.teacher_mode != "none":
        teacher = get_teacher(cfg, dataset, take(dataset.x_train, public), dataset.y_train[public])
    streams.init_weights(cfg.train.seed)
    # The server holds the whole student (its upper part trains there) on the run's torch
    # device; devices and payloads stay on the CPU.
    student = student_for(cfg, dataset).to(torch_device(cfg.model.torch_device))
    # The edge server as a library user builds it (fedsplitkd.library.edge_server): the zoo's
    # student and teacher are SplitModels already.
    server = edge_server(student, student.input_shape, teacher, config=cfg, costs=CostModel.from_config(cfg))
    # Training samples all devices together put through the split in a round: the scheduler's
    # guess for a device it has not seen yet is this over the fleet size.
    pool = len(dataset.y_train) * (1 - cfg.data.public_fraction - cfg.data.holdout_fraction) * (1 - cfg.data.val_fraction) \
        * cfg.train.local_epochs
    exp = Experiment(cfg, dataset, student, teacher, server, Scheduler(server, cfg, int(pool)),
                     holdout=(take(dataset.x_train, holdout), dataset.y_train[holdout]))
    exp.teacher_accuracy  # the pre-trained teacher's, before mutual learning moves it
    return exp


COST_COLUMNS = ("device_flops", "server_flops", "device_energy_j", "round_delay_s", "sim_time_s",
                "cum_device_energy_j", "stragglers")


def metrics_row(server_round: int, method: str, accuracy: float, loss: float,
                stats: RoundStats | None, wall_s: float,
                holdout: tuple[float, float] = (float("nan"), float("nan")),
                evaluation: Evaluation | None = None) -> dict:
    """One row of metrics.csv; ``holdout`` is (accuracy, loss) on the server's holdout split,
    ``evaluation`` the devices' split evaluation of the round (the val_ columns)."""
    stats = stats or RoundStats()
    row = {
        "round": server_round, "method": method, "test_accuracy": accuracy, "test_loss": loss,
        "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down,
        "bytes_up_activations": stats.bytes_up_activations, "bytes_up_teacher": stats.bytes_up_teacher,
        "bytes_up_labels": stats.bytes_up_labels, "bytes_up_weights": stats.bytes_up_weights,
        "train_loss": stats.train_loss,
        "devices": stats.devices, "completed": stats.completed,
        "dropped_failed": stats.dropped["failed"], "dropped_invalid": stats.dropped["invalid"],
        "dropped_forward": stats.dropped["forward"], "dropped_backward": stats.dropped["backward"],
        "dropped_evaluate": 0,  # set when devices evaluate
        "exchanges": stats.exchanges, "wall_s": round(wall_s, 4),
        "transport_s": round(stats.transport_s, 4), "server_s": round(stats.server_s, 4),
        "val_accuracy": float("nan"), "val_loss": float("nan"),  # set when devices evaluate
        **{k: stats.costs.get(k, 0) for k in COST_COLUMNS},
        # cross-entropy in bits per label: bits per character for the character models
        "test_bpc": loss / math.log(2), "val_bpc": float("nan"),
        "holdout_accuracy": holdout[0], "holdout_loss": holdout[1],
    }
    if evaluation is not None:
        row.update(val_accuracy=evaluation.accuracy, val_loss=evaluation.loss,
                   val_bpc=evaluation.loss / math.log(2), dropped_evaluate=evaluation.dropped)
    return row


def run_inprocess(overrides: dict | None, num_devices: int,
                  on_round: Callable[[dict], None] | None = None,
                  checkpoint_dir: Path | None = None) -> tuple[Experiment, list[dict]]:
    """The whole protocol in one process (``rounds.train`` over an ``InProcessFleet``): the same
    loop and math as the Flower run, no messages.

    With ``checkpoint-every``, checkpoints go to ``checkpoint_dir``; ``resume`` continues
    from one, and the rows returned are then the checkpoint's followed by the new ones.
    """
    from fedsplitkd.run import checkpoint

    cfg = config_lib.resolve(overrides)
    exp = build(cfg)
    fleet = InProcessFleet({i: device_setup(cfg, i, num_devices) for i in range(num_devices)})
    # The sampling streams of the SplitKD strategy: the same devices train as in a Flower run.
    rngs = {"train": streams.sampling(cfg.train.seed), "evaluate": streams.evaluate_sampling(cfg.train.seed)}
    rows = checkpoint.resume(exp, rngs) or [metrics_row(0, cfg.method.name, *exp.evaluate(), None, 0.0,
                                                        exp.evaluate_holdout())]
    started = time.perf_counter()

    def record(server_round: int, stats: RoundStats, evaluation: Evaluation | None) -> None:
        nonlocal started
        row = metrics_row(server_round, cfg.method.name, *exp.evaluate(server_round), stats, time.perf_counter() - started,
                          exp.evaluate_holdout(server_round), evaluation)
        rows.append(row)
        exp.check_health(row)
        exp.device_rows += [{"round": server_round, **r} for r in stats.device_costs]
        checkpoint.maybe_save(exp, server_round, rngs, rows, checkpoint_dir)
        if on_round:
            on_round(row)
        started = time.perf_counter()

    train(exp.scheduler, fleet, range(rows[-1]["round"] + 1, cfg.train.num_rounds + 1), rngs,
          cfg.train.fraction_train, cfg.train.fraction_evaluate, record)
    return exp, rows
