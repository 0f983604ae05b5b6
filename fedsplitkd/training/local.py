"""Whole-model training on one device's data (FedAvg, FedProx and local baselines), plain PyTorch."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedsplitkd.data.datasets import DeviceData
from fedsplitkd.protocol.device import batch_plan
from fedsplitkd.protocol.kd import kd_loss
from fedsplitkd.protocol.runtime import clip, torch_device_of, per_sample, round_lr
from fedsplitkd.protocol.sgd import DeviceSGD

# KD targets for a batch, from its sample indices, inputs and labels.
Teacher = Callable[[np.ndarray, torch.Tensor, torch.Tensor], torch.Tensor]


def train_whole(model: nn.Module, data: DeviceData, cfg, server_round: int, device_key: int,
                proximal_mu: float = 0.0,
                teacher: Teacher | None = None) -> tuple[int, float]:
    """``local-epochs`` over the device's data in the seed's batch order (the split methods'
    order too), cross-entropy, or KD towards ``teacher(indices, x, y)`` logits when given
    (rows of NaN: cross-entropy only), plus FedProx's (mu / 2) ||w - w_start||^2. Returns
    the samples trained on and the summed loss."""
    optimizer = DeviceSGD(model.parameters(), round_lr(cfg, server_round), cfg.train.momentum)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu else []
    plan = batch_plan(len(data.y_train), cfg.train.batch_size, cfg.train.local_epochs, cfg.train.seed,
                      server_round, device_key)
    samples, loss_sum = 0, 0.0
    torch_dev = torch_device_of(model)
    model.train()
    for batch in plan:
        x, y = (torch.from_numpy(a[batch]).to(torch_dev) for a in (data.x_train, data.y_train))
        logits = model(x)
        losses = kd_loss(logits, None, y, 0.0, 1.0, reduction="none")  # cross-entropy per label
        if teacher is not None:
            with torch.no_grad():
                target = teacher(batch, x, y)
            known = ~torch.isnan(target).any(-1)  # per label (per token for sequences)
            if known.any():
                losses = losses.clone()
                losses[known] = kd_loss(logits[known], target[known], y[known], cfg.split.kd_alpha,
                                        cfg.split.kd_temperature, reduction="none")
        loss = per_sample(losses).mean()
        objective = loss
        if proximal_mu:
            objective = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        clip(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        samples += len(batch)
        loss_sum += float(loss.detach()) * len(batch)
    return samples, loss_sum


def pooled(parts: list[DeviceData]) -> DeviceData:
    """Every device's data in one place (the central upper bound)."""
    return DeviceData(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("x_train", "y_train", "x_val", "y_val")))


@torch.no_grad()
def class_logits(model: nn.Module, x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean logit vector of each class over (x, y), and the class counts (federated distillation)."""
    model.eval()
    logits = model(torch.from_numpy(x)).numpy().astype(np.float64)
    model.train()
    counts = np.bincount(y, minlength=num_classes)
    sums = np.zeros((num_classes, logits.shape[1]))
    np.add.at(sums, y, logits)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32), counts.astype(np.int64)


def merge_class_logits(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The global per-class logits: each device's class means weighted by its class counts."""
    counts = sum(c.astype(np.float64) for _, c in parts)
    sums = sum(logits.astype(np.float64) * c[:, None] for logits, c in parts)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32), counts.astype(np.int64)


def class_targets(logits: np.ndarray, counts: np.ndarray) -> Teacher:
    """Federated distillation's teacher: the global mean logits of each sample's label.
    Samples of classes no device has reported are left out (their KD target is NaN, masked)."""
    table, seen = torch.from_numpy(logits), torch.from_numpy(counts > 0)

    def targets(indices: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(seen[y][:, None], table[y], torch.full_like(table[y], float("nan")))

    return targets
