"""The teacher: trained by the server on its public split, or loaded from a checkpoint.

Trained teachers are cached on disk under a key made of everything that determines
them (architecture, data, training settings), so repeated runs skip the training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from fedsplitkd.protocol.kd import kd_loss
from fedsplitkd.models.resnet import checkpoint_file, load_checkpoint
from fedsplitkd.models.zoo import SplitModel, family_of, pretrained_teacher, teacher_for
from fedsplitkd.protocol.runtime import torch_device_of, evaluate, torch_device
from fedsplitkd import streams
from fedsplitkd.data import sources

log = logging.getLogger("fedsplitkd")

CACHE_VERSION = 3  # 2: cosine learning rate and augmentation; 3: images only


def default_cache_dir() -> Path:
    return sources.cache_root() / "teachers"


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images (N, C, H, W) only: a random shift of the whole batch by up to 1 pixel each way,
    plus Gaussian noise of 0.05. Other inputs come back as they are: a shift is no invariance
    of an arbitrary (C, L) window or feature vector (it wrecked a 3 x 16 sensor set)."""
    if x.ndim != 4:
        return x
    dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
    return torch.roll(x, (dx, dy), (2, 3)) + 0.05 * torch.randn(x.shape, generator=generator).to(x.device)


def train_teacher(teacher: SplitModel, x: np.ndarray, y: np.ndarray, epochs: int, seed: int,
                  batch_size: int = 64, lr: float = 1e-3, augmented: bool = False) -> SplitModel:
    """Supervised training on the public split: Adam with a cosine learning rate, cross-entropy
    per label, optionally on augmented batches (``augment``: images only), on the teacher's
    torch device."""
    generator = streams.torch_generator(seed)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    torch_dev = torch_device_of(teacher)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    augmented = augmented and xs.is_floating_point() and xs.ndim == 4
    teacher.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for i in range(0, len(xs), batch_size):
            idx = order[i:i + batch_size]
            batch = augment(xs[idx], generator) if augmented else xs[idx]
            loss = kd_loss(teacher(batch.to(torch_dev)), None, ys[idx].to(torch_dev), 0.0, 1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    return teacher


def cache_key(family: str, input_shape: tuple, num_classes: int, x: np.ndarray, y: np.ndarray,
              epochs: int, seed: int, augmented: bool = False) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, family, list(input_shape), num_classes, epochs, seed,
                              augmented]).encode())
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()[:20]


def get_teacher(cfg, dataset, x_public: np.ndarray, y_public: np.ndarray) -> SplitModel:
    """The teacher from ``teacher-path``, the disk cache, or fresh training on the public split,
    on the run's torch device."""
    streams.init_weights(cfg.train.seed)
    input_shape, num_classes = dataset.input_shape, dataset.num_classes
    family = family_of(cfg, dataset)
    if family == "gpt":  # the size is part of what determines the teacher
        family = f"gpt-{cfg.model.gpt_teacher}"
    torch_dev = torch_device(cfg.model.torch_device)
    teacher = teacher_for(cfg, dataset).to(torch_dev)
    if cfg.model.hf_teacher:  # a Hugging Face checkpoint is a trained teacher: used as is
        return teacher
    published = pretrained_teacher(cfg, dataset)
    if published:  # pre-trained and frozen: never trained further, the public split unused for it
        cache = Path(cfg.model.teacher_cache_dir).expanduser() if cfg.model.teacher_cache_dir else default_cache_dir()
        load_checkpoint(teacher, checkpoint_file(published, cfg.model.teacher_path, cache))
        log.info("teacher: pre-trained %s from %s", published, cfg.model.teacher_path or "its release")
        return teacher
    if cfg.model.teacher_path:
        path = Path(cfg.model.teacher_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"teacher-path '{path}': no such file")
        try:
            teacher.load_state_dict(torch.load(path, weights_only=True, map_location=torch_dev))
        except RuntimeError as err:
            raise ValueError(f"teacher-path '{path}' does not fit the teacher for input "
                             f"{input_shape}: {str(err).splitlines()[0]}") from err
        return teacher
    cache_dir = Path(cfg.model.teacher_cache_dir).expanduser() if cfg.model.teacher_cache_dir else default_cache_dir()
    key = cache_key(family, input_shape, num_classes, x_public, y_public,
                    cfg.model.teacher_epochs, cfg.train.seed, cfg.model.teacher_augment)
    path = cache_dir / f"teacher-{key}.pt"
    if path.is_file():
        teacher.load_state_dict(torch.load(path, weights_only=True, map_location=torch_dev))
        log.info("teacher loaded from cache %s", path)
        return teacher
    train_teacher(teacher, x_public, y_public, cfg.model.teacher_epochs, cfg.train.seed, augmented=cfg.model.teacher_augment)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(teacher.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: a concurrent run never reads a half-written file
    acc, _ = evaluate(teacher, x_public, y_public)
    log.info("teacher trained on %d public samples (train accuracy %.3f), cached at %s",
             len(y_public), acc, path)
    return teacher
