"""fedgkt: group knowledge transfer (He et al. 2020) on the split student.

One training message per device per round: the server's logits for the device's samples
go down, the device's features, logits and labels come up. The server trains the
student's upper part on everyone's features. Test accuracy is the mean, over devices,
of each device's extractor under the server's part (an evaluate message carrying the
server part; evaluation traffic is not charged to training, as for every method).
"""

from __future__ import annotations

from dataclasses import replace
from logging import WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedsplitkd.baselines.accounting import mean_of_devices, round_stats
from fedsplitkd.fleet.costs import BACKWARD_FACTOR, SplitFlops
from fedsplitkd.protocol.rounds import sample_devices
from fedsplitkd.run.experiment import Experiment
from fedsplitkd.training.gkt import server_optimizer, train_server
from fedsplitkd.protocol.payload import PayloadError, require_array, require_labels
from fedsplitkd.strategies.grid import FastGrid, NodeMap, discover
from fedsplitkd.strategies.recorder import Recorder
from fedsplitkd import streams


def upload_of(reply: Message, feature_shape: tuple, num_classes: int) -> tuple[np.ndarray, ...]:
    """A device's features, logits and labels, checked before the server trains on them."""
    if "arrays" not in reply.content:
        raise PayloadError("missing record 'arrays'")
    arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    features = require_array(arrays, "features", np.float32, (None, *feature_shape), finite=True)
    logits = require_array(arrays, "logits", np.float32, (len(features), num_classes), finite=True)
    labels = require_labels(arrays, "labels", len(features), num_classes)
    return features, logits, labels


def run(grid: Grid, exp: Experiment, recorder: Recorder) -> None:
    cfg = exp.cfg
    nodes = NodeMap()
    rng = streams.sampling(cfg.train.seed)
    upper = exp.server.edge.part  # the student's blocks after the cut: the server's model
    optimizer = server_optimizer(upper, cfg)
    feature_shape, classes = exp.server.act_shape, exp.dataset.num_classes
    flops = SplitFlops.of(exp.student, exp.server.cut, None)
    device_flops = replace(flops, server=0.0)  # the server's work is priced from what it trained
    server_logits: dict[int, np.ndarray] = {}
    recorder.round(0, *exp.evaluate(), None)  # every device's extractor starts as this student's
    for server_round in range(1, cfg.train.num_rounds + 1):
        devices = sample_devices(discover(grid, nodes, cfg.fleet.min_nodes, wait_s=cfg.faults.round_timeout), cfg.train.fraction_train, rng)
        fast = FastGrid(grid, nodes)
        messages = []
        for d in devices:
            content = {"config": ConfigRecord({"server-round": server_round})}
            if d in server_logits:
                content["arrays"] = ArrayRecord({"server-logits": Array(server_logits[d])})
            messages.append(Message(RecordDict(content), dst_node_id=nodes[d],
                                    message_type=f"{MessageType.TRAIN}.fedgkt"))
        uploads, device_of = {}, fast.devices
        for reply in fast.send_and_receive(messages, timeout=cfg.faults.round_timeout):
            device = device_of.get(reply.metadata.src_node_id)
            if reply.has_error() or device is None:
                continue
            try:
                uploads[device] = upload_of(reply, feature_shape, classes)
            except PayloadError as err:
                log(WARNING, "round %d: upload of device %s dropped: %s", server_round, device, err)
        loss_sum, features_seen = 0.0, sum(len(u[0]) for u in uploads.values())
        if uploads:
            features, logits, labels = (np.concatenate([u[i] for u in uploads.values()]) for i in range(3))
            loss_sum = train_server(upper, optimizer, features, logits, labels, cfg, server_round)
            upper.eval()
            with torch.no_grad():
                for d, (f, _, _) in uploads.items():
                    server_logits[d] = upper(torch.from_numpy(f)).numpy()
        # Server compute: server-epochs of training over every feature, then their logits.
        server_flops = features_seen * flops.server * (cfg.method.server_epochs * (1 + BACKWARD_FACTOR) + 1)
        stats = round_stats(exp.server.costs, fast.traffic, device_flops, server_round, server_flops)
        stats.loss_sum = loss_sum
        replies = []
        if exp.tested(server_round):
            evaluation = FastGrid(grid, nodes)  # not charged to training
            weights = ArrayRecord(torch_state_dict=upper.state_dict())
            replies = evaluation.send_and_receive(
                [Message(RecordDict({"arrays": weights}), dst_node_id=nodes[d],
                         message_type=f"{MessageType.EVALUATE}.fedgkt") for d in uploads], timeout=cfg.faults.round_timeout)
        test, holdout = mean_of_devices([r.content["metrics"] for r in replies if not r.has_error()])
        recorder.round(server_round, *test, stats, holdout=holdout)
