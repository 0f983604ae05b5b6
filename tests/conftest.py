"""Shared fixtures and helpers of the fedsplitkd tests.

Every test runs with ``FEDSPLITKD_CACHE`` pointing at a temporary directory, so trained
teachers are never written to (or read from) ``~/.cache``.
"""

from __future__ import annotations

import os
from pathlib import Path

# One OpenMP thread in every process the tests start (SuperLinks, ServerApps, Ray actors,
# ClientApp processes inherit it): the suite runs as two pytest workers on 2 cores, and torch's
# default of a thread per core in each of a dozen processes only makes them wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The shared datasets beside the checkout (../shared/datasets): tests that read them skip
# where a checkout has none beside it, wherever the tests are run from.
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HAR_NPZ = SHARED_DATASETS / "uci_har_subset.npz"
SHAKESPEARE = SHARED_DATASETS / "tiny_shakespeare.txt"
needs_shared = pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason="../shared/datasets is not beside the checkout")

# A tiny run: the digits dataset, one short round, a quickly trained teacher.
TINY = {
    "dataset": "digits",
    "num-rounds": 1,
    "teacher-epochs": 2,
    "seed": 0,
}


def tiny(**overrides) -> dict:
    """The tiny run config with run-config style overrides (``exchange_batches=1`` ...)."""
    cfg = dict(TINY)
    cfg.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return cfg


@pytest.fixture(scope="session", autouse=True)
def teacher_cache_dir(tmp_path_factory) -> Path:
    """Point the teacher cache at a temporary directory for the whole session.

    Session-scoped (with its own MonkeyPatch) so that module-scoped fixtures which
    build experiments, and therefore teachers, also see it.
    """
    cache = tmp_path_factory.mktemp("fedsplitkd-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSPLITKD_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def shared_teachers(teacher_cache_dir) -> Path:
    """The teacher cache of the session's Flower runs (``teacher-cache-dir``): a teacher is keyed
    by everything that determines it (architecture, public data, epochs, seed), so modules that
    need the same one share it; see ``warm_teachers``."""
    return teacher_cache_dir / "flower-teachers"


def warm_teachers(configs) -> None:
    """Train here, before the Flower runs start, the teacher each run config needs, into the
    cache the config names: every run then loads it instead of training it in its ServerApp.
    A ServerApp shares its process with the simulation engine's threads and its machine with
    the Ray actors, so a 20-epoch digits teacher took ~12 s of CPU there against ~1.5 s here,
    and runs started side by side each trained their own. A config that does not resolve (a
    run that tests the error) is left to its run."""
    from fedsplitkd.config import ConfigError, resolve
    from fedsplitkd.run.experiment import build

    for config in configs:
        try:
            build(resolve(config))
        except ConfigError:
            continue


@pytest.fixture(autouse=True)
def _cache_env_is_isolated(monkeypatch, teacher_cache_dir):
    """Per test: re-assert (via monkeypatch) that the cache is the temporary directory."""
    monkeypatch.setenv("FEDSPLITKD_CACHE", str(teacher_cache_dir))
    assert os.environ["FEDSPLITKD_CACHE"] == str(teacher_cache_dir)


@pytest.fixture(autouse=True)
def _few_threads():
    """Keep torch on one thread: the machine is small and shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The modules that take longest, slowest first by their durations in the suite on 2 cores
# (`--durations`): Flower runs and deployments. The rest follow in their collected order.
LONGEST_FIRST = ("test_baselines", "test_deployment", "test_simulation", "test_virtual_baselines", "test_resume",
                 "test_own_data", "test_bench", "test_ray_cluster", "test_lm", "test_fuzz", "test_example")


def pytest_configure(config):
    """Keep our module order under pytest-xdist: its loadfile scheduler otherwise sorts the
    modules by their number of tests, which put the one-test Flower modules last."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """The slowest modules first (``LONGEST_FIRST``), the rest after, each in its collected order.
    The suite runs as two workers taking a module at a time (`make test`: pytest-xdist, --dist
    loadfile): a long module started last would leave one worker running alone at the end."""
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))
