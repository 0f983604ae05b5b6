"""evaluate-every: rounds left untested read NaN; the training and the tested rounds are unchanged."""

from __future__ import annotations

import csv
import math

import pytest

from conftest import tiny
from fedsplitkd.run.experiment import run_inprocess
from fedsplitkd.strategies.inprocess import run_app
from fedsplitkd.tools.bench import collapse

DEVICES = 4
TRAINING = ("train_loss", "bytes_up", "bytes_down", "device_energy_j", "completed")


def rows_of(method: str, tmp_path, every: int) -> list[dict]:
    config = {**tiny(num_rounds=3, method=method, holdout_fraction=0.1, evaluate_every=every),
              "output-dir": str(tmp_path), "run-name": f"{method}-{every}"}
    if method == "splitkd":
        return run_inprocess(config, DEVICES)[1]
    with open(run_app(config, DEVICES) / "metrics.csv") as f:
        return [{k: v if k == "method" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.mark.parametrize("method", ["splitkd", "fedavg", "local", "fedgkt"])
def test_untested_rounds_read_nan_and_the_rest_is_the_same(method, tmp_path):
    every_round, sparse = rows_of(method, tmp_path, 1), rows_of(method, tmp_path, 2)
    assert [r["round"] for r in sparse] == [0, 1, 2, 3]
    for full, row in zip(every_round, sparse):
        tested = row["round"] in (0, 2, 3)  # every 2nd round, and the last
        for column in ("test_accuracy", "test_loss", "holdout_accuracy", "holdout_loss"):
            if tested:
                assert row[column] == pytest.approx(full[column], rel=1e-6), (row["round"], column)
            else:
                assert math.isnan(row[column]), (row["round"], column)
        for column in TRAINING:
            assert row[column] == pytest.approx(full[column], rel=1e-6, nan_ok=True), (row["round"], column)
    # Model selection judges both alike: an untested round is no divergence.
    assert collapse(sparse, 10) == collapse(every_round, 10) != "diverged"


def test_an_untested_round_is_no_divergence_but_all_devices_dropped_is():
    from fedsplitkd.run.health import Health

    health = Health(10)
    untested = {"round": 1, "test_loss": math.nan, "test_accuracy": math.nan, "devices": 4, "completed": 4,
                "dropped_invalid": 0}
    assert health.update(untested, math.nan, tested=False) is None
    assert health.summary()["health"] == "ok"
    assert "diverged" in health.update({**untested, "round": 2, "completed": 0, "dropped_invalid": 4}, math.nan,
                                       tested=False)
    assert health.summary()["diverged_round"] == 2
