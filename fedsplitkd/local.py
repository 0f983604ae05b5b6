"""Whole-model training on one device's data (FedAvg, FedProx and local baselines), plain PyTorch."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedsplitkd.data import DeviceData
from fedsplitkd.device import batch_plan
from fedsplitkd.kd import kd_loss
from fedsplitkd.runtime import make_optimizer


def train_whole(model: nn.Module, data: DeviceData, cfg, server_round: int, device_key: int,
                proximal_mu: float = 0.0, teacher: nn.Module | None = None) -> tuple[int, float]:
    """``local-epochs`` over the device's data in the seed's batch order (the split methods'
    order too), cross-entropy (KD from ``teacher`` when given), plus FedProx's
    (mu / 2) ||w - w_start||^2. Returns the samples trained on and the summed loss."""
    optimizer = make_optimizer(model.parameters(), cfg["learning-rate"], cfg["momentum"])
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu else []
    plan = batch_plan(len(data.y_train), cfg["batch-size"], cfg["local-epochs"], cfg["seed"],
                      server_round, device_key)
    samples, loss_sum = 0, 0.0
    model.train()
    for batch in plan:
        x, y = torch.from_numpy(data.x_train[batch]), torch.from_numpy(data.y_train[batch])
        logits = model(x)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x)
            loss = kd_loss(logits, target, y, cfg["kd-alpha"], cfg["kd-temperature"])
        else:
            loss = nn.functional.cross_entropy(logits, y)
        objective = loss
        if proximal_mu:
            objective = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        samples += len(batch)
        loss_sum += float(loss.detach()) * len(batch)
    return samples, loss_sum


def pooled(parts: list[DeviceData]) -> DeviceData:
    """Every device's data in one place (the central upper bound)."""
    return DeviceData(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("x_train", "y_train", "x_val", "y_val")))
