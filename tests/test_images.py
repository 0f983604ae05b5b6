"""Image folders (directory or zip), CIFAR-10's release, the CIFAR ResNets' published checkpoints, LeNet-5."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATASETS
from fedsplitkd.config import resolve
from fedsplitkd.data import images
from fedsplitkd.data.datasets import load_dataset
from fedsplitkd.data.sources import DataError
from fedsplitkd.models.resnet import cifar_resnet, lenet, load_checkpoint
from fedsplitkd.models.zoo import student_for, teacher_for

SHARED_MODELS = SHARED_DATASETS.parent / "models" / "cifar-resnet"
CIFAR_ZIP = SHARED_DATASETS / "cifar10-jpeg.zip"
RESNET56 = SHARED_MODELS / "resnet56-4bfd9763.th"
needs_cifar = pytest.mark.skipif(not (CIFAR_ZIP.is_file() and RESNET56.is_file()),
                                 reason="../shared has no CIFAR-10 zip or ResNet checkpoint")


def write_folder(root: Path, sizes=(10, 4), shape=(12, 12), mode="RGB", fmt="png", splits=("train", "test")):
    """Class sub-folders of images whose mean brightness encodes the class."""
    rng = np.random.default_rng(0)
    for split, count in zip(splits, sizes):
        for label in range(3):
            folder = root / split / f"class{label}" if split else root / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                channels = 3 if mode == "RGB" else 1
                pixels = np.clip(rng.normal(60 + 60 * label, 10, (*shape, channels)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(folder / f"{i}.{fmt}")


def test_image_folder_directory_png_and_jpeg(tmp_path):
    write_folder(tmp_path / "png")
    ds = load_dataset(resolve({"dataset": "images", "data-path": str(tmp_path / "png")}))
    assert ds.input_shape == (3, 12, 12) and ds.num_classes == 3
    assert len(ds.y_train) == 30 and len(ds.y_test) == 12
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    # the brightness encodes the class, so the labels follow the folder names
    means = [ds.x_train[ds.y_train == c].mean() for c in range(3)]
    assert means == sorted(means)
    write_folder(tmp_path / "gray", mode="L", fmt="jpg", shape=(9, 7))
    gray = load_dataset(resolve({"dataset": "images", "data-path": str(tmp_path / "gray")}))
    assert gray.input_shape == (1, 9, 7)


def test_image_folder_zip_and_single_split(tmp_path):
    write_folder(tmp_path / "flat", sizes=(10,), splits=("",))
    archive = tmp_path / "flat.zip"
    with zipfile.ZipFile(archive, "w") as z:  # a wrapping folder, as zips of folders usually have
        for file in (tmp_path / "flat").rglob("*.png"):
            z.write(file, "wrapper/" + str(file.relative_to(tmp_path / "flat")))
    ds = load_dataset(resolve({"dataset": "images", "data-path": str(archive)}))
    assert len(ds.y_train) + len(ds.y_test) == 30 and len(ds.y_test) == 6  # a fixed 20 % test split
    assert sorted(set(ds.y_train.tolist())) == [0, 1, 2]


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_dataset(resolve({"dataset": "images", "data-path": str(tmp_path / "nothing")}))
    (tmp_path / "one" / "train" / "only").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "one" / "train" / "only" / "a.png")
    with pytest.raises(DataError, match="at least two class sub-folders"):
        load_dataset(resolve({"dataset": "images", "data-path": str(tmp_path / "one")}))
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a zip"):
        load_dataset(resolve({"dataset": "images", "data-path": str(tmp_path / "bad.zip")}))


def test_cifar_release_tarball(tmp_path):
    """The original python release: pickled uint8 rows, channel-major."""
    rng = np.random.default_rng(1)
    batches = {f"cifar-10-batches-py/data_batch_{i}": 4 for i in range(1, 6)}
    batches["cifar-10-batches-py/test_batch"] = 3
    archive = tmp_path / "cifar-10-python.tar.gz"
    first = None
    with tarfile.open(archive, "w:gz") as tar:
        for name, n in batches.items():
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            first = data if first is None else first
            blob = pickle.dumps({"data": data, "labels": list(range(n))})
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    ds = load_dataset(resolve({"dataset": "cifar10", "data-path": str(archive)}))
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(ds.x_train[0], first[0].reshape(3, 32, 32) / 255.0, rtol=1e-6)


def test_cifar_download_is_checked(tmp_path, monkeypatch):
    """No network here: the download path fetches from a local file URL and checks the md5."""
    from fedsplitkd.data import sources

    fake = tmp_path / "fake.tar.gz"
    fake.write_bytes(b"not cifar")
    monkeypatch.setattr(images, "CIFAR10", sources.Source(fake.as_uri(), None, "cifar.tar.gz", md5="0" * 32))
    monkeypatch.setenv("FEDSPLITKD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="md5"):
        images.cifar10("")
    assert not (tmp_path / "cache" / "data" / "cifar.tar.gz").exists()


def test_train_samples_is_a_fixed_subset(tmp_path):
    write_folder(tmp_path, sizes=(10, 4))
    cfg = {"dataset": "images", "data-path": str(tmp_path), "train-samples": 12}
    a, b = load_dataset(resolve(cfg)), load_dataset(resolve({**cfg, "seed": 5}))
    assert len(a.y_train) == 12 and len(a.y_test) == 12
    np.testing.assert_array_equal(a.x_train, b.x_train)


def test_lenet_is_the_image_student_and_cuts():
    model = lenet((3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == 62006
    assert model.cut_points == ["conv1", "conv2", "fc1", "fc2"]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    cfg = resolve({"dataset": "images"})

    class Images:
        name, input_shape, num_classes, tokens, sequence = "images", (1, 28, 28), 10, False, False

    assert student_for(cfg, Images).block_names[0] == "conv1"


def test_resnet_shapes_and_checkpoint_errors(tmp_path):
    model = cifar_resnet("resnet20", (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == 269722
    gray = cifar_resnet("resnet20", (1, 28, 28), 10)  # the teacher of a gray image set, trained here
    assert gray(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert model.block_names[0] == "stem" and model.block_names[-1] == "head"
    assert model.block_stats()[0].out_shape == (16, 32, 32)
    # our own state dict round-trips exactly
    torch.save(model.state_dict(), tmp_path / "own.pt")
    other = load_checkpoint(cifar_resnet("resnet20", (3, 32, 32), 10), tmp_path / "own.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(16, 3, 3, 3)}}, tmp_path / "short.th")
    with pytest.raises(DataError, match="short.th.*keys do not fit"):
        load_checkpoint(model, tmp_path / "short.th")
    torch.save(cifar_resnet("resnet20", (3, 32, 32), 5).state_dict(), tmp_path / "five.pt")
    with pytest.raises(DataError, match="five.pt.*head.linear.weight.*shape"):
        load_checkpoint(model, tmp_path / "five.pt")
    (tmp_path / "junk.th").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.th.*not a torch checkpoint"):
        load_checkpoint(model, tmp_path / "junk.th")


def cifar_sample(path: Path, train_count: int = 100, test_count: int = 200) -> Path:
    """A zip of random real CIFAR-10 JPEGs from the shared set (the files are sorted by class)."""
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        rng = np.random.default_rng(0)
        train = [n for n in names if "/train/" in n]
        test = [n for n in names if "/test/" in n]
        picked = [train[i] for i in rng.choice(len(train), train_count, replace=False)] + \
                 [test[i] for i in rng.choice(len(test), test_count, replace=False)]
        with zipfile.ZipFile(path, "w") as out:
            for name in picked:
                out.writestr(name, z.read(name))
    return path


@needs_cifar
def test_published_resnet56_on_real_cifar_images(tmp_path):
    """The shared checkpoint loads exactly and classifies 200 random JPEG test images as published
    (0.832 on all 10,000 here); the run's teacher is that ResNet-56, frozen."""
    cfg = resolve({"dataset": "cifar10", "data-path": str(cifar_sample(tmp_path / "cifar-small.zip")),
                   "teacher-path": str(RESNET56)})
    ds = load_dataset(cfg)
    assert ds.input_shape == (3, 32, 32) and len(ds.y_test) == 200
    from fedsplitkd.models.teacher import get_teacher

    teacher = get_teacher(cfg, ds, ds.x_train[:0], ds.y_train[:0])
    assert teacher.block_names[0] == "stem" and len(teacher.block_names) == 29
    from fedsplitkd.protocol.runtime import evaluate

    accuracy, _ = evaluate(teacher, ds.x_test, ds.y_test)
    assert accuracy >= 0.75
    assert student_for(cfg, ds).block_names[0] == "conv1"  # LeNet-5 for CIFAR-10


@needs_cifar
def test_teacher_cut_trades_device_compute_for_bytes(tmp_path):
    """A teacher cut after the first downsampling block: the same teacher logits (so the same round),
    half the stem's bytes a sample up (32 x 16 x 16 against 16 x 32 x 32 floats), more device FLOPs;
    a name that is not a block of the teacher is refused naming the key."""
    from fedsplitkd.config import ConfigError
    from fedsplitkd.run.experiment import run_inprocess

    base = {"dataset": "cifar10", "data-path": str(cifar_sample(tmp_path / "cifar.zip", 60, 40)),
            "teacher-path": str(RESNET56), "num-rounds": 1, "teacher-input": "embedding", "public-fraction": 0.1}
    rows = {cut: run_inprocess({**base, "teacher-cut": cut}, 2)[1][1] for cut in ("default", "layer2_0")}
    stem, deeper = rows["default"], rows["layer2_0"]
    assert deeper["train_loss"] == pytest.approx(stem["train_loss"], rel=1e-5)
    assert deeper["bytes_up_teacher"] * 2 == pytest.approx(stem["bytes_up_teacher"], rel=0.01)
    assert deeper["device_flops"] > stem["device_flops"] * 1.5
    with pytest.raises(ConfigError, match="teacher-cut 'layer9_0' is not a cut point of the teacher"):
        run_inprocess({**base, "teacher-cut": "layer9_0"}, 2)
