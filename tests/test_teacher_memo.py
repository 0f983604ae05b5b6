"""A frozen teacher's outputs kept across the runs of one process (the bench harness turns it on)."""

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


def test_only_new_rows_and_new_weights_are_computed(memo):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    seen: list[int] = []
    first = teacher_memo.outputs(model, x, counted(model, seen))
    again = teacher_memo.outputs(model, np.concatenate([x[::-1], x[:2] + 1]), counted(model, seen))
    assert seen == [6, 2]  # the reversed rows were known, the two shifted ones were not
    np.testing.assert_array_equal(again[:6], first[::-1])
    with torch.no_grad():
        np.testing.assert_allclose(again[6:], model(torch.from_numpy(x[:2] + 1)).numpy(), rtol=1e-6)
        model.weight.mul_(2)  # other weights: nothing is reused
    teacher_memo.outputs(model, x, counted(model, seen))
    assert seen == [6, 2, 6]
    teacher_memo.outputs(model, x, counted(model, seen), variant="bf16")  # another computation
    assert seen == [6, 2, 6, 6]


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
    teacher_memo.outputs(model, x + 1, counted(model, seen))  # over the bound: the first rows are let go
    teacher_memo.outputs(model, x, counted(model, seen))
    assert seen == [4, 4, 4]
