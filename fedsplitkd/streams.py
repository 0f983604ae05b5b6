"""Every seeded random stream of a run, named in one place.

A stream is a pure function of the run's seed and what it is for (round, device...), so the
in-process and the Flower run draw the same numbers whatever process serves a message, and
one stream never shifts another. The trailing constants keep the streams apart.
"""

from __future__ import annotations

import numpy as np
import torch

Generator = np.random.Generator


def sampling(seed: int) -> Generator:
    """Which devices train each round (every method draws from it alike)."""
    return np.random.default_rng([seed, 0])


def evaluate_sampling(seed: int) -> Generator:
    """Which devices do split evaluation each round: apart, so it never shifts training."""
    return np.random.default_rng([seed, 1])


def batches(seed: int, server_round: int, device: int) -> Generator:
    """A device's minibatch order in a round."""
    return np.random.default_rng([seed, server_round, device])


def dropout(seed: int, server_round: int, device: int) -> Generator:
    """Whether an injected failure (``dropout-rate``) hits a device in a round."""
    return np.random.default_rng([seed, server_round, device, 13])


def fading(seed: int, server_round: int, device: int) -> Generator:
    """A device's Rayleigh fading draw in a round."""
    return np.random.default_rng([seed, server_round, device, 11])


def profile(seed: int, device: int) -> Generator:
    """A device's profile jitter."""
    return np.random.default_rng([seed, 7, device])


def gkt_batches(seed: int, server_round: int) -> Generator:
    """FedGKT's server-side batch order in a round."""
    return np.random.default_rng([seed, server_round, 97])


def partition(seed: int) -> Generator:
    """The split of the training data into public, holdout and device shares."""
    return np.random.default_rng(seed)


def local_split(seed: int, device: int) -> Generator:
    """A device's own train/validation split."""
    return np.random.default_rng([seed, device])


def csv_test_split() -> Generator:
    """The fixed train/test split of a single CSV file (not the run's seed: the data is the data)."""
    return np.random.default_rng(0)


def train_subset() -> Generator:
    """The fixed subset of a large training split (``train-samples``): the same for every run and seed."""
    return np.random.default_rng([0, 29])


def torch_generator(seed: int) -> torch.Generator:
    """Torch-side shuffling (the teacher's and FedDF's batches)."""
    return torch.Generator().manual_seed(seed)


def init_weights(seed: int) -> None:
    """Model initialisation draws from torch's global generator: seed it before building."""
    torch.manual_seed(seed)
