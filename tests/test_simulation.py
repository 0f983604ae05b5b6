"""End to end through Flower: `flwr run` on a private simulation SuperLink."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsplitkd.config import resolve
from fedsplitkd.data.datasets import device_data
from fedsplitkd.protocol.device import batch_plan
from fedsplitkd.run.experiment import run_inprocess
from fedsplitkd.tools.localsim import LocalSimulation
from fedsplitkd.models.zoo import build_student, build_teacher
from fedsplitkd.run.results import load_student
from fedsplitkd.protocol.runtime import evaluate

from conftest import warm_teachers

pytestmark = pytest.mark.integration  # Flower runs through a SuperLink

ROOT = Path(__file__).resolve().parents[1]
DEVICES, ROUNDS = 3, 3
# 3 nodes serve a fleet of 12 virtual devices: split-KD samples 6 a round (two per node, in
# one message per node and exchange). The whole-model methods: tests/test_virtual_baselines.py.
VIRTUAL = {"virtual-devices": 12, "fraction-train": 0.5, "fraction-evaluate": 0.5}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_teachers):
    out = tmp_path_factory.mktemp("outputs")
    common = {"output-dir": str(out), "teacher-cache-dir": str(shared_teachers), "teacher-epochs": 20,
              "num-rounds": ROUNDS}
    configs = [{**common, "run-name": "good", "fraction-evaluate": 1.0},
               {**common, "run-name": "bad", "kd-alpha": 1.5},
               {**common, "run-name": "faulty", "dropout-rate": 0.5, "dropout-stage": "backward"},
               {**common, **VIRTUAL, "run-name": "virtual-splitkd"},
               {**common, "run-name": "npz", "dataset": "npz", "num-rounds": 1, "learning-rate": 0.05,
                "batch-size": 16, "public-fraction": 0.1, "data-path": str(write_sensor_npz(out / "mine.npz"))}]
    warm_teachers(configs)
    with LocalSimulation() as sim:
        good, bad, _, _, own = sim.run_many(ROOT, [(config, DEVICES) for config in configs])
    assert (out / "npz" / "metrics.csv").is_file(), own.stdout[-3000:]
    return out, good, bad, {**common, "fraction-evaluate": 1.0}


def write_sensor_npz(path: Path) -> Path:
    """A user's own file: 3 classes of (3 channels x 16 steps) windows, one pattern per class."""
    rng = np.random.default_rng(0)
    patterns = rng.normal(size=(3, 3, 16))
    y_train, y_test = rng.integers(0, 3, 600), rng.integers(0, 3, 150)
    np.savez(path, x_train=patterns[y_train] + 0.5 * rng.normal(size=(600, 3, 16)), y_train=y_train,
             x_test=patterns[y_test] + 0.5 * rng.normal(size=(150, 3, 16)), y_test=y_test)
    return path


def read_metrics(directory: Path) -> list[dict]:
    assert (directory / "metrics.csv").is_file(), "the run wrote no metrics.csv"
    return list(csv.DictReader(open(directory / "metrics.csv")))


def test_run_learns_and_writes_the_results_contract(runs):
    out, good, _, _ = runs
    rows = read_metrics(out / "good")
    assert [int(r["round"]) for r in rows] == list(range(ROUNDS + 1)), good.stdout[-3000:]
    assert rows[0].keys() >= {"round", "method", "test_accuracy", "test_loss", "bytes_up", "bytes_down"}
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"]) + 0.05
    assert all(int(r["completed"]) == DEVICES for r in rows[1:])
    assert all(int(r["dropped_failed"]) + int(r["dropped_invalid"]) == 0 for r in rows[1:])
    assert all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in rows[1:])  # split evaluation ran
    summary = json.loads((out / "good" / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(float(rows[-1]["test_accuracy"]))
    assert (out / "good" / "config.yaml").is_file()
    assert "[round 3/3]" in good.stdout
    assert float(rows[-1]["sim_time_s"]) > float(rows[1]["sim_time_s"]) > 0
    assert float(rows[1]["device_energy_j"]) > 0 and float(rows[1]["device_flops"]) > 0
    devices = list(csv.DictReader(open(out / "good" / "devices.csv")))
    assert len(devices) == ROUNDS * DEVICES and {d["device"] for d in devices} == {"0", "1", "2"}
    for name in ("accuracy_vs_time.png", "accuracy_vs_energy.png"):
        assert (out / "good" / name).read_bytes()[:4] == b"\x89PNG"


def test_flower_run_equals_the_in_process_reference(runs):
    """Same config, same math: the Flower run repeats the one-process run round by round."""
    out, _, _, common = runs
    _, reference = run_inprocess({**common, "run-name": "ref"}, DEVICES)
    rows = read_metrics(out / "good")
    for flower, local in zip(rows, reference, strict=True):
        assert float(flower["test_accuracy"]) == pytest.approx(local["test_accuracy"], abs=1e-9)
        assert float(flower["test_loss"]) == pytest.approx(local["test_loss"], rel=1e-4)
        assert int(flower["bytes_up"]) == local["bytes_up"]
        assert int(flower["bytes_down"]) == local["bytes_down"]


def test_bytes_up_equals_the_payloads_sent(runs):
    """Activations, labels, batch sizes, teacher inputs and final weights, counted exactly. The
    default teacher input ('auto': cached here) sends each sample's embedding output and its id
    once, in its first round, and the sample ids of every chunk."""
    out, _, _, common = runs
    cfg = resolve({**common, "run-name": "good"})
    rows = read_metrics(out / "good")
    shape, classes = (1, 8, 8), 10
    student, teacher = build_student("auto", shape, classes), build_teacher("auto", shape, classes)
    stats, tstats = student.block_stats(), teacher.block_stats()
    act, emb = stats[0].activation_numel, tstats[0].activation_numel
    device_params = sum(p.numel() for p in student.device_part("default").parameters())
    for r in rows[1:]:
        expected_acts = expected_total = 0
        for pid in range(DEVICES):
            n = len(device_data(cfg, pid, DEVICES).y_train)
            batches = len(batch_plan(n, cfg["batch-size"], 1, cfg["seed"], int(r["round"]), pid))
            expected_acts += n * act * 4
            first = int(r["round"]) == 1  # every sample is new to the server's teacher cache
            expected_total += n * (act * 4 + 8 + 8 + first * (emb * 4 + 8)) + 8 * batches + 4 * device_params
        assert int(r["bytes_up_activations"]) == expected_acts
        assert int(r["bytes_up"]) == expected_total
        assert (int(r["bytes_up_teacher"]) > 0) == (int(r["round"]) == 1)


def test_final_student_loads_and_matches_the_reported_accuracy(runs):
    out, _, _, common = runs
    student = load_student(out / "good")
    cfg = resolve({**common, "run-name": "good"})
    from fedsplitkd.data.datasets import load_dataset

    ds = load_dataset(cfg)
    accuracy, _ = evaluate(student, ds.x_test, ds.y_test)
    assert accuracy == pytest.approx(float(read_metrics(out / "good")[-1]["test_accuracy"]))
    program = torch.export.load(str(out / "good" / "student.pt2")).module()
    x = torch.from_numpy(ds.x_test[:7])
    torch.testing.assert_close(program(x), student(x))
    merged = torch.load(out / "good" / "student.pt", weights_only=True)
    parts = {**torch.load(out / "good" / "student_device.pt", weights_only=True),
             **torch.load(out / "good" / "student_server.pt", weights_only=True)}
    assert merged.keys() == parts.keys()
    assert all(torch.equal(merged[k], parts[k]) for k in merged)
    assert not math.isnan(accuracy)


def test_a_users_npz_trains_end_to_end(runs):
    out = runs[0]
    rows = read_metrics(out / "npz")
    assert [int(r["round"]) for r in rows] == [0, 1]
    assert float(rows[1]["test_accuracy"]) > max(0.9, float(rows[0]["test_accuracy"]))
    assert load_student(out / "npz")[0][0].__class__.__name__ == "Conv1d"  # (C, L) -> 1-D CNN


def test_invalid_config_stops_the_run_naming_the_key(runs):
    out, _, bad, _ = runs
    assert not (out / "bad" / "metrics.csv").exists()
    assert "run-config 'kd-alpha' = 1.5: must be a number in [0.0, 1.0]" in bad.stdout + bad.stderr


def test_devices_dropping_out_mid_round_are_counted_and_named(runs):
    """ClientApps that raise after uploading their activations: the round goes on without them."""
    out = runs[0]
    rows = read_metrics(out / "faulty")
    assert [int(r["round"]) for r in rows] == list(range(ROUNDS + 1))
    dropped = list(csv.DictReader(open(out / "faulty" / "dropped.csv")))
    for r in rows[1:]:
        lost = {d for d in range(DEVICES) if np.random.default_rng([0, int(r["round"]), d, 13]).random() < 0.5}
        assert int(r["dropped_backward"]) == int(r["dropped_failed"]) == len(lost)
        assert int(r["completed"]) == DEVICES - len(lost)
        named = {int(d["device"]) for d in dropped if d["round"] == r["round"]}
        assert named == lost and all(d["stage"] == "backward" for d in dropped)
    assert sum(int(r["dropped_backward"]) for r in rows) > 0
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"])


def test_nodes_serve_a_larger_fleet_of_virtual_devices(runs):
    """Each round 6 of 12 devices are sampled and served by the 3 nodes; split-KD repeats the
    in-process run of 12 devices (the teacher's embedding is counted per node, so bytes down
    differ)."""
    out, _, _, common = runs
    rows = read_metrics(out / "virtual-splitkd")
    sampled = round(12 * VIRTUAL["fraction-train"])
    assert [int(r["round"]) for r in rows] == list(range(ROUNDS + 1))
    assert all(int(r["completed"]) == sampled for r in rows[1:])
    assert all(0.0 < float(r["val_accuracy"]) <= 1.0 for r in rows[1:])  # split evaluation, bundled too
    served = {int(d["device"]) for d in csv.DictReader(open(out / "virtual-splitkd" / "devices.csv"))}
    assert len(served) > DEVICES and max(served) < 12
    _, reference = run_inprocess({**common, **VIRTUAL, "run-name": "ref"}, 12)
    for flower, local in zip(rows, reference, strict=True):
        assert float(flower["test_accuracy"]) == pytest.approx(local["test_accuracy"], abs=1e-9)
        assert int(flower["bytes_up"]) == local["bytes_up"]
