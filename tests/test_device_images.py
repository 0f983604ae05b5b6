"""Devices that hold their own images: a folder (or zip) per device, written by fedsplitkd-split."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fedsplitkd.config import resolve
from fedsplitkd.data import own_data
from fedsplitkd.data.datasets import device_data, local_split
from fedsplitkd.data.sources import DataError
from test_images import write_folder


@pytest.fixture
def source(tmp_path):
    write_folder(tmp_path / "src", sizes=(24, 6))
    return resolve({"dataset": "images", "data-path": str(tmp_path / "src"), "public-fraction": 0.1,
                    "partition": "iid"})


def test_split_writes_image_folders_that_devices_read_as_the_run_gives_them(source, tmp_path, monkeypatch):
    folders = own_data.write_device_files(source, 2, tmp_path / "devices", images=True)
    assert [f.name for f in folders] == ["device-0", "device-1"]
    assert (folders[0] / "classes.txt").read_text().split() == ["0", "1", "2"]
    for i, folder in enumerate(folders):
        local, shape = own_data.device_file({"data-path": str(folder)}, source, i)
        expected = device_data(source, i, 2)
        assert shape.input_shape == (3, 12, 12) and shape.num_classes == 3
        for name in ("x_train", "y_train", "x_val", "y_val"):  # PNG keeps 8-bit pixels exactly
            np.testing.assert_array_equal(getattr(local, name), getattr(expected, name), err_msg=name)
    # decoded once: a fresh process (the cache in memory cleared) reads the arrays back from disk
    own_data.load.cache_clear()
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("decoded the images again"))
    again, _ = own_data.device_file({"data-path": str(folders[1])}, source, 1)
    np.testing.assert_array_equal(again.x_train, device_data(source, 1, 2).x_train)


def test_a_zipped_device_folder_and_labels_from_folder_names(source, tmp_path):
    folder = own_data.write_device_files(source, 1, tmp_path / "devices", images=True)[0]
    (folder / "classes.txt").unlink()  # folder names that are labels need no class list
    archive = shutil.make_archive(str(tmp_path / "device-0"), "zip", folder)
    local, shape = own_data.device_file({"data-path": archive, "num-classes": 3}, source, 0)
    np.testing.assert_array_equal(local.y_train, device_data(source, 0, 1).y_train)
    assert shape.num_classes == 3


def test_class_folders_without_a_class_list_are_refused(tmp_path):
    write_folder(tmp_path / "dev", sizes=(4,), splits=("train",))  # folders class0, class1, class2
    cfg = resolve({})
    with pytest.raises(DataError, match="dev.*need a classes.txt"):
        own_data.device_file({"data-path": str(tmp_path / "dev")}, cfg, 0)
    (tmp_path / "dev" / "classes.txt").write_text("class0\nclass2\n")
    with pytest.raises(DataError, match="class folder 'class1' is not in its classes.txt"):
        own_data.device_file({"data-path": str(tmp_path / "dev")}, cfg, 0)


def test_a_device_holding_one_class(tmp_path):
    """One class folder: the loader infers no labels; the folder's name still says which."""
    from fedsplitkd.data.images import write_device_folder

    x = np.random.default_rng(0).integers(0, 256, (5, 3, 6, 6)).astype(np.float32) / 255
    folder = write_device_folder(tmp_path / "dev", {"train": (x, np.full(5, 2))}, 4)
    local, shape = own_data.device_file({"data-path": str(folder)}, resolve({"val-fraction": 0.0}), 0)
    assert shape.num_classes == 4 and (local.y_train == 2).all() and len(local.y_train) == 5
    train, _ = local_split(np.arange(5), 0.0, 0, 0)  # the device's own split of a file without validation/
    np.testing.assert_array_equal(local.x_train, x[train])
