"""The on-device cache of prepared data (fedsplitkd.data.prepared): the same data, no partitioning."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import HAR_NPZ, needs_shared
from fedsplitkd.data import prepared
from fedsplitkd.clients.client_app import _cache_dir
from fedsplitkd.config import RunConfig, resolve
from fedsplitkd.data.datasets import device_data, load_dataset
from fedsplitkd.protocol.device import device_setup

HAR = str(HAR_NPZ)


def _cfg(**overrides) -> RunConfig:
    return resolve({"partition": "dirichlet", **overrides})


def _same(a, b) -> None:
    for name in ("x_train", "y_train", "x_val", "y_val"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(a, name).dtype == getattr(b, name).dtype


@pytest.mark.parametrize("overrides", [{}, pytest.param({"dataset": "npz", "data-path": HAR, "dirichlet-alpha": 0.1},
                                                          marks=needs_shared)],
                         ids=["digits", "har-npz"])
def test_cached_data_equals_the_partitioned_data(tmp_path, overrides):
    cfg = _cfg(**overrides)
    ds = load_dataset(cfg)
    for device in (0, 2):
        first, shape = prepared.device_data(cfg, device, 3, tmp_path)
        again, shape_again = prepared.device_data(cfg, device, 3, tmp_path)
        _same(first, device_data(cfg, device, 3))
        _same(again, first)
        assert shape == shape_again
        assert (shape.input_shape, shape.num_classes, shape.tokens) == (ds.input_shape, ds.num_classes, ds.tokens)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_a_cached_device_is_served_from_its_file(tmp_path, monkeypatch):
    cfg = _cfg()
    prepared.device_data(cfg, 1, 3, tmp_path)

    def fail(*_):
        raise AssertionError("prepared again although the cache holds the device")

    monkeypatch.setattr(prepared, "_prepare", fail)
    local, _ = prepared.device_data(cfg, 1, 3, tmp_path)
    _same(local, device_data(cfg, 1, 3))


@needs_shared
def test_the_key_follows_what_the_data_depends_on(tmp_path):
    cfg = _cfg()
    base = prepared.key(cfg, 0, 3)
    assert prepared.key(_cfg(**{"learning-rate": 0.5, "kd-alpha": 0.9}), 0, 3) == base
    for other in (prepared.key(cfg, 1, 3), prepared.key(cfg, 0, 4), prepared.key(_cfg(seed=1), 0, 3),
                  prepared.key(_cfg(**{"dirichlet-alpha": 0.1}), 0, 3), prepared.key(_cfg(partition="iid"), 0, 3),
                  prepared.key(_cfg(**{"val-fraction": 0.2}), 0, 3)):
        assert other != base
    file = tmp_path / "devices.npz"
    raw = dict(np.load(HAR))
    np.savez(file, **raw)
    before = prepared.key(_cfg(dataset="npz", **{"data-path": str(file)}), 0, 3)
    raw["x_train"] = raw["x_train"] + 1.0
    np.savez(file, **raw)
    assert prepared.key(_cfg(dataset="npz", **{"data-path": str(file)}), 0, 3) != before


def test_a_damaged_file_is_prepared_again(tmp_path):
    cfg = _cfg()
    path = tmp_path / f"{prepared.key(cfg, 0, 3)}.npz"
    path.write_bytes(b"not an npz")
    local, _ = prepared.device_data(cfg, 0, 3, tmp_path)
    _same(local, device_data(cfg, 0, 3))
    _same(prepared._read(path)[0], local)


def test_a_fresh_device_process_imports_only_what_its_message_needs(tmp_path):
    """A SuperNode's process per message: with the cache warm, a forward and a backward
    request import neither the partitioners nor torch.optim's dynamo nor sympy."""
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from fedsplitkd.config import resolve
        from fedsplitkd.protocol.device import device_setup, handle_train
        from fedsplitkd.protocol.payload import TEACHER, WEIGHTS, pack
        from fedsplitkd.protocol.runtime import state_to_numpy

        cfg = resolve({{"partition": "dirichlet", "exchange-batches": 1000}})
        setup = device_setup(cfg, 2, 3, {str(tmp_path)!r})
        request = {{"round": 1, "kind": "forward", **pack(WEIGHTS, state_to_numpy(setup.student.device_part(cfg["cut"]))),
                   **pack(TEACHER, state_to_numpy(setup.embedding))}}
        reply, state = handle_train(request, {{}}, setup)
        grads = np.ones_like(reply["activations"])
        handle_train({{"round": 1, "kind": "backward", "cursor": 0, "grads": grads, "final": True}}, state, setup)
        heavy = {{"sklearn", "flwr_datasets", "datasets", "sympy", "torch._dynamo"}}
        print(len(setup.data.y_train), *sorted(heavy & set(sys.modules)))
    """)
    cold = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    warm = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert "flwr_datasets" in cold[1:]  # the first process partitions the dataset
    assert warm == cold[:1]                                # the next one reads its file alone
    assert int(warm[0]) == len(device_data(_cfg(), 2, 3).y_train)


def test_the_node_config_names_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSPLITKD_CACHE", str(tmp_path))
    node = lambda **config: SimpleNamespace(node_config={"partition-id": 0, "num-partitions": 3, **config})  # noqa: E731
    assert _cache_dir(node()) == str(tmp_path / "prepared")
    assert _cache_dir(node(**{"cache-dir": "/var/cache/x"})) == "/var/cache/x"
    assert _cache_dir(node(**{"cache-dir": ""})) is None
    setup = device_setup(_cfg(), 0, 3, _cache_dir(node()))
    _same(setup.data, device_data(_cfg(), 0, 3))
    assert len(list((tmp_path / "prepared").glob("*.npz"))) == 1
