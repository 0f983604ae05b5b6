"""kd_loss against a hand computation (math, no torch.nn.functional)."""

from __future__ import annotations

import math

import pytest
import torch

from fedsplitkd.protocol.kd import kd_loss

STUDENT = [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3]]
TEACHER = [[1.0, 2.0, 0.0], [-0.5, 0.25, 3.0]]
LABELS = [0, 2]


def _log_softmax(row, t=1.0):
    z = [v / t for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def _hand_per_sample(student, teacher, labels, alpha, t):
    out = []
    for s, te, y in zip(student, teacher, labels):
        ce = -_log_softmax(s)[y]
        if alpha == 0.0:
            out.append(ce)
            continue
        log_ps, log_pt = _log_softmax(s, t), _log_softmax(te, t)
        kl = sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_pt, log_ps))
        out.append(alpha * t * t * kl + (1.0 - alpha) * ce)
    return out


def _tensors():
    return (torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64),
            torch.tensor(LABELS, dtype=torch.int64))


def test_hand_computation_sanity():
    # The hand CE of sample 0 (label 0): -log(e^2 / (e^2 + e^0.5 + e^-1)).
    expected = -(2.0 - math.log(math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)))
    assert _hand_per_sample(STUDENT, TEACHER, LABELS, 0.0, 1.0)[0] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("alpha,t", [(0.5, 3.0), (0.3, 1.0), (0.9, 4.5), (1.0, 2.0)])
def test_kd_loss_matches_hand_computation(alpha, t):
    s, te, y = _tensors()
    want = _hand_per_sample(STUDENT, TEACHER, LABELS, alpha, t)
    got = kd_loss(s, te, y, alpha, t)
    assert got.ndim == 0
    assert float(got) == pytest.approx(sum(want) / len(want), rel=1e-10, abs=1e-12)


def test_alpha_one_is_pure_scaled_kl():
    s, te, y = _tensors()
    t = 2.0
    # alpha = 1: no CE term at all, so the labels must not matter.
    a = kd_loss(s, te, y, 1.0, t, reduction="none")
    b = kd_loss(s, te, torch.tensor([1, 1]), 1.0, t, reduction="none")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    kl = []
    for srow, trow in zip(STUDENT, TEACHER):
        ls, lt = _log_softmax(srow, t), _log_softmax(trow, t)
        kl.append(t * t * sum(math.exp(q) * (q - p) for p, q in zip(ls, lt)))
    assert a.tolist() == pytest.approx(kl, rel=1e-10)


def test_alpha_zero_is_cross_entropy_and_needs_no_teacher():
    s, _, y = _tensors()
    got = kd_loss(s, None, y, 0.0, 3.0, reduction="none")
    ce = [-_log_softmax(row)[label] for row, label in zip(STUDENT, LABELS)]
    assert got.tolist() == pytest.approx(ce, rel=1e-12)
    assert float(kd_loss(s, None, y, 0.0, 3.0)) == pytest.approx(sum(ce) / 2, rel=1e-12)


def test_alpha_zero_ignores_a_given_teacher():
    s, te, y = _tensors()
    torch.testing.assert_close(kd_loss(s, te, y, 0.0, 3.0), kd_loss(s, None, y, 0.0, 3.0), atol=0, rtol=0)


@pytest.mark.parametrize("alpha,t", [(0.5, 3.0), (1.0, 1.0)])
def test_reduction_none_returns_per_sample_values(alpha, t):
    s, te, y = _tensors()
    got = kd_loss(s, te, y, alpha, t, reduction="none")
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(_hand_per_sample(STUDENT, TEACHER, LABELS, alpha, t), rel=1e-10)
    # and the default reduction is their mean
    assert float(kd_loss(s, te, y, alpha, t)) == pytest.approx(float(got.mean()), rel=1e-12)


def test_float32_inputs_match_hand_computation():
    got = kd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), 0.5, 3.0,
                  reduction="none")
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(_hand_per_sample(STUDENT, TEACHER, LABELS, 0.5, 3.0), rel=1e-5)


def test_identical_logits_leave_only_the_ce_term():
    s, _, y = _tensors()
    got = kd_loss(s, s.clone(), y, 0.4, 3.0, reduction="none")
    ce = [-_log_softmax(row)[label] for row, label in zip(STUDENT, LABELS)]
    assert got.tolist() == pytest.approx([0.6 * c for c in ce], rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1e-6])
def test_positive_alpha_without_teacher_raises(alpha):
    s, _, y = _tensors()
    with pytest.raises(ValueError, match="teacher"):
        kd_loss(s, None, y, alpha, 3.0)


def test_gradient_matches_hand_formula():
    # d loss / d z_s for one sample: alpha*T*(p_s^T - p_t^T) + (1-alpha)*(p_s - onehot)
    alpha, t = 0.5, 3.0
    s = torch.tensor([STUDENT[0]], dtype=torch.float64, requires_grad=True)
    te = torch.tensor([TEACHER[0]], dtype=torch.float64)
    kd_loss(s, te, torch.tensor([LABELS[0]]), alpha, t).backward()
    ps_t = [math.exp(v) for v in _log_softmax(STUDENT[0], t)]
    pt_t = [math.exp(v) for v in _log_softmax(TEACHER[0], t)]
    ps = [math.exp(v) for v in _log_softmax(STUDENT[0])]
    onehot = [1.0 if i == LABELS[0] else 0.0 for i in range(3)]
    want = [alpha * t * (a - b) + (1 - alpha) * (c - d) for a, b, c, d in zip(ps_t, pt_t, ps, onehot)]
    assert s.grad[0].tolist() == pytest.approx(want, rel=1e-10, abs=1e-12)
