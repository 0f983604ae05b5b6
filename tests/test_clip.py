"""grad-clip: every step's gradient, on the server part, the device part and whole models, is
scaled down to the bound; a step within it is left exactly as it was."""

from __future__ import annotations

import numpy as np
import torch

from fedsplitkd.models.zoo import build_student, build_teacher
from fedsplitkd.protocol.runtime import DeviceRuntime, EdgeRuntime, state_to_numpy

LR = 0.5


def server_step(grad_clip: float) -> tuple[float, np.ndarray]:
    """One KD step on a fresh server part towards a teacher with +-30 logits: the weights' move, and
    the cut-layer gradient sent back."""
    torch.manual_seed(0)
    student = build_student("auto", (1, 8, 8), 10)
    edge = EdgeRuntime(student, "conv1", None, 0.9, 2.0, LR, 0.0, grad_clip=grad_clip)
    before = state_to_numpy(edge.part)
    acts = np.random.default_rng(0).normal(size=(16, *student.block_stats()[0].out_shape)).astype(np.float32)
    logits = np.zeros((16, 10), np.float32)
    logits[:, 3] = 30.0
    grads, _ = edge.train_step([acts], [np.arange(16) % 10], [logits])
    moved = np.sqrt(sum(((state_to_numpy(edge.part)[k] - v) ** 2).sum() for k, v in before.items()))
    return moved, grads[0]


def test_the_server_step_is_bounded_and_untouched_within_the_bound():
    free, free_grads = server_step(0.0)
    clipped, clipped_grads = server_step(0.1)
    assert free > 0.1 * LR * 1.5  # this step is large enough for the bound to bite
    assert clipped <= 0.1 * LR * (1 + 1e-5)
    np.testing.assert_array_equal(clipped_grads, free_grads)  # the cut gradient is the loss's, clipped on the device
    loose, _ = server_step(1e6)
    assert loose == free


def test_the_device_step_is_bounded():
    torch.manual_seed(0)
    student = build_student("auto", (1, 8, 8), 10)
    teacher = build_teacher("auto", (1, 8, 8), 10)
    x = np.random.default_rng(1).normal(size=(8, 1, 8, 8)).astype(np.float32)
    grads = np.full((8, *student.block_stats()[0].out_shape), 10.0, np.float32)
    moves = []
    for grad_clip in (0.0, 0.05):
        runtime = DeviceRuntime(student, "conv1", LR, 0.0, teacher[0], grad_clip)
        weights = state_to_numpy(runtime.part)
        runtime.backward([x], [grads])
        after = state_to_numpy(runtime.part)
        moves.append(np.sqrt(sum(((after[k] - v) ** 2).sum() for k, v in weights.items())))
        runtime.load(weights)  # back to the start for the next bound
    assert moves[0] > 0.05 * LR * 1.5 and moves[1] <= 0.05 * LR * (1 + 1e-5)
