"""Whether a run learns: a run that diverges or never learns says so, in the log and summary.json.

- **diverged**: the student's test loss is not finite, or every device that trained in a round
  was dropped for a non-finite loss on the server. The first such round is reported.
- **not learning**: from round ``GRACE_ROUNDS`` on, the student's test cross-entropy is still
  at or above chance (ln C, what a uniform guess scores) with an accuracy under twice chance
  (2 / C: an over-confident student that is right often is learning), or it predicts one class for
  ``COLLAPSED_SHARE`` of the test samples or more (a dead student: every ReLU of a layer off,
  one logit winning everywhere). Judged on the last round; the first round it held is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

GRACE_ROUNDS = 3
COLLAPSED_SHARE = 0.99


def top_class_share(predicted: np.ndarray) -> float:
    """The share of the most predicted class, from per-class prediction counts (NaN for none)."""
    total = np.sum(predicted)
    return float(np.max(predicted) / total) if total else float("nan")


@dataclass
class Health:
    """Follows a run round by round; ``update`` returns a warning the first time a problem shows."""

    num_classes: int
    diverged_round: int | None = None
    not_learning_round: int | None = None
    top_class_share: float = float("nan")
    learning: bool = True

    def update(self, row: dict, top_share: float, tested: bool = True) -> str | None:
        """``tested``: whether the round was tested (``evaluate-every``); an untested round's
        NaN test loss is no divergence, and only its device drops are judged."""
        server_round = row["round"]
        if tested:
            self.top_class_share = top_share
        diverged = _diverged(row) if tested else _all_dropped_invalid(row)
        if self.diverged_round is None and server_round > 0 and diverged:
            self.diverged_round = server_round
            return (f"round {server_round}: the run diverged (test loss {row['test_loss']:.4g}, "
                    f"{row.get('dropped_invalid', 0)} devices dropped for a non-finite loss): lower "
                    "learning-rate or kd-alpha")
        if not tested:
            return None
        chance = math.log(self.num_classes) if self.num_classes > 1 else 0.0
        at_chance = not row["test_loss"] < chance and row["test_accuracy"] < 2.0 / self.num_classes
        stuck = server_round >= GRACE_ROUNDS and (at_chance or top_share >= COLLAPSED_SHARE)
        self.learning = not stuck
        if stuck and self.not_learning_round is None:
            self.not_learning_round = server_round
            return (f"round {server_round}: the student is not learning (test loss {row['test_loss']:.4f} vs "
                    f"chance {chance:.4f}, {top_share:.0%} of test samples in one class): check "
                    "learning-rate, kd-alpha and server-batching")
        return None

    def summary(self) -> dict:
        status = "diverged" if self.diverged_round is not None else "ok" if self.learning else "not learning"
        return {"health": status, "diverged_round": self.diverged_round,
                "not_learning_round": self.not_learning_round if not self.learning else None,
                "top_class_share": self.top_class_share}


def _diverged(row: dict) -> bool:
    return not math.isfinite(row["test_loss"]) or _all_dropped_invalid(row)


def _all_dropped_invalid(row: dict) -> bool:
    """Every device that trained in the round was dropped for a non-finite loss."""
    devices = row.get("devices", 0)
    return bool(devices) and row.get("completed", 0) == 0 and row.get("dropped_invalid", 0) > 0
