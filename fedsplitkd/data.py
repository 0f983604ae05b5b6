"""Datasets, the server's public split, and federated partitions.

Every array is numpy; features are float32 of shape (N, *input_shape), labels int64.
The test split stays on the server (central evaluation); the public split (teacher
pre-training) is cut from the training data and removed from the devices.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A dataset file or partition request is unusable; the message says why."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass(frozen=True)
class DeviceData:
    """One device's local data: a training and a validation split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    # A fixed split: the test set must not move with the run seed.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return Dataset("digits", x_tr, y_tr, x_te, y_te, 10)


def _npz(name: str, path: str) -> Dataset:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"dataset '{name}': no file at '{file}' (set data-path to an .npz with "
                        "x_train, y_train, x_test, y_test)")
    with np.load(file, allow_pickle=False) as arrays:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
        if missing:
            raise DataError(f"dataset file '{file}': missing arrays {missing}")
        x_tr, y_tr, x_te, y_te = (arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"dataset file '{file}': x_{split} {x.shape} and y_{split} {y.shape} "
                            "must be (N, ...) and (N,)")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise DataError(f"dataset file '{file}': y_{split} must hold integer labels >= 0")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"dataset file '{file}': x_train {x_tr.shape[1:]} and x_test "
                        f"{x_te.shape[1:]} feature shapes differ")
    x_tr, x_te = x_tr.astype(np.float32), x_te.astype(np.float32)
    # Standardise per channel (axis 1) with training statistics only.
    axes = (0,) + tuple(range(2, x_tr.ndim))
    mean, std = x_tr.mean(axis=axes, keepdims=True), x_tr.std(axis=axes, keepdims=True) + 1e-6
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    return Dataset(name, (x_tr - mean) / std, y_tr.astype(np.int64), (x_te - mean) / std,
                   y_te.astype(np.int64), num_classes)


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, path: str = "") -> Dataset:
    """Load a dataset by run-config name; ``har`` and ``npz`` read an .npz at ``path``."""
    if name == "digits":
        return _digits()
    if name in ("har", "npz"):
        if not path:
            raise DataError(f"dataset '{name}' needs data-path: an .npz with x_train, y_train, "
                            "x_test, y_test (for har: UCI HAR windows, shape (N, 9, 128))")
        return _npz(name, path)
    raise DataError(f"unknown dataset '{name}'")


def public_split(num_train: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the server's public split and of the pool left for the devices."""
    order = np.random.default_rng(seed).permutation(num_train)
    n_public = max(1, int(round(fraction * num_train)))
    return np.sort(order[:n_public]), np.sort(order[n_public:])


def partition(labels: np.ndarray, num_partitions: int, scheme: str, alpha: float,
              seed: int) -> list[np.ndarray]:
    """Split sample indices among devices with a flwr-datasets partitioner."""
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if len(labels) < num_partitions:
        raise DataError(f"cannot give {num_partitions} devices a sample each from "
                        f"{len(labels)} training samples")
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions)
    else:
        partitioner = DirichletPartitioner(num_partitions, partition_by="label", alpha=alpha,
                                           min_partition_size=2, self_balancing=False,
                                           shuffle=True, seed=seed)
    partitioner.dataset = HFDataset.from_dict({"label": labels, "index": np.arange(len(labels))})
    try:
        parts = [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
                 for i in range(num_partitions)]
    except ValueError as err:
        raise DataError(f"partition '{scheme}' of {len(labels)} samples into {num_partitions} "
                        f"devices failed: {err}") from err
    return parts


@functools.lru_cache(maxsize=8)
def _device_index(name: str, path: str, public_fraction: float, scheme: str, alpha: float,
                  seed: int, num_partitions: int) -> tuple[np.ndarray, ...]:
    ds = load_dataset(name, path)
    _, pool = public_split(len(ds.y_train), public_fraction, seed)
    parts = partition(ds.y_train[pool], num_partitions, scheme, alpha, seed)
    return tuple(pool[p] for p in parts)


def device_data(cfg, partition_id: int, num_partitions: int) -> DeviceData:
    """The local data of device ``partition_id``, deterministic for the run config."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} out of range for {num_partitions} partitions")
    ds = load_dataset(cfg["dataset"], cfg["data-path"])
    index = _device_index(cfg["dataset"], cfg["data-path"], cfg["public-fraction"],
                          cfg["partition"], cfg["dirichlet-alpha"], cfg["seed"],
                          num_partitions)[partition_id]
    order = np.random.default_rng([cfg["seed"], partition_id]).permutation(index)
    n_val = int(round(cfg["val-fraction"] * len(order))) if len(order) > 1 else 0
    val, train = order[:n_val], order[n_val:]
    return DeviceData(ds.x_train[train], ds.y_train[train], ds.x_train[val], ds.y_train[val])
