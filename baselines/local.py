"""local: every device trains its own student alone; the metric is the mean test accuracy."""

from __future__ import annotations

import statistics

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsplitkd.baselines.accounting import round_stats, whole_flops
from fedsplitkd.experiment import Experiment, sample_devices
from fedsplitkd.strategies.grid import FastGrid, discover
from fedsplitkd.strategies.recorder import Recorder


def run(grid: Grid, exp: Experiment, recorder: Recorder) -> None:
    cfg = exp.cfg
    nodes: dict[int, int] = {}
    rng = np.random.default_rng([cfg["seed"], 0])
    flops = whole_flops(exp.student)
    recorder.round(0, *exp.evaluate(), None)  # every device starts from this student
    for server_round in range(1, cfg["num-rounds"] + 1):
        devices = sample_devices(discover(grid, nodes, cfg["min-nodes"]), cfg["fraction-train"], rng)
        fast = FastGrid(grid, nodes)
        messages = [Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}),
                            dst_node_id=nodes[d], message_type=f"{MessageType.TRAIN}.local") for d in devices]
        replies = [r for r in fast.send_and_receive(messages, timeout=cfg["round-timeout"]) if not r.has_error()]
        metrics = [r.content["metrics"] for r in replies]
        accuracy = statistics.mean(m["test_accuracy"] for m in metrics) if metrics else float("nan")
        loss = statistics.mean(m["test_loss"] for m in metrics) if metrics else float("nan")
        recorder.round(server_round, accuracy, loss, round_stats(exp.server.costs, fast.traffic, flops, server_round))
