"""SplitKD inside your own Flower app: the README's "Run on real devices" example.

Point your app's ``pyproject.toml`` at these two objects (module path as in your app)::

    [tool.flwr.app.components]
    serverapp = "my_app:server_app"
    clientapp = "my_app:client_app"

tests/test_deployment.py runs ``main`` over an in-process Grid with these handlers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from fedsplitkd.clients import client_app as splitkd_client
from fedsplitkd.strategies import SplitKD
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsplitkd.config import resolve
from fedsplitkd.run.experiment import build
from fedsplitkd.protocol.runtime import evaluate, load_numpy_state

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = resolve(context.run_config)  # every key the run config leaves out takes its default
    exp = build(cfg)  # data, pre-trained teacher, student, edge server (upper part + KD loss)
    strategy = SplitKD(exp.scheduler, fraction_train=cfg.train.fraction_train, min_nodes=cfg.fleet.min_nodes,
                       round_timeout=cfg.faults.round_timeout, seed=cfg.train.seed)

    def test(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_numpy_state(exp.student, {k: v.numpy() for k, v in arrays.items()})
        accuracy, loss = evaluate(exp.student, exp.dataset.x_test, exp.dataset.y_test)
        return MetricRecord({"test_accuracy": accuracy, "test_loss": loss})

    result = strategy.start(grid, ArrayRecord(torch_state_dict=exp.student.state_dict()),
                            num_rounds=cfg.train.num_rounds, timeout=cfg.faults.round_timeout, evaluate_fn=test)
    out = Path(cfg.output.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result.arrays.to_torch_state_dict(), out / "my_student.pt")  # the whole student


# Your ClientApp keeps its own handlers; add the split ones (each SuperNode needs
# --node-config "partition-id=I num-partitions=N" to pick its data).
client_app = ClientApp()
client_app.query("describe")(splitkd_client.describe)  # which device this node is
client_app.train("split_forward")(splitkd_client.split_forward)
client_app.train("split_backward")(splitkd_client.split_backward)
client_app.evaluate("split")(splitkd_client.evaluate)  # split evaluation, used when fraction-evaluate > 0
