"""Every method through `flwr run`, on the same partitions and cost accounting."""

import csv
from pathlib import Path

import pytest

from fedsplitkd.config import resolve
from fedsplitkd.data.datasets import device_data
from fedsplitkd.tools.localsim import LocalSimulation
from fedsplitkd.models.zoo import build_student

from conftest import warm_teachers

pytestmark = pytest.mark.integration  # Flower runs through a SuperLink

ROOT = Path(__file__).resolve().parents[1]
DEVICES, ROUNDS = 3, 2
METHODS = ["splitkd", "split", "splitfed", "fedavg", "fedprox", "feddf", "fd", "fedgkt", "local", "central-kd"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, shared_teachers):
    out = tmp_path_factory.mktemp("baselines")
    common = {"output-dir": str(out), "num-rounds": ROUNDS, "learning-rate": 0.05, "teacher-epochs": 20,
              "teacher-cache-dir": str(shared_teachers)}
    runs = [({**common, "method": method, "run-name": method}, DEVICES) for method in METHODS]
    warm_teachers(config for config, _ in runs)
    with LocalSimulation() as sim:
        logs = dict(zip(METHODS, sim.run_many(ROOT, runs, cpus_per_client=1)))
    rows = {}
    for method in METHODS:
        path = out / method / "metrics.csv"
        assert path.is_file(), f"{method} wrote no metrics: {logs[method].stdout[-2000:]}"
        rows[method] = list(csv.DictReader(open(path)))
    return rows, common


@pytest.mark.parametrize("method", METHODS)
def test_each_method_beats_its_initial_accuracy(results, method):
    rows = results[0][method]
    assert [int(r["round"]) for r in rows] == list(range(ROUNDS + 1))
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"])
    assert float(rows[-1]["sim_time_s"]) > 0


def test_weights_and_activations_are_priced_alike(results):
    """FedAvg moves the whole student both ways; split methods move activations and the device part."""
    rows, common = results
    cfg = resolve({**common, "run-name": "x"})
    params = sum(p.numel() for p in build_student("auto", (1, 8, 8), 10).parameters())
    for r in rows["fedavg"][1:]:
        assert int(r["bytes_up"]) == int(r["bytes_down"]) == DEVICES * params * 4
    samples = sum(len(device_data(cfg, d, DEVICES).y_train) for d in range(DEVICES))
    for r in rows["splitfed"][1:]:  # no teacher: activations + labels + batch sizes + device part
        assert int(r["bytes_up_activations"]) == samples * 16 * 8 * 8 * 4
    assert float(rows["fedavg"][1]["device_flops"]) > float(rows["splitfed"][1]["device_flops"])
    assert all(float(r["device_energy_j"]) == 0 for r in rows["central-kd"][1:])
    assert all(int(r["bytes_up"]) == 0 for r in rows["local"][1:])


@pytest.mark.parametrize("method", METHODS)
def test_the_in_process_grid_repeats_the_flower_run(results, method, tmp_path):
    """The benchmark tunes on InProcessGrid: every method's ServerApp code and the real ClientApp
    handlers in one process. It must compute what `flwr run` computed, round by round."""
    from fedsplitkd.strategies.inprocess import run_app

    rows, common = results
    directory = run_app({**common, "method": method, "output-dir": str(tmp_path), "run-name": method}, DEVICES)
    local = list(csv.DictReader(open(directory / "metrics.csv")))
    for flower, here in zip(rows[method], local, strict=True):
        assert float(here["test_accuracy"]) == pytest.approx(float(flower["test_accuracy"]), abs=1e-9)
        assert float(here["test_loss"]) == pytest.approx(float(flower["test_loss"]), rel=1e-5)
        assert int(here["bytes_up"]) == int(flower["bytes_up"])
        assert float(here["device_energy_j"]) == pytest.approx(float(flower["device_energy_j"]), rel=1e-9)
