"""Devices that hold only their own data: one file per device, named by the node's config.

    flower-supernode ... --node-config "data-path='/data/me.npz' partition-id=3 num-partitions=20"

The device loads that file alone, with no global dataset and no partitioning. The server keeps
its own public (teacher) and test data through the run config's ``dataset``/``data-path``.
A device file is an ``.npz`` with ``x_train``, ``y_train``, ``num_classes`` and optionally
``x_val``, ``y_val`` (else ``val-fraction`` of the training data becomes the validation
split), or a ``.csv`` of numeric feature columns and an integer label column
(``label-column``; the class count then comes from the node config's ``num-classes``), or a
folder or zip of images (``images.device_folder``: class sub-folders, decoded once and cached).
Features are used as they are: prepare them as the server prepares its data
(``fedsplitkd-split`` writes files exactly so, from the project's own loaders and partitioners).

    fedsplitkd-split --devices 20 --out devices/ --run-config "dataset='har' data-path='har.npz'"
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsplitkd.data.datasets import DATA_KEYS, DataError, DeviceData, device_data, load_dataset, local_split


@dataclass(frozen=True)
class ModelShape:
    """What the model zoo needs of a dataset to build the student and teacher (a ``Dataset``'s
    attributes of the same names), known on a device from its own file."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    tokens: bool = False
    sequence: bool = False


def _read(file: Path, label_column: str, num_classes: int | None) -> dict:
    if not file.exists():
        raise DataError(f"device data file '{file}' does not exist")
    if file.is_dir() or file.suffix == ".zip":  # the device's images, as a camera holds them
        from fedsplitkd.data.images import device_folder

        raw = dict(device_folder(file))
        if num_classes is not None:
            raw["num_classes"] = num_classes
        return raw
    if file.suffix == ".csv":
        import pandas as pd

        frame = pd.read_csv(file)
        if label_column not in frame.columns:
            raise DataError(f"device data file '{file}' has no label column '{label_column}'")
        if num_classes is None:
            raise DataError(f"device data file '{file}': a CSV carries no class count; give the node "
                            "config 'num-classes'")
        return {"x_train": frame.drop(columns=[label_column]).to_numpy(np.float32),
                "y_train": frame[label_column].to_numpy(), "num_classes": num_classes}
    try:
        with np.load(file, allow_pickle=False) as arrays:
            raw = {k: arrays[k] for k in arrays.files}
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same error to the user
        raise DataError(f"device data file '{file}' is not a readable .npz: {type(err).__name__}") from None
    if num_classes is not None:
        raw["num_classes"] = num_classes
    return raw


@functools.lru_cache(maxsize=16)
def load(path: str, label_column: str, num_classes: int | None, val_fraction: float, seed: int,
         device: int, mtime: float | str = 0.0) -> tuple[DeviceData, ModelShape]:
    """A device's data and the model shape, from its file alone (cached per file version)."""
    file = Path(path).expanduser()
    raw = _read(file, label_column, num_classes)
    missing = [k for k in ("x_train", "y_train", "num_classes") if k not in raw]
    if missing:
        raise DataError(f"device data file '{file}': missing field {missing[0]!r}")
    x, y = np.asarray(raw["x_train"]), np.asarray(raw["y_train"])
    classes = int(np.asarray(raw["num_classes"]))
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or not len(y):
        raise DataError(f"device data file '{file}': x_train {x.shape} and y_train {y.shape} must be "
                        "(N, ...) and (N,) with N > 0")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= classes:
        raise DataError(f"device data file '{file}': y_train must be integer classes in [0, {classes})")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise DataError(f"device data file '{file}': x_train must be finite numbers")
    x, y = x.astype(np.float32), y.astype(np.int64)
    if "x_val" in raw and "y_val" in raw:
        data = DeviceData(x, y, np.asarray(raw["x_val"], np.float32), np.asarray(raw["y_val"], np.int64))
    else:
        train, val = local_split(np.arange(len(y)), val_fraction, seed, device)
        data = DeviceData(x[train], y[train], x[val], y[val])
    return data, ModelShape(str(raw.get("dataset", "own")), tuple(x.shape[1:]), classes)


def device_file(node_config, cfg, device: int) -> tuple[DeviceData, ModelShape]:
    """The data of the device whose node config names ``data-path``."""
    path = str(node_config["data-path"])
    file = Path(path).expanduser()
    if file.is_dir():
        from fedsplitkd.data.images import folder_version

        mtime = folder_version(file)  # a folder's version: its files' names, sizes and times
    else:
        mtime = file.stat().st_mtime if file.is_file() else 0.0
    classes = node_config.get("num-classes")
    return load(path, cfg.data.label_column, None if classes is None else int(classes), cfg.data.val_fraction,
                cfg.train.seed, device, mtime)


def write_device_files(cfg, devices: int, out: Path, images: bool = False) -> list[Path]:
    """One ``.npz`` per device (``images``: a folder of PNG files per device): exactly the data the
    run config gives device i of ``devices`` (the same loaders, public split, partitioner and
    validation split)."""
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(cfg)
    if dataset.sequence or dataset.tokens:
        raise DataError(f"dataset '{dataset.name}': device files hold classification features, not token windows")
    if images and len(dataset.input_shape) != 3:
        raise DataError(f"dataset '{dataset.name}': its samples {dataset.input_shape} are not images (C, H, W)")
    files = []
    for i in range(devices):
        local = device_data(cfg, i, devices)
        if images:
            from fedsplitkd.data.images import write_device_folder

            files.append(write_device_folder(out / f"device-{i}", {
                "train": (local.x_train, local.y_train), "validation": (local.x_val, local.y_val)},
                dataset.num_classes))
            continue
        files.append(out / f"device-{i}.npz")
        np.savez(files[-1], x_train=local.x_train, y_train=local.y_train, x_val=local.x_val, y_val=local.y_val,
                 num_classes=dataset.num_classes, dataset=dataset.name)
    return files


def main(argv: list[str] | None = None) -> None:
    from fedsplitkd.config import resolve
    from fedsplitkd.tools.deployment import parse_run_config

    parser = argparse.ArgumentParser(prog="fedsplitkd-split", description="Split a dataset into one file per "
                                     "device, with the project's loaders and partitioners")
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", required=True, help="directory for device-<i>.npz")
    parser.add_argument("--run-config", default="", help="run-config keys, as for flwr run (" +
                        ", ".join(DATA_KEYS + ("val-fraction",)) + ")")
    parser.add_argument("--images", action="store_true", help="a folder of PNG files per device "
                        "(train/<label>/, validation/<label>/, classes.txt) instead of an .npz")
    args = parser.parse_args(argv)
    cfg = resolve(parse_run_config(args.run_config))
    files = write_device_files(cfg, args.devices, Path(args.out), args.images)
    name = "device-<i>" if args.images else "device-<i>.npz"
    print(f"{len(files)} device {'folders' if args.images else 'files'} in {args.out}: give SuperNode i --node-config "
          f"\"data-path='{Path(args.out).resolve() / name}' partition-id=i num-partitions={args.devices}\"")


if __name__ == "__main__":
    main()
