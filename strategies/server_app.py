"""The fedsplitkd ServerApp: validate the run config, build the experiment, run the method, write results."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedsplitkd.run import checkpoint
from fedsplitkd.baselines import central, fedavg, fedgkt, local
from fedsplitkd.config import resolve
from fedsplitkd.run.experiment import Experiment, build
from fedsplitkd.run.results import ResultsWriter, run_dir
from fedsplitkd.data.sources import CharTokenizer
from fedsplitkd.strategies.recorder import Recorder
from fedsplitkd.strategies.splitkd import SplitKD

app = ServerApp()


def run_split(grid: Grid, exp: Experiment, recorder: Recorder) -> None:
    """splitkd, split and splitfed: ``SplitKD.start`` (the round loop of ``fedsplitkd.protocol.rounds``)
    over the grid, from round 1 or from the checkpoint ``resume`` names."""
    cfg = exp.cfg
    strategy = SplitKD(exp.scheduler, cfg.train.fraction_train, cfg.train.fraction_evaluate, cfg.fleet.min_nodes,
                       cfg.faults.round_timeout, seed=cfg.train.seed, virtual_devices=cfg.fleet.virtual_devices)
    rngs = strategy.rngs
    done = checkpoint.resume(exp, rngs)
    if done:
        recorder.writer.restart_from(done)
        strategy.round_offset = done[-1]["round"]
        log(INFO, "fedsplitkd: resumed from the checkpoint of round %d in %s", strategy.round_offset, cfg.faults.resume)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and done:
            return None  # the checkpoint's round 0 is in metrics.csv already
        server_round += strategy.round_offset
        stats, evaluation = (strategy.last_stats, strategy.evaluation) if server_round else (None, None)
        record = recorder.round(server_round, *exp.evaluate(server_round), stats, evaluation)
        checkpoint.maybe_save(exp, server_round, rngs, recorder.writer.rows, recorder.writer.dir)
        return record

    strategy.start(grid, ArrayRecord(torch_state_dict=exp.student.state_dict()),
                   num_rounds=cfg.train.num_rounds - strategy.round_offset, timeout=cfg.faults.round_timeout,
                   evaluate_fn=evaluate_fn, overlap=lambda r: not checkpoint.due(cfg, r + strategy.round_offset))


METHODS = {"splitkd": run_split, "split": run_split, "splitfed": run_split, "fedavg": fedavg.run,
           "fedprox": fedavg.run,
           "feddf": fedavg.run,
           "local": local.run, "fd": local.run, "fedgkt": fedgkt.run, "central-kd": central.run,
           "public-kd": central.run}


def run(grid: Grid, cfg) -> Path:
    """Run the method ``cfg`` names over ``grid`` and write its results; returns their directory."""
    directory = Path(cfg.faults.resume).expanduser() if cfg.faults.resume else run_dir(cfg)
    writer = ResultsWriter(cfg, directory)
    exp = build(cfg)
    METHODS[cfg.method.name](grid, exp, Recorder(exp, writer))
    writer.write_json("clusters.json", exp.scheduler.history)
    if exp.dataset.vocab is not None:  # token ids -> characters, for whoever uses the student
        writer.write_json("tokenizer.json", CharTokenizer(exp.dataset.vocab).to_json())
    last = writer.rows[-1]
    extras = {"teacher_test_accuracy": exp.teacher_accuracy,
              "gap_to_teacher": exp.teacher_accuracy - last["test_accuracy"],
              "devices_over_memory": len(exp.server.costs.over_memory),
              **(exp.health.summary() if exp.health else {})}
    summary = writer.finish(exp.student.cpu(), exp.server.cut, extras)  # saved models load on any machine
    log(INFO, "fedsplitkd: %s final test accuracy %.4f (teacher %.4f); results in %s", cfg.method.name,
        summary["test_accuracy"], exp.teacher_accuracy, directory)
    return directory


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, resolve(context.run_config))  # a bad value stops the run here, naming the key
