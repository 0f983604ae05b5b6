"""A run that diverges or never learns says so; a round's upload is reported by kind."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from conftest import tiny
from fedsplitkd.run.experiment import run_inprocess
from fedsplitkd.protocol.runtime import scores
from fedsplitkd.run.health import Health, top_class_share


def test_health_flags_divergence_and_a_dead_student():
    health = Health(10)
    row = {"round": 1, "test_loss": 1.5, "test_accuracy": 0.4, "devices": 4, "completed": 4, "dropped_invalid": 0}
    assert health.update(row, 0.3) is None
    dead = {**row, "round": 3, "test_loss": 2.31, "test_accuracy": 0.1}
    assert "not learning" in health.update(dead, 1.0)
    assert health.update({**dead, "round": 4}, 1.0) is None  # warned once
    assert health.summary()["health"] == "not learning" and health.summary()["not_learning_round"] == 3
    assert health.update({**row, "round": 5}, 0.3) is None
    assert health.summary()["health"] == "ok"  # judged on the last round
    nan = {**row, "round": 6, "test_loss": math.nan, "test_accuracy": 0.1}
    assert "diverged" in health.update(nan, 1.0)
    assert health.summary() == {"health": "diverged", "diverged_round": 6, "not_learning_round": None,
                                "top_class_share": 1.0}
    all_dropped = Health(10)
    all_dropped.update({**row, "round": 2, "completed": 0, "dropped_invalid": 4}, 0.2)
    assert all_dropped.summary()["diverged_round"] == 2


def test_top_class_share_from_one_test_pass():
    """The test pass counts each class's predictions; the health check reads them (no second pass)."""
    model = torch.nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    x, y = np.ones((7, 2), np.float32), np.array([1, 1, 0, 2, 1, 0, 1])
    accuracy, loss, predicted = scores(model, x, y, batch_size=3)
    assert predicted.tolist() == [0, 7, 0] and accuracy == 4 / 7 and loss > 0
    assert top_class_share(predicted) == 1.0 and top_class_share(np.array([2, 1, 1])) == 0.5
    assert math.isnan(top_class_share(np.zeros(3)))


def test_a_diverging_run_is_flagged(caplog):
    """At learning rate 10 the student blows up: the run says so, with its round, and never ends
    silently at chance."""
    with caplog.at_level(logging.WARNING, logger="fedsplitkd"):
        exp, rows = run_inprocess(tiny(num_rounds=3, learning_rate=10.0, kd_alpha=0.0), 4)
    summary = exp.health.summary()
    assert summary["health"] in ("diverged", "not learning")
    assert (summary["diverged_round"] or summary["not_learning_round"]) in (1, 2, 3)
    assert any("diverged" in r.message or "not learning" in r.message for r in caplog.records)


def test_a_learning_run_is_ok_and_uploads_by_kind():
    exp, rows = run_inprocess(tiny(num_rounds=3, teacher_epochs=5), 4)
    assert exp.health.summary()["health"] == "ok", rows[-1]
    last_round, predicted = exp.predicted  # the last round's test pass, read by the health check
    assert last_round == 3 and predicted.sum() == len(exp.dataset.y_test)
    assert exp.health.top_class_share == top_class_share(predicted)
    first, last = rows[1], rows[-1]
    for row in (first, last):
        kinds = row["bytes_up_activations"] + row["bytes_up_teacher"] + row["bytes_up_labels"] + row["bytes_up_weights"]
        assert row["bytes_up_weights"] > 0 and row["bytes_up_labels"] > 0
        assert 0.9 * row["bytes_up"] < kinds <= row["bytes_up"]  # the rest is framing, ids and counters
    # teacher-input 'auto' is 'cached' here: each sample's embedding output (digits' teacher stem:
    # 32 x 8 x 8 floats) goes up in the first round it trains, and never again
    assert first["bytes_up_teacher"] == first["bytes_up_labels"] // 8 * 32 * 8 * 8 * 4
    assert last["bytes_up_teacher"] == 0
