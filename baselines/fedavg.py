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
    online = discover(grid, nodes, cfg.fleet.min_nodes, wait_s=cfg.faults.round_timeout)
    # Flower's strategy addresses every node; FastGrid picks the devices that train (the
    # split methods' seeded draw), deals virtual devices to the nodes, and records traffic.
    fast = FastGrid(grid, nodes, cfg.fleet.virtual_devices, cfg.train.seed, fraction=cfg.train.fraction_train)
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=max(1, len(online)),
                  min_evaluate_nodes=0, min_available_nodes=max(1, cfg.fleet.min_nodes))
    if cfg.method.name == "fedprox":
        strategy = FedProx(proximal_mu=cfg.method.proximal_mu, **common)
    elif cfg.method.name == "feddf":
        public, _ = public_split(len(exp.dataset.y_train), cfg.data.public_fraction, cfg.train.seed)
        make = lambda: student_for(cfg, exp.dataset)  # noqa: E731
        strategy = FedDF(make, take(exp.dataset.x_train, public), cfg.method.distill_steps, cfg.split.kd_temperature,
                         seed=cfg.train.seed, **common)
    else:
        strategy = FedAvg(**common)
    flops = whole_flops(exp.student)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_numpy_state(exp.student, {k: v.numpy() for k, v in arrays.items()})
        server_flops = getattr(strategy, "server_flops", 0.0)  # FedDF's distillation
        stats = round_stats(exp.server.costs, fast.traffic, flops, server_round, server_flops) if server_round else None
        fast.traffic = {}
        return recorder.round(server_round, *exp.evaluate(server_round), stats)

    strategy.start(fast, ArrayRecord(torch_state_dict=exp.student.state_dict()), num_rounds=cfg.train.num_rounds,
                   timeout=cfg.faults.round_timeout, evaluate_fn=evaluate_fn)
