"""The run config: defaults, the pyproject table, and the checks on every key."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
import yaml

from fedsplitkd.config import DEFAULTS, SCHEMA, SECTIONS, WHERE, ConfigError, RunConfig, resolve

from conftest import tiny

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


@pytest.fixture(scope="module")
def flwr_config() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_defaults_resolve():
    cfg = resolve()
    assert isinstance(cfg, RunConfig)
    assert dict(cfg) == DEFAULTS
    assert resolve({}) == resolve(None) == cfg
    assert cfg["exchange-batches"] == 8 and cfg["teacher-input"] == "auto" and cfg.split.teacher_mode == "cached"
    assert resolve({"virtual-devices": 4}).split.teacher_mode == "embedding"
    assert resolve({"kd-mode": "mutual"}).split.teacher_mode == "embedding"


def test_the_default_kd_loss_is_the_bench_tuned_one_on_digits():
    """kd-alpha and kd-temperature are the tuned split-KD config of the default dataset (to 3
    significant figures): a new tuning that moves them fails here until the defaults follow.
    The learning rate is below that tuning's, and the server's steps interleaved: digits' rate
    kills a LeNet student on CIFAR-10 (experiments/probe_defaults.py)."""
    tuned = yaml.safe_load((ROOT / "experiments/bench-standard/tuned.yaml").read_text())
    chosen = tuned[DEFAULTS["dataset"]]["dirichlet-" + str(DEFAULTS["dirichlet-alpha"])]["splitkd"]
    for key in ("kd-alpha", "kd-temperature"):
        assert DEFAULTS[key] == float(f"{chosen[key]:.3g}"), key
    assert DEFAULTS["learning-rate"] < chosen["learning-rate"] and DEFAULTS["server-batching"] == "interleaved"


def test_sections_are_typed_and_read_the_same_values_as_the_keys():
    cfg = resolve({"kd-alpha": 0.5, "dataset": "har", "virtual-devices": 7, "method": "fedprox"})
    assert (cfg.split.kd_alpha, cfg.data.dataset, cfg.fleet.virtual_devices, cfg.method.name) == \
        (0.5, "har", 7, "fedprox")
    assert [name for name, (section, _) in WHERE.items() if section == "faults"] == \
        ["round-timeout", "dropout-rate", "dropout-stage", "checkpoint-every", "resume"]
    for name, (section, attr) in WHERE.items():  # every key is one field of one section
        assert getattr(getattr(cfg, section), attr) == cfg[name]
        assert dataclasses.fields(SECTIONS[section])[[f.name for f in dataclasses.fields(SECTIONS[section])]
                                                     .index(attr)].type in ("str", "int", "float", "bool")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.split.kd_alpha = 0.1  # validated once: nothing changes it afterwards
    assert cfg.split.teacher_mode == "embedding" and resolve({"method": "split"}).split.teacher_mode == "none"
    assert hash(cfg) == hash(resolve(dict(cfg))) and cfg == resolve(dict(cfg))


def test_replace_validates_the_changed_keys():
    cfg = resolve()
    assert cfg.replace(**{"num-rounds": 3}).train.num_rounds == 3
    with pytest.raises(ConfigError, match="'num-rounds'"):
        cfg.replace(**{"num-rounds": 0})


def test_tiny_overrides_resolve():
    cfg = resolve(tiny())
    assert cfg["dataset"] == "digits" and cfg["num-rounds"] == 1 and cfg["teacher-epochs"] == 2
    # keys not overridden keep their defaults
    assert cfg["batch-size"] == DEFAULTS["batch-size"]


def test_schema_keys_equal_pyproject_table(flwr_config):
    assert list(flwr_config) == list(SCHEMA)  # same keys, same order


def test_schema_defaults_equal_pyproject_values(flwr_config):
    for name, key in SCHEMA.items():
        value = flwr_config[name]
        assert value == key.default, name
        assert type(value) is type(key.default), f"{name}: {type(value).__name__} vs {type(key.default).__name__}"


def test_pyproject_table_resolves_unchanged(flwr_config):
    # what Flower hands the apps as run_config with no overrides
    assert dict(resolve(flwr_config)) == DEFAULTS


def test_every_default_passes_its_own_check():
    for name, key in SCHEMA.items():
        assert key.check(key.default), name


def _single_line_naming(err: pytest.ExceptionInfo, key: str) -> str:
    message = str(err.value)
    assert key in message
    assert "\n" not in message and "\r" not in message
    return message


@pytest.mark.parametrize("name", ["no-such-key", "kd_alpha", "Seed"])
def test_unknown_key_raises_naming_it(name):
    with pytest.raises(ConfigError) as err:
        resolve({name: 1})
    message = _single_line_naming(err, name)
    assert f"'{name}'" in message


BAD = [
    ("kd-alpha", 1.5),
    ("kd-alpha", -0.1),
    ("exchange-batches", 0),
    ("exchange-batches", 2.5),
    ("teacher-input", "x"),
    ("batch-size", "32"),
    ("batch-size", True),
    ("batch-size", None),
    ("seed", -1),
    ("num-rounds", float("inf")),
    ("learning-rate", 0.0),
    ("learning-rate", float("nan")),
    ("kd-temperature", 0),
    ("momentum", 1.0),
    ("dataset", "mnist"),
    ("server-batching", "Joint"),
    ("student-model", "resnet"),
    ("cut", 3),
    ("output-dir", None),
    ("fraction-train", 0.0),
    ("val-fraction", 0.75),
    ("round-timeout", "600"),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_value_raises_single_line_error_naming_the_key(name, value):
    with pytest.raises(ConfigError) as err:
        resolve({name: value})
    message = _single_line_naming(err, name)
    assert message.startswith(f"run-config '{name}'")
    assert isinstance(err.value, ValueError)  # ConfigError is a ValueError


def test_multiline_string_value_still_gives_single_line_error():
    with pytest.raises(ConfigError) as err:
        resolve({"teacher-input": "embedding\ncached"})
    _single_line_naming(err, "teacher-input")


@pytest.mark.parametrize("name", ["batch-size", "exchange-batches", "seed", "num-rounds", "teacher-epochs"])
def test_whole_float_for_int_key_is_taken_as_int(name):
    cfg = resolve({name: 8.0})
    assert cfg[name] == 8
    assert type(cfg[name]) is int


def test_int_for_float_key_is_accepted():
    cfg = resolve({"kd-alpha": 1, "learning-rate": 1, "round-timeout": 30})
    assert cfg["kd-alpha"] == 1 and cfg["learning-rate"] == 1 and cfg["round-timeout"] == 30


@pytest.mark.parametrize("name,value", [("kd-alpha", 0.0), ("kd-alpha", 1.0), ("momentum", 0.0),
                                        ("exchange-batches", 1), ("val-fraction", 0.0),
                                        ("teacher-input", "cached"), ("server-batching", "joint"),
                                        ("cut", "conv2"), ("fraction-evaluate", 1.0)])
def test_boundary_values_are_accepted(name, value):
    assert resolve({name: value})[name] == value


def test_first_bad_key_in_schema_order_is_reported_and_defaults_untouched():
    with pytest.raises(ConfigError) as err:
        resolve({"exchange-batches": 0, "num-rounds": 0})
    assert "'num-rounds'" in str(err.value) and "exchange-batches" not in str(err.value)
    assert DEFAULTS["exchange-batches"] == 8 and DEFAULTS["num-rounds"] == 25


@pytest.mark.parametrize("overrides,key", [
    ({"method": "fedavg", "checkpoint-every": 2}, "checkpoint-every"),
    ({"method": "local", "resume": "outputs/x"}, "resume"),
    ({"method": "fedgkt", "torch-device": "cuda"}, "torch-device"),
    ({"dropout-rate": 1.5}, "dropout-rate"),
    ({"dropout-stage": "midway"}, "dropout-stage"),
    ({"min-nodes": -1}, "min-nodes"),
])
def test_combinations_the_methods_cannot_run_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}"):
        resolve(overrides)


def test_the_pyproject_table_is_generated_from_the_schema():
    from fedsplitkd.config_docs import flwr_table

    assert flwr_table() in PYPROJECT.read_text(), \
        "pyproject.toml's [tool.flwr.app.config] is stale: python -m fedsplitkd.config_docs"


def test_the_run_config_reference_is_generated_from_the_schema():
    from fedsplitkd.config_docs import MEANING, reference

    assert set(MEANING) == set(SCHEMA) and all(MEANING.values())
    assert reference() in (ROOT / "docs/run-config.md").read_text(), \
        "docs/run-config.md is stale: python -m fedsplitkd.config_docs docs/run-config.md"
