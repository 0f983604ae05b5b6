"""Devices holding only their own data file (node config ``data-path``), and ``fedsplitkd-split``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from fedsplitkd.config import resolve
from fedsplitkd.data.datasets import DataError, device_data
from fedsplitkd.tools.deployment import LocalDeployment, alive
from fedsplitkd.run.experiment import run_inprocess
from fedsplitkd.data.own_data import device_file, main as split_main, write_device_files
from fedsplitkd.strategies.inprocess import InProcessGrid, _server_identity
from fedsplitkd.strategies.server_app import run

from conftest import tiny

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 3
# Every batch in one exchange: two messages per device and round (a deployment starts a
# flwr-clientapp process per message).
CONFIG = {**tiny(), "teacher-epochs": 5, "exchange-batches": 1000}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    return write_device_files(resolve(CONFIG), DEVICES, tmp_path_factory.mktemp("devices"))


def test_a_device_file_holds_exactly_the_devices_partition(files):
    cfg = resolve(CONFIG)
    for i, file in enumerate(files):
        local, shape = device_file({"data-path": str(file)}, cfg, i)
        want = device_data(cfg, i, DEVICES)
        for name in ("x_train", "y_train", "x_val", "y_val"):
            np.testing.assert_array_equal(getattr(local, name), getattr(want, name))
        assert shape.input_shape == (1, 8, 8) and shape.num_classes == 10  # digits as images


def test_the_split_command_writes_one_file_per_device(tmp_path, capsys):
    split_main(["--devices", "2", "--out", str(tmp_path), "--run-config", "dataset='digits' partition='iid'"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device-0.npz", "device-1.npz"]
    assert "partition-id=i num-partitions=2" in capsys.readouterr().out


def test_bad_device_files_are_named(tmp_path, files):
    cfg = resolve(CONFIG)
    with pytest.raises(DataError, match=f"device data file '{tmp_path / 'none.npz'}' does not exist"):
        device_file({"data-path": str(tmp_path / "none.npz")}, cfg, 0)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="garbage.npz' is not a readable .npz"):
        device_file({"data-path": str(tmp_path / "garbage.npz")}, cfg, 0)
    np.savez(tmp_path / "nolabels.npz", x_train=np.zeros((4, 3)), num_classes=2)
    with pytest.raises(DataError, match="nolabels.npz': missing field 'y_train'"):
        device_file({"data-path": str(tmp_path / "nolabels.npz")}, cfg, 0)
    np.savez(tmp_path / "range.npz", x_train=np.zeros((4, 3)), y_train=np.array([0, 1, 2, 5]), num_classes=3)
    with pytest.raises(DataError, match=r"range.npz': y_train must be integer classes in \[0, 3\)"):
        device_file({"data-path": str(tmp_path / "range.npz")}, cfg, 0)
    table = tmp_path / "mine.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["a", "b", "label"], [0.1, 0.2, 1], [0.3, 0.4, 0], [0.5, 0.6, 1]])
    with pytest.raises(DataError, match="give the node config 'num-classes'"):
        device_file({"data-path": str(table)}, cfg, 0)
    local, shape = device_file({"data-path": str(table), "num-classes": 2}, cfg, 0)
    assert shape.input_shape == (2,) and len(local.y_train) + len(local.y_val) == 3


def in_process(files: list, config: dict, tmp_path: Path) -> list[dict]:
    """The ServerApp over in-process nodes whose node configs name ``files``."""
    cfg = {**config, "output-dir": str(tmp_path), "run-name": "own"}
    grid = InProcessGrid(cfg, len(files))
    for context, file in zip(grid.contexts.values(), files):
        context.node_config["data-path"] = str(file)
    with _server_identity():
        directory = run(grid, resolve(cfg))
    with open(directory / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_devices_with_their_own_files_train_as_the_partitioned_run(files, tmp_path):
    rows = in_process(files, CONFIG, tmp_path)
    reference = run_inprocess(dict(CONFIG), DEVICES)[1]
    assert [float(r["test_accuracy"]) for r in rows] == pytest.approx([r["test_accuracy"] for r in reference],
                                                                      abs=1e-12)


def test_a_device_whose_file_is_missing_is_dropped_and_the_others_go_on(files, tmp_path):
    rows = in_process([*files[:2], tmp_path / "missing.npz"], CONFIG, tmp_path)
    assert int(rows[1]["completed"]) == 2 and int(rows[1]["dropped_failed"]) == 1
    dropped = (tmp_path / "own" / "dropped.csv").read_text()
    assert "missing.npz' does not exist" in dropped and dropped.count("\n") == 2  # header + one line


@pytest.mark.integration
def test_own_data_deployment_matches_the_in_process_run(files, tmp_path):
    """An insecure deployment: 3 SuperNodes with a file each and one whose file is missing. The
    run completes without it, with the metrics of the same per-device data in one process, and
    every process the deployment started is gone afterwards."""
    nodes = [*files, tmp_path / "missing.npz"]
    reference = in_process(nodes, CONFIG, tmp_path / "reference")
    with LocalDeployment(len(nodes), node_configs=[{"data-path": str(f)} for f in nodes]) as dep:
        started = dep.pids()
        result = dep.run(ROOT, {**CONFIG, "output-dir": str(tmp_path), "run-name": "run"})
        started |= dep.pids() | dep.seen
    assert len(started) >= 1 + 2 * len(nodes)  # SuperLink, SuperNodes and their SuperExecs
    assert not [pid for pid in started if alive(pid)], "processes outlived the deployment"
    # The one problem the judge finds is the device we meant to fail.
    assert result.problems == ["devices failed in a round (completed < devices)"], \
        f"{result.problems}\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}"
    assert result.status == "finished:completed"
    rows = result.rows
    assert [int(r["round"]) for r in rows] == list(range(CONFIG["num-rounds"] + 1))
    assert [int(r["completed"]) for r in rows[1:]] == [DEVICES] and int(rows[1]["dropped_failed"]) == 1
    for got, want in zip(rows, reference, strict=True):
        assert float(got["test_accuracy"]) == pytest.approx(float(want["test_accuracy"]), abs=1e-9)
        assert int(got["bytes_up"]) == int(want["bytes_up"])
    assert (tmp_path / "run" / "summary.json").is_file()
    assert "missing.npz' does not exist" in (tmp_path / "run" / "dropped.csv").read_text()
