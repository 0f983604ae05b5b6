"""The model zoo: students and teachers of each family as ``SplitModel`` s (splitmodel.py),
built from the run config and the dataset's shapes."""

from __future__ import annotations

import torch
from torch import nn

from fedsplitkd.models.gpt import GPTSize, gpt
from fedsplitkd.models.resnet import cifar_resnet, lenet
from fedsplitkd.models.splitmodel import BlockStats, SplitModel

__all__ = ["BlockStats", "SplitModel", "build_student", "build_teacher", "student_for", "teacher_for"]


def _flat_dim(layers: nn.Module, shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return layers(torch.zeros(1, *shape)).numel()


def mlp(input_shape: tuple[int, ...], num_classes: int, widths: list[int]) -> SplitModel:
    """Fully connected blocks; the first flattens its input."""
    blocks, width = [], int(torch.tensor(input_shape).prod())
    for i, out in enumerate(widths):
        layers = [nn.Flatten()] if i == 0 else []
        blocks.append((f"fc{i + 1}", nn.Sequential(*layers, nn.Linear(width, out), nn.ReLU())))
        width = out
    blocks.append(("head", nn.Linear(width, num_classes)))
    return SplitModel(blocks, input_shape)


def cnn1d(input_shape: tuple[int, ...], num_classes: int, channels: list[int], hidden: int) -> SplitModel:
    """1-D convolutions over sensor windows (channels, length); each halves the length."""
    blocks, c_in = [], input_shape[0]
    for i, c_out in enumerate(channels):
        last = i == len(channels) - 1
        pool = [nn.AdaptiveAvgPool1d(1), nn.Flatten()] if last else [nn.MaxPool1d(2)]
        blocks.append((f"conv{i + 1}", nn.Sequential(
            nn.Conv1d(c_in, c_out, kernel_size=5, padding=2), nn.ReLU(), *pool)))
        c_in = c_out
    if hidden:
        blocks.append(("fc", nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU())))
        c_in = hidden
    blocks.append(("head", nn.Linear(c_in, num_classes)))
    return SplitModel(blocks, input_shape)


def cnn2d(input_shape: tuple[int, ...], num_classes: int, channels: list[int], hidden: int) -> SplitModel:
    """2-D convolutions over images (channels, height, width); pooling keeps maps >= 4x4."""
    blocks, c_in, size = [], input_shape[0], min(input_shape[1:])
    for i, c_out in enumerate(channels):
        pool = [nn.MaxPool2d(2)] if size >= 8 and i > 0 or size >= 16 else []
        size //= 2 if pool else 1
        blocks.append((f"conv{i + 1}", nn.Sequential(
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU(), *pool)))
        c_in = c_out
    flat = _flat_dim(nn.Sequential(*(b for _, b in blocks)), input_shape)
    blocks.append(("fc", nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU())))
    blocks.append(("head", nn.Linear(hidden, num_classes)))
    return SplitModel(blocks, input_shape)


class Transpose(nn.Module):
    """(N, L, D) token embeddings -> (N, D, L) channels for 1-D convolutions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def charcnn(seq_len: int, vocab: int, dim: int, channels: list[int]) -> SplitModel:
    """Next-token prediction over a window of token ids; the first block is the embedding."""
    blocks = [("embed", nn.Sequential(nn.Embedding(vocab, dim), Transpose()))]
    c_in = dim
    for i, c_out in enumerate(channels):
        last = i == len(channels) - 1
        pool = [nn.AdaptiveMaxPool1d(1), nn.Flatten()] if last else []
        blocks.append((f"conv{i + 1}", nn.Sequential(
            nn.Conv1d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU(), *pool)))
        c_in = c_out
    blocks.append(("head", nn.Linear(c_in, vocab)))
    return SplitModel(blocks, (seq_len,), torch.int64)


GPT_STUDENT, GPT_TEACHER = "2x128x4", "6x256x8"  # layers x width x heads (run-config defaults)


LENET_MIN_SIDE = 28  # images at least this large get LeNet-5; smaller ones (digits' 8x8) the small 2-D CNN


def family_for(input_shape: tuple[int, ...], tokens: bool = False, sequence: bool = False) -> str:
    """Token ids -> char CNN (one next token) or GPT (a next token per position, ``sequence``);
    flat features -> MLP, (C, L) -> 1-D CNN, (C, H, W) -> LeNet-5 from 28x28, else a small 2-D CNN."""
    if sequence:
        return "gpt"
    if tokens:
        return "charcnn"
    if len(input_shape) not in (1, 2, 3):
        raise ValueError(f"no model family for feature shape {input_shape}: expected (F,), (C, L) or (C, H, W)")
    if len(input_shape) == 3 and min(input_shape[1:]) >= LENET_MIN_SIDE:
        return "lenet"
    return {1: "mlp", 2: "cnn1d", 3: "cnn2d"}[len(input_shape)]


def build_student(family: str, input_shape: tuple[int, ...], num_classes: int,
                  tokens: bool = False, gpt_size: str = GPT_STUDENT, width: int = 1) -> SplitModel:
    """The family's student; ``width`` multiplies its channels and units (not the GPT's: ``gpt_size``)."""
    family = family_for(input_shape, tokens) if family == "auto" else family
    if family == "gpt":
        if width != 1:
            raise ValueError(f"run-config 'student-width' = {width}: the GPT student's size is 'gpt-student'")
        return _gpt(input_shape, num_classes, gpt_size, "gpt-student")
    if family == "charcnn":
        return charcnn(input_shape[0], num_classes, 32 * width, [64 * width] * 2)
    if family == "mlp":
        return mlp(input_shape, num_classes, [128 * width, 64 * width])
    if family == "cnn1d":
        return cnn1d(input_shape, num_classes, [16 * width, 32 * width, 64 * width], hidden=0)
    if family == "lenet":
        return lenet(input_shape, num_classes, width)
    return cnn2d(input_shape, num_classes, [16 * width, 32 * width], hidden=64 * width)


def build_teacher(family: str, input_shape: tuple[int, ...], num_classes: int,
                  tokens: bool = False, gpt_size: str = GPT_TEACHER) -> SplitModel:
    """A clearly larger model of the student's family; its first block is the embedding module."""
    family = family_for(input_shape, tokens) if family == "auto" else family
    if family == "gpt":
        return _gpt(input_shape, num_classes, gpt_size, "gpt-teacher")
    if family == "charcnn":
        return charcnn(input_shape[0], num_classes, 64, [128, 128, 128])
    if family == "mlp":
        return mlp(input_shape, num_classes, [512, 512, 256])
    if family == "cnn1d":
        return cnn1d(input_shape, num_classes, [32, 64, 128, 256], hidden=128)
    if family == "lenet":  # a trained-from-scratch teacher for a LeNet student: the small ResNet
        return cifar_resnet("resnet20", input_shape, num_classes)
    return cnn2d(input_shape, num_classes, [32, 64, 128], hidden=256)


def _gpt(input_shape: tuple[int, ...], vocab: int, size: str, key: str) -> SplitModel:
    if len(input_shape) != 1:
        raise ValueError(f"student-model 'gpt' needs token windows (T,), not features {input_shape}")
    return gpt(vocab, input_shape[0], GPTSize.parse(size, f"run-config '{key}'"))


def family_of(cfg, dataset) -> str:
    """The run's model family: ``student-model``, or picked from the dataset; one that cannot
    fit the dataset's targets is refused naming the key."""
    sequence = getattr(dataset, "sequence", False)
    family = cfg.model.student_model
    if family == "auto":
        return family_for(dataset.input_shape, dataset.tokens, sequence)
    if (family == "gpt") != sequence:
        want = "'gpt' (or 'auto')" if sequence else "not 'gpt' (it predicts a token per position)"
        raise ValueError(f"run-config 'student-model' = {family!r}: dataset '{dataset.name}' needs {want}")
    return family


def _hf(cfg, dataset, key: str) -> SplitModel | None:
    """The local Hugging Face checkpoint run-config ``key`` names, split; None when unset."""
    if not cfg[key]:
        return None
    if not getattr(dataset, "sequence", False):
        raise ValueError(f"run-config '{key}': a causal LM needs a dataset with a next token per "
                         f"position, not '{dataset.name}'")
    from fedsplitkd.models.hf import load_split  # transformers is an extra: imported only when asked for

    return load_split(cfg[key], dataset.input_shape[0], dataset.num_classes, f"run-config '{key}'")


def _model_for(cfg, dataset, role: str) -> SplitModel:
    """The run's ``role`` ('student' or 'teacher') for ``dataset``: a local HF checkpoint
    (``hf-<role>``), else the built-in model of the family (GPT sizes from ``gpt-<role>``)."""
    hf = _hf(cfg, dataset, f"hf-{role}")
    if hf is not None:
        if role == "student" and cfg.model.student_width != 1:
            raise ValueError(f"run-config 'student-width' = {cfg.model.student_width}: 'hf-student' is "
                             "used as saved; leave the width at 1")
        return hf
    if role == "teacher":
        return build_teacher(family_of(cfg, dataset), dataset.input_shape, dataset.num_classes, dataset.tokens,
                             cfg["gpt-teacher"])
    return build_student(family_of(cfg, dataset), dataset.input_shape, dataset.num_classes, dataset.tokens,
                         cfg["gpt-student"], cfg.model.student_width)


def student_for(cfg, dataset) -> SplitModel:
    """The run's student for ``dataset`` (sizes from the run config, or a local HF checkpoint)."""
    return _model_for(cfg, dataset, "student")


def pretrained_teacher(cfg, dataset) -> str | None:
    """The published pre-trained teacher the run uses ('resnet56', ...), or None (a teacher the
    server trains, or a Hugging Face one). ``teacher-model = auto`` picks ResNet-56 for CIFAR-10."""
    name = cfg.model.teacher_model
    if name == "auto":
        name = "resnet56" if dataset.name == "cifar10" else None
    if name and len(dataset.input_shape) != 3:
        raise ValueError(f"run-config 'teacher-model' = {name!r} needs images (C, H, W); dataset "
                         f"'{dataset.name}' has features {dataset.input_shape}")
    return name


def teacher_for(cfg, dataset) -> SplitModel:
    """The run's teacher for ``dataset`` (sizes from the run config, a CIFAR ResNet, or a local HF checkpoint)."""
    name = pretrained_teacher(cfg, dataset)
    if name:
        return cifar_resnet(name, dataset.input_shape, dataset.num_classes)
    return _model_for(cfg, dataset, "teacher")
