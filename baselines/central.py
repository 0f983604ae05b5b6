"""central-kd and public-kd: the student distilled at the server, no device involved.

- ``central-kd``: on all devices' data pooled at the server (the upper bound);
- ``public-kd``: on the server's public split alone (what a sceptical reader asks first: why
  not skip the devices? split-KD must beat it for the devices' private data to matter).

Each round is one pass over the data, priced as server compute. A frozen teacher's logits are
computed once, before the first round (a pre-trained ResNet-56 costs 125 MFLOPs an image).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp import Grid

from fedsplitkd.fleet.costs import BACKWARD_FACTOR
from fedsplitkd.data.datasets import DeviceData, device_data, server_splits, take
from fedsplitkd.run.experiment import Experiment
from fedsplitkd.training.local import pooled, train_whole
from fedsplitkd.protocol.teacher_memo import frozen_logits
from fedsplitkd.protocol.server import RoundStats
from fedsplitkd.strategies.grid import NodeMap, discover
from fedsplitkd.strategies.recorder import Recorder


def server_data(grid: Grid, exp: Experiment) -> tuple[DeviceData, int]:
    """The data the method trains on, and the number of devices its batch order is drawn for."""
    cfg = exp.cfg
    if cfg.method.name == "public-kd":
        public, _, _ = server_splits(len(exp.dataset.y_train), cfg.data.public_fraction, cfg.data.holdout_fraction,
                                     cfg.train.seed)
        x, y = take(exp.dataset.x_train, public), exp.dataset.y_train[public]
        return DeviceData(x, y, x[:0], y[:0]), 1
    devices = discover(grid, NodeMap(), cfg.fleet.min_nodes, wait_s=cfg.faults.round_timeout)
    count = cfg.fleet.virtual_devices or (max(devices) + 1 if devices else 1)
    return pooled([device_data(cfg, d, count) for d in range(count)]), count


def teacher_logits(teacher: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frozen_logits(teacher, x))


def run(grid: Grid, exp: Experiment, recorder: Recorder) -> None:
    cfg = exp.cfg
    data, count = server_data(grid, exp)
    teacher = exp.teacher if cfg.split.teacher_mode != "none" else None
    student_flops = sum(s.forward_flops for s in exp.student.block_stats())
    recorder.round(0, *exp.evaluate(), None)
    targets, teacher_flops = None, 0.0
    if teacher is not None:
        logits = teacher_logits(teacher, data.x_train)
        targets = lambda idx, x, y: logits[idx].to(x.device)  # noqa: E731
        teacher_flops = len(data.y_train) * sum(s.forward_flops for s in teacher.block_stats())
    for server_round in range(1, cfg.train.num_rounds + 1):
        samples, loss = train_whole(exp.student, data, cfg, server_round, count, teacher=targets)
        stats = RoundStats(samples=samples, loss_sum=loss)
        # the teacher's one pass over the data is priced in the first round
        once = teacher_flops if server_round == 1 else 0.0
        stats.costs = exp.server.costs.account_server(samples * (1 + BACKWARD_FACTOR) * student_flops + once)
        recorder.round(server_round, *exp.evaluate(server_round), stats)
