"""SplitKDConfig: every protocol setting of the config app, reachable from the library in one typed
object that SplitDevice, edge_server and SplitKD.from_models all take (issue 35)."""

from __future__ import annotations

import ast
import dataclasses
import logging
import tomllib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsplitkd import SplitDevice, SplitKDConfig, edge_server
from fedsplitkd.clients import register_device
from fedsplitkd.config import DEFAULTS, SCHEMA, SECTIONS, WHERE, ConfigError, resolve
from fedsplitkd.splitkd_config import PROTOCOL_KEYS, app_config_block, main, split_run_config
from fedsplitkd.strategies import SplitKD
from fedsplitkd.strategies.inprocess import InProcessGrid, _server_identity

ROOT = Path(__file__).resolve().parents[1]
FEATURES, CLASSES = 8, 3
# The settings issue 35 found out of the library's reach.
ONCE_UNREACHABLE = ("teacher-input", "server-batching", "kd-mode", "torch-device", "precision",
                    "device-threads", "lr-schedule")


def student() -> nn.Sequential:
    return nn.Sequential(OrderedDict([("fc1", nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU())),
                                      ("head", nn.Linear(16, CLASSES))]))


def teacher_parts() -> tuple[nn.Module, nn.Module]:
    return nn.Sequential(nn.Linear(FEATURES, 12), nn.ReLU()), nn.Linear(12, CLASSES)


def data(n: int = 64, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, FEATURES)).astype(np.float32), rng.integers(0, CLASSES, n))]


def keys_read_by(paths: list[Path]) -> set[str]:
    """Run-config keys the code reads as ``<x>.<section>.<field>`` (``cfg.split.kd_alpha``)."""
    fields = {(section, f.name): name for name, (section, attr) in WHERE.items()
              for f in dataclasses.fields(SECTIONS[section]) if f.name == attr}
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                    and (node.value.attr, node.attr) in fields:
                found.add(fields[node.value.attr, node.attr])
    return found


def test_every_key_the_protocol_reads_is_a_field():
    """What the protocol's code reads (its server, devices, rounds, scheduler and cost model) can
    be set through SplitKDConfig; 'method' is the one exception: the library picks splitkd or split
    from kd-alpha."""
    code = [*(ROOT / "fedsplitkd" / "protocol").glob("*.py"), *(ROOT / "fedsplitkd" / "fleet").glob("*.py"),
            ROOT / "fedsplitkd" / "library.py", ROOT / "strategies" / "splitkd.py",
            ROOT / "clients" / "device_app.py"]
    read = keys_read_by(code)
    assert {"kd-alpha", "kd-mode", "precision", "server-batching"} <= read  # the scan sees the sections' reads
    assert read - {"method"} <= set(PROTOCOL_KEYS), read - set(PROTOCOL_KEYS)
    fields = [f.name for f in dataclasses.fields(SplitKDConfig)]
    assert fields == [k.replace("-", "_") for k in PROTOCOL_KEYS]
    assert set(ONCE_UNREACHABLE) <= set(PROTOCOL_KEYS)
    assert {f.name: f.default for f in dataclasses.fields(SplitKDConfig)} == \
        {k.replace("-", "_"): DEFAULTS[k] for k in PROTOCOL_KEYS}
    # the config app's own keys are not the protocol's
    assert not {"dataset", "method", "virtual-devices", "resume", "output-dir", "student-model"} & set(PROTOCOL_KEYS)


def non_default_values() -> dict:
    """A valid value other than the default for every protocol key that has one."""
    values = {"seed": 3, "num-rounds": 4, "fraction-train": 0.5, "fraction-evaluate": 0.5, "batch-size": 8,
              "local-epochs": 2, "learning-rate": 0.05, "lr-schedule": "cosine", "momentum": 0.5, "grad-clip": 5.0,
              "torch-device": "auto", "precision": "bf16", "compile": False, "cut": "fc1", "exchange-batches": 2,
              "server-batching": "joint", "kd-alpha": 0.5, "kd-temperature": 3.0, "kd-mode": "standard",
              "teacher-input": "cached", "min-nodes": 2, "clusters": "2", "cluster-features": "compute,link",
              "recluster-every": 2, "energy-weight": 2.0, "bandwidth-allocation": "equal",
              "server-allocation": "pipelined", "power-allocation": "least-energy", "energy-control": "lyapunov",
              "lyapunov-v": 0.5, "class-mix": "mcu:1", "profile-jitter": 0.2, "fading": True, "deadline-s": 5.0,
              "straggler-policy": "drop", "device-threads": 2, "round-timeout": 30.0, "dropout-rate": 0.1,
              "dropout-stage": "backward"}
    return {k: v for k, v in values.items() if k in PROTOCOL_KEYS}


def test_from_run_config_reads_every_protocol_key_and_leaves_the_apps_own():
    protocol = non_default_values()
    run_config = {**protocol, "data-file": "x.npz", "samples-per-device": 200, "dataset": "har"}
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    flower = logging.getLogger("flwr")  # where a Flower app's log lines are seen
    level = flower.level  # an earlier test may have raised it (the suite runs them in one process)
    flower.addHandler(handler)
    flower.setLevel(logging.INFO)
    try:
        config = SplitKDConfig.from_run_config(run_config)
    finally:
        flower.removeHandler(handler)
        flower.setLevel(level)
    assert lines == ["fedsplitkd: run-config keys left to the app (not split-KD's): data-file, samples-per-device, "
                     "dataset"]
    assert {k: getattr(config, k.replace("-", "_")) for k in protocol} == protocol
    assert config.ignored_keys == ("data-file", "samples-per-device", "dataset")
    assert config.as_run_config() == {k: protocol.get(k, DEFAULTS[k]) for k in PROTOCOL_KEYS}
    assert split_run_config(run_config)[1] == ["data-file", "samples-per-device", "dataset"]
    # the resolved run config the protocol reads carries every one of them
    resolved = config.run_config()
    assert all(resolved[k] == v for k, v in protocol.items())
    assert resolved.split.teacher_mode == "cached" and resolved.method.name == "splitkd"
    # a RunConfig (the config app's) gives the same settings
    assert SplitKDConfig.from_run_config(resolve({**protocol, "dataset": "har"})) == config


def test_a_misspelt_protocol_key_is_refused_unless_the_app_owns_it():
    with pytest.raises(ConfigError, match="run-config 'kd-alfa': not a split-KD key; did you mean 'kd-alpha'"):
        SplitKDConfig.from_run_config({"kd-alfa": 0.5})
    with pytest.raises(ConfigError, match="did you mean 'batch-size'"):
        SplitKDConfig.from_run_config({"batchsize": 16})
    config = SplitKDConfig.from_run_config({"kd-alfa": 0.5}, app_keys=["kd-alfa"])
    assert config.kd_alpha == DEFAULTS["kd-alpha"] and config.ignored_keys == ("kd-alfa",)
    # keys far from any protocol key, and the config app's own schema keys, are the app's
    assert SplitKDConfig.from_run_config({"teacher-checkpoint": "t.pt", "teacher-epochs": 3}).ignored_keys == \
        ("teacher-checkpoint", "teacher-epochs")


def test_bad_values_name_their_key():
    with pytest.raises(ConfigError, match=r"^run-config 'teacher-input' = 'logits': must be one of"):
        SplitKDConfig(teacher_input="logits")
    with pytest.raises(ConfigError, match="run-config 'precision' = 'fp16'"):
        SplitKDConfig.from_run_config({"precision": "fp16"})
    with pytest.raises(ConfigError, match="run-config 'kd-mode' = 'mutual'"):
        SplitKDConfig(kd_mode="mutual", teacher_input="cached")
    with pytest.raises(TypeError, match="config: give a SplitKDConfig"):
        edge_server(student(), (FEATURES,), config=3)
    assert SplitKDConfig.from_run_config({"batch-size": 16.0}).batch_size == 16  # TOML's 16.0 is an int key's 16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="run-config 'torch-device' = 'cuda'"):
            edge_server(student(), (FEATURES,), *reversed(teacher_parts()), SplitKDConfig(torch_device="cuda"))


@pytest.mark.parametrize("form", ["SplitKDConfig", "RunConfig", "run config"])
def test_device_server_and_strategy_take_each_form_of_the_settings(form):
    settings = {"cut": "fc1", "teacher-input": "cached", "server-batching": "joint", "lr-schedule": "cosine",
                "precision": "bf16", "kd-alpha": 0.4, "fraction-train": 0.5, "min-nodes": 2, "seed": 7,
                "device-threads": 1, "batch-size": 8}
    config = {"SplitKDConfig": SplitKDConfig.from_run_config(settings),
              "RunConfig": resolve({**settings, "dataset": "har"}),  # the config app's, app keys and all
              "run config": {**settings, "data-file": "mine.npz"}}[form]
    embedding, body = teacher_parts()
    device = SplitDevice(student(), data(), teacher_embedding=embedding, config=config)
    server = edge_server(student(), (FEATURES,), body, embedding, config)
    strategy = SplitKD.from_models(student(), (FEATURES,), body, embedding, config)
    for cfg in (device.cfg, server.cfg, strategy.server.cfg):
        assert all(cfg[k] == v for k, v in settings.items())
    assert server.mode == strategy.server.mode == "cached" and strategy.server.edge.precision == "bf16"
    assert (strategy.fraction_train, strategy.min_nodes) == (0.5, 2)


def test_a_round_runs_with_the_settings_once_out_of_reach():
    """cached teacher inputs, joint server batching, a cosine schedule and one device thread,
    set through SplitKDConfig, in a user's Flower app: the round runs with them."""
    config = SplitKDConfig(cut="fc1", teacher_input="cached", server_batching="joint", lr_schedule="cosine",
                           device_threads=1, batch_size=16, exchange_batches=2, num_rounds=2)
    embedding, body = teacher_parts()

    def device(context):
        return SplitDevice(student(), data(64, context.node_config["partition-id"]), teacher_embedding=embedding,
                           config=config)

    from flwr.clientapp import ClientApp

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        strategy = SplitKD.from_models(student(), (FEATURES,), body, embedding, config)
        with _server_identity():
            grid = InProcessGrid({}, 2, register_device(ClientApp(), device))
            strategy.start(grid, ArrayRecord(strategy.server.student.state_dict()), num_rounds=2)
        assert torch.get_num_threads() == 1  # device-threads, applied where the device is set up
    finally:
        torch.set_num_threads(threads)
    stats = strategy.last_stats
    assert stats.completed == 2 and not stats.dropped
    assert strategy.server.teacher_cache  # cached mode: the server kept the teacher's logits by sample id


def test_the_toml_block_declares_every_protocol_key_at_its_default(capsys):
    table = tomllib.loads(app_config_block())["tool"]["flwr"]["app"]["config"]
    assert table == {k: DEFAULTS[k] for k in PROTOCOL_KEYS}
    assert SplitKDConfig.from_run_config(table) == SplitKDConfig()
    assert main(["--keys", "kd-alpha", "teacher-input"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)["tool"]["flwr"]["app"]["config"]
    assert printed == {"kd-alpha": DEFAULTS["kd-alpha"], "teacher-input": DEFAULTS["teacher-input"]}
    with pytest.raises(SystemExit):
        main(["--keys", "dataset"])
    assert "not a split-KD protocol key: 'dataset'" in capsys.readouterr().err
    assert set(PROTOCOL_KEYS) <= set(SCHEMA)


def test_values_stay_as_given_so_a_replace_decides_again():
    """Only a whole float for an integer key is rewritten; a value the resolved run config
    decides (e.g. an 'auto') stays as given, so replacing another key decides it anew."""
    first = SplitKDConfig(local_epochs=2.0)
    assert first.local_epochs == 2 and type(first.local_epochs) is int
    assert first.teacher_input == DEFAULTS["teacher-input"]
    mutual = dataclasses.replace(first, kd_mode="mutual")  # valid whatever the default teacher input
    assert mutual.run_config().split.teacher_mode == "embedding"


def test_the_example_app_declares_every_protocol_key():
    """examples/own-model's pyproject declares every protocol key (so each can be overridden
    with --run-config) beside its own keys, and the whole table reads without complaint."""
    with open(ROOT / "examples" / "own-model" / "pyproject.toml", "rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert set(PROTOCOL_KEYS) <= set(table), set(PROTOCOL_KEYS) - set(table)
    config = SplitKDConfig.from_run_config(table)
    assert set(config.ignored_keys) == set(table) - set(PROTOCOL_KEYS)
    assert (config.cut, config.num_rounds) == ("conv2", 5)


def test_from_models_refuses_the_config_apps_wiring_in_a_run_config():
    embedding, body = teacher_parts()
    with pytest.raises(ConfigError, match="^run-config 'virtual-devices' = 20: the config app's, not the library's"):
        SplitKD.from_models(student(), (FEATURES,), body, embedding, resolve({"virtual-devices": 20, "cut": "fc1",
                                                                               "teacher-input": "embedding"}))
    with pytest.raises(ConfigError, match="run-config 'checkpoint-every' = 2"):
        SplitKD.from_models(student(), (FEATURES,), body, embedding, resolve({"checkpoint-every": 2, "cut": "fc1"}))
