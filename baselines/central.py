"""central-kd: the student distilled on all devices' data pooled at the server (the upper bound).

No device trains; each round is one pass over the pooled data, priced as server compute.
"""

from __future__ import annotations

from flwr.serverapp import Grid

from fedsplitkd.fleet.costs import BACKWARD_FACTOR
from fedsplitkd.data.datasets import device_data
from fedsplitkd.run.experiment import Experiment
from fedsplitkd.training.local import pooled, train_whole
from fedsplitkd.protocol.server import RoundStats
from fedsplitkd.strategies.grid import NodeMap, discover
from fedsplitkd.strategies.recorder import Recorder


def run(grid: Grid, exp: Experiment, recorder: Recorder) -> None:
    cfg = exp.cfg
    devices = discover(grid, NodeMap(), cfg.fleet.min_nodes, wait_s=cfg.faults.round_timeout)
    count = cfg.fleet.virtual_devices or (max(devices) + 1 if devices else 1)
    data = pooled([device_data(cfg, d, count) for d in range(count)])
    teacher = exp.teacher if cfg.split.teacher_mode != "none" else None
    student_flops = sum(s.forward_flops for s in exp.student.block_stats())
    teacher_flops = sum(s.forward_flops for s in teacher.block_stats()) if teacher is not None else 0.0
    recorder.round(0, *exp.evaluate(), None)
    for server_round in range(1, cfg.train.num_rounds + 1):
        samples, loss = train_whole(exp.student, data, cfg, server_round, count,
                                    teacher=None if teacher is None else lambda idx, x, y: teacher(x))
        stats = RoundStats(samples=samples, loss_sum=loss)
        stats.costs = exp.server.costs.account_server(
            samples * ((1 + BACKWARD_FACTOR) * student_flops + teacher_flops))
        recorder.round(server_round, *exp.evaluate(), stats)
