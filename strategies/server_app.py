"""The fedsplitkd ServerApp: validate the run config, build the experiment, run the method, write results."""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedsplitkd.baselines import central, fedavg, fedgkt, local
from fedsplitkd.config import resolve
from fedsplitkd.experiment import Experiment, build
from fedsplitkd.results import ResultsWriter, run_dir
from fedsplitkd.strategies.recorder import Recorder
from fedsplitkd.strategies.splitkd import SplitKD

app = ServerApp()


def run_split(grid: Grid, exp: Experiment, recorder: Recorder) -> None:
    """splitkd and splitfed: the split protocol under Flower's own Strategy.start loop."""
    cfg = exp.cfg
    strategy = SplitKD(exp.scheduler, cfg["fraction-train"], cfg["fraction-evaluate"], cfg["min-nodes"],
                       cfg["round-timeout"], seed=cfg["seed"])

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        stats = strategy.last_stats if server_round else None
        extra = dict(strategy.last_evaluation.items()) if server_round and strategy.last_evaluation else {}
        return recorder.round(server_round, *exp.evaluate(), stats,
                              {k: v for k, v in extra.items() if k.startswith("val_")})

    strategy.start(grid, ArrayRecord(torch_state_dict=exp.student.state_dict()),
                   num_rounds=cfg["num-rounds"], timeout=cfg["round-timeout"], evaluate_fn=evaluate_fn)


METHODS = {"splitkd": run_split, "splitfed": run_split, "fedavg": fedavg.run, "fedprox": fedavg.run,
           "feddf": fedavg.run,
           "local": local.run, "fd": local.run, "fedgkt": fedgkt.run, "central-kd": central.run}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = resolve(context.run_config)  # a bad value stops the run here, naming the key
    directory = run_dir(cfg)
    writer = ResultsWriter(cfg, directory)
    exp = build(cfg)
    METHODS[cfg["method"]](grid, exp, Recorder(exp, writer))
    writer.write_json("clusters.json", exp.scheduler.history)
    summary = writer.finish(exp.student, exp.server.cut)
    log(INFO, "fedsplitkd: %s final test accuracy %.4f; results in %s", cfg["method"],
        summary["test_accuracy"], directory)
