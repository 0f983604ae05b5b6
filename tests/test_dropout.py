"""Injected device dropout (``dropout-rate`` at a stage) and devices that never answer."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from fedsplitkd import config as config_lib
from fedsplitkd.protocol.device import DeviceDropout, device_setup, handle_evaluate
from fedsplitkd.run.experiment import build, run_inprocess
from fedsplitkd.protocol.payload import WEIGHTS, pack
from fedsplitkd.protocol.runtime import state_to_numpy
from fedsplitkd.strategies.transport import GridTransport

from conftest import tiny

DEVICES = 8


def picked(cfg: dict, server_round: int, rate: float) -> set[int]:
    """The devices the rule drops, computed here independently of the device code."""
    return {d for d in range(DEVICES)
            if np.random.default_rng([cfg.get("seed", 0), server_round, d, 13]).random() < rate}


@pytest.mark.parametrize("stage", ["forward", "backward"])
def test_dropped_devices_are_counted_by_stage_and_left_out(stage):
    cfg = tiny(num_rounds=2, dropout_rate=0.4, dropout_stage=stage, exchange_batches=100)
    _, rows = run_inprocess(cfg, DEVICES)
    for row in rows[1:]:
        lost = picked(cfg, row["round"], 0.4)
        assert 0 < len(lost) < DEVICES
        assert row[f"dropped_{stage}"] == row["dropped_failed"] == len(lost)
        assert row["completed"] == DEVICES - len(lost)
    clean = run_inprocess(tiny(num_rounds=1, exchange_batches=100), DEVICES)[1][1]
    if stage == "backward":  # their one chunk was uploaded and trained on before they left
        assert rows[1]["bytes_up_activations"] == clean["bytes_up_activations"]
    else:
        assert rows[1]["bytes_up_activations"] < clean["bytes_up_activations"]


def test_evaluation_dropout_is_counted():
    cfg = config_lib.resolve(tiny(dropout_rate=0.5, dropout_stage="evaluate"))
    exp = build(cfg)
    request = {"kind": "forward", "round": 3, **pack(WEIGHTS, state_to_numpy(exp.server.device_part))}
    replies = {}
    for d in range(DEVICES):
        try:
            replies[d] = handle_evaluate(request, device_setup(cfg, d, DEVICES))
        except DeviceDropout as err:
            replies[d] = str(err)
    lost = picked(dict(cfg), 3, 0.5)
    assert {d for d, r in replies.items() if isinstance(r, str)} == lost
    accuracy, _, n, dropped = exp.server.evaluate_replies(replies, 3)
    assert dropped == len(lost) and n > 0 and 0.0 <= accuracy <= 1.0


class SilentGrid:
    """Accepts every message and never answers."""

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        return []


def test_a_device_that_never_answers_times_out_and_the_round_completes_without_it(monkeypatch):
    for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):  # Messages outside an app
        monkeypatch.setattr(TaskIdentity, name, value)
    exp = build(config_lib.resolve(tiny()))
    transport = GridTransport(SilentGrid(), timeout=0.2, nodes={0: 10, 1: 11})
    stats = exp.server.run_round(transport, [0, 1], 1)
    assert (stats.completed, stats.dropped["failed"], stats.dropped["forward"]) == (0, 2, 2)
    assert all("no reply within" in reason for *_, reason in stats.drops)
