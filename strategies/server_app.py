"""The fedsplitkd ServerApp: validate the run config, build the experiment, run, write results."""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedsplitkd.config import resolve
from fedsplitkd.experiment import build, metrics_row
from fedsplitkd.results import ResultsWriter, run_dir
from fedsplitkd.strategies.splitkd import SplitKD

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = resolve(context.run_config)  # a bad value stops the run here, naming the key
    directory = run_dir(cfg)
    writer = ResultsWriter(cfg, directory)
    exp = build(cfg)
    strategy = SplitKD(exp.scheduler, cfg["fraction-train"], cfg["fraction-evaluate"], cfg["min-nodes"],
                       cfg["round-timeout"], seed=cfg["seed"])
    clock = [time.perf_counter()]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Test-split evaluation of the whole student, and the round's row of metrics.csv."""
        accuracy, loss = exp.evaluate()
        stats = strategy.last_stats if server_round else None
        row = metrics_row(server_round, cfg["method"], accuracy, loss, stats,
                          time.perf_counter() - clock[0] if server_round else 0.0)
        if server_round and strategy.last_evaluation is not None:
            row.update({k: v for k, v in strategy.last_evaluation.items() if k.startswith("val_")})
        writer.append(row)
        if stats:
            writer.append_devices(server_round, stats.device_costs)
            log(INFO, "[round %d/%d] test acc %.4f loss %.4f | up %.2f MB down %.2f MB | %d/%d devices | "
                "sim %.1f s, %.2f J | %.2f s", server_round, cfg["num-rounds"], accuracy, loss,
                stats.bytes_up / 1e6, stats.bytes_down / 1e6, stats.completed, stats.devices,
                row["sim_time_s"], row["device_energy_j"], row["wall_s"])
        clock[0] = time.perf_counter()
        return MetricRecord({"test_accuracy": accuracy, "test_loss": loss})

    strategy.start(grid, ArrayRecord(torch_state_dict=exp.student.state_dict()),
                   num_rounds=cfg["num-rounds"], timeout=cfg["round-timeout"], evaluate_fn=evaluate_fn)
    writer.write_json("clusters.json", exp.scheduler.history)
    summary = writer.finish(exp.student, exp.server.cut)
    log(INFO, "fedsplitkd: final test accuracy %.4f; results in %s", summary["test_accuracy"], directory)
