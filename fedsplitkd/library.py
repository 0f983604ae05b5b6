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

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsplitkd.config import DEFAULTS, ConfigError, RunConfig, resolve
from fedsplitkd.fleet.costs import CostModel
from fedsplitkd.data.datasets import DeviceData
from fedsplitkd.protocol.device import DeviceSetup
from fedsplitkd.models.splitmodel import Part, SplitModel
from fedsplitkd.protocol.runtime import OptimizerFactory
from fedsplitkd.protocol.server import SplitKDServer

Blocks = nn.Sequential | list[tuple[str, nn.Module]]
TEACHER_EMBEDDING = "embedding"  # the teacher's first block: the one the devices run


def _default(key: str) -> Any:
    return dataclasses.field(default=DEFAULTS[key])


@dataclasses.dataclass(frozen=True)
class SplitKDConfig:
    """The split protocol's settings; each field is the run-config key with '-' for '_'.

    Defaults are the run config's (``fedsplitkd.config.SCHEMA``), checked by the same rules.
    """

    cut: str = _default("cut")
    batch_size: int = _default("batch-size")
    local_epochs: int = _default("local-epochs")
    exchange_batches: int = _default("exchange-batches")
    learning_rate: float = _default("learning-rate")
    momentum: float = _default("momentum")
    lr_schedule: str = _default("lr-schedule")
    kd_alpha: float = _default("kd-alpha")
    kd_temperature: float = _default("kd-temperature")
    num_rounds: int = _default("num-rounds")
    fraction_train: float = _default("fraction-train")
    fraction_evaluate: float = _default("fraction-evaluate")
    min_nodes: int = _default("min-nodes")
    round_timeout: float = _default("round-timeout")
    seed: int = _default("seed")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> SplitKDConfig:
        """The fields a Flower run config sets (``learning-rate`` etc.); other keys are the app's own."""
        names = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(cls)}
        return cls(**{names[k]: v for k, v in run_config.items() if k in names}).checked()

    def run_config(self) -> RunConfig:
        """The full resolved run config these settings stand for (the protocol code reads it)."""
        values = {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}
        return resolve({**values, "method": "splitkd" if self.kd_alpha > 0 else "split"})

    def checked(self) -> SplitKDConfig:
        self.run_config()  # raises ConfigError naming the bad key
        return self


def _run_config(config: SplitKDConfig | RunConfig | None) -> RunConfig:
    """The whole run config: a ``RunConfig`` as given, the protocol's settings resolved into one."""
    return config if isinstance(config, RunConfig) else (config or SplitKDConfig()).run_config()


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
    ``teacher_embedding`` is the teacher's first module, needed when kd_alpha > 0: its
    architecture only, since the server sends its weights once; a ``Part`` of a ``SplitModel``
    teacher (the zoo's) keeps the teacher's block names. ``config`` is the protocol's settings,
    or a whole ``RunConfig`` (the config-driven app builds its devices here).
    """

    student: Blocks
    train: Iterable | DeviceData
    val: Iterable | None = None
    teacher_embedding: nn.Module | None = None
    config: SplitKDConfig | RunConfig = dataclasses.field(default_factory=SplitKDConfig)
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
        if self.cfg.split.kd_alpha > 0:
            if self.teacher_embedding is None:
                raise ConfigError("SplitDevice 'teacher_embedding': kd_alpha > 0 needs the teacher's embedding "
                                  "module on the device (or kd_alpha = 0: split learning without KD)")
            # Named as the server's teacher names it, so the weights it sends load.
            self.embedding = self.teacher_embedding if isinstance(self.teacher_embedding, Part) else \
                nn.Sequential(OrderedDict([(TEACHER_EMBEDDING, self.teacher_embedding)]))

    def setup(self, device_id: int, runtimes: dict | None = None) -> DeviceSetup:
        """The protocol's view of this device (``fedsplitkd.protocol.device.handle_train`` serves it).
        ``runtimes``: cut -> runtime, shared by devices of one architecture in a process."""
        return DeviceSetup(self.cfg, device_id, self.data, self.model, self.embedding,
                           runtimes if runtimes is not None else {})


def edge_server(student: Blocks, input_shape: tuple[int, ...], teacher: nn.Module | None = None,
                teacher_embedding: nn.Module | None = None, config: SplitKDConfig | RunConfig | None = None,
                optimizer: OptimizerFactory | None = None, costs: CostModel | None = None,
                input_dtype: torch.dtype = torch.float32) -> SplitKDServer:
    """The edge server: the student's upper part and the teacher, the KD + CE loss, the cost model.

    ``teacher`` maps the embedding's outputs to logits (pre-trained; frozen), or is a
    ``SplitModel`` whose first block is the embedding (the zoo's teachers; ``teacher_embedding``
    is then unused). ``config`` is the protocol's settings, or a whole ``RunConfig`` (the
    config-driven app builds its server here). ``optimizer`` builds the server part's optimizer
    from its parameters (default SGD at ``learning_rate`` and ``momentum``, scheduled by
    ``lr_schedule``; a factory's own rate is left alone). ``costs`` prices every round
    (default: the run config's device classes).
    """
    cfg = _run_config(config)  # raises ConfigError naming a bad key
    model = split_model(student, input_shape, input_dtype)
    kd = cfg.split.kd_alpha > 0
    if isinstance(teacher, SplitModel):
        split_teacher = teacher if kd else None
    elif kd and (teacher is None or teacher_embedding is None):
        raise ConfigError("edge_server 'teacher'/'teacher_embedding': kd_alpha > 0 needs both (the devices "
                          "run the embedding so raw inputs never leave them), or kd_alpha = 0")
    else:
        split_teacher = teacher_model(teacher, teacher_embedding, input_shape, input_dtype) if kd else None
    num_classes = model.block_stats()[-1].out_shape[-1]
    # adaptive, per-device: the scheduler moves it
    cut = "default" if cfg.split.cut in ("adaptive", "per-device") else cfg.split.cut
    model.cut_index(cut)  # fail early, naming the cut points, on a bad cut
    return SplitKDServer(model, split_teacher, cfg, num_classes,
                         costs if costs is not None else CostModel.from_config(cfg), cut, optimizer)
