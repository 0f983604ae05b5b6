"""Where datasets come from: bundled, downloaded (checksum + cache), the Hugging Face hub
through flwr-datasets, or the user's own .npz / .csv files.

Every loader returns arrays: features (N, ...) and int64 labels, a fixed test split, and,
where the data has one, a natural id per training sample (speaking role, subject, writer).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from fedsplitkd import streams


class DataError(ValueError):
    """A dataset file or partition request is unusable; the message says why."""


@dataclass(frozen=True)
class Source:
    """A downloadable file: its address and, where the publisher's bytes are fixed, sha256."""

    url: str
    sha256: str | None
    filename: str
    md5: str | None = None  # where the publisher gives only an md5, checked besides the sha256 pin


SHAKESPEARE = Source(
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", "tiny_shakespeare.txt")
# UCI publishes no checksum for this archive: the first download is pinned (its sha256 is
# stored beside it) and every later load of the cached copy is verified against that pin.
UCI_HAR = Source("https://archive.ics.uci.edu/static/public/240/human+activity+recognition+using+smartphones.zip",
                 None, "uci_har.zip")

HUB = {  # run-config name -> (hub dataset, image column, label column, natural-id column)
    "fashion_mnist": ("zalando-datasets/fashion_mnist", "image", "label", None),
    "femnist": ("flwrlabs/femnist", "image", "character", "writer_id"),
}


def cache_root() -> Path:
    """Where fedsplitkd caches (downloads, teachers, prepared device data): $FEDSPLITKD_CACHE or ~/.cache/fedsplitkd."""
    return Path(os.environ.get("FEDSPLITKD_CACHE", Path.home() / ".cache" / "fedsplitkd"))


def cache_dir() -> Path:
    return cache_root() / "data"


BUNDLED = {"digits": "scikit-learn"}  # datasets shipped inside a package: its version names them


def fingerprint(name: str, path: str) -> str:
    """What identifies the data of dataset ``name`` at ``path``: a file's sha256; a
    directory's file names, sizes and times; the version of the package that bundles it;
    else the name (downloads are pinned by checksum, so their name names their content)."""
    where = Path(str(path)).expanduser() if path else None
    if where is not None and where.is_file():
        stat = where.stat()
        return _file_digest(str(where.resolve()), stat.st_size, stat.st_mtime_ns)
    if where is not None and where.is_dir():
        files = sorted(p for p in where.rglob("*") if p.is_file())
        return json.dumps([(str(p.relative_to(where)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    package = BUNDLED.get(name)
    return f"{package} {metadata.version(package)}" if package else name


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """A data file's sha256, once per process and version of the file (the dataset cache and
    every device's prepared-data key ask for it)."""
    return sha256_of(Path(path))


def code_digest(*names: str) -> str:
    """The sha256 of our modules ``names`` (paths under the package, e.g. 'data/sources.py'): cache
    keys change with the code."""
    here = Path(__file__).parents[1]
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in names)).hexdigest()


def sha256_of(path: Path) -> str:
    return file_digest(path, "sha256")


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(source: Source, directory: Path | None = None) -> Path:
    """The cached copy of ``source``, downloading and verifying it first if needed."""
    directory = directory or cache_dir()
    path = directory / source.filename
    pin = path.with_name(path.name + ".sha256")
    expected = source.sha256 or (pin.read_text().strip() if pin.is_file() else None)
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.part{os.getpid()}")
        try:
            with urllib.request.urlopen(source.url, timeout=60) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise DataError(f"could not download {source.url}: {err}; download it by hand and "
                            "set data-path to the file") from err
        got = sha256_of(tmp)
        if expected and got != expected:
            tmp.unlink()
            raise DataError(f"download of {source.url} has sha256 {got}, expected {expected}")
        md5 = file_digest(tmp, "md5") if source.md5 else None
        if md5 != source.md5:
            tmp.unlink()
            raise DataError(f"download of {source.url} has md5 {md5}, expected {source.md5}")
        os.replace(tmp, path)
        if not source.sha256:
            pin.write_text(got + "\n")
        return path
    got = sha256_of(path)
    if expected and got != expected:
        raise DataError(f"cached file {path} has sha256 {got}, expected {expected}: delete it to "
                        "download again")
    return path


# ---- bundled ------------------------------------------------------------------------------
def digits() -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    # A fixed split: the test set must not move with the run seed.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)


# ---- the user's own files ------------------------------------------------------------------
def npz(path: str) -> dict:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"no file at '{file}' (data-path must name an .npz with x_train, y_train, "
                        "x_test, y_test)")
    with np.load(file, allow_pickle=False) as arrays:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
        if missing:
            raise DataError(f"dataset file '{file}': missing arrays {missing}")
        out = {k: arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        if "ids_train" in arrays:
            out["ids_train"] = arrays["ids_train"]
    return out


def csv(path: str, label_column: str) -> dict:
    """``train.csv`` and ``test.csv`` in a directory, or one CSV (a fixed 20 % becomes the test split)."""
    import pandas as pd

    where = Path(path).expanduser()
    files = [where / "train.csv", where / "test.csv"] if where.is_dir() else [where]
    for file in files:
        if not file.is_file():
            raise DataError(f"no file at '{file}' (data-path must name a CSV file, or a directory "
                            "with train.csv and test.csv)")
    frames = [pd.read_csv(f) for f in files]
    for file, frame in zip(files, frames):
        if label_column not in frame.columns:
            raise DataError(f"'{file}' has no label column '{label_column}' (columns: "
                            f"{list(frame.columns)[:10]}); set label-column")
        bad = [c for c in frame.columns if c != label_column and not pd.api.types.is_numeric_dtype(frame[c])]
        if bad:
            raise DataError(f"'{file}': feature columns must be numeric, not {bad[:5]}")
    if len(frames) == 1:
        order = streams.csv_test_split().permutation(len(frames[0]))
        cut = int(0.8 * len(order))
        frames = [frames[0].iloc[order[:cut]], frames[0].iloc[order[cut:]]]
    labels = sorted(set(frames[0][label_column]) | set(frames[1][label_column]), key=str)
    code = {v: i for i, v in enumerate(labels)}  # any label values -> 0..K-1
    out = {}
    for split, frame in zip(("train", "test"), frames):
        out[f"x_{split}"] = frame.drop(columns=[label_column]).to_numpy(np.float32)
        out[f"y_{split}"] = frame[label_column].map(code).to_numpy(np.int64)
    return out


# ---- UCI HAR -------------------------------------------------------------------------------
HAR_SIGNALS = [f"{kind}_{axis}" for kind in ("body_acc", "body_gyro", "total_acc") for axis in "xyz"]


def har(path: str) -> dict:
    """UCI HAR raw inertial windows (9 x 128, 6 activities; subject ids as natural ids).

    ``path`` is an .npz (x_train, y_train, x_test, y_test), the UCI archive, or its
    unpacked "UCI HAR Dataset" directory; '' downloads the archive into the cache.
    """
    if path.endswith(".npz"):
        return npz(path)
    root = Path(path).expanduser() if path else fetch(UCI_HAR)
    if not root.exists():
        raise DataError(f"no UCI HAR data at '{root}': give the .npz, the UCI zip or the "
                        "'UCI HAR Dataset' directory, or '' to download it")
    if root.is_dir():
        read = lambda name: (root / name).read_bytes()  # noqa: E731
    else:
        archive = zipfile.ZipFile(root)
        names = archive.namelist()
        inner = [n for n in names if n.endswith("UCI HAR Dataset.zip")]
        if inner:  # the UCI download wraps the dataset's own zip
            archive = zipfile.ZipFile(io.BytesIO(archive.read(inner[0])))
            names = archive.namelist()
        prefix = next((n.split("train/")[0] for n in names if n.endswith("train/y_train.txt")), None)
        if prefix is None:
            raise DataError(f"'{root}' holds no UCI HAR train/y_train.txt")
        read = lambda name: archive.read(prefix + name)  # noqa: E731
    out = {}
    for split in ("train", "test"):
        try:
            signals = [np.loadtxt(io.BytesIO(read(f"{split}/Inertial Signals/{s}_{split}.txt")), dtype=np.float32)
                       for s in HAR_SIGNALS]
            labels = np.loadtxt(io.BytesIO(read(f"{split}/y_{split}.txt")), dtype=np.int64) - 1
            subjects = np.loadtxt(io.BytesIO(read(f"{split}/subject_{split}.txt")), dtype=np.int64)
        except (KeyError, FileNotFoundError) as err:
            raise DataError(f"UCI HAR data at '{root}' lacks a file: {err}") from err
        out[f"x_{split}"], out[f"y_{split}"] = np.stack(signals, axis=1), labels
        if split == "train":
            out["ids_train"] = subjects
    return out


# ---- Tiny Shakespeare, by speaking role ----------------------------------------------------
def speeches(text: str) -> list[tuple[str, str]]:
    """(role, speech) pairs. A speech is a block of non-blank lines whose first line is the
    speaker's name followed by ':' (at most 40 characters); other blocks are skipped."""
    pairs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").splitlines()
        if len(lines) >= 2 and lines[0].endswith(":") and 0 < len(lines[0]) <= 41:
            pairs.append((lines[0][:-1].strip(), "\n".join(lines[1:])))
    return pairs


class CharTokenizer:
    """Characters <-> int64 ids over a fixed vocabulary (sorted characters of the text)."""

    def __init__(self, vocab: str):
        if not vocab or len(set(vocab)) != len(vocab):
            raise DataError("a character vocabulary must be non-empty, without repeats")
        self.vocab = vocab
        self._code = {c: i for i, c in enumerate(vocab)}

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        try:
            return np.fromiter((self._code[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError as err:
            raise DataError(f"character {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def to_json(self) -> dict:
        return {"kind": "char", "vocab": self.vocab}


MIN_ROLE_LINES = 20  # roles speaking fewer lines share one natural id (the LM task)
MINOR_ROLES = "(minor roles)"


def merge_minor_roles(by_role: dict[str, list[str]], min_lines: int) -> dict[str, list[str]]:
    """Roles with fewer than ``min_lines`` lines of speech, pooled into one role (in name order):
    a device then never holds a role too small to give a training and a test window."""
    merged: dict[str, list[str]] = {}
    for role in sorted(by_role):
        lines = sum(s.count("\n") + 1 for s in by_role[role])
        merged.setdefault(role if lines >= min_lines else MINOR_ROLES, []).extend(by_role[role])
    return merged


def shakespeare(path: str, seq_len: int, stride: int, test_fraction: float = 0.1,
                sequence: bool = False) -> dict:
    """Next-character prediction; each role's speeches are one natural id (LEAF-style).

    Windows of ``seq_len`` characters every ``stride`` characters of a role's text; the
    label is the character after the window, or, with ``sequence`` (language modelling),
    the window shifted by one: a next character per position, and roles with fewer than
    MIN_ROLE_LINES lines are pooled into one id. The last ``test_fraction`` of every
    role's windows is the test split.
    """
    file = Path(path).expanduser() if path else fetch(SHAKESPEARE)
    if not file.is_file():
        raise DataError(f"no file at '{file}': data-path must name the Tiny Shakespeare text, or "
                        "be '' to download it")
    text = file.read_text(encoding="utf-8")
    tokenizer = CharTokenizer.fit(text)
    by_role: dict[str, list[str]] = {}
    for role, speech in speeches(text):
        by_role.setdefault(role, []).append(speech)
    if not by_role:
        raise DataError(f"'{file}' has no 'NAME:' speaker lines: is it Tiny Shakespeare?")
    if sequence:
        by_role = merge_minor_roles(by_role, MIN_ROLE_LINES)
    parts = {k: [] for k in ("x_train", "y_train", "ids_train", "x_test", "y_test")}
    for role_id, role in enumerate(sorted(by_role)):
        ids = tokenizer.encode("\n\n".join(by_role[role]))
        starts = np.arange(0, len(ids) - seq_len, stride)
        if not len(starts):
            continue
        x = np.stack([ids[s:s + seq_len] for s in starts])
        y = np.stack([ids[s + 1:s + seq_len + 1] for s in starts]) if sequence else ids[starts + seq_len]
        n_test = int(len(starts) * test_fraction)
        cut = len(starts) - n_test
        parts["x_train"].append(x[:cut]); parts["y_train"].append(y[:cut])
        parts["ids_train"].append(np.full(cut, role_id))
        parts["x_test"].append(x[cut:]); parts["y_test"].append(y[cut:])
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["num_classes"] = len(tokenizer)
    out["vocab"] = tokenizer.vocab
    return out


# ---- the Hugging Face hub, through flwr-datasets -------------------------------------------
def images_to_arrays(split, image_column: str, label_column: str, id_column: str | None = None) -> dict:
    """A ``datasets.Dataset`` of PIL images -> float32 (N, C, H, W) in [0, 1] and int64 labels."""
    images = [np.asarray(img, dtype=np.float32) / 255.0 for img in split[image_column]]
    x = np.stack([img[None] if img.ndim == 2 else img.transpose(2, 0, 1) for img in images])
    out = {"x": x, "y": np.asarray(split[label_column], dtype=np.int64)}
    if id_column:
        ids = np.asarray(split[id_column])
        out["ids"] = np.unique(ids, return_inverse=True)[1].astype(np.int64)
    return out


def hub(name: str) -> dict:
    """cifar10, fashion_mnist, femnist through flwr-datasets' FederatedDataset (needs the internet
    the first time; the hub's cache serves later runs). femnist has no test split: a fixed
    10 % of it is held out."""
    from flwr_datasets import FederatedDataset

    hub_name, image_column, label_column, id_column = HUB[name]
    fds = FederatedDataset(dataset=hub_name, partitioners={"train": 1})
    try:
        train = fds.load_split("train")
    except (OSError, ConnectionError) as err:
        raise DataError(f"could not load '{hub_name}' from the Hugging Face hub: {err}") from err
    try:
        test = fds.load_split("test")
    except ValueError:  # no test split on the hub
        test = None
    if test is None:
        halves = train.train_test_split(test_size=0.1, seed=0)
        train, test = halves["train"], halves["test"]
    tr = images_to_arrays(train, image_column, label_column, id_column)
    te = images_to_arrays(test, image_column, label_column)
    out = {"x_train": tr["x"], "y_train": tr["y"], "x_test": te["x"], "y_test": te["y"]}
    if "ids" in tr:
        out["ids_train"] = tr["ids"]
    return out
