"""FedAvg, FedProx and FedDF under virtual devices, through `flwr run`.

Every device sampled in a round trains and is averaged, whatever the node count: 2 nodes
serving a fleet of 6 virtual devices give, round by round, what 6 nodes (a node per device)
give with the same seed. The 6 nodes run on the in-process grid (the same ServerApp and
ClientApp handlers, one node per device, no Flower run to start): tests/test_baselines.py
holds it equal to `flwr run` for every method.
"""

import csv
from pathlib import Path

import pytest

from fedsplitkd.strategies.inprocess import run_app
from fedsplitkd.tools.localsim import LocalSimulation

from conftest import warm_teachers

pytestmark = pytest.mark.integration  # Flower runs through a SuperLink

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fedavg", "fedprox", "feddf")
FLEET, NODES, ROUNDS, FRACTION = 6, 2, 2, 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_teachers):
    out = tmp_path_factory.mktemp("virtual-baselines")
    common = {"output-dir": str(out), "num-rounds": ROUNDS, "fraction-train": FRACTION, "learning-rate": 0.05,
              "local-epochs": 2, "distill-steps": 20, "proximal-mu": 0.1, "teacher-epochs": 2,
              "teacher-cache-dir": str(shared_teachers)}
    runs = [({**common, "virtual-devices": FLEET, "method": method, "run-name": f"{method}-virtual"}, NODES)
            for method in METHODS]
    warm_teachers(config for config, _ in runs)
    with LocalSimulation() as sim:
        for (config, _), result in zip(runs, sim.run_many(ROOT, runs)):
            assert (out / config["run-name"] / "metrics.csv").is_file(), result.stdout[-3000:]
    for method in METHODS:  # a node per device
        run_app({**common, "method": method, "run-name": f"{method}-nodes"}, FLEET)
    return out


def rows(out: Path, name: str, table: str = "metrics.csv") -> list[dict]:
    return list(csv.DictReader(open(out / name / table)))


@pytest.mark.parametrize("method", METHODS)
def test_virtual_devices_train_every_sampled_device_as_a_node_per_device_does(runs, method):
    virtual, nodes = rows(runs, f"{method}-virtual"), rows(runs, f"{method}-nodes")
    assert [int(r["round"]) for r in virtual] == list(range(ROUNDS + 1))
    sampled = round(FLEET * FRACTION)
    assert all(int(r["completed"]) == sampled for r in virtual[1:])  # more devices than nodes
    for v, n in zip(virtual, nodes, strict=True):
        assert float(v["test_accuracy"]) == float(n["test_accuracy"])
        assert float(v["test_loss"]) == pytest.approx(float(n["test_loss"]), rel=1e-6)
        for column in ("bytes_up", "bytes_down", "completed"):
            assert int(v[column]) == int(n[column])
        for column in ("device_energy_j", "server_flops", "sim_time_s"):
            assert float(v[column]) == pytest.approx(float(n[column]), rel=1e-9)
    assert float(virtual[-1]["test_loss"]) != float(virtual[0]["test_loss"])  # the model moved
    if method != "feddf":  # FedDF's 20 distillation steps on this tiny fleet do not lift it in 2 rounds
        assert float(virtual[-1]["test_accuracy"]) > float(virtual[0]["test_accuracy"])
    served = {(d["round"], d["device"]) for d in rows(runs, f"{method}-virtual", "devices.csv")}
    assert served == {(d["round"], d["device"]) for d in rows(runs, f"{method}-nodes", "devices.csv")}
    if method == "feddf":  # the server's distillation is priced as server compute
        assert all(float(r["server_flops"]) > 0 for r in virtual[1:])
