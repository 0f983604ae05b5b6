"""Split-KD from the user's own objects: their student, teacher and data, no zoo, no dataset keys.

Three pieces, plain PyTorch (the Flower wiring is ``fedsplitkd.clients.register_device`` and
``fedsplitkd.strategies.SplitKD.from_models``):

- ``SplitKDConfig``: the protocol's settings, typed, with the run config's defaults. Both
  sides must agree on them (the server sizes chunks by ``batch_size * exchange_batches``):
  build both from the same run config with ``SplitKDConfig.from_run_config``.
- ``SplitDevice``: one IoT device, from the student's blocks, its training (and validation)
  data as any iterable of ``(x, y)`` or dict batches, and the teacher's embedding module.
- ``edge_server``: the edge server, from the student, the teacher (inputs -> logits), its
  embedding module (run on the devices, so raw inputs never leave them) and an optimizer factory.

A student is an ``nn.Sequential`` of named blocks or a list of ``(name, module)``: every block
name but the last is a cut point.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsplitkd.config import ConfigError, RunConfig
from fedsplitkd.fleet.costs import CostModel
from fedsplitkd.data.datasets import DeviceData
from fedsplitkd.protocol.device import DeviceSetup
from fedsplitkd.models.splitmodel import Part, SplitModel
from fedsplitkd.protocol.runtime import OptimizerFactory, eval_mode, torch_device
from fedsplitkd.protocol.server import SplitKDServer
from fedsplitkd.splitkd_config import PROTOCOL_KEYS, SplitKDConfig, as_run_config

__all__ = ["Blocks", "OptimizerFactory", "PROTOCOL_KEYS", "SplitDevice", "SplitKDConfig", "as_run_config",
           "edge_server", "split_model", "teacher_accuracy", "teacher_model", "to_arrays"]

Blocks = nn.Sequential | list[tuple[str, nn.Module]]
TEACHER_EMBEDDING = "embedding"  # the teacher's first block: the one the devices run


def _run_config(config: SplitKDConfig | RunConfig | Mapping[str, Any] | None) -> RunConfig:
    """The whole run config: a ``RunConfig`` as given, the protocol's settings resolved into one."""
    return as_run_config(config)


def split_model(student: Blocks, input_shape: tuple[int, ...], input_dtype: torch.dtype = torch.float32
                ) -> SplitModel:
    """The student as a ``SplitModel``: the same modules (and state-dict keys), cut points by name."""
    if isinstance(student, SplitModel):
        return student
    blocks = list(student.named_children()) if isinstance(student, nn.Module) else list(student)
    if len(blocks) < 2 or not all(isinstance(n, str) and isinstance(m, nn.Module) for n, m in blocks):
        raise ValueError("student: give an nn.Sequential of at least two named blocks, or a list of "
                         "(name, module) pairs; every block but the last is a cut point")
    return SplitModel(blocks, tuple(input_shape), input_dtype)


def teacher_model(teacher: nn.Module, embedding: nn.Module, input_shape: tuple[int, ...],
                  input_dtype: torch.dtype = torch.float32) -> SplitModel:
    """The teacher as the protocol holds it: the embedding (on the devices), then the rest (on the server)."""
    return SplitModel([(TEACHER_EMBEDDING, embedding), ("body", teacher)], tuple(input_shape), input_dtype)


def _numpy(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as err:  # noqa: BLE001 - named below
        raise ValueError(f"{what}: cannot read a batch as an array ({type(value).__name__})") from err


def to_arrays(data: Iterable, keys: tuple[str, str] = ("img", "label"), what: str = "data"
              ) -> tuple[np.ndarray, np.ndarray]:
    """All of ``data``'s samples: a DataLoader or any iterable of ``(x, y)`` or dict batches.

    The protocol draws its own seeded minibatches (of ``batch_size``) each round, as the server
    expects, so the loader's batching and shuffling do not matter; its transforms are applied once.
    """
    xs, ys = [], []
    for batch in data:
        if isinstance(batch, Mapping):
            missing = [k for k in keys if k not in batch]
            if missing:
                raise ValueError(f"{what}: a batch has no key {missing[0]!r} (keys: {sorted(batch)}); "
                                 f"set keys=(input key, label key)")
            x, y = batch[keys[0]], batch[keys[1]]
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y = batch
        else:
            raise ValueError(f"{what}: a batch must be (x, y) or a dict with keys {keys}, "
                             f"not {type(batch).__name__}")
        xs.append(_numpy(x, what))
        ys.append(_numpy(y, what))
    if not xs:
        raise ValueError(f"{what}: no batches")
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(x) != len(y) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: inputs {x.shape} and labels {y.shape} {y.dtype}: labels must be one "
                         "integer class per sample")
    x = x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x.astype(np.int64)
    return np.ascontiguousarray(x), y.astype(np.int64)


@dataclasses.dataclass
class SplitDevice:
    """One IoT device: the student's lower part trains here on ``train``; ``val`` serves split evaluation.

    ``train`` is a DataLoader or any iterable of ``(x, y)`` or dict batches (read once, on
    creation), or a ``DeviceData`` with the arrays already split (``val`` is then unused).
    ``teacher_embedding`` is the teacher's first module, needed for KD (kd_alpha or kd_feature_weight > 0): its
    architecture only, since the server sends its weights once. The device runs a copy of it,
    frozen and in eval mode; the module given is left as it was. A ``Part`` of a ``SplitModel``
    teacher (the zoo's) is used as given and keeps the teacher's block names. ``config`` is a
    ``SplitKDConfig``, a whole ``RunConfig`` (the config-driven app builds its devices here) or
    a Flower run config (``context.run_config``: its protocol keys are read, the app's left).
    The student's modules are the device's working copy: each request loads the global weights.
    """

    student: Blocks
    train: Iterable | DeviceData
    val: Iterable | None = None
    teacher_embedding: nn.Module | None = None
    config: SplitKDConfig | RunConfig | Mapping[str, Any] = dataclasses.field(default_factory=SplitKDConfig)
    keys: tuple[str, str] = ("img", "label")

    def __post_init__(self) -> None:
        if isinstance(self.train, DeviceData):
            self.data = self.train
        else:
            x_train, y_train = to_arrays(self.train, self.keys, "train data")
            x_val, y_val = (x_train[:0], y_train[:0]) if self.val is None else \
                to_arrays(self.val, self.keys, "validation data")
            self.data = DeviceData(x_train, y_train, x_val, y_val)
        dtype = torch.float32 if self.data.x_train.dtype == np.float32 else torch.int64
        self.model = split_model(self.student, self.data.x_train.shape[1:], dtype)
        self.cfg = _run_config(self.config)
        self.embedding = None
        if self.cfg.split.uses_teacher:
            if self.teacher_embedding is None:
                raise ConfigError("SplitDevice 'teacher_embedding': KD (kd_alpha or kd_feature_weight > 0) needs the "
                                  "teacher's embedding module on the device (or both 0: split learning without KD)")
            # Named as the server's teacher names it, so the weights it sends load; a copy, since
            # the device loads those weights into it and freezes it (eval mode, no gradients).
            self.embedding = self.teacher_embedding if isinstance(self.teacher_embedding, Part) else \
                nn.Sequential(OrderedDict([(TEACHER_EMBEDDING, copy.deepcopy(self.teacher_embedding))]))

    def setup(self, device_id: int, runtimes: dict | None = None) -> DeviceSetup:
        """The protocol's view of this device (``fedsplitkd.protocol.device.handle_train`` serves it).
        ``runtimes``: cut -> runtime, shared by devices of one architecture in a process."""
        return DeviceSetup(self.cfg, device_id, self.data, self.model, self.embedding,
                           runtimes if runtimes is not None else {})


def edge_server(student: Blocks, input_shape: tuple[int, ...], teacher: nn.Module | None = None,
                teacher_embedding: nn.Module | None = None,
                config: SplitKDConfig | RunConfig | Mapping[str, Any] | None = None,
                optimizer: OptimizerFactory | None = None, costs: CostModel | None = None,
                input_dtype: torch.dtype = torch.float32) -> SplitKDServer:
    """The edge server: the student's upper part and the teacher, the KD + CE loss, the cost model.

    ``teacher`` (the body) maps the embedding's outputs to logits, pre-trained; the server
    runs a copy of both, frozen and in eval mode (BatchNorm on its running statistics, no
    dropout), so the modules given are left as they were (``server.teacher`` is the copy; under
    ``kd_mode = 'mutual'`` it is the copy that trains). A ``SplitModel`` whose first block is the
    embedding (the zoo's teachers) is used as given (``teacher_embedding`` is then unused).
    ``student``'s modules are the server's own: they train in place and move to the run's
    ``torch_device``. ``config`` is a ``SplitKDConfig``, a whole ``RunConfig`` (the
    config-driven app builds its server here) or a Flower run config. ``optimizer`` builds the
    server part's optimizer from its parameters (default SGD at ``learning_rate`` and
    ``momentum``, scheduled by ``lr_schedule``; a factory's own rate is left alone). ``costs``
    prices every round (default: the run config's device classes).
    """
    cfg = _run_config(config)  # raises ConfigError naming a bad key
    server_device = torch_device(cfg.model.torch_device)
    model = split_model(student, input_shape, input_dtype).to(server_device)
    kd = cfg.split.uses_teacher
    if isinstance(teacher, SplitModel):
        split_teacher = teacher if kd else None
        if kd and cfg.split.kd_mode != "mutual":
            split_teacher.eval()  # frozen on the server (the devices freeze their own embedding copies)
    elif kd and (teacher is None or teacher_embedding is None):
        raise ConfigError("edge_server 'teacher'/'teacher_embedding': KD (kd_alpha or kd_feature_weight > 0) "
                          "needs both (the devices run the embedding so raw inputs never leave them), or both 0")
    else:
        # The server's own copy, frozen in eval mode: a pre-trained teacher's BatchNorm statistics
        # are its own (mutual learning fine-tunes its weights with them), and dropout is off.
        split_teacher = teacher_model(copy.deepcopy(teacher), copy.deepcopy(teacher_embedding), input_shape,
                                      input_dtype).to(server_device).eval() if kd else None
    # The server sizes the parts with one example through each block: in eval mode, so a
    # BatchNorm neither refuses a batch of one nor takes the zeros into its running statistics.
    with eval_mode(model), eval_mode(split_teacher) if split_teacher is not None else contextlib.nullcontext():
        num_classes = model.block_stats()[-1].out_shape[-1]
        # adaptive, per-device: the scheduler moves it
        cut = "default" if cfg.split.cut in ("adaptive", "per-device") else cfg.split.cut
        model.cut_index(cut)  # fail early, naming the cut points, on a bad cut
        return SplitKDServer(model, split_teacher, cfg, num_classes,
                             costs if costs is not None else CostModel.from_config(cfg), cut, optimizer)


def teacher_accuracy(teacher: nn.Module, test_data: Iterable | None = None,
                     evaluate: Callable[[nn.Module], float] | None = None,
                     keys: tuple[str, str] = ("img", "label")) -> float:
    """The teacher's test accuracy: ``evaluate(teacher)`` (the user's own test, returning the
    accuracy), or the share of ``test_data``'s labels (batches as ``SplitDevice`` reads them) that
    its largest logit names. ``teacher`` is the whole teacher, inputs to logits (e.g. the
    server's ``server.teacher``); it runs in eval mode without gradients, and each of its
    modules gets back the train/eval mode it had."""
    if (test_data is None) == (evaluate is None):
        raise ValueError("teacher_accuracy: give test_data or evaluate (one of them)")
    with eval_mode(teacher), torch.no_grad():
        if evaluate is not None:
            accuracy = evaluate(teacher)
            if isinstance(accuracy, torch.Tensor) and accuracy.numel() == 1:
                accuracy = accuracy.item()
            if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float, np.floating)):
                raise ValueError(f"the teacher's evaluation returned {type(accuracy).__name__}: it must return "
                                 "the accuracy, a number in [0, 1]")
            return float(accuracy)
        x, y = to_arrays(test_data, keys, "teacher test data")
        server_device = next(teacher.parameters()).device
        correct = 0
        for i in range(0, len(y), 1024):
            logits = teacher(torch.from_numpy(x[i:i + 1024]).to(server_device))
            correct += int((logits.argmax(-1).cpu() == torch.from_numpy(y[i:i + 1024])).sum())
        return correct / len(y)
