"""Teacher-input modes: the cached mode trains exactly as the embedding mode, for fewer bytes."""

import numpy as np
import pytest

from conftest import tiny
from fedsplitkd.run.experiment import run_inprocess

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


def test_the_teachers_augmentation_shifts_images_and_leaves_other_inputs_alone():
    """A shift is an invariance of images, not of an arbitrary (C, L) window or feature vector."""
    import torch

    from fedsplitkd.models.teacher import augment

    generator = torch.Generator().manual_seed(0)
    for shape in ((4, 3, 16), (4, 64)):
        x = torch.randn(shape)
        assert torch.equal(augment(x, generator), x)
    image = torch.zeros(2, 1, 8, 8)
    image[:, :, 4, 4] = 10.0
    for _ in range(10):
        moved = augment(image, generator)
        peak = (moved[0, 0] > 5).nonzero().tolist()
        assert len(peak) == 1 and abs(peak[0][0] - 4) <= 1 and abs(peak[0][1] - 4) <= 1
        assert 0.0 < float((moved - torch.roll(image, (peak[0][0] - 4, peak[0][1] - 4), (2, 3))).std()) < 0.1
