"""Pre-trained CIFAR ResNets (He et al. 2016, the CIFAR family: 20, 32, 44, 56, 110 layers) and
the LeNet-5 student, as ``SplitModel`` s of named blocks.

The ResNets are the "option A" variant (parameter-free shortcuts: a strided slice padded with
zero channels) whose published CIFAR-10 checkpoints (akamaster/pytorch_resnet_cifar10, BSD
2-Clause) load here exactly: ``load_checkpoint`` maps their keys (``module.conv1.weight``,
``module.layer2.4.bn1.bias``, ``module.linear.weight``) onto the blocks and refuses, naming the
file, a checkpoint that does not fit. The teacher takes images in [0, 1]: its stem normalises
them as the checkpoint was trained (ImageNet mean and std), so the devices' embedding is the
whole input side of the teacher and the server needs no knowledge of it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedsplitkd.data.sources import DataError, Source, fetch, sha256_of
from fedsplitkd.models.splitmodel import SplitModel

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}  # blocks a stage
_RELEASE = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
# The published CIFAR-10 checkpoints; the first 8 hex digits of the sha256 are in each name (as
# torch hub names checkpoints). Full digests where we verified the bytes, else that prefix.
CHECKPOINTS = {
    "resnet20": Source(_RELEASE + "resnet20-12fca82f.th",
                       "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8", "resnet20-12fca82f.th"),
    "resnet32": Source(_RELEASE + "resnet32-d509ac18.th", None, "resnet32-d509ac18.th"),
    "resnet44": Source(_RELEASE + "resnet44-014dd654.th", None, "resnet44-014dd654.th"),
    "resnet56": Source(_RELEASE + "resnet56-4bfd9763.th",
                       "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367", "resnet56-4bfd9763.th"),
    "resnet110": Source(_RELEASE + "resnet110-1d1ed7c2.th", None, "resnet110-1d1ed7c2.th"),
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the checkpoints' input normalisation


class Normalize(nn.Module):
    """Per-channel (x - mean) / std with fixed constants (buffers not saved: they are the architecture's)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Stem(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        # RGB as the checkpoints were trained; any other channel count (a teacher trained here) alike
        self.normalize = Normalize(MEAN, STD) if channels == 3 else Normalize((0.5,) * channels, (0.25,) * channels)
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(self.normalize(x))))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; the shortcut halves the map and zero-pads the new channels (option A)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pad = (c_out - c_in) // 2 if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class Head(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


def cifar_resnet(name: str, input_shape: tuple[int, ...], num_classes: int) -> SplitModel:
    """Blocks ``stem``, ``layer{s}_{b}`` (stage s, block b), ``head``; cut after the stem or any block."""
    if name not in DEPTHS:
        raise ValueError(f"unknown CIFAR ResNet {name!r}: one of {', '.join(DEPTHS)}")
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs images (C, H, W), not features {input_shape}")
    blocks: list[tuple[str, nn.Module]] = [("stem", Stem(input_shape[0]))]
    c_in = 16
    for stage, c_out in enumerate((16, 32, 64), start=1):
        for b in range(DEPTHS[name]):
            blocks.append((f"layer{stage}_{b}", BasicBlock(c_in, c_out, 2 if stage > 1 and b == 0 else 1)))
            c_in = c_out
    blocks.append(("head", Head(num_classes)))
    return SplitModel(blocks, input_shape)


def _our_key(key: str) -> str:
    """A published checkpoint's key as ours: module.conv1.w -> stem.conv1.w, module.layer2.4.x ->
    layer2_4.x, module.linear.x -> head.linear.x; our own keys stay as they are."""
    if not key.startswith("module."):
        return key
    key = key.removeprefix("module.")
    if key.startswith(("conv1.", "bn1.")):
        return "stem." + key
    if key.startswith("linear."):
        return "head." + key
    if key.startswith("layer"):
        stage, block, rest = key.split(".", 2)
        return f"{stage}_{block}.{rest}"
    return key


def load_checkpoint(model: SplitModel, path: str | Path) -> SplitModel:
    """Load a published checkpoint (``{"state_dict": ...}``, ``module.`` keys) or one of our own
    state dicts into ``model``, exactly: a missing, extra or misshapen key is refused naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"teacher-path '{path}': no such file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise DataError(f"teacher-path '{path}': not a torch checkpoint ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from err
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise DataError(f"teacher-path '{path}': holds no state dict")
    state = {_our_key(k): v for k, v in state.items()}
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(ours) - set(state))
    extra = sorted(k for k in set(state) - set(ours) if not k.endswith("num_batches_tracked"))
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise DataError(f"teacher-path '{path}': keys do not fit the teacher ({len(missing)} missing, "
                        f"{len(extra)} unexpected; {what})")
    for k, v in ours.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise DataError(f"teacher-path '{path}': {k!r} has shape {tuple(state[k].shape)}, the teacher "
                            f"needs {tuple(v.shape)}")
    model.load_state_dict(state, strict=False)  # num_batches_tracked: not in old checkpoints, unused in eval
    return model


def checkpoint_file(name: str, path: str = "", cache: Path | None = None) -> Path:
    """The published weights of CIFAR ResNet ``name``: ``path``, else downloaded from its release
    (checksum-checked, cached in ``cache``)."""
    if path:
        return Path(path).expanduser()
    source = CHECKPOINTS[name]
    file = fetch(source, cache)
    prefix = source.filename.rsplit("-", 1)[1].split(".")[0]  # torch hub's naming convention
    if not sha256_of(file).startswith(prefix):
        raise DataError(f"{file}: sha256 does not start with {prefix}, as its name says: delete it to "
                        "download again")
    return file


def pretrained(name: str, input_shape: tuple[int, ...], num_classes: int, path: str = "",
               cache: Path | None = None) -> SplitModel:
    """The CIFAR ResNet ``name`` with its published weights (``checkpoint_file``)."""
    return load_checkpoint(cifar_resnet(name, input_shape, num_classes), checkpoint_file(name, path, cache))


PIXEL_MEAN, PIXEL_STD = 0.5, 0.25  # the student's fixed input scaling: pixels in [0, 1] to about [-2, 2]


def lenet(input_shape: tuple[int, ...], num_classes: int, width: int = 1) -> SplitModel:
    """LeNet-5 (62 k parameters on 3x32x32): conv1, conv2 (5x5, each then max-pooled), fc1, fc2, head;
    ``width`` multiplies every layer's channels and units (2: 245 k parameters on 3x32x32).

    Like the teacher it takes pixels in [0, 1] and scales them in its first block, so the deployed
    model needs no preprocessing. The scaling matters: on raw [0, 1] pixels a KD step at the
    default rate collapsed it to one class (experiments/probe_defaults.py, docs/protocol.md)."""
    c, h, w = input_shape
    if min(h, w) < 12:
        raise ValueError(f"LeNet-5 needs images of at least 12x12, not {input_shape}")
    c1, c2, f1, f2 = (width * n for n in (6, 16, 120, 84))
    flat = c2 * (((h - 4) // 2 - 4) // 2) * (((w - 4) // 2 - 4) // 2)
    return SplitModel([
        ("conv1", nn.Sequential(Normalize((PIXEL_MEAN,) * c, (PIXEL_STD,) * c), nn.Conv2d(c, c1, 5), nn.ReLU(),
                                nn.MaxPool2d(2))),
        ("conv2", nn.Sequential(nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2))),
        ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(flat, f1), nn.ReLU())),
        ("fc2", nn.Sequential(nn.Linear(f1, f2), nn.ReLU())),
        ("head", nn.Linear(f2, num_classes)),
    ], input_shape)
