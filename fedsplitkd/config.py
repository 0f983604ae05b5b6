"""Run configuration: typed sections, every key's default and the check that guards it, in one place.

A run config is what Flower hands the apps: flat ``key = value`` pairs (``[tool.flwr.app.config]``
of pyproject.toml, which a test keeps equal to the defaults here). ``resolve`` validates it once
and returns a ``RunConfig``: frozen, typed sections (``cfg.split.kd_alpha``) that the code reads.
A ``RunConfig`` is also a read-only mapping by run-config key (``dict(cfg)`` is the flat run
config again), which is how it is saved, hashed and compared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A run-config value is invalid; the message names the key and what it accepts."""


@dataclass(frozen=True)
class Key:
    default: Any
    accepts: str
    check: Callable[[Any], bool]


def _choice(*options: str) -> Key:
    return Key(options[0], "one of " + ", ".join(repr(o) for o in options), lambda v: v in options)


def _int(default: int, low: int, high: int | None = None) -> Key:
    span = f">= {low}" if high is None else f"in [{low}, {high}]"
    return Key(default, f"an integer {span}",
               lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low
               and (high is None or v <= high))


def _float(default: float, low: float, high: float, low_open: bool = False) -> Key:
    bracket = "(" if low_open else "["
    return Key(default, f"a number in {bracket}{low}, {high}]",
               lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
               and (v > low if low_open else v >= low) and v <= high)


def _bool(default: bool) -> Key:
    return Key(default, "true or false", lambda v: isinstance(v, bool))


def _str(default: str, accepts: str = "a string") -> Key:
    return Key(default, accepts, lambda v: isinstance(v, str))


def _gpt_size_ok(value: Any) -> bool:
    from fedsplitkd.models.gpt import GPTSize

    try:
        GPTSize.parse(value)
    except ValueError:
        return False
    return True


def key(spec: Key, name: str | None = None) -> Any:
    """A section field for run-config key ``name`` (default: the field's name with '-' for '_')."""
    return dataclasses.field(default=spec.default, metadata={"key": spec, "name": name})


@dataclass(frozen=True)
class MethodConfig:
    """What runs: the method, and the knobs only some baselines have."""

    name: str = key(_choice("splitkd", "split", "splitfed", "fedavg", "fedprox", "feddf", "fd", "fedgkt",
                            "local", "central-kd", "public-kd"), "method")
    proximal_mu: float = key(_float(0.01, 0.0, 1e6))
    distill_steps: int = key(_int(100, 0))
    server_epochs: int = key(_int(1, 1))


@dataclass(frozen=True)
class DataConfig:
    """The dataset, where it comes from, the server's splits of it, and how devices share the rest."""

    dataset: str = key(_choice("digits", "har", "shakespeare", "shakespeare-lm", "cifar10", "fashion_mnist",
                               "femnist", "images", "npz", "csv"))
    data_path: str = key(_str("", "a file path ('' = the dataset's default source)"))
    label_column: str = key(_str("label", "the label column's name (csv)"))
    seq_len: int = key(_int(40, 2))
    text_stride: int = key(_int(40, 1))
    train_samples: int = key(Key(0, "an integer >= 0 (0 = the whole training split; else a fixed random subset "
                                 "of this many, the same for every run)",
                                 lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0))
    partition: str = key(_choice("dirichlet", "iid", "pathological", "natural"))
    dirichlet_alpha: float = key(_float(0.5, 0.0, 1e6, low_open=True))
    classes_per_device: int = key(_int(2, 1))
    public_fraction: float = key(_float(0.3, 0.0, 0.9, low_open=True))
    holdout_fraction: float = key(_float(0.0, 0.0, 0.5))
    val_fraction: float = key(_float(0.1, 0.0, 0.5))


@dataclass(frozen=True)
class TrainConfig:
    """Rounds, sampling and the optimiser, the same for every method."""

    seed: int = key(_int(0, 0))
    num_rounds: int = key(_int(25, 1))
    fraction_train: float = key(_float(1.0, 0.0, 1.0, low_open=True))
    fraction_evaluate: float = key(_float(0.0, 0.0, 1.0))
    evaluate_every: int = key(_int(1, 1))
    batch_size: int = key(_int(32, 1))
    local_epochs: int = key(_int(1, 1))
    # kd-alpha and kd-temperature default to split-KD's tuned config on digits (the default
    # dataset; experiments/bench-standard/tuned.yaml). The learning rate is lower than digits'
    # tuned 0.0222, which kills a LeNet student on CIFAR-10: 0.01 with interleaved server steps
    # learns on digits, HAR and CIFAR-10 alike (experiments/probe_defaults.py; docs/protocol.md).
    learning_rate: float = key(_float(0.01, 0.0, 10.0, low_open=True))
    lr_schedule: str = key(_choice("constant", "cosine"))
    momentum: float = key(_float(0.9, 0.0, 0.999))
    grad_clip: float = key(_float(0.0, 0.0, 1e6))


@dataclass(frozen=True)
class ModelConfig:
    """The student, the teacher, and the torch device the server computes on."""

    student_model: str = key(_choice("auto", "mlp", "cnn1d", "cnn2d", "lenet", "gpt"))
    student_width: int = key(_int(1, 1, 8))
    gpt_student: str = key(Key("2x128x4", "layers x width x heads, e.g. '2x128x4' (heads divide width)",
                               _gpt_size_ok))
    gpt_teacher: str = key(Key("6x256x8", "layers x width x heads, e.g. '6x256x8' (heads divide width)",
                               _gpt_size_ok))
    hf_student: str = key(_str("", "a local Hugging Face checkpoint directory ('' = the built-in GPT)"))
    hf_teacher: str = key(_str("", "a local Hugging Face checkpoint directory, used as trained "
                               "('' = the built-in GPT)"))
    teacher_model: str = key(_choice("auto", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"))
    teacher_path: str = key(_str("", "a checkpoint path ('' = a pre-trained teacher-model's published "
                                 "weights, downloaded; else train on the public split)"))
    teacher_cache_dir: str = key(_str("", "a directory ('' = ~/.cache/fedsplitkd/teachers)"))
    teacher_epochs: int = key(_int(100, 1))
    teacher_augment: bool = key(_bool(True))
    torch_device: str = key(_choice("cpu", "cuda", "auto"))
    precision: str = key(_choice("fp32", "bf16"))
    compile: bool = key(_bool(False))


@dataclass(frozen=True)
class SplitConfig:
    """Split learning and KD: the cut, the exchanges, how the server steps, the KD loss."""

    cut: str = key(_str("default", "a cut-point name of the student ('default' = its first block, "
                        "'adaptive' = chosen per cluster from the cost model, 'per-device' = per device)"))
    exchange_batches: int = key(_int(8, 1))
    server_batching: str = key(_choice("interleaved", "per-device", "joint"))
    kd_alpha: float = key(_float(0.278, 0.0, 1.0))
    kd_temperature: float = key(_float(2.0, 0.0, 100.0, low_open=True))
    kd_feature_weight: float = key(_float(0.0, 0.0, 100.0))
    kd_mode: str = key(_choice("standard", "mutual"))
    teacher_input: str = key(_choice("auto", "embedding", "cached"))
    teacher_cut: str = key(_str("default", "a cut-point name of the teacher ('default' = its first block: the "
                                "embedding the devices run)"))

    # teacher-input 'auto' as resolve() settles it with the fleet's settings ('' = not settled)
    settled_teacher_input: str = dataclasses.field(default="", repr=False)

    @property
    def uses_teacher(self) -> bool:
        """Whether the loss reads the teacher: its logits (kd-alpha) or its features (kd-feature-weight)."""
        return self.kd_alpha > 0.0 or self.kd_feature_weight > 0.0

    @property
    def teacher_mode(self) -> str:
        """How the teacher's input reaches the server: 'embedding', 'cached' or 'none' (no KD).

        'auto' is 'cached' (the server computes a frozen teacher's logits once per device sample,
        and each sample's embedding goes up once, not every round) where the cache can serve, else
        'embedding': a node serving several devices (virtual-devices), a teacher that trains
        (kd-mode mutual), or a run with checkpoints (a checkpoint does not keep the server's cache)."""
        if not self.uses_teacher:
            return "none"
        mode = self.settled_teacher_input or self.teacher_input
        if mode == "auto":
            return "cached" if self.kd_mode == "standard" else "embedding"
        return mode


@dataclass(frozen=True)
class FleetConfig:
    """The devices: how many, their profiles, clustering, the cost model and its resource control."""

    virtual_devices: int = key(_int(0, 0))
    min_nodes: int = key(Key(0, "an integer >= 0 (0 = wait for every device the nodes declare: num-partitions)",
                             lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0))
    clusters: str = key(Key("1", "'1' (no clustering), 'auto' (k by silhouette) or a number of clusters",
                            lambda v: isinstance(v, str) and (v == "auto" or v.isdigit() and int(v) >= 1)))
    cluster_features: str = key(Key("compute,link,energy,memory", "a comma list of compute, link, energy, memory",
                                    lambda v: isinstance(v, str) and bool(v) and
                                    set(v.split(",")) <= {"compute", "link", "energy", "memory"}))
    recluster_every: int = key(_int(0, 0))
    energy_weight: float = key(_float(1.0, 0.0, 1e9))
    bandwidth_allocation: str = key(_choice("dedicated", "equal", "minmax"))
    server_allocation: str = key(_choice("after-all", "pipelined"))
    power_allocation: str = key(_choice("max", "least-energy"))
    energy_control: str = key(_choice("budget", "lyapunov"))
    lyapunov_v: float = key(_float(0.1, 0.0, 1e9, low_open=True))
    device_classes: str = key(_str("", "a YAML file of device classes ('' = the bundled one)"))
    class_mix: str = key(_str("", "class:weight pairs, e.g. 'mcu:1,raspberry_pi:2' ('' = all alike)"))
    profile_jitter: float = key(_float(0.1, 0.0, 0.9))
    profile_file: str = key(_str("", "a CSV with one device profile per row ('' = sample from the classes)"))
    fading: bool = key(_bool(False))
    deadline_s: float = key(_float(0.0, 0.0, 1e9))
    straggler_policy: str = key(_choice("wait", "drop"))
    device_threads: int = key(_int(1, 0))


@dataclass(frozen=True)
class FaultConfig:
    """Timeouts, injected failures, checkpoints and resuming."""

    round_timeout: float = key(_float(600.0, 0.0, 86400.0, low_open=True))
    dropout_rate: float = key(_float(0.0, 0.0, 1.0))
    dropout_stage: str = key(_choice("forward", "backward", "evaluate"))
    checkpoint_every: int = key(_int(0, 0))
    resume: str = key(_str("", "a run directory to continue from its last checkpoint ('' = a fresh run)"))


@dataclass(frozen=True)
class OutputConfig:
    """Where the results go."""

    output_dir: str = key(_str("outputs"))
    run_name: str = key(_str("", "a directory name ('' = a timestamp)"))


SECTIONS: dict[str, type] = {"method": MethodConfig, "data": DataConfig, "train": TrainConfig,
                             "model": ModelConfig, "split": SplitConfig, "fleet": FleetConfig,
                             "faults": FaultConfig, "output": OutputConfig}
# run-config key -> (section, its field), in the order of the sections: the one schema.
_FIELDS: dict[str, tuple[str, dataclasses.Field]] = {
    (f.metadata["name"] or f.name.replace("_", "-")): (section, f)
    for section, cls in SECTIONS.items() for f in dataclasses.fields(cls) if "key" in f.metadata}
WHERE: dict[str, tuple[str, str]] = {name: (section, f.name) for name, (section, f) in _FIELDS.items()}
SCHEMA: dict[str, Key] = {name: f.metadata["key"] for name, (_, f) in _FIELDS.items()}
DEFAULTS: dict[str, Any] = {name: spec.default for name, spec in SCHEMA.items()}
SPLIT_METHODS = ("splitkd", "split", "splitfed")  # the split protocol (strategies/splitkd.py)


@dataclass(frozen=True)
class RunConfig(Mapping):
    """A validated run config in typed sections; also a read-only mapping by run-config key."""

    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    fleet: FleetConfig = dataclasses.field(default_factory=FleetConfig)
    faults: FaultConfig = dataclasses.field(default_factory=FaultConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)

    def __getitem__(self, name: str) -> Any:
        section, attr = WHERE[name]
        return getattr(getattr(self, section), attr)

    def __iter__(self) -> Iterator[str]:
        return iter(WHERE)

    def __len__(self) -> int:
        return len(WHERE)

    def replace(self, **overrides: Any) -> RunConfig:
        """A validated copy with some run-config keys changed (``cfg.replace(**{"kd-alpha": 0.0})``)."""
        return resolve({**self, **overrides})


def resolve(overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Merge ``overrides`` (e.g. Flower's run_config) over the defaults and validate.

    Raises ConfigError naming the first bad key and what it accepts.
    """
    values = dict(DEFAULTS)
    for name, value in (overrides or {}).items():
        if name not in SCHEMA:
            raise ConfigError(f"unknown run-config key {name!r} (known: {', '.join(SCHEMA)})")
        values[name] = value
    if values["method"] == "splitfed":  # split learning without KD, per-device server copies
        values.update({"kd-alpha": 0.0, "kd-feature-weight": 0.0, "server-batching": "per-device"})
    if values["method"] == "split":  # split learning without KD, one shared server part
        values.update({"kd-alpha": 0.0, "kd-feature-weight": 0.0})
    for name, spec in SCHEMA.items():
        value = values[name]
        # Flower hands TOML floats such as 1.0 through; an int where a float is
        # expected is fine, a whole float where an int is expected is taken as int.
        if type(spec.default) is int and isinstance(value, float) and value.is_integer():
            value = values[name] = int(value)
        if not spec.check(value):
            raise ConfigError(f"run-config '{name}' = {value!r}: must be {spec.accepts}")
    # Combinations last: each value is valid by now, so an error names the real conflict.
    if values["virtual-devices"] and values["method"] in ("local", "fd", "fedgkt"):
        raise ConfigError(f"run-config 'virtual-devices': method {values['method']!r} keeps a model per "
                          "device on its node; run it with one node per device (virtual-devices = 0)")
    if values["virtual-devices"] and values["teacher-input"] == "cached":
        raise ConfigError("run-config 'virtual-devices': teacher-input 'cached' needs each device's "
                          "upload record on its own node; use 'embedding'")
    if values["kd-mode"] == "mutual" and (values["method"] != "splitkd" or values["teacher-input"] == "cached"
                                          or values["kd-alpha"] == 0.0):
        raise ConfigError("run-config 'kd-mode' = 'mutual' trains the server's teacher on the devices' "
                          "embedding outputs: it needs method 'splitkd', teacher-input 'embedding' and "
                          "kd-alpha > 0")
    if values["kd-feature-weight"] and (values["method"] != "splitkd" or values["kd-mode"] == "mutual"):
        raise ConfigError("run-config 'kd-feature-weight' > 0 distils a frozen teacher's features on the edge "
                          "server: it needs method 'splitkd' and kd-mode 'standard'")
    if values["kd-mode"] == "mutual" and (values["checkpoint-every"] or values["resume"]):
        raise ConfigError("run-config 'checkpoint-every'/'resume': a checkpoint keeps the teacher by reference, "
                          "and kd-mode 'mutual' changes it; run mutual learning without checkpoints")
    if values["cut"] == "per-device" and values["method"] == "splitfed":
        raise ConfigError("run-config 'cut' = 'per-device': method 'splitfed' keeps a server copy per device "
                          "at one cut; use one cut (a cut point or 'adaptive')")
    if values["power-allocation"] != "max" and values["bandwidth-allocation"] == "dedicated":
        raise ConfigError("run-config 'power-allocation' = 'least-energy' lowers each device's power on the "
                          "edge's shared band; set 'bandwidth-allocation' to 'equal' or 'minmax'")
    if values["method"] == "fedgkt" and values["torch-device"] != "cpu":
        raise ConfigError("run-config 'torch-device': the fedgkt baseline trains on the CPU only")
    if (values["checkpoint-every"] or values["resume"]) and values["method"] not in SPLIT_METHODS:
        raise ConfigError(f"run-config 'checkpoint-every'/'resume': checkpoints cover the split methods "
                          f"({', '.join(SPLIT_METHODS)}), not method {values['method']!r}")
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, (section, attr) in WHERE.items():
        sections[section][attr] = values[name]
    if values["teacher-input"] == "auto" and (values["virtual-devices"] or values["checkpoint-every"]
                                              or values["resume"]):
        sections["split"]["settled_teacher_input"] = "embedding"
    return RunConfig(**{s: SECTIONS[s](**fields) for s, fields in sections.items()})
