"""public-kd and central-kd: the student distilled at the server, the teacher's logits computed once."""

from __future__ import annotations

import csv

import pytest

from conftest import tiny
from fedsplitkd.baselines import central


@pytest.mark.parametrize("method", ["public-kd", "central-kd"])
def test_server_distillation_learns_with_one_teacher_pass(method, tmp_path, monkeypatch):
    from fedsplitkd.strategies.inprocess import run_app

    passes = []
    once = central.teacher_logits
    monkeypatch.setattr(central, "teacher_logits", lambda teacher, x: passes.append(len(x)) or once(teacher, x))
    directory = run_app({**tiny(num_rounds=8, teacher_epochs=20, learning_rate=0.0222), "method": method,
                         "output-dir": str(tmp_path),
                         "run-name": method}, 4)
    rows = list(csv.DictReader(open(directory / "metrics.csv")))
    assert len(passes) == 1  # the frozen teacher ran over the data once, not every round
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"]) + 0.2
    assert all(float(r["device_energy_j"]) == 0 and int(r["bytes_up"]) == 0 for r in rows[1:])
    if method == "public-kd":  # the public split: 30 % of digits' 1,437 training images
        assert passes == [round(0.3 * 1437)]
    else:
        assert passes[0] > 700
