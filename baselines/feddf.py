"""feddf: FedAvg, then ensemble distillation on the server's unlabeled public split (Lin et al. 2020).

The averaged model is the starting point; the ensemble of the devices' returned models
(their averaged softened predictions) is the teacher; the labels of the public split are
never used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedsplitkd.fleet.costs import BACKWARD_FACTOR
from fedsplitkd.protocol.kd import kd_loss
from fedsplitkd.models.zoo import SplitModel
from fedsplitkd.protocol.runtime import load_numpy_state
from fedsplitkd import streams


MEMBER_LOGITS_BYTES = 512 * 2**20  # beyond this (a language model's public set), members run per step


def member_logits(members: list[SplitModel], x: torch.Tensor, chunk: int = 1024) -> torch.Tensor | None:
    """Every member's logits for every row of ``x`` (members x rows x ...), or None where they
    would not fit in ``MEMBER_LOGITS_BYTES``. The members are frozen while the fused model
    distils, so a public sample's outputs are computed once a round rather than once per draw
    (steps x batch rows). A row's logits do not depend on the rows beside it, and each step
    averages the members over the gathered rows as before: the same bits as per-batch passes."""
    with torch.no_grad():
        first = [m(x[:1]) for m in members]
        if sum(f.numel() for f in first) * 4 * len(x) > MEMBER_LOGITS_BYTES:
            return None
        return torch.stack([torch.cat([m(x[i:i + chunk]) for i in range(0, len(x), chunk)]) for m in members])


def ensemble_distill(fused: SplitModel, members: list[SplitModel], x_public: np.ndarray, steps: int,
                     temperature: float, batch_size: int, seed: int, lr: float = 1e-3) -> SplitModel:
    """Train ``fused`` towards the mean of the members' logits on unlabeled public data (Adam)."""
    generator = streams.torch_generator(seed)
    optimizer = torch.optim.Adam(fused.parameters(), lr=lr)
    x_all = torch.from_numpy(x_public)
    logits_of = member_logits(members, x_all) if steps else None
    for _ in range(steps):
        idx = torch.randint(len(x_all), (min(batch_size, len(x_all)),), generator=generator)
        x = x_all[idx]
        with torch.no_grad():
            teacher = (logits_of[:, idx] if logits_of is not None else torch.stack([m(x) for m in members])).mean(0)
        logits = fused(x)
        dummy = torch.zeros(logits.shape[:-1], dtype=torch.int64)  # alpha = 1: the labels play no part
        loss = kd_loss(logits, teacher, dummy, alpha=1.0, temperature=temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return fused


def distill_flops(student: SplitModel, members: int, steps: int, batch_size: int, public: int) -> float:
    """Server FLOPs of ``ensemble_distill``: every member's forward pass over the public set
    once, then the fused model's forward and backward per drawn sample (priced as every
    method's training: backward = 2x forward)."""
    forward = sum(s.forward_flops for s in student.block_stats())
    return forward * (members * public * (steps > 0) + steps * batch_size * (1 + BACKWARD_FACTOR))


class FedDF(FedAvg):
    """Flower's FedAvg with server-side ensemble distillation after each aggregation."""

    def __init__(self, make_student: Callable[[], SplitModel], x_public: np.ndarray, steps: int = 100,
                 temperature: float = 3.0, batch_size: int = 64, seed: int = 0, **fedavg_args):
        super().__init__(**fedavg_args)
        self.make_student, self.x_public = make_student, x_public
        self.steps, self.temperature, self.batch_size, self.seed = steps, temperature, batch_size, seed
        self.server_flops = 0.0  # the last round's distillation compute, for the cost model

    def _model(self, arrays: ArrayRecord) -> SplitModel:
        model = self.make_student()
        load_numpy_state(model, {k: v.numpy() for k, v in arrays.items()})
        return model

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.server_flops = 0.0
        arrays, metrics = super().aggregate_train(server_round, replies)
        valid = [r for r in replies if not r.has_error()]
        if arrays is None or not valid:
            return arrays, metrics
        members = [self._model(r.content[self.arrayrecord_key]).eval() for r in valid]
        fused = ensemble_distill(self._model(arrays), members, self.x_public, self.steps, self.temperature,
                                 self.batch_size, self.seed + server_round)
        self.server_flops = distill_flops(fused, len(members), self.steps, min(self.batch_size, len(self.x_public)),
                                         len(self.x_public))
        return ArrayRecord(torch_state_dict=fused.state_dict()), metrics
