"""Teacher-input modes: the cached mode trains exactly as the embedding mode, for fewer bytes."""

import numpy as np
import pytest

from conftest import tiny
from fedsplitkd.experiment import run_inprocess

DEVICES = 3


@pytest.fixture(scope="module")
def runs():
    base = tiny(num_rounds=3, exchange_batches=2)
    return {mode: run_inprocess({**base, "teacher-input": mode}, DEVICES)[1]
            for mode in ("embedding", "cached")}


def test_cached_mode_follows_the_embedding_mode_exactly(runs):
    for emb, cached in zip(runs["embedding"], runs["cached"], strict=True):
        assert cached["test_accuracy"] == emb["test_accuracy"]
        assert cached["test_loss"] == pytest.approx(emb["test_loss"], rel=1e-6)
        assert cached["train_loss"] == pytest.approx(emb["train_loss"], rel=1e-6, nan_ok=True)


def test_cached_mode_uploads_teacher_inputs_once(runs):
    emb, cached = runs["embedding"], runs["cached"]
    # Round 1 sends every teacher input (plus sample ids); later rounds send none.
    assert cached[1]["bytes_up"] > emb[1]["bytes_up"]  # + sample ids
    saved = emb[2]["bytes_up"] - cached[2]["bytes_up"]
    assert saved > 0.5 * (emb[1]["bytes_up"] - emb[1]["bytes_up_activations"])
    assert cached[2]["bytes_up"] == cached[3]["bytes_up"]
    assert np.all([r["completed"] == DEVICES for r in cached[1:]])
