"""Every method through `flwr run`, on the same partitions and cost accounting, on two private
SuperLinks side by side (each launcher's own ports: tests/test_ports.py)."""

import csv
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from fedsplitkd.config import resolve
from fedsplitkd.data.datasets import device_data
from fedsplitkd.tools.localsim import LocalSimulation
from fedsplitkd.tools.processes import alive, tagged
from fedsplitkd.models.zoo import build_student

from conftest import warm_teachers

pytestmark = pytest.mark.integration  # Flower runs through a SuperLink

ROOT = Path(__file__).resolve().parents[1]
DEVICES, ROUNDS = 3, 2
SIMULATIONS = 2  # private SuperLinks side by side (three measured no faster, at more CPU)
METHODS = ["splitkd", "split", "splitfed", "fedavg", "fedprox", "feddf", "fd", "fedgkt", "local", "central-kd"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, shared_teachers):
    out = tmp_path_factory.mktemp("baselines")
    common = {"output-dir": str(out), "num-rounds": ROUNDS, "learning-rate": 0.05, "teacher-epochs": 20,
              "teacher-cache-dir": str(shared_teachers)}
    warm_teachers({**common, "method": method} for method in METHODS)
    # A share of the methods on each LocalSimulation, all at once, a run at a time on each: a
    # run mostly waits (Ray's start, the engine's polls), so two side by side finish sooner.
    shares = [METHODS[k::SIMULATIONS] for k in range(SIMULATIONS)]
    sims, logs, launchers = [LocalSimulation() for _ in shares], {}, []

    def run(sim: LocalSimulation, methods: list[str]) -> None:
        with sim:
            runs = [({**common, "method": method, "run-name": method}, DEVICES) for method in methods]
            logs.update(zip(methods, sim.run_many(ROOT, runs, parallel=1)))
            launchers.append({"methods": methods, "listed": listed_runs(sim), "tree": sim.tree,
                              "members": sim.tree.members()})

    with ThreadPoolExecutor(SIMULATIONS) as pool:
        for done in [pool.submit(run, sim, share) for sim, share in zip(sims, shares)]:
            done.result()
    rows = {}
    for method in METHODS:
        path = out / method / "metrics.csv"
        assert path.is_file(), f"{method} wrote no metrics: {logs[method].stdout[-2000:]}"
        rows[method] = list(csv.DictReader(open(path)))
    return rows, common, launchers


def listed_runs(sim: LocalSimulation) -> list[dict]:
    """The runs the simulation's own SuperLink knows (``flwr ls``)."""
    done = subprocess.run(["flwr", "ls", "fedsplitkd-sim", "--format", "json"], env=sim.env, capture_output=True,
                          text=True, timeout=120)
    return json.loads(done.stdout).get("runs", []) if done.returncode == 0 and done.stdout.strip() else []


def test_simulations_at_once_each_get_their_own_results_and_leave_nothing(results):
    """The LocalSimulations ran side by side: each SuperLink saw its own runs alone, each run
    wrote its own results (its own config), and afterwards no process of any is left."""
    rows, common, launchers = results
    assert len(launchers) == SIMULATIONS
    for launcher in launchers:
        assert len(launcher["listed"]) == len(launcher["methods"])  # its SuperLink saw its runs alone
        for method in launcher["methods"]:
            directory = Path(common["output-dir"]) / method
            assert [int(r["round"]) for r in rows[method]] == list(range(ROUNDS + 1))
            assert yaml.safe_load((directory / "config.yaml").read_text())["method"] == method  # its own config
            assert (directory / "summary.json").is_file()
        assert launcher["members"], "no process was recorded under the simulation"
        assert not [pid for pid in launcher["members"] if alive(pid)], "a process of the simulation outlived it"
        assert not tagged(launcher["tree"].id)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_beats_its_initial_accuracy(results, method):
    rows = results[0][method]
    assert [int(r["round"]) for r in rows] == list(range(ROUNDS + 1))
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"])
    assert float(rows[-1]["sim_time_s"]) > 0


def test_weights_and_activations_are_priced_alike(results):
    """FedAvg moves the whole student both ways; split methods move activations and the device part."""
    rows, common, _ = results
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

    rows, common, _ = results
    directory = run_app({**common, "method": method, "output-dir": str(tmp_path), "run-name": method}, DEVICES)
    local = list(csv.DictReader(open(directory / "metrics.csv")))
    for flower, here in zip(rows[method], local, strict=True):
        assert float(here["test_accuracy"]) == pytest.approx(float(flower["test_accuracy"]), abs=1e-9)
        assert float(here["test_loss"]) == pytest.approx(float(flower["test_loss"]), rel=1e-5)
        assert int(here["bytes_up"]) == int(flower["bytes_up"])
        assert float(here["device_energy_j"]) == pytest.approx(float(flower["device_energy_j"]), rel=1e-9)
