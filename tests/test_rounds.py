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


class LoggedFleet(InProcessFleet):
    """An in-process fleet that logs each send with its round (``fail_round``: that round's sends raise)."""

    def __init__(self, setups, log: list, fail_round: int | None = None):
        super().__init__(setups)
        self.log, self.fail_round = log, fail_round

    def transport(self, devices, evaluate=False):
        inner, log, fail_round = super().transport(devices, evaluate), self.log, self.fail_round

        class Logged:
            def send(self, requests):
                server_round = next(iter(requests.values()))["round"]
                if server_round == fail_round:
                    raise ConnectionError("the grid is gone")
                log.append(("send", server_round))
                inner.send(requests)

            def receive(self):
                return inner.receive()

        return Logged()


def run_logged(overlap, log: list, fail_round=None) -> dict:
    """Rounds 1-3 over a LoggedFleet; ``log`` gets the sends and the records, in order.
    Returns each round's (test accuracy and loss, train loss) as its callback saw them."""
    cfg = resolve(tiny(fraction_train=0.5))
    exp = build(cfg)
    results = {}
    fleet = LoggedFleet({i: device_setup(cfg, i, DEVICES) for i in range(DEVICES)}, log, fail_round)

    def on_round(server_round, stats, evaluation):
        log.append(("record", server_round))
        results[server_round] = (exp.evaluate(), stats.train_loss)

    rngs = {"train": streams.sampling(0), "evaluate": streams.evaluate_sampling(0)}
    train(exp.scheduler, fleet, range(1, 4), rngs, 0.5, 0.0, on_round, overlap)
    return results


def test_an_overlapped_round_records_once_the_next_rounds_first_requests_are_out():
    plain_log, log = [], []
    plain = run_logged(lambda r: False, plain_log)
    overlapped = run_logged(lambda r: r != 2, log)  # round 2 (a checkpoint round, say) records at once
    assert plain_log.index(("record", 1)) < plain_log.index(("send", 2))
    first_send = {r: log.index(("send", r)) for r in (2, 3)}
    assert log.index(("record", 1)) == first_send[2] + 1  # right after the first requests, before the replies
    assert log.index(("record", 2)) < first_send[3]
    assert log[-1] == ("record", 3) and [e for e in log if e[0] == "record"] == [("record", r) for r in (1, 2, 3)]
    # the student the callback sees is the round's: the next round's requests do not change it
    assert overlapped == plain


def test_a_failing_round_still_records_the_overlapped_one_before_it():
    log = []
    with pytest.raises(ConnectionError, match="the grid is gone"):
        run_logged(lambda r: True, log, fail_round=2)
    assert log[-1] == ("record", 1) and {e for e in log if e[0] == "send"} == {("send", 1)}
