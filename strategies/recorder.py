"""One row of metrics.csv (and devices.csv) per round, and the progress line, for every method."""

from __future__ import annotations

import math
import time
from logging import INFO

from flwr.app import MetricRecord
from flwr.supercore import log

from fedsplitkd.run.experiment import Experiment, metrics_row
from fedsplitkd.run.results import ResultsWriter
from fedsplitkd.protocol.rounds import Evaluation
from fedsplitkd.protocol.server import RoundStats


class Recorder:
    def __init__(self, exp: Experiment, writer: ResultsWriter):
        self.exp, self.writer, self.cfg = exp, writer, exp.cfg
        self.clock = time.perf_counter()

    def round(self, server_round: int, accuracy: float, loss: float, stats: RoundStats | None,
              evaluation: Evaluation | None = None, holdout: tuple[float, float] | None = None) -> MetricRecord:
        """Record a round. ``evaluation`` is the devices' split evaluation, if they did one;
        ``holdout`` is (accuracy, loss) on the server's holdout split, by default the global
        student's (methods with a model per device pass their devices' mean)."""
        row = metrics_row(server_round, self.cfg.method.name, accuracy, loss, stats,
                          time.perf_counter() - self.clock if server_round else 0.0,
                          holdout if holdout is not None else self.exp.evaluate_holdout(server_round), evaluation)
        self.writer.append(row)
        self.exp.check_health(row)
        if stats is not None:
            self.writer.append_round_rows("devices.csv", server_round, stats.device_costs)
            self.writer.append_round_rows("dropped.csv", server_round, [
                {"device": key, "stage": stage, "kind": kind, "reason": reason}
                for key, stage, kind, reason in stats.drops])
            log(INFO, "[round %d/%d] %s test acc %.4f loss %.4f%s | up %.2f MB (activations %.2f, teacher %.2f, "
                "weights %.2f) down %.2f MB | %d/%d devices | sim %.1f s, %.2f J | %.2f s", server_round,
                self.cfg.train.num_rounds, self.cfg.method.name, accuracy, loss, self._teacher(),
                stats.bytes_up / 1e6, stats.bytes_up_activations / 1e6, stats.bytes_up_teacher / 1e6,
                stats.bytes_up_weights / 1e6, stats.bytes_down / 1e6, stats.completed,
                stats.devices, row["sim_time_s"], row["device_energy_j"], row["wall_s"])
        self.clock = time.perf_counter()
        return MetricRecord({"test_accuracy": accuracy, "test_loss": loss})

    def _teacher(self) -> str:
        teacher = self.exp.teacher_accuracy
        return "" if math.isnan(teacher) else f" (teacher {teacher:.4f})"
