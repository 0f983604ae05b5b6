"""FedDF's server-side ensemble distillation."""

import numpy as np
import torch

from fedsplitkd.baselines.feddf import ensemble_distill, member_logits
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


def test_the_ensemble_computed_once_is_the_per_batch_ensemble_bit_for_bit():
    """What the distillation reads per step, the members' mean on the drawn rows, comes from one
    pass over the public set in chunks; it must be what the batch's own forward passes give."""
    torch.manual_seed(0)
    members = [build_student("auto", (1, 8, 8), 10).eval() for _ in range(5)]
    x = torch.randn(300, 1, 8, 8)
    once = member_logits(members, x, chunk=128)  # three chunks, the last one short
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = torch.randint(len(x), (64,), generator=generator)
        with torch.no_grad():
            per_batch = torch.stack([m(x[idx]) for m in members]).mean(0)
        assert torch.equal(once[:, idx].mean(0), per_batch)


def test_members_run_per_step_where_their_logits_would_not_fit(monkeypatch):
    """Past the memory bound the members run on each drawn batch, as before: the same fused model."""
    from fedsplitkd.baselines import feddf

    torch.manual_seed(0)
    members = [build_student("mlp", (12,), 4).eval() for _ in range(3)]
    start = build_student("mlp", (12,), 4).state_dict()
    x = np.random.default_rng(0).normal(size=(200, 12)).astype(np.float32)
    fused = []
    for bound in (feddf.MEMBER_LOGITS_BYTES, 0):
        monkeypatch.setattr(feddf, "MEMBER_LOGITS_BYTES", bound)
        model = build_student("mlp", (12,), 4)
        model.load_state_dict(start)
        fused.append(ensemble_distill(model, members, x, steps=30, temperature=3.0, batch_size=64, seed=0))
    assert feddf.member_logits(members, torch.from_numpy(x)) is None  # the bound (0) is in force
    for a, b in zip(fused[0].parameters(), fused[1].parameters()):
        assert torch.equal(a, b)
