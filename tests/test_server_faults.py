"""A device whose data breaks the server loss is dropped alone and trains nothing."""

import numpy as np
import pytest
import torch

from conftest import tiny
from malformed import Tampering
from fedsplitkd.config import resolve
from fedsplitkd.protocol.device import device_setup, handle_train
from fedsplitkd.run.experiment import build
from fedsplitkd.protocol.rounds import InProcessTransport


def setup(overrides):
    cfg = resolve(tiny(**overrides))
    exp = build(cfg)
    return cfg, exp, {k: device_setup(cfg, k, 4) for k in (0, 1)}


def first_chunks(exp, setups):
    requests = exp.server.first_requests(list(setups), 1)
    return {k: handle_train(requests[k], {}, setups[k])[0] for k in setups}


@pytest.mark.parametrize("batching", ["per-device", "joint", "interleaved"])
def test_only_the_nan_device_is_dropped_and_its_later_minibatches_skipped(batching):
    cfg, exp, setups = setup({"server_batching": batching, "exchange_batches": 4})
    chunks = first_chunks(exp, setups)
    assert len(chunks[1]["batch-sizes"]) > 1
    chunks[1]["activations"][0, ...] = np.nan  # its first minibatch only
    teacher = {k: exp.server.teacher_logits(k, c) for k, c in chunks.items()}
    steps = []
    original = exp.server.edge.train_step
    exp.server.edge.train_step = lambda *a: steps.append(len(a[0][0])) or original(*a)
    grads, loss_sum, diverged = exp.server.train_chunks(chunks, teacher)
    assert diverged == {1}
    assert set(grads) == {0}
    assert grads[0].shape == chunks[0]["activations"].shape
    assert np.isfinite(loss_sum)
    if batching == "per-device":  # device 0's minibatches, then device 1's first (failed) only
        assert len(steps) == len(chunks[0]["batch-sizes"]) + 1


@pytest.mark.parametrize("batching, expected", [("per-device", [[0]] * 4 + [[1]] * 4),
                                                ("interleaved", [[0], [1]] * 4), ("joint", [[0, 1]] * 4)])
def test_server_batching_orders_the_steps(batching, expected):
    """Which devices' minibatches each server step takes: device after device, alternating, together."""
    cfg, exp, setups = setup({"server_batching": batching, "exchange_batches": 4})
    chunks = first_chunks(exp, setups)
    assert all(len(c["batch-sizes"]) == 4 for c in chunks.values())
    teacher = {k: exp.server.teacher_logits(k, c) for k, c in chunks.items()}
    steps = []
    original = exp.server.edge.train_step

    def spy(acts, labels, logits):
        steps.append([k for a in acts for k, c in chunks.items() if np.shares_memory(a, c["activations"])])
        return original(acts, labels, logits)

    exp.server.edge.train_step = spy
    grads, _, _ = exp.server.train_chunks(chunks, teacher)
    assert steps == expected
    assert all(grads[k].shape == chunks[k]["activations"].shape for k in chunks)


def test_huge_activations_are_rejected_and_leave_no_trace():
    """Finite but huge activations are refused; the model equals training device 0 alone."""
    cfg, exp, setups = setup({"exchange_batches": 4})

    overflowing = Tampering(setups, 1, 0, lambda r: {**r, "activations": np.full_like(r["activations"], 3e38)})
    stats = exp.server.run_round(overflowing, [0, 1], 1)
    assert (stats.completed, stats.dropped["invalid"]) == (1, 1)
    _, alone, setups_alone = setup({"exchange_batches": 4})
    alone.server.run_round(InProcessTransport(setups_alone), [0], 1)
    for (name, a), b in zip(exp.student.state_dict().items(), alone.student.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_a_device_claiming_more_examples_is_not_averaged():
    """Device parts are weighted by the samples the server saw, and the claim must match."""
    cfg, exp, setups = setup({"exchange_batches": 4})

    boasting = Tampering(setups, 1, -1, lambda r: {**r, "num-examples": 10**9})  # in its final reply
    stats = exp.server.run_round(boasting, [0, 1], 1)
    assert (stats.completed, stats.dropped["invalid"]) == (1, 1)
