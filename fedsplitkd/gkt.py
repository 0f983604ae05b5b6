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

from fedsplitkd.data import DeviceData
from fedsplitkd.device import batch_plan
from fedsplitkd.kd import kd_loss
from fedsplitkd.runtime import make_optimizer


def device_head(feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The device's own small classifier on its extracted features."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(feature_shape)), num_classes))


def train_device(extractor: nn.Module, head: nn.Module, data: DeviceData, server_logits: np.ndarray | None,
                 cfg, server_round: int, device_key: int) -> tuple[int, float]:
    """The device's extractor and head, ``local-epochs`` in the seed's batch order: KD towards
    the server's logits for each sample (plain cross-entropy before the server has any)."""
    model = nn.Sequential(extractor, head)
    optimizer = make_optimizer(model.parameters(), cfg["learning-rate"], cfg["momentum"])
    alpha = cfg["kd-alpha"] if server_logits is not None else 0.0
    samples, loss_sum = 0, 0.0
    for batch in batch_plan(len(data.y_train), cfg["batch-size"], cfg["local-epochs"], cfg["seed"],
                            server_round, device_key):
        target = torch.from_numpy(server_logits[batch]) if server_logits is not None else None
        loss = kd_loss(model(torch.from_numpy(data.x_train[batch])), target, torch.from_numpy(data.y_train[batch]),
                       alpha, cfg["kd-temperature"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        samples += len(batch)
        loss_sum += float(loss.detach()) * len(batch)
    return samples, loss_sum


@torch.no_grad()
def extract(extractor: nn.Module, head: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features and the device's own logits for every sample."""
    features = extractor(torch.from_numpy(x))
    return features.numpy(), head(features).numpy()


def train_server(server_part: nn.Module, optimizer: torch.optim.Optimizer, features: np.ndarray,
                 device_logits: np.ndarray, labels: np.ndarray, cfg, server_round: int) -> float:
    """``local-epochs`` over all devices' features: KD towards the devices' logits + CE."""
    rng = np.random.default_rng([cfg["seed"], server_round, 97])
    loss_sum = 0.0
    server_part.train()
    for _ in range(cfg["local-epochs"]):
        order = rng.permutation(len(labels))
        for i in range(0, len(order), cfg["batch-size"]):
            idx = order[i:i + cfg["batch-size"]]
            loss = kd_loss(server_part(torch.from_numpy(features[idx])), torch.from_numpy(device_logits[idx]),
                           torch.from_numpy(labels[idx]), cfg["kd-alpha"], cfg["kd-temperature"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
    return loss_sum


def server_optimizer(server_part: nn.Module, cfg) -> torch.optim.Optimizer:
    return make_optimizer(server_part.parameters(), cfg["learning-rate"], cfg["momentum"])
