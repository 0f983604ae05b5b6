"""Loaders, downloads, partitions and bad input, all on local files."""

import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import HAR_NPZ, SHAKESPEARE, needs_shared
from fedsplitkd.data import sources
from fedsplitkd.config import resolve
from fedsplitkd.data.datasets import DataError, Partition, _load, device_data, group_ids, load_dataset, partition
from fedsplitkd.models.zoo import build_student, family_for


def cfg(**overrides):
    return resolve({k.replace("_", "-"): v for k, v in overrides.items()})


@pytest.fixture(autouse=True)
def fresh_loads():
    _load.cache_clear()
    yield
    _load.cache_clear()


# ---- loaders ---------------------------------------------------------------------------
def test_digits_is_a_fixed_image_split():
    ds = load_dataset(cfg())
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_test) == 1797 and not ds.tokens


@needs_shared
def test_har_subset_npz():
    ds = load_dataset(cfg(dataset="har", data_path=str(HAR_NPZ)))
    assert ds.x_train.shape == (2400, 9, 128) and ds.x_test.shape == (950, 9, 128)
    assert ds.num_classes == 6
    assert abs(float(ds.x_train.mean())) < 1e-3  # standardised with training statistics


def write_uci_har(root: Path, n_train=12, n_test=6) -> None:
    """The UCI layout: 'UCI HAR Dataset/{train,test}/Inertial Signals/<signal>_<split>.txt' etc."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        signals = root / "UCI HAR Dataset" / split / "Inertial Signals"
        signals.mkdir(parents=True)
        for name in sources.HAR_SIGNALS:
            np.savetxt(signals / f"{name}_{split}.txt", rng.normal(size=(n, 128)))
        np.savetxt(root / "UCI HAR Dataset" / split / f"y_{split}.txt", np.arange(n) % 6 + 1, fmt="%d")
        np.savetxt(root / "UCI HAR Dataset" / split / f"subject_{split}.txt", np.arange(n) % 3 + 1, fmt="%d")


@pytest.mark.parametrize("form", ["directory", "nested zip"])
def test_har_original_uci_layout(tmp_path, form):
    write_uci_har(tmp_path)
    path = tmp_path / "UCI HAR Dataset"
    if form == "nested zip":  # the UCI download wraps the dataset's own zip
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as z:
            for f in path.rglob("*.txt"):
                z.write(f, f.relative_to(tmp_path))
        path = tmp_path / "download.zip"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("UCI HAR Dataset.zip", inner.getvalue())
    ds = load_dataset(cfg(dataset="har", data_path=str(path)))
    assert ds.x_train.shape == (12, 9, 128) and ds.x_test.shape == (6, 9, 128)
    assert sorted(set(ds.y_train)) == list(range(6))  # UCI labels 1..6 become 0..5
    assert sorted(set(ds.ids_train)) == [1, 2, 3]  # subjects: natural ids


@needs_shared
def test_shakespeare_by_speaking_role():
    ds = load_dataset(cfg(dataset="shakespeare", data_path=str(SHAKESPEARE)))
    assert ds.tokens and ds.input_shape == (40,) and ds.num_classes == 65
    assert len(np.unique(ds.ids_train)) > 250
    assert family_for(ds.input_shape, ds.tokens) == "charcnn"


def test_speeches_parse_roles():
    text = "First Citizen:\nBefore we proceed.\nHear me.\n\nAll:\nSpeak.\n\nStray line\n\nAll:\nAgain.\n"
    assert sources.speeches(text) == [("First Citizen", "Before we proceed.\nHear me."),
                                      ("All", "Speak."), ("All", "Again.")]


def test_shakespeare_windows_predict_the_next_character(tmp_path):
    text = "A:\n" + "abcdefghij" * 5 + "\n\nB:\n" + "klmnopqrst" * 5 + "\n"
    path = tmp_path / "plays.txt"
    path.write_text(text)
    raw = sources.shakespeare(str(path), seq_len=4, stride=3, test_fraction=0.2)
    vocab = sorted(set(text))
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    for x, y in zip(raw["x_train"], raw["y_train"]):
        window = decode(x) + vocab[y]
        assert window in text
    assert set(raw["ids_train"]) == {0, 1}


def test_npz_of_any_feature_shape_picks_a_model_family(tmp_path):
    for shape, family in (((12,), "mlp"), ((3, 16), "cnn1d"), ((1, 8, 8), "cnn2d")):
        path = tmp_path / f"{len(shape)}.npz"
        rng = np.random.default_rng(0)
        np.savez(path, x_train=rng.normal(size=(20, *shape)), y_train=np.arange(20) % 3,
                 x_test=rng.normal(size=(6, *shape)), y_test=np.arange(6) % 3)
        ds = load_dataset(cfg(dataset="npz", data_path=str(path)))
        assert family_for(ds.input_shape) == family
        assert build_student("auto", ds.input_shape, ds.num_classes)(
            __import__("torch").from_numpy(ds.x_test)).shape == (6, 3)


def test_csv_single_file_and_directory(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(50, 4)), columns=list("abcd"))
    frame["activity"] = np.where(np.arange(50) % 2, "walk", "sit")
    frame.to_csv(tmp_path / "all.csv", index=False)
    ds = load_dataset(cfg(dataset="csv", data_path=str(tmp_path / "all.csv"), label_column="activity"))
    assert ds.input_shape == (4,) and ds.num_classes == 2 and len(ds.y_train) == 40
    (tmp_path / "split").mkdir()
    frame.iloc[:30].to_csv(tmp_path / "split" / "train.csv", index=False)
    frame.iloc[30:].to_csv(tmp_path / "split" / "test.csv", index=False)
    _load.cache_clear()
    ds = load_dataset(cfg(dataset="csv", data_path=str(tmp_path / "split"), label_column="activity"))
    assert (len(ds.y_train), len(ds.y_test)) == (30, 20)


def hub_dict(with_test: bool):
    from datasets import Dataset, DatasetDict
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(n):
        return Dataset.from_dict({
            "image": [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)) for _ in range(n)],
            "character": list(np.arange(n) % 5), "label": list(np.arange(n) % 5),
            "writer_id": [f"w{i % 4}" for i in range(n)]})

    return DatasetDict({"train": split(30), **({"test": split(10)} if with_test else {})})


@pytest.mark.parametrize("name,with_test", [("fashion_mnist", True), ("femnist", False)])
def test_hub_loader_through_federated_dataset(monkeypatch, name, with_test):
    import flwr_datasets.federated_dataset as fd

    asked = []
    monkeypatch.setattr(fd.datasets, "load_dataset",
                        lambda path, **kw: asked.append(path) or hub_dict(with_test))
    ds = load_dataset(cfg(dataset=name))
    assert asked == [sources.HUB[name][0]]
    assert ds.input_shape == (1, 28, 28) and ds.x_train.max() <= 1.0
    assert len(ds.y_train) + len(ds.y_test) == (40 if with_test else 30)
    if name == "femnist":
        assert sorted(set(ds.ids_train)) == [0, 1, 2, 3]


# ---- download, checksum, cache -----------------------------------------------------------
def test_fetch_verifies_and_caches(tmp_path):
    origin = tmp_path / "origin.txt"
    origin.write_text("to be or not to be")
    digest = hashlib.sha256(origin.read_bytes()).hexdigest()
    source = sources.Source(origin.as_uri(), digest, "copy.txt")
    path = sources.fetch(source, tmp_path / "cache")
    assert path.read_text() == "to be or not to be"
    origin.unlink()  # a second call is served from the cache
    assert sources.fetch(source, tmp_path / "cache") == path
    with pytest.raises(DataError, match="sha256"):
        sources.fetch(sources.Source(path.as_uri(), "0" * 64, "other.txt"), tmp_path / "cache")
    assert not (tmp_path / "cache" / "other.txt").exists()


def test_fetch_pins_an_unpublished_checksum_on_first_download(tmp_path):
    origin = tmp_path / "data.zip"
    origin.write_bytes(b"archive")
    source = sources.Source(origin.as_uri(), None, "data.zip")
    path = sources.fetch(source, tmp_path / "cache")
    pin = path.with_name("data.zip.sha256").read_text().strip()
    assert pin == hashlib.sha256(b"archive").hexdigest()
    path.write_bytes(b"tampered")
    with pytest.raises(DataError, match="delete it to download again"):
        sources.fetch(source, tmp_path / "cache")


def test_a_missing_download_names_the_source(tmp_path):
    with pytest.raises(DataError, match="download it by hand"):
        sources.fetch(sources.Source((tmp_path / "absent").as_uri(), None, "x"), tmp_path / "cache")


# ---- partitions ------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological", "natural"])
def test_partitions_are_disjoint_covering_and_repeatable(scheme):
    labels = np.arange(600) % 10
    ids = np.arange(600) // 20  # 30 natural ids
    parts = partition(labels, 12, scheme, 0.5, seed=3, classes_per_device=2, ids=ids)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == 600
    again = partition(labels, 12, scheme, 0.5, seed=3, classes_per_device=2, ids=ids)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if scheme == "pathological":
        assert all(len(set(labels[p])) <= 2 for p in parts)
    if scheme == "natural":
        assert all(len(set(ids[p])) >= 1 for p in parts)
        assert all(set(ids[a]).isdisjoint(ids[b]) for i, a in enumerate(parts) for b in parts[i + 1:])


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological", "natural"])
def test_a_partition_read_lazily_in_any_order_is_the_same(scheme):
    """Devices of a large fleet are partitioned on demand; which devices a process asks for,
    and in which order, changes no device's samples."""
    labels, ids = np.arange(600) % 10, np.arange(600) // 20
    every = partition(labels, 12, scheme, 0.5, seed=3, classes_per_device=2, ids=ids)
    lazy = Partition(labels, 12, scheme, 0.5, seed=3, classes_per_device=2, ids=ids)
    for device in (11, 4, 0, 7):
        assert np.array_equal(lazy[device], every[device])
    assert set(lazy._parts) == ({11, 4, 0, 7} if scheme != "iid" else set())  # the others never computed


@pytest.mark.parametrize("samples,devices", [(600, 12), (601, 12), (611, 12), (7, 7), (100_003, 1_000)])
def test_iid_shards_by_arithmetic_are_flwr_datasets_iid_partitions(samples, devices):
    """iid_shard computes what flwr-datasets' IidPartitioner gives over the index column
    (uneven sizes included), without building the partitioner's table."""
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import IidPartitioner

    from fedsplitkd.data.datasets import iid_shard

    library = IidPartitioner(devices)
    library.dataset = HFDataset.from_dict({"index": np.arange(samples)})
    ours = Partition(np.zeros(samples), devices, "iid", 0.5, seed=3)
    for device in sorted({0, 1, devices // 2, devices - 2, devices - 1}):
        expected = np.asarray(library.load_partition(device)["index"], dtype=np.int64)
        assert np.array_equal(iid_shard(samples, devices, device), expected)
        assert np.array_equal(ours[device], expected)


@pytest.mark.parametrize("holdout", [0.0, 0.1])
def test_device_splits_are_disjoint_from_each_other_and_the_servers_splits(holdout):
    """Devices, the public split (the teacher's) and the holdout split (model selection) share no sample."""
    from fedsplitkd.data.datasets import holdout_data, server_splits

    c = cfg(partition="dirichlet", **{"holdout-fraction": holdout})
    ds = load_dataset(c)
    seen = []
    for i in range(10):
        local = device_data(c, i, 10)
        seen += [x.tobytes() for x in np.concatenate([local.x_train, local.x_val])]
    public, held, _ = server_splits(len(ds.y_train), c["public-fraction"], holdout, c["seed"])
    server = [x.tobytes() for x in ds.x_train[public]] + [x.tobytes() for x in holdout_data(c)[0]]
    assert len(held) == round(holdout * len(ds.y_train)) and len(holdout_data(c)[1]) == len(held)
    assert len(seen) == len(set(seen)) == len(ds.y_train) - len(public) - len(held)
    assert len(set(seen) | set(server)) == len(seen) + len(server)  # digits has no duplicate images


def test_group_ids_balances_largest_first():
    ids = np.array([0] * 5 + [1] * 3 + [2] * 3 + [3] * 2)
    groups = group_ids(ids, 2)
    # 0 (5) -> device 0; 1 (3) -> device 1; 2 (3) -> device 1 (3 < 5); 3 (2) -> device 0 (5 < 6)
    assert [int(groups[ids == i][0]) for i in range(4)] == [0, 1, 1, 0]


# ---- bad input ---------------------------------------------------------------------------
def test_bad_inputs_give_one_clear_line(tmp_path):
    np.savez(tmp_path / "nolabels.npz", x_train=np.zeros((4, 3)), x_test=np.zeros((2, 3)))
    np.savez(tmp_path / "floatlabels.npz", x_train=np.zeros((4, 3)), y_train=np.zeros(4),
             x_test=np.zeros((2, 3)), y_test=np.zeros(2))
    np.savez(tmp_path / "shapes.npz", x_train=np.zeros((4, 3)), y_train=np.zeros(4, int),
             x_test=np.zeros((2, 5)), y_test=np.zeros(2, int))
    cases = [
        (cfg(dataset="npz", data_path=str(tmp_path / "absent.npz")), "no file at"),
        (cfg(dataset="npz", data_path=str(tmp_path / "nolabels.npz")), "missing arrays ['y_train', 'y_test']"),
        (cfg(dataset="npz", data_path=str(tmp_path / "floatlabels.npz")), "integer labels"),
        (cfg(dataset="npz", data_path=str(tmp_path / "shapes.npz")), "feature shapes differ"),
        (cfg(dataset="npz"), "needs data-path"),
        (cfg(dataset="har", data_path=str(tmp_path / "nothing")), "no UCI HAR data"),
        (cfg(dataset="shakespeare", data_path=str(tmp_path / "absent.txt")), "no file at"),
        (cfg(dataset="csv", data_path=str(tmp_path)), "train.csv"),
    ]
    for c, expected in cases:
        _load.cache_clear()
        with pytest.raises(DataError) as err:
            load_dataset(c)
        assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_device_left_without_samples_is_an_error_naming_the_sizes():
    with pytest.raises(DataError, match="6 devices .* 5 training samples"):
        partition(np.arange(5), 6, "iid", 0.5, 0)
    labels = np.array([0] * 9 + [1])  # one sample of class 1 cannot serve several devices
    with pytest.raises(DataError, match="partition 'pathological' of 10 samples into 8 devices failed"):
        partition(labels, 8, "pathological", 0.5, 0, classes_per_device=1)
    with pytest.raises(DataError, match="has none"):
        partition(np.arange(10), 2, "natural", 0.5, 0)


# ---- large datasets: memory-mapped from the cache ---------------------------------------
def test_digits_come_from_the_cache_without_scikit_learn(tmp_path, monkeypatch):
    """A ServerApp process of a digits run reads the cached arrays: scikit-learn, whose import
    alone costs 1.5 s, is imported only to fill the cache."""
    monkeypatch.setenv("FEDSPLITKD_CACHE", str(tmp_path))
    script = ("import sys; from fedsplitkd.config import resolve; from fedsplitkd.data.datasets import load_dataset; "
              "ds = load_dataset(resolve({'dataset': 'digits'})); "
              "print('sklearn' in sys.modules, len(ds.y_train), float(ds.x_train.sum()))")
    first, second = (subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
                     .stdout.split() for _ in range(2))
    assert first[0] == "True" and second[0] == "False"
    assert first[1:] == second[1:]  # the same arrays


@needs_shared
def test_a_large_dataset_is_memory_mapped_from_the_cache(tmp_path, monkeypatch):
    from fedsplitkd.data import datasets as data_lib

    monkeypatch.setenv("FEDSPLITKD_CACHE", str(tmp_path / "cache"))
    cfg = resolve({"dataset": "npz", "data-path": str(HAR_NPZ), "partition": "dirichlet"})
    _load.cache_clear()
    in_memory = load_dataset(cfg)
    expected = [device_data(cfg, d, 5) for d in (0, 3)]
    assert not isinstance(in_memory.x_train, np.memmap)
    monkeypatch.setattr(data_lib, "MAPPED_BYTES", 1)  # this file now counts as large
    _load.cache_clear()
    try:
        stored = load_dataset(cfg)
        assert isinstance(stored.x_train, np.memmap)
        _load.cache_clear()
        monkeypatch.setattr(sources, "npz", lambda path: pytest.fail("read the source again"))
        mapped = load_dataset(cfg)
        for name in ("x_train", "y_train", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(mapped, name), getattr(in_memory, name))
        assert (mapped.num_classes, mapped.input_shape) == (in_memory.num_classes, in_memory.input_shape)
        data_lib._device_partition.cache_clear()
        for d, want in zip((0, 3), expected):
            got = device_data(cfg, d, 5)
            assert type(got.x_train) is np.ndarray and got.x_train.flags.writeable
            np.testing.assert_array_equal(got.x_train, want.x_train)
            np.testing.assert_array_equal(got.x_val, want.x_val)
        assert len(list((tmp_path / "cache" / "datasets").iterdir())) == 1
    finally:
        _load.cache_clear()


def test_take_copies_rows_out_of_a_mapping(tmp_path):
    from fedsplitkd.data.datasets import take

    np.save(tmp_path / "x.npy", np.arange(4096 * 8, dtype=np.float32).reshape(-1, 8))
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    rows = take(x, np.array([5, 0, 4000]))
    assert type(rows) is np.ndarray and rows.flags.writeable
    np.testing.assert_array_equal(rows, np.arange(4096 * 8, dtype=np.float32).reshape(-1, 8)[[5, 0, 4000]])
    np.testing.assert_array_equal(x[4000], rows[2])  # the mapping still reads after its pages are let go
