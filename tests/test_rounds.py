"""The one round loop (fedsplitkd.protocol.rounds.train): the in-process run and SplitKD.start over a
Flower Grid drive it alike, split evaluation included, and Flower's one-shot hooks refuse."""

import csv
import math

import pytest
from flwr.app import ArrayRecord

from fedsplitkd.protocol.rounds import InProcessFleet, sample_devices, train
from fedsplitkd.run.experiment import build, run_inprocess
from fedsplitkd.config import resolve
from fedsplitkd.protocol.device import device_setup
from fedsplitkd.strategies.inprocess import run_app
from fedsplitkd.strategies.splitkd import SplitKD
from fedsplitkd import streams

from conftest import tiny

DEVICES = 4
COLUMNS = ("test_accuracy", "test_loss", "train_loss", "bytes_up", "bytes_down", "completed", "val_accuracy",
           "val_loss", "dropped_evaluate", "device_energy_j")


def overrides(tmp_path, **extra) -> dict:
    return {**tiny(num_rounds=2, fraction_train=0.75, fraction_evaluate=0.5), "output-dir": str(tmp_path),
            "run-name": "flower", **extra}


def test_the_flower_strategy_and_the_in_process_run_are_one_loop(tmp_path):
    """Sampling, training, split evaluation and accounting agree round by round: both are rounds.train."""
    directory = run_app(overrides(tmp_path), DEVICES)
    flower = list(csv.DictReader(open(directory / "metrics.csv")))
    _, rows = run_inprocess(overrides(tmp_path), DEVICES)
    assert len(flower) == len(rows) == 3
    for ours, theirs in zip(rows[1:], flower[1:]):
        assert not math.isnan(ours["val_accuracy"])  # the in-process run evaluates on the devices too
        for column in COLUMNS:
            assert float(theirs[column]) == pytest.approx(ours[column], rel=1e-6, abs=1e-9), column


def test_train_calls_back_once_per_round_with_the_round_and_its_results():
    cfg = resolve(tiny(fraction_train=0.5))
    exp = build(cfg)
    fleet = InProcessFleet({i: device_setup(cfg, i, DEVICES) for i in range(DEVICES)})
    seen = []
    rngs = {"train": streams.sampling(0), "evaluate": streams.evaluate_sampling(0)}
    train(exp.scheduler, fleet, range(3, 5), rngs, 0.5, 0.0, lambda r, stats, ev: seen.append((r, stats, ev)))
    assert [r for r, _, _ in seen] == [3, 4]
    assert all(stats.devices == 2 and stats.completed == 2 and ev is None for _, stats, ev in seen)
    # the devices sampled are the strategy's: the same stream, the same picks
    again = streams.sampling(0)
    assert [sorted(stats.completed_keys) for _, stats, _ in seen] == \
        [sample_devices(list(range(DEVICES)), 0.5, again) for _ in range(2)]


def test_flowers_one_shot_hooks_refuse_and_name_start():
    strategy = SplitKD(build(resolve(tiny())).server)
    with pytest.raises(NotImplementedError, match="SplitKD.start"):
        strategy.configure_train(1, ArrayRecord(), None, None)
    with pytest.raises(NotImplementedError, match="SplitKD.start"):
        strategy.aggregate_evaluate(1, [])


def test_a_finished_runs_student_loads_from_its_directory(tmp_path):
    """config.yaml holds the flat run config; load_student resolves it into the typed one again."""
    from fedsplitkd.run.results import load_student
    from fedsplitkd.protocol.runtime import evaluate

    directory = run_app({**tiny(), "output-dir": str(tmp_path), "run-name": "done"}, 2)
    student = load_student(directory)
    last = list(csv.DictReader(open(directory / "metrics.csv")))[-1]
    exp = build(resolve(tiny()))
    assert evaluate(student, exp.dataset.x_test, exp.dataset.y_test)[0] == pytest.approx(float(last["test_accuracy"]))
