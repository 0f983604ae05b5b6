"""fedavg, fedprox and feddf: Flower's FedAvg / FedProx (and FedAvg + ensemble distillation)."""

from __future__ import annotations

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from fedsplitkd.baselines.accounting import round_stats, whole_flops
from fedsplitkd.baselines.feddf import FedDF
from fedsplitkd.data.datasets import public_split, take
from fedsplitkd.models.zoo import student_for
from fedsplitkd.run.experiment import Experiment
from fedsplitkd.protocol.runtime import load_numpy_state
from fedsplitkd.strategies.grid import FastGrid, NodeMap, discover
from fedsplitkd.strategies.recorder import Recorder


def run(grid: Grid, exp: Experiment, recorder: Recorder) -> None:
    cfg = exp.cfg
    nodes = NodeMap()
    online = discover(grid, nodes, cfg["min-nodes"], wait_s=cfg["round-timeout"])
    # Flower's strategy addresses every node; FastGrid picks the devices that train (the
    # split methods' seeded draw), deals virtual devices to the nodes, and records traffic.
    fast = FastGrid(grid, nodes, cfg["virtual-devices"], cfg["seed"], fraction=cfg["fraction-train"])
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=max(1, len(online)),
                  min_evaluate_nodes=0, min_available_nodes=max(1, cfg["min-nodes"]))
    if cfg["method"] == "fedprox":
        strategy = FedProx(proximal_mu=cfg["proximal-mu"], **common)
    elif cfg["method"] == "feddf":
        public, _ = public_split(len(exp.dataset.y_train), cfg["public-fraction"], cfg["seed"])
        make = lambda: student_for(cfg, exp.dataset)  # noqa: E731
        strategy = FedDF(make, take(exp.dataset.x_train, public), cfg["distill-steps"], cfg["kd-temperature"],
                         seed=cfg["seed"], **common)
    else:
        strategy = FedAvg(**common)
    flops = whole_flops(exp.student)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_numpy_state(exp.student, {k: v.numpy() for k, v in arrays.items()})
        server_flops = getattr(strategy, "server_flops", 0.0)  # FedDF's distillation
        stats = round_stats(exp.server.costs, fast.traffic, flops, server_round, server_flops) if server_round else None
        fast.traffic = {}
        return recorder.round(server_round, *exp.evaluate(), stats)

    strategy.start(fast, ArrayRecord(torch_state_dict=exp.student.state_dict()), num_rounds=cfg["num-rounds"],
                   timeout=cfg["round-timeout"], evaluate_fn=evaluate_fn)
