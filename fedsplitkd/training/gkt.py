"""Group knowledge transfer (FedGKT, He et al. 2020) on the split student, plain PyTorch.

Each device keeps its own extractor (the student's blocks up to the cut) and a small
classifier head on the extracted features; it trains both with cross-entropy plus KD
towards the server's logits for its samples, then uploads features, its logits and labels.
The server trains the student's upper part on everyone's features with KD towards the
devices' logits, and sends back its logits for each device's samples.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedsplitkd.data.datasets import DeviceData
from fedsplitkd.protocol.kd import kd_loss
from fedsplitkd.training.local import train_whole
from fedsplitkd.protocol.runtime import clip, make_optimizer, round_lr, set_lr
from fedsplitkd import streams


def device_head(feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The device's own small classifier on its extracted features."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(feature_shape)), num_classes))


def train_device(extractor: nn.Module, head: nn.Module, data: DeviceData, server_logits: np.ndarray | None,
                 cfg, server_round: int, device_key: int) -> tuple[int, float]:
    """The device's extractor and head, trained like any whole model: KD towards the
    server's logits for each sample (plain cross-entropy before the server has any)."""
    teacher = None if server_logits is None else lambda idx, x, y: torch.from_numpy(server_logits[idx])
    return train_whole(nn.Sequential(extractor, head), data, cfg, server_round, device_key, teacher=teacher)


@torch.no_grad()
def extract(extractor: nn.Module, head: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features and the device's own logits for every sample."""
    features = extractor(torch.from_numpy(x))
    return features.numpy(), head(features).numpy()


def train_server(server_part: nn.Module, optimizer: torch.optim.Optimizer, features: np.ndarray,
                 device_logits: np.ndarray, labels: np.ndarray, cfg, server_round: int) -> float:
    """``server-epochs`` over all devices' features: KD towards the devices' logits + CE."""
    rng = streams.gkt_batches(cfg.train.seed, server_round)
    set_lr(optimizer, round_lr(cfg, server_round))
    loss_sum = 0.0
    server_part.train()
    for _ in range(cfg.method.server_epochs):
        order = rng.permutation(len(labels))
        for i in range(0, len(order), cfg.train.batch_size):
            idx = order[i:i + cfg.train.batch_size]
            loss = kd_loss(server_part(torch.from_numpy(features[idx])), torch.from_numpy(device_logits[idx]),
                           torch.from_numpy(labels[idx]), cfg.split.kd_alpha, cfg.split.kd_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip(server_part.parameters(), cfg.train.grad_clip)
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
    return loss_sum


def server_optimizer(server_part: nn.Module, cfg) -> torch.optim.Optimizer:
    return make_optimizer(server_part.parameters(), cfg.train.learning_rate, cfg.train.momentum)
