"""The fedsplitkd ServerApp: validate the run config, build the experiment, run, write results."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from fedsplitkd.config import resolve
from fedsplitkd.experiment import build, metrics_row
from fedsplitkd.results import ResultsWriter, run_dir
from fedsplitkd.server import RoundStats
from fedsplitkd.strategies.splitkd import SplitKD
from flwr.supercore import log
from logging import INFO

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = resolve(context.run_config)  # a bad value stops the run here, naming the key
    directory = run_dir(cfg)
    writer = ResultsWriter(cfg, directory)
    exp = build(cfg)
    strategy = SplitKD(exp.server, cfg["fraction-train"], cfg["fraction-evaluate"], cfg["min-nodes"],
                       seed=cfg["seed"])
    clock = {"start": time.perf_counter()}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        accuracy, loss = exp.evaluate()
        if server_round == 0:
            writer.append(metrics_row(0, cfg["method"], accuracy, loss, None, 0.0))
        return MetricRecord({"test_accuracy": accuracy, "test_loss": loss})

    def on_round(server_round: int, stats: RoundStats, result: Result) -> None:
        test = result.evaluate_metrics_serverapp[server_round]
        row = metrics_row(server_round, cfg["method"], test["test_accuracy"], test["test_loss"], stats,
                          time.perf_counter() - clock["start"])
        if server_round in result.evaluate_metrics_clientapp:
            row.update({k: v for k, v in result.evaluate_metrics_clientapp[server_round].items()
                        if k.startswith("val_")})
        writer.append(row)
        log(INFO, "[round %d/%d] test acc %.4f loss %.4f | up %.2f MB down %.2f MB | %d/%d devices | %.2f s",
            server_round, cfg["num-rounds"], row["test_accuracy"], row["test_loss"], stats.bytes_up / 1e6,
            stats.bytes_down / 1e6, stats.completed, stats.devices, row["wall_s"])
        clock["start"] = time.perf_counter()

    strategy.start(grid, num_rounds=cfg["num-rounds"], timeout=cfg["round-timeout"],
                   evaluate_fn=evaluate_fn, on_round=on_round)
    summary = writer.finish(exp.student, cfg["cut"])
    log(INFO, "fedsplitkd: final test accuracy %.4f; results in %s", summary["test_accuracy"], directory)
