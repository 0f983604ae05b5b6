"""Images as camera devices hold them: a folder (or a zip) of class sub-folders of PNG/JPEG files,
and CIFAR-10 from its original release.

Folders are read by Hugging Face ``datasets``' image-folder loader (the one flwr-datasets
wraps): ``train/<class>/*`` and ``test/<class>/*`` become the two splits; a folder of class
sub-folders alone gets a fixed 20 % test split. A zip is unpacked once into the cache. Every
image becomes float32 (C, H, W) in [0, 1]; the decoded arrays are kept in the prepared-data
cache (``datasets._load``), so no process decodes a file twice.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from fedsplitkd import streams
from fedsplitkd.data.sources import DataError, Source, cache_dir, fetch, sha256_of

# The original release (Krizhevsky 2009); its publisher gives an md5, which we check as well.
CIFAR10 = Source("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", None, "cifar-10-python.tar.gz",
                 md5="c58f30108f718f92721af3b95e74349a")
TEST_FRACTION = 0.2  # of a folder that has no test/ sub-folder


def cifar10(path: str) -> dict:
    """CIFAR-10: ``path`` a folder or zip of images (``train/<class>``, ``test/<class>``), the
    original ``cifar-10-python.tar.gz``, or '' to download that (checksum-checked, cached)."""
    where = Path(path).expanduser() if path else fetch(CIFAR10)
    if where.is_file() and where.name.endswith((".tar.gz", ".tgz")):
        return _cifar_tarball(where)
    return image_folder(str(where))


def _cifar_tarball(path: Path) -> dict:
    """The python release: pickled batches of uint8 rows (3072 = 3 x 32 x 32, channel-major)."""
    out: dict[str, list] = {"x_train": [], "y_train": [], "x_test": [], "y_test": []}
    try:
        with tarfile.open(path) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                name = Path(member.name).name
                split = "train" if name.startswith("data_batch") else "test" if name == "test_batch" else None
                if split:
                    batch = pickle.load(tar.extractfile(member), encoding="latin1")
                    out[f"x_{split}"].append(np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32))
                    out[f"y_{split}"].append(np.asarray(batch["labels"], np.int64))
    except (tarfile.TarError, pickle.UnpicklingError, KeyError, EOFError) as err:
        raise DataError(f"'{path}' is not the CIFAR-10 python release: {err}") from err
    if not out["x_train"] or not out["x_test"]:
        raise DataError(f"'{path}' holds no CIFAR-10 data_batch_* / test_batch")
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    for split in ("train", "test"):
        arrays[f"x_{split}"] = arrays[f"x_{split}"].astype(np.float32) / 255.0
    return {**arrays, "num_classes": 10}


def unpacked(archive: Path) -> Path:
    """A zip's contents, unpacked once into the cache (keyed by the zip's sha256)."""
    target = cache_dir() / "images" / sha256_of(archive)[:20]
    if target.is_dir():
        return target
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
    except zipfile.BadZipFile as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"data-path '{archive}': not a zip file ({err})") from err
    try:
        os.replace(tmp, target)  # atomic; another process may have unpacked it first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _root(where: Path) -> Path:
    """The folder holding train/ (and test/) or the class folders: single wrapping folders skipped."""
    while not (where / "train").is_dir():
        entries = [p for p in where.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        if len(entries) != 1 or not entries[0].is_dir():
            break
        where = entries[0]
    return where


def image_folder(path: str) -> dict:
    """Arrays from a folder or zip of class sub-folders (any size, gray or colour; one size a set)."""
    where = Path(path).expanduser()
    if not where.exists():
        raise DataError(f"data-path '{where}': no such folder or zip of images")
    root = _root(unpacked(where) if where.is_file() else where)
    import datasets

    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_dataset("imagefolder", data_dir=str(root),
                                       cache_dir=str(cache_dir() / "hf-imagefolder"))
    except (ValueError, FileNotFoundError) as err:
        raise DataError(f"data-path '{where}': no images in class sub-folders ({err})") from err
    train = loaded["train"]
    names = train.features["label"].names if "label" in train.features else []
    if len(names) < 2:
        raise DataError(f"data-path '{where}': images must sit in at least two class sub-folders "
                        f"(train/<class>/*.png or <class>/*.jpg); found classes {names}")
    x, y = _arrays(train, where)
    if "test" in loaded:
        x_test, y_test = _arrays(loaded["test"], where)
    else:  # a fixed split: the test set must not move with the run seed
        order = streams.csv_test_split().permutation(len(y))
        cut = int((1 - TEST_FRACTION) * len(y))
        x, y, x_test, y_test = x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
    if x.shape[1:] != x_test.shape[1:]:
        raise DataError(f"data-path '{where}': training images are {x.shape[1:]}, test images {x_test.shape[1:]}")
    return {"x_train": x, "y_train": y, "x_test": x_test, "y_test": y_test, "num_classes": len(names)}


def _arrays(split, where: Path) -> tuple[np.ndarray, np.ndarray]:
    """float32 (N, C, H, W) in [0, 1] and int64 labels; gray stays one channel, all else is RGB."""
    decoded = list(split["image"])  # the column is lazy: each pass over it decodes every file again
    gray = all(img.mode in ("L", "1", "I;16", "I") for img in decoded)
    pixels = [np.asarray(img.convert("L" if gray else "RGB")) for img in decoded]
    sizes = {p.shape for p in pixels}
    if len(sizes) > 1:
        raise DataError(f"data-path '{where}': images of {len(sizes)} sizes ({sorted(sizes)[:3]}...): "
                        "resize them to one size first")
    x = np.stack(pixels).astype(np.float32) / 255.0
    x = x[:, None] if gray else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), np.asarray(split["label"], dtype=np.int64)

