"""Methods where every device keeps its own student: local, and fd (federated distillation).

local: each device trains alone. fd (Jeong et al. 2018): each device trains with KD
towards the global mean logits of its samples' labels and shares only its own per-class
mean logits and counts; the server merges them weighted by counts. Either way the metric
is the mean test accuracy of the devices' models.
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedsplitkd.baselines.accounting import mean_of_devices, round_stats, whole_flops
from fedsplitkd.protocol.rounds import sample_devices
from fedsplitkd.run.experiment import Experiment
from fedsplitkd.training.local import merge_class_logits
from fedsplitkd.protocol.payload import PayloadError, require_array
from fedsplitkd.strategies.grid import FastGrid, NodeMap, discover
from fedsplitkd.strategies.recorder import Recorder
from fedsplitkd import streams


def class_logits_of(reply: Message, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A device's shared class logits, checked: a malformed reply must not touch the global ones."""
    if "arrays" not in reply.content:
        raise PayloadError("missing record 'arrays'")
    arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    logits = require_array(arrays, "class-logits", np.float32, (num_classes, num_classes), finite=True)
    counts = require_array(arrays, "class-counts", np.int64, (num_classes,))
    if counts.min() < 0:
        raise PayloadError("field 'class-counts' is negative")
    return logits, counts


def run(grid: Grid, exp: Experiment, recorder: Recorder) -> None:
    cfg = exp.cfg
    distill = cfg.method.name == "fd"
    nodes = NodeMap()
    rng = streams.sampling(cfg.train.seed)
    flops = whole_flops(exp.student)
    shared: tuple[np.ndarray, np.ndarray] | None = None  # global class logits and counts (fd)
    recorder.round(0, *exp.evaluate(), None)  # every device starts from this student
    for server_round in range(1, cfg.train.num_rounds + 1):
        devices = sample_devices(discover(grid, nodes, cfg.fleet.min_nodes, wait_s=cfg.faults.round_timeout), cfg.train.fraction_train, rng)
        fast = FastGrid(grid, nodes)
        content = {"config": ConfigRecord({"server-round": server_round, "test": exp.tested(server_round)})}
        if shared is not None:
            content["arrays"] = ArrayRecord({"global-logits": Array(shared[0]), "global-counts": Array(shared[1])})
        messages = [Message(RecordDict(content), dst_node_id=nodes[d],
                            message_type=f"{MessageType.TRAIN}.{cfg.method.name}") for d in devices]
        replies = [r for r in fast.send_and_receive(messages, timeout=cfg.faults.round_timeout) if not r.has_error()]
        if distill:
            parts = []
            for reply in replies:
                try:
                    parts.append(class_logits_of(reply, exp.dataset.num_classes))
                except PayloadError as err:
                    log(WARNING, "round %d: class logits of node %s dropped: %s", server_round,
                        reply.metadata.src_node_id, err)
            if parts:
                shared = merge_class_logits(parts)
        test, holdout = mean_of_devices([r.content["metrics"] for r in replies])
        recorder.round(server_round, *test, round_stats(exp.server.costs, fast.traffic, flops, server_round),
                       holdout=holdout)
