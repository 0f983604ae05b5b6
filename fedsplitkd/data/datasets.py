"""Datasets, the server's public split, and federated partitions.

Features are float32 of shape (N, *input_shape) (int64 token ids for text), labels int64.
The test split stays on the server (central evaluation); the public split (teacher
pre-training) is cut from the training data and removed from the devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsplitkd.data import images, sources
from fedsplitkd.data.sources import DataError
from fedsplitkd import streams
from fedsplitkd.config import DataConfig

__all__ = ["DataError", "Dataset", "DeviceData", "load_dataset", "public_split", "server_splits", "holdout_data",
           "Partition", "partition", "device_data", "take"]

STANDARDISED = {"har", "npz", "csv"}  # sources whose features arrive in raw units


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    ids_train: np.ndarray | None = None  # natural id per training sample (role, subject, writer)
    vocab: str | None = None  # the characters of a text dataset, in token-id order

    @property
    def sequence(self) -> bool:
        """Whether each sample has a label per position (language modelling: y is (N, T))."""
        return self.y_train.ndim == 2

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def tokens(self) -> bool:
        """Whether the features are token ids (text), not measurements."""
        return np.issubdtype(self.x_train.dtype, np.integer)


@dataclass(frozen=True)
class DeviceData:
    """One device's local data: a training and a validation split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def _checked(name: str, origin: str, raw: dict) -> Dataset:
    """Validate arrays from any source; standardise raw measurements with training statistics."""
    x_tr, y_tr, x_te, y_te = (np.asarray(raw[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        per_position = y.ndim == 2 and y.shape == x.shape and np.issubdtype(x.dtype, np.integer)
        if x.ndim < 2 or not (y.ndim == 1 or per_position) or len(x) != len(y) or not len(x):
            raise DataError(f"{origin}: x_{split} {x.shape} and y_{split} {y.shape} must be (N, ...) "
                            "and (N,) with N > 0 (or token ids (N, T) with a label per position)")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise DataError(f"{origin}: y_{split} must hold integer labels >= 0 (dtype {y.dtype}, "
                            f"min {y.min()})")
        if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
            raise DataError(f"{origin}: x_{split} must be numeric, not {x.dtype}")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{origin}: x_train {x_tr.shape[1:]} and x_test {x_te.shape[1:]} feature "
                        "shapes differ")
    num_classes = int(raw.get("num_classes", max(y_tr.max(), y_te.max()) + 1))
    if max(y_tr.max(), y_te.max()) >= num_classes:
        raise DataError(f"{origin}: labels reach {max(y_tr.max(), y_te.max())} but there are "
                        f"{num_classes} classes")
    ids = raw.get("ids_train")
    if ids is not None and np.asarray(ids).shape != y_tr.shape[:1]:
        raise DataError(f"{origin}: ids_train {np.asarray(ids).shape} must be one id per training sample")
    if np.issubdtype(x_tr.dtype, np.integer) and name in ("shakespeare", "shakespeare-lm"):
        x_tr, x_te = x_tr.astype(np.int64), x_te.astype(np.int64)
    else:
        x_tr, x_te = x_tr.astype(np.float32), x_te.astype(np.float32)
        if not (np.isfinite(x_tr).all() and np.isfinite(x_te).all()):
            raise DataError(f"{origin}: features hold NaN or Inf")
        if name in STANDARDISED:  # per channel (axis 1) with training statistics only
            axes = (0,) + tuple(range(2, x_tr.ndim))
            mean, std = x_tr.mean(axis=axes, keepdims=True), x_tr.std(axis=axes, keepdims=True) + 1e-6
            for x in (x_tr, x_te):  # in place: astype made copies, and a large set needs no third one
                x -= mean
                x /= std
    return Dataset(name, x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64), num_classes,
                   None if ids is None else np.asarray(ids).astype(np.int64), raw.get("vocab"))


MAPPED_BYTES = 64 << 20  # training features at least this large are memory-mapped from the cache
# Kept in the cache whatever their size: those decoded from image files, and digits, read through
# scikit-learn, whose import alone costs each ServerApp process 1.5 s of CPU.
SLOW_TO_READ = {"cifar10", "images", "digits"}


def take(x: np.ndarray, index) -> np.ndarray:
    """``x[index]``. From a memory-mapped array the rows are copied out, and the pages read
    for them are let go, so a process that gathered its part keeps no more of the file."""
    rows = np.asarray(x[index])
    mapping = getattr(x, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise"):
        mapping.madvise(mmap.MADV_DONTNEED)
    return rows


def _mapped_directory(name: str, path: str, seq_len: int, stride: int, label_column: str) -> Path:
    """Where a loaded, checked and standardised dataset is kept as .npy files: keyed by the
    load's settings, the source's fingerprint and our data code."""
    code = sources.code_digest("data/datasets.py", "data/sources.py")
    # The fingerprint, not the path, names the data: a copy of the file elsewhere is the same dataset.
    key = json.dumps([name, seq_len, stride, label_column, sources.fingerprint(name, path), code])
    return sources.cache_root() / "datasets" / hashlib.sha256(key.encode()).hexdigest()[:32]


def _open_mapped(directory: Path) -> Dataset | None:
    """The dataset kept in ``directory``, its training features memory-mapped; None if absent."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        arrays = {k: np.load(directory / f"{k}.npy", mmap_mode="r" if k == "x_train" else None, allow_pickle=False)
                  for k in meta["arrays"]}
    except (OSError, ValueError, KeyError):
        return None
    return Dataset(meta["name"], arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                   meta["num_classes"], arrays.get("ids_train"), meta["vocab"])


def _store_mapped(directory: Path, ds: Dataset) -> None:
    arrays = {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test}
    if ds.ids_train is not None:
        arrays["ids_train"] = ds.ids_train
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for k, a in arrays.items():
        np.save(tmp / f"{k}.npy", a)
    (tmp / "meta.json").write_text(json.dumps({"name": ds.name, "num_classes": ds.num_classes, "vocab": ds.vocab,
                                               "arrays": sorted(arrays)}))
    try:
        os.replace(tmp, directory)  # atomic; another process may have stored it first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=4)
def _load(name: str, path: str, seq_len: int, stride: int, label_column: str) -> Dataset:
    """A dataset, once per process. A large one (``MAPPED_BYTES``) is kept checked and
    standardised in the cache and memory-mapped, so the processes of a large simulated
    fleet (ServerApp, Ray workers) share the file instead of each holding a copy."""
    if path and not Path(str(path)).expanduser().exists():
        return _read(name, path, seq_len, stride, label_column)  # its own error names the path
    directory = _mapped_directory(name, path, seq_len, stride, label_column)
    mapped = _open_mapped(directory)
    if mapped is not None:
        return mapped
    ds = _read(name, path, seq_len, stride, label_column)
    if ds.x_train.nbytes < MAPPED_BYTES and name not in SLOW_TO_READ:
        return ds
    try:
        _store_mapped(directory, ds)
    except OSError:  # a read-only or full cache costs memory, never the run
        return ds
    return _open_mapped(directory) or ds


def _read(name: str, path: str, seq_len: int, stride: int, label_column: str) -> Dataset:
    if name == "digits":
        raw = sources.digits()
    elif name == "har":
        raw = sources.har(path)
    elif name == "shakespeare":
        raw = sources.shakespeare(path, seq_len, stride)
    elif name == "shakespeare-lm":
        raw = sources.shakespeare(path, seq_len, stride, sequence=True)
    elif name == "cifar10":
        raw = images.cifar10(path)
    elif name == "images":
        if not path:
            raise DataError("dataset 'images' needs data-path: a folder or zip of class sub-folders of "
                            "images (train/<class>/*.png and test/<class>/*.png, or <class>/*.jpg)")
        raw = images.image_folder(path)
    elif name in sources.HUB:
        raw = sources.hub(name)
    elif name == "npz":
        if not path:
            raise DataError("dataset 'npz' needs data-path: an .npz with x_train, y_train, x_test, y_test")
        raw = sources.npz(path)
    elif name == "csv":
        if not path:
            raise DataError("dataset 'csv' needs data-path: a CSV file, or a directory with train.csv "
                            "and test.csv")
        raw = sources.csv(path, label_column)
    else:
        raise DataError(f"unknown dataset '{name}'")
    return _checked(name, f"dataset '{name}'" + (f" ({path})" if path else ""), raw)


def load_dataset(cfg) -> Dataset:
    """The dataset a run config names, loaded once per process."""
    return _dataset(cfg.data)


def _dataset(data: DataConfig) -> Dataset:
    where = (data.dataset, data.data_path, data.seq_len, data.text_stride, data.label_column)
    return _subset(*where, data.train_samples) if data.train_samples else _load(*where)


@functools.lru_cache(maxsize=4)
def _subset(name: str, path: str, seq_len: int, stride: int, label_column: str, train_samples: int) -> Dataset:
    """``train_samples`` of the training split, drawn once from a fixed stream (as many or more: all of it)."""
    ds = _load(name, path, seq_len, stride, label_column)
    if train_samples >= len(ds.y_train):
        return ds
    keep = np.sort(streams.train_subset().permutation(len(ds.y_train))[:train_samples])
    return dataclasses.replace(ds, x_train=take(ds.x_train, keep), y_train=ds.y_train[keep],
                               ids_train=None if ds.ids_train is None else ds.ids_train[keep])


def server_splits(num_train: int, public_fraction: float, holdout_fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the server's public split (the teacher's), its holdout split (model
    selection: no device and no teacher ever sees it) and the pool left for the devices."""
    order = streams.partition(seed).permutation(num_train)
    n_public = max(1, int(round(public_fraction * num_train)))
    n_holdout = int(round(holdout_fraction * num_train))
    return (np.sort(order[:n_public]), np.sort(order[n_public:n_public + n_holdout]),
            np.sort(order[n_public + n_holdout:]))


def public_split(num_train: int, fraction: float, seed: int, holdout_fraction: float = 0.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the server's public split and of the pool left for the devices."""
    public, _, pool = server_splits(num_train, fraction, holdout_fraction, seed)
    return public, pool


def holdout_data(cfg) -> tuple[np.ndarray, np.ndarray]:
    """The server's holdout split (``holdout-fraction`` of the training data): validation
    data for model selection, disjoint from the public split and from every device."""
    ds = load_dataset(cfg)
    _, holdout, _ = server_splits(len(ds.y_train), cfg.data.public_fraction, cfg.data.holdout_fraction, cfg.train.seed)
    return take(ds.x_train, holdout), ds.y_train[holdout]


def group_ids(ids: np.ndarray, num_groups: int) -> np.ndarray:
    """Merge natural ids into ``num_groups`` devices: largest id first, each to the device
    holding the fewest samples so far (ties: lowest device). Returns a device per sample."""
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) < num_groups:
        raise DataError(f"natural partition: {len(unique)} natural ids cannot fill {num_groups} devices")
    load, device_of = np.zeros(num_groups, dtype=np.int64), {}
    for i in sorted(range(len(unique)), key=lambda i: (-counts[i], unique[i])):
        device = int(np.argmin(load))
        device_of[unique[i]] = device
        load[device] += counts[i]
    return np.array([device_of[i] for i in ids], dtype=np.int64)


class Partition:
    """A flwr-datasets partitioner over sample indices, read one device at a time (IID: its
    result by arithmetic, ``iid_shard``).

    A device's indices are computed when first asked for, so a process that serves a few
    devices of a large fleet pays for those (and the partitioner's one pass over the
    labels), not for every device: at 100,000 devices, loading every partition up front was
    most of a process's start-up."""

    def __init__(self, labels: np.ndarray, num_partitions: int, scheme: str, alpha: float, seed: int,
                 classes_per_device: int = 2, ids: np.ndarray | None = None):
        if len(labels) < num_partitions:
            raise DataError(f"cannot give {num_partitions} devices a sample each from "
                            f"{len(labels)} training samples")
        self.num_partitions, self.scheme, self.num_samples = num_partitions, scheme, len(labels)
        self._parts: dict[int, np.ndarray] = {}
        self.partitioner = None
        if scheme == "iid":  # a closed form, nothing to build or keep: see iid_shard
            return
        from datasets import Dataset as HFDataset
        from flwr_datasets.partitioner import DirichletPartitioner, NaturalIdPartitioner, PathologicalPartitioner

        columns = {"label": labels, "index": np.arange(len(labels))}
        if scheme == "dirichlet":
            partitioner = DirichletPartitioner(num_partitions, partition_by="label", alpha=alpha,
                                               min_partition_size=2, self_balancing=False,
                                               shuffle=True, seed=seed)
        elif scheme == "pathological":
            partitioner = PathologicalPartitioner(num_partitions, partition_by="label",
                                                  num_classes_per_partition=classes_per_device,
                                                  class_assignment_mode="random", seed=seed)
        elif scheme == "natural":
            if ids is None:
                raise DataError("partition 'natural' needs natural ids (speaking role, subject, writer): "
                                "this dataset has none")
            columns["device"] = group_ids(ids, num_partitions)
            partitioner = NaturalIdPartitioner(partition_by="device")
        else:
            raise DataError(f"unknown partition '{scheme}'")
        partitioner.dataset = HFDataset.from_dict(columns)
        self.partitioner = partitioner

    def __getitem__(self, device: int) -> np.ndarray:
        """Device ``device``'s sample indices (NaturalIdPartitioner numbers the sorted ids, so
        partition i is device i)."""
        if self.partitioner is None:
            return iid_shard(self.num_samples, self.num_partitions, device)
        if device not in self._parts:
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # its progress bar, once per process
                    part = np.asarray(self.partitioner.load_partition(device)["index"], dtype=np.int64)
            except ValueError as err:
                raise DataError(f"partition '{self.scheme}' of {self.num_samples} samples into "
                                f"{self.num_partitions} devices failed: {err}") from err
            if not len(part):
                raise DataError(f"partition '{self.scheme}' leaves device {device} of {self.num_partitions} "
                                f"without samples ({self.num_samples} training samples): use fewer devices "
                                "or another partition")
            self._parts[device] = part
        return self._parts[device]


def iid_shard(num_samples: int, num_partitions: int, device: int) -> np.ndarray:
    """Device ``device``'s indices under flwr-datasets' IidPartitioner over ``arange(num_samples)``:
    its contiguous shard (datasets' ``shard(contiguous=True)``: the first ``num_samples %
    num_partitions`` shards one longer), by arithmetic. Through the partitioner's Arrow table
    it cost 3-7 ms a device, half of what serving a virtual device's message cost; the
    tests hold it equal to IidPartitioner."""
    size, longer = divmod(num_samples, num_partitions)
    start = size * device + min(device, longer)
    return np.arange(start, start + size + (device < longer), dtype=np.int64)


def partition(labels: np.ndarray, num_partitions: int, scheme: str, alpha: float, seed: int,
              classes_per_device: int = 2, ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Split sample indices among devices with a flwr-datasets partitioner: every device's."""
    parts = Partition(labels, num_partitions, scheme, alpha, seed, classes_per_device, ids)
    return [parts[i] for i in range(num_partitions)]


@functools.lru_cache(maxsize=8)
def _device_partition(data: DataConfig, seed: int, num_partitions: int) -> tuple[np.ndarray, Partition]:
    """The devices' pool and its partition, once per process; devices are read from it lazily."""
    ds = _dataset(data)
    _, pool = public_split(len(ds.y_train), data.public_fraction, seed, data.holdout_fraction)
    ids = ds.ids_train[pool] if ds.ids_train is not None else None
    # Label-skewed partitions need one label per sample: a sequence's last next token.
    labels = ds.y_train[pool] if ds.y_train.ndim == 1 else ds.y_train[pool, -1]
    return pool, Partition(labels, num_partitions, data.partition, data.dirichlet_alpha, seed,
                           data.classes_per_device, ids)


DATA_KEYS = ("dataset", "data-path", "seq-len", "text-stride", "label-column", "public-fraction",
             "holdout-fraction", "partition", "dirichlet-alpha", "classes-per-device", "seed")


def device_data(cfg, partition_id: int, num_partitions: int) -> DeviceData:
    """The local data of device ``partition_id``, deterministic for the run config."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} out of range for {num_partitions} partitions")
    ds = load_dataset(cfg)
    pool, parts = _device_partition(cfg.data, cfg.train.seed, num_partitions)
    index = pool[parts[partition_id]]
    train, val = local_split(index, cfg.data.val_fraction, cfg.train.seed, partition_id)
    return DeviceData(take(ds.x_train, train), ds.y_train[train], take(ds.x_train, val), ds.y_train[val])


def local_split(index: np.ndarray, val_fraction: float, seed: int, device: int) -> tuple[np.ndarray, np.ndarray]:
    """A device's (training, validation) sample indices out of ``index``, seeded per device."""
    order = streams.local_split(seed, device).permutation(index)
    n_val = int(round(val_fraction * len(order))) if len(order) > 1 else 0
    return order[n_val:], order[:n_val]
