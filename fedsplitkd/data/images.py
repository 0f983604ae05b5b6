"""Images as camera devices hold them: a folder (or a zip) of class sub-folders of PNG/JPEG files,
and CIFAR-10 from its original release.

Folders are read by Hugging Face ``datasets``' image-folder loader (the one flwr-datasets
wraps): ``train/<class>/*`` and ``test/<class>/*`` become the two splits; a folder of class
sub-folders alone gets a fixed 20 % test split. A zip is unpacked once into the cache. Every
image becomes float32 (C, H, W) in [0, 1]; the decoded arrays are kept in the prepared-data
cache (``datasets._load``), so no process decodes a file twice.
"""

from __future__ import annotations

import hashlib
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
    return _pixels(split, where), np.asarray(split["label"], dtype=np.int64)


def _pixels(split, where: Path) -> np.ndarray:
    decoded = list(split["image"])  # the column is lazy: each pass over it decodes every file again
    gray = all(img.mode in ("L", "1", "I;16", "I") for img in decoded)
    pixels = [np.asarray(img.convert("L" if gray else "RGB")) for img in decoded]
    sizes = {p.shape for p in pixels}
    if len(sizes) > 1:
        raise DataError(f"data-path '{where}': images of {len(sizes)} sizes ({sorted(sizes)[:3]}...): "
                        "resize them to one size first")
    x = np.stack(pixels).astype(np.float32) / 255.0
    x = x[:, None] if gray else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


CLASS_LIST = "classes.txt"  # a device folder's class names, one a line, in label order


def folder_version(where: Path) -> str:
    """What identifies a folder's contents for the cache: every file's path, size and mtime."""
    h = hashlib.sha256()
    for file in sorted(p for p in where.rglob("*") if p.is_file()):
        stat = file.stat()
        h.update(f"{file.relative_to(where)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def device_folder(path: Path) -> dict:
    """One device's images: a folder or zip of ``train/<class>/*`` (and optionally ``validation/``)
    or of ``<class>/*`` alone. A device holds a few of the classes, so a folder's name says which
    label it is: its line in ``classes.txt`` (``fedsplitkd-split`` writes one), else the folder
    name is the label itself (``0``, ``1``, ...). Decoded once; later messages read the cache."""
    root = _root(unpacked(path) if path.is_file() else path)
    cached = cache_dir() / "device-images" / f"{folder_version(root)}.npz"
    if cached.is_file():
        with np.load(cached, allow_pickle=False) as arrays:
            return {k: arrays[k] for k in arrays.files}
    names = (root / CLASS_LIST).read_text().split() if (root / CLASS_LIST).is_file() else None
    import datasets

    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(cache_dir() / "hf-imagefolder"))
    except (ValueError, FileNotFoundError) as err:
        raise DataError(f"device data folder '{path}': no images in class sub-folders ({err})") from err
    raw: dict = {}
    for split, prefix in (("train", "train"), ("validation", "val")):
        if split not in loaded:
            continue
        data = loaded[split]
        if "label" in data.features:
            x, local = _arrays(data, path)
            folders = data.features["label"].names
        else:  # one class folder: the loader infers no labels
            x = _pixels(data, path)
            local = np.zeros(len(x), np.int64)
            folders = [d.name for d in (root / split if (root / split).is_dir() else root).iterdir() if d.is_dir()]
        # files numbered 000000.png ... (fedsplitkd-split's) come back in that order, not class by class
        stems = [Path(f["path"]).stem for f in data.cast_column("image", datasets.Image(decode=False))["image"]]
        order = np.argsort([int(t) for t in stems], kind="stable") if all(t.isdigit() for t in stems) \
            else np.arange(len(x))
        raw[f"x_{prefix}"], raw[f"y_{prefix}"] = x[order], _labels(folders, local, names, path)[order]
    if "x_train" not in raw:
        raise DataError(f"device data folder '{path}': no train/ images")
    raw["num_classes"] = np.int64(len(names) if names else int(raw["y_train"].max()) + 1)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **raw)
    os.replace(tmp, cached)
    return raw


def _labels(folders: list[str], local: np.ndarray, names: list[str] | None, path: Path) -> np.ndarray:
    """The run's labels of a device's images, from their class folders' names."""
    if names is not None:
        unknown = [f for f in folders if f not in names]
        if unknown:
            raise DataError(f"device data folder '{path}': class folder {unknown[0]!r} is not in its {CLASS_LIST}")
        table = [names.index(f) for f in folders]
    else:
        if not all(f.isdigit() for f in folders):
            raise DataError(f"device data folder '{path}': class folders {folders[:3]} need a {CLASS_LIST} "
                            "(one class name a line, in label order) or names that are the labels (0, 1, ...)")
        table = [int(f) for f in folders]
    return np.asarray(table, np.int64)[local]


def write_device_folder(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int) -> Path:
    """A device's images as PNG files (lossless for 8-bit pixels): ``<split>/<label>/<n>.png`` and
    ``classes.txt``; ``splits`` maps 'train'/'validation' to float (N, C, H, W) in [0, 1] and labels."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    (out / CLASS_LIST).write_text("".join(f"{c}\n" for c in range(num_classes)))
    for split, (x, y) in splits.items():
        pixels = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
        for n, (image, label) in enumerate(zip(pixels, y)):
            folder = out / split / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            img = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            Image.fromarray(img, "L" if image.shape[0] == 1 else "RGB").save(folder / f"{n:06d}.png")
    return out
