"""Run configuration: every key, its default, and the check that guards it.

The same keys and defaults stand in ``[tool.flwr.app.config]`` of pyproject.toml (Flower
needs them there); a test keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf


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


SCHEMA: dict[str, Key] = {
    "method": _choice("splitkd", "split", "splitfed", "fedavg", "fedprox", "feddf", "fd", "fedgkt", "local",
                      "central-kd"),
    "proximal-mu": _float(0.01, 0.0, 1e6),
    "distill-steps": _int(100, 0),
    "server-epochs": _int(1, 1),
    "dataset": _choice("digits", "har", "shakespeare", "shakespeare-lm", "cifar10", "fashion_mnist", "femnist",
                       "npz", "csv"),
    "data-path": _str("", "a file path ('' = the dataset's default source)"),
    "label-column": _str("label", "the label column's name (csv)"),
    "seq-len": _int(40, 2),
    "text-stride": _int(40, 1),
    "partition": _choice("dirichlet", "iid", "pathological", "natural"),
    "dirichlet-alpha": _float(0.5, 0.0, 1e6, low_open=True),
    "classes-per-device": _int(2, 1),
    "public-fraction": _float(0.3, 0.0, 0.9, low_open=True),
    "holdout-fraction": _float(0.0, 0.0, 0.5),
    "val-fraction": _float(0.1, 0.0, 0.5),
    "seed": _int(0, 0),
    "num-rounds": _int(25, 1),
    "fraction-train": _float(1.0, 0.0, 1.0, low_open=True),
    "fraction-evaluate": _float(0.0, 0.0, 1.0),
    "virtual-devices": _int(0, 0),
    "min-nodes": Key(0, "an integer >= 0 (0 = wait for every device the nodes declare: num-partitions)",
                     lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "batch-size": _int(32, 1),
    "local-epochs": _int(1, 1),
    "exchange-batches": _int(8, 1),
    "server-batching": _choice("per-device", "joint"),
    # learning-rate, kd-alpha and kd-temperature default to split-KD's tuned config on digits
    # (the default dataset), from the standard bench preset (experiments/bench-standard/tuned.yaml).
    "learning-rate": _float(0.0222, 0.0, 10.0, low_open=True),
    "lr-schedule": _choice("constant", "cosine"),
    "momentum": _float(0.9, 0.0, 0.999),
    "kd-alpha": _float(0.278, 0.0, 1.0),
    "kd-temperature": _float(2.0, 0.0, 100.0, low_open=True),
    "kd-mode": _choice("standard", "mutual"),
    "teacher-input": _choice("embedding", "cached"),
    "teacher-path": _str("", "a checkpoint path ('' = train on the public split)"),
    "teacher-cache-dir": _str("", "a directory ('' = ~/.cache/fedsplitkd/teachers)"),
    "teacher-epochs": _int(100, 1),
    "teacher-augment": _bool(True),
    "student-model": _choice("auto", "mlp", "cnn1d", "cnn2d", "gpt"),
    "gpt-student": Key("2x128x4", "layers x width x heads, e.g. '2x128x4' (heads divide width)",
                       _gpt_size_ok),
    "gpt-teacher": Key("6x256x8", "layers x width x heads, e.g. '6x256x8' (heads divide width)",
                       _gpt_size_ok),
    "torch-device": _choice("cpu", "cuda", "auto"),
    "hf-student": _str("", "a local Hugging Face checkpoint directory ('' = the built-in GPT)"),
    "hf-teacher": _str("", "a local Hugging Face checkpoint directory, used as trained ('' = the built-in GPT)"),
    "cut": _str("default", "a cut-point name of the student ('default' = its first block, "
                "'adaptive' = chosen per cluster from the cost model)"),
    "clusters": Key("1", "'1' (no clustering), 'auto' (k by silhouette) or a number of clusters",
                    lambda v: isinstance(v, str) and (v == "auto" or v.isdigit() and int(v) >= 1)),
    "cluster-features": Key("compute,link,energy,memory", "a comma list of compute, link, energy, memory",
                            lambda v: isinstance(v, str) and bool(v) and
                            set(v.split(",")) <= {"compute", "link", "energy", "memory"}),
    "recluster-every": _int(0, 0),
    "energy-weight": _float(1.0, 0.0, 1e9),
    "bandwidth-allocation": _choice("dedicated", "equal", "minmax"),
    "server-allocation": _choice("after-all", "pipelined"),
    "energy-control": _choice("budget", "lyapunov"),
    "lyapunov-v": _float(0.1, 0.0, 1e9, low_open=True),
    "device-classes": _str("", "a YAML file of device classes ('' = the bundled one)"),
    "class-mix": _str("", "class:weight pairs, e.g. 'mcu:1,raspberry_pi:2' ('' = all alike)"),
    "profile-jitter": _float(0.1, 0.0, 0.9),
    "profile-file": _str("", "a CSV with one device profile per row ('' = sample from the classes)"),
    "fading": _bool(False),
    "deadline-s": _float(0.0, 0.0, 1e9),
    "straggler-policy": _choice("wait", "drop"),
    "device-threads": _int(1, 0),
    "round-timeout": _float(600.0, 0.0, 86400.0, low_open=True),
    "dropout-rate": _float(0.0, 0.0, 1.0),
    "dropout-stage": _choice("forward", "backward", "evaluate"),
    "checkpoint-every": _int(0, 0),
    "resume": _str("", "a run directory to continue from its last checkpoint ('' = a fresh run)"),
    "output-dir": _str("outputs"),
    "run-name": _str("", "a directory name ('' = a timestamp)"),
}

DEFAULTS: dict[str, Any] = {name: key.default for name, key in SCHEMA.items()}
SPLIT_METHODS = ("splitkd", "split", "splitfed")  # the split protocol (strategies/splitkd.py)


def resolve(overrides: Mapping[str, Any] | None = None) -> DictConfig:
    """Merge ``overrides`` (e.g. Flower's run_config) over the defaults and validate.

    Raises ConfigError naming the first bad key and what it accepts.
    """
    values = dict(DEFAULTS)
    for name, value in (overrides or {}).items():
        if name not in SCHEMA:
            raise ConfigError(f"unknown run-config key {name!r} (known: {', '.join(SCHEMA)})")
        values[name] = value
    if values["method"] == "splitfed":  # split learning without KD, per-device server copies
        values.update({"kd-alpha": 0.0, "server-batching": "per-device"})
    if values["method"] == "split":  # split learning without KD, one shared server part
        values["kd-alpha"] = 0.0
    for name, key in SCHEMA.items():
        value = values[name]
        # Flower hands TOML floats such as 1.0 through; an int where a float is
        # expected is fine, a whole float where an int is expected is taken as int.
        if type(key.default) is int and isinstance(value, float) and value.is_integer():
            value = values[name] = int(value)
        if not key.check(value):
            raise ConfigError(f"run-config '{name}' = {value!r}: must be {key.accepts}")
    # Combinations last: each value is valid by now, so an error names the real conflict.
    if values["virtual-devices"] and values["method"] in ("local", "fd", "fedgkt"):
        raise ConfigError(f"run-config 'virtual-devices': method {values['method']!r} keeps a model per "
                          "device on its node; run it with one node per device (virtual-devices = 0)")
    if values["virtual-devices"] and values["teacher-input"] == "cached":
        raise ConfigError("run-config 'virtual-devices': teacher-input 'cached' needs each device's "
                          "upload record on its own node; use 'embedding'")
    if values["kd-mode"] == "mutual" and (values["method"] != "splitkd" or values["teacher-input"] != "embedding"
                                          or values["kd-alpha"] == 0.0):
        raise ConfigError("run-config 'kd-mode' = 'mutual' trains the server's teacher on the devices' "
                          "embedding outputs: it needs method 'splitkd', teacher-input 'embedding' and "
                          "kd-alpha > 0")
    if values["kd-mode"] == "mutual" and (values["checkpoint-every"] or values["resume"]):
        raise ConfigError("run-config 'checkpoint-every'/'resume': a checkpoint keeps the teacher by reference, "
                          "and kd-mode 'mutual' changes it; run mutual learning without checkpoints")
    if values["method"] == "fedgkt" and values["torch-device"] != "cpu":
        raise ConfigError("run-config 'torch-device': the fedgkt baseline trains on the CPU only")
    if (values["checkpoint-every"] or values["resume"]) and values["method"] not in SPLIT_METHODS:
        raise ConfigError(f"run-config 'checkpoint-every'/'resume': checkpoints cover the split methods "
                          f"({', '.join(SPLIT_METHODS)}), not method {values['method']!r}")
    return OmegaConf.create(values)
