"""A device's prepared data, cached on the device, so a fresh process need not partition.

A real SuperNode starts a new ClientApp process for every message. Without this cache each
one loads the whole dataset and partitions it (importing scikit-learn and flwr-datasets:
about 2.7 s of a 3-device digits message here) to find its own few hundred samples. The
cache file holds the device's ``DeviceData`` and the model shape, under a key hashing all
they depend on: the data settings, the device and the device count, the source (the data
file's sha256; a directory's file names, sizes and times; the version of the package that
bundles the data) and the source code of our data modules. Other settings, another file or
another version of the code is another key, so no entry is ever stale; a file that cannot
be read is prepared again and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from fedsplitkd.data import datasets as data_lib
from fedsplitkd.data.own_data import ModelShape
from fedsplitkd.data.sources import cache_root, code_digest, fingerprint

# What a device's data is computed from, besides data_lib.DATA_KEYS.
KEYS = (*data_lib.DATA_KEYS, "val-fraction")
CODE = ("data/datasets.py", "data/sources.py", "streams.py", "data/prepared.py")


def default_directory() -> Path:
    return cache_root() / "prepared"


def key(cfg, device: int, num_devices: int) -> str:
    """The cache key of device ``device`` of ``num_devices`` under run config ``cfg``."""
    parts = {"settings": {k: cfg[k] for k in KEYS}, "device": device, "devices": num_devices,
             "source": fingerprint(cfg.data.dataset, cfg.data.data_path), "code": code_digest(*CODE)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _prepare(cfg, device: int, num_devices: int) -> tuple[data_lib.DeviceData, ModelShape]:
    ds = data_lib.load_dataset(cfg)
    shape = ModelShape(ds.name, ds.input_shape, ds.num_classes, ds.tokens, ds.sequence)
    return data_lib.device_data(cfg, device, num_devices), shape


def _read(path: Path) -> tuple[data_lib.DeviceData, ModelShape]:
    with np.load(path, allow_pickle=False) as f:
        shape = json.loads(str(f["shape"]))
        local = data_lib.DeviceData(f["x_train"], f["y_train"], f["x_val"], f["y_val"])
    return local, ModelShape(shape["name"], tuple(shape["input_shape"]), shape["num_classes"],
                             shape["tokens"], shape["sequence"])


def _write(path: Path, local: data_lib.DeviceData, shape: ModelShape) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    shape_json = json.dumps({"name": shape.name, "input_shape": list(shape.input_shape),
                             "num_classes": shape.num_classes, "tokens": shape.tokens, "sequence": shape.sequence})
    np.savez(tmp, x_train=local.x_train, y_train=local.y_train, x_val=local.x_val, y_val=local.y_val,
             shape=np.array(shape_json))
    os.replace(tmp, path)  # atomic: another process never reads half a file


def device_data(cfg, device: int, num_devices: int, directory: str | Path
                ) -> tuple[data_lib.DeviceData, ModelShape]:
    """Device ``device``'s data and the model shape, from the cache in ``directory`` or
    prepared (and stored there) the first time."""
    path = Path(directory).expanduser() / f"{key(cfg, device, num_devices)}.npz"
    if path.is_file():
        try:
            return _read(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # damaged: prepare it again
            pass
    local, shape = _prepare(cfg, device, num_devices)
    try:
        _write(path, local, shape)
    except OSError:  # a read-only or full disk costs speed, never the message
        pass
    return local, shape
