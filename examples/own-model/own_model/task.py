"""The app's own model, teacher and data: nothing here knows fedsplitkd."""

from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

NUM_CLASSES = 10


class Net(nn.Module):
    """LeNet-style CIFAR model (conv 3->6->16, fc 120->84->10), written as named blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(OrderedDict([
            ("conv1", nn.Sequential(nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2, 2))),
            ("conv2", nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten())),
            ("fc1", nn.Sequential(nn.Linear(16 * 5 * 5, 120), nn.ReLU())),
            ("fc2", nn.Sequential(nn.Linear(120, 84), nn.ReLU())),
            ("head", nn.Linear(84, NUM_CLASSES)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Teacher(nn.Module):
    """A wider CNN: ``embedding`` (its first conv) and ``body`` (the rest, to logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.embedding(x))


class Images(Dataset):
    """Generated CIFAR-shaped images (3x32x32, 10 classes): a class pattern plus noise."""

    def __init__(self, n: int, seed: int) -> None:
        patterns = np.random.default_rng(12345).normal(size=(NUM_CLASSES, 3, 32, 32)).astype(np.float32)
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, NUM_CLASSES, n)
        self.images = patterns[self.labels] * 2.0 + rng.normal(size=(n, 3, 32, 32)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"img": torch.from_numpy(self.images[i]), "label": int(self.labels[i])}


def load_data(partition_id: int, num_partitions: int, batch_size: int, samples: int = 200):
    """This device's train and validation DataLoaders of {"img", "label"} batches."""
    data = Images(samples, seed=1 + partition_id)
    split = int(0.8 * samples)
    train = torch.utils.data.Subset(data, range(split))
    val = torch.utils.data.Subset(data, range(split, samples))
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=batch_size)


def load_server_data(samples: int):
    """The server's own data: a public set the teacher trains on, and a test set."""
    return (DataLoader(Images(samples, seed=1000), batch_size=64, shuffle=True),
            DataLoader(Images(500, seed=2000), batch_size=256))


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float = 0.01) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(batch["img"]), batch["label"]).backward()
            optimizer.step()


@torch.no_grad()
def test(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for batch in loader:
        logits = model(batch["img"])
        loss += float(nn.functional.cross_entropy(logits, batch["label"], reduction="sum"))
        correct += int((logits.argmax(1) == batch["label"]).sum())
        n += len(batch["label"])
    return loss / n, correct / n
