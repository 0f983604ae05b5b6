"""FedDF's server-side ensemble distillation."""

import numpy as np
import torch

from fedsplitkd.baselines.feddf import ensemble_distill
from fedsplitkd.models.zoo import build_student


def kl_to_ensemble(model, members, x, temperature=3.0):
    with torch.no_grad():
        target = torch.stack([m(x) for m in members]).mean(0)
        log_p = torch.log_softmax(model(x) / temperature, -1)
        log_q = torch.log_softmax(target / temperature, -1)
        return float((log_q.exp() * (log_q - log_p)).sum(-1).mean())


def test_distillation_pulls_the_fused_model_to_the_ensemble_mean():
    torch.manual_seed(0)
    members = [build_student("mlp", (12,), 4).eval() for _ in range(3)]
    fused = build_student("mlp", (12,), 4)
    x = np.random.default_rng(0).normal(size=(256, 12)).astype(np.float32)
    before = kl_to_ensemble(fused, members, torch.from_numpy(x))
    ensemble_distill(fused, members, x, steps=200, temperature=3.0, batch_size=64, seed=0)
    after = kl_to_ensemble(fused, members, torch.from_numpy(x))
    assert after < 0.2 * before
    # the members are the teacher: they do not move
    assert all(not p.requires_grad or p.grad is None for m in members for p in m.parameters())
