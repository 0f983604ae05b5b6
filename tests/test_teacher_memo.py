"""A frozen teacher's outputs kept per batch across the runs of one process (the bench harness turns it on)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsplitkd.protocol import teacher_memo


@pytest.fixture
def memo():
    with teacher_memo.kept():
        yield


def counted(model: nn.Module, seen: list[int]):
    def compute(rows: np.ndarray) -> np.ndarray:
        seen.append(len(rows))
        with torch.no_grad():
            return model(torch.from_numpy(rows)).numpy()
    return compute


def test_only_new_batches_and_new_weights_are_computed(memo):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    seen: list[int] = []
    first = teacher_memo.outputs(model, x, counted(model, seen))
    again = teacher_memo.outputs(model, x.copy(), counted(model, seen))
    assert seen == [6]
    np.testing.assert_array_equal(again, first)
    again[:] = 0  # the caller's copy
    np.testing.assert_array_equal(teacher_memo.outputs(model, x, counted(model, seen)), first)
    teacher_memo.outputs(model, x[::-1], counted(model, seen))  # the same rows, another batch
    assert seen == [6, 6]
    with torch.no_grad():
        model.weight.mul_(2)  # other weights: nothing is reused
    teacher_memo.outputs(model, x, counted(model, seen))
    assert seen == [6, 6, 6]
    teacher_memo.outputs(model, x, counted(model, seen), variant="bf16")  # another computation
    assert seen == [6, 6, 6, 6]


def test_a_batch_gets_what_computing_it_gives_whatever_was_kept_before(memo):
    """A network's output for a row can differ in its last bits with its batch; the memo must
    never hand a run a row computed in another batch (a run's result would then depend on the
    runs before it in the process)."""
    model, seen = nn.Linear(4, 3), []

    def batch_dependent(rows: np.ndarray) -> np.ndarray:  # as a CPU kernel blocked by batch size
        return counted(model, seen)(rows) + np.float32(1e-7 * len(rows))

    x = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
    teacher_memo.outputs(model, x, batch_dependent)
    part = teacher_memo.outputs(model, x[:2], batch_dependent)
    np.testing.assert_array_equal(part, batch_dependent(x[:2]))


def test_off_by_default_and_after_kept_computes_everything():
    with teacher_memo.kept():
        assert teacher_memo.enabled()
    assert not teacher_memo.enabled()
    model, seen = nn.Linear(4, 3), []
    x = np.zeros((5, 4), np.float32)
    teacher_memo.outputs(model, x, counted(model, seen))
    teacher_memo.outputs(model, x, counted(model, seen))
    assert seen == [5, 5]


def test_frozen_logits_in_eval_mode_and_same_as_a_plain_pass(memo):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).train()
    x = np.random.default_rng(1).normal(size=(7, 4)).astype(np.float32)
    logits = teacher_memo.frozen_logits(model, x, batch_size=3)
    assert model.training and model[1].training  # modes given back
    with torch.no_grad():
        plain = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-6)


def test_the_memo_is_bounded_in_bytes(memo, monkeypatch):
    model, seen = nn.Linear(4, 3), []
    x = np.random.default_rng(2).normal(size=(4, 4)).astype(np.float32)
    monkeypatch.setattr(teacher_memo, "MAX_BYTES", 4 * 3 * 4 + 1)  # four rows of three float32 logits
    teacher_memo.outputs(model, x, counted(model, seen))
    teacher_memo.outputs(model, x + 1, counted(model, seen))  # over the bound: the first batch is let go
    teacher_memo.outputs(model, x, counted(model, seen))
    assert seen == [4, 4, 4]
