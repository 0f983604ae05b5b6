"""The edge's bf16 autocast and torch.compile options: same protocol, float32 on the wire."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedsplitkd.models.zoo import build_student, build_teacher
from fedsplitkd.protocol.runtime import EdgeRuntime, load_numpy_state, state_to_numpy

SHAPE, CLASSES, BATCH = (9, 128), 6, 16


def steps(edge: EdgeRuntime, student, teacher, cut: str, n: int = 3):
    """n server steps on fixed batches: the teacher's logits, the cut gradients, the losses."""
    rng = np.random.default_rng(0)
    embedding = teacher.device_part(teacher.cut_points[0])
    lower = student.device_part(cut)
    out = []
    for _ in range(n):
        x = torch.from_numpy(rng.standard_normal((BATCH, *SHAPE)).astype(np.float32))
        y = rng.integers(0, CLASSES, size=BATCH).astype(np.int64)
        with torch.no_grad():
            acts, emb = lower(x).numpy(), embedding(x).numpy()
        logits = edge.teacher_logits(emb)
        grads, loss = edge.train_step([acts[:6], acts[6:]], [y[:6], y[6:]], [logits[:6], logits[6:]])
        out.append((logits, grads, loss))
    return out


def pair(**options):
    torch.manual_seed(0)
    student, teacher = build_student("cnn1d", SHAPE, CLASSES), build_teacher("cnn1d", SHAPE, CLASSES)
    ref_student = copy.deepcopy(student)
    plain = EdgeRuntime(ref_student, "conv2", teacher, 0.5, 3.0, 0.05, 0.9)
    edge = EdgeRuntime(student, "conv2", teacher, 0.5, 3.0, 0.05, 0.9, **options)
    return (plain, ref_student), (edge, student), teacher


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_bf16_autocast_keeps_the_step_close_and_the_payloads_float32():
    (plain, ref_student), (edge, student), teacher = pair(precision="bf16")
    for (t_ref, g_ref, l_ref), (t, g, loss) in zip(steps(plain, ref_student, teacher, "conv2"),
                                                   steps(edge, student, teacher, "conv2")):
        assert t.dtype == np.float32 and all(x.dtype == np.float32 for x in g)
        assert 0 < relative(t, t_ref) < 0.05  # bf16 ran (not bitwise fp32) and stays close
        assert all(0 < relative(a, b) < 0.1 for a, b in zip(g, g_ref))
        assert loss == pytest.approx(l_ref, rel=0.02)
    assert all(p.dtype == torch.float32 for p in edge.part.parameters())


def test_compiled_step_equals_the_eager_step_and_follows_loaded_weights():
    (plain, ref_student), (edge, student), teacher = pair(compiled=True)
    assert edge.forward is not edge.part and edge.teacher_forward is not edge.teacher_rest
    for (t_ref, g_ref, l_ref), (t, g, loss) in zip(steps(plain, ref_student, teacher, "conv2", 2),
                                                   steps(edge, student, teacher, "conv2", 2)):
        np.testing.assert_allclose(t, t_ref, atol=1e-5)
        for a, b in zip(g, g_ref):
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert loss == pytest.approx(l_ref, rel=1e-5)
    # weights loaded into the part (a new round's average) are the ones the compiled forward uses
    weights = {k: v * 0.5 for k, v in state_to_numpy(edge.part).items()}
    load_numpy_state(edge.part, weights)
    x = torch.randn(4, *student.block_stats()[student.cut_index("conv2") - 1].out_shape)
    with torch.no_grad():
        torch.testing.assert_close(edge.forward(x), edge.part(x), atol=1e-5, rtol=1e-5)
