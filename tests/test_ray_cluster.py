"""Simulation on an existing two-node Ray cluster (``ray start --head`` + ``ray start --address``,
1 CPU each, on this machine), joined through ``RAY_ADDRESS``: a ClientApp actor on each Ray node,
and the metrics of the in-process run. Every process the test starts is stopped by its PID."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from fedsplitkd.run.experiment import run_inprocess
from fedsplitkd.tools.localsim import LocalSimulation, _free_port, descendants

from conftest import tiny

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {**tiny(), "num-rounds": 2, "teacher-epochs": 5, "exchange-batches": 1000}
DEVICES = 4

# Samples, while the run goes on, how many CPUs each Ray node has free: a node whose only CPU
# is taken hosts a ClientApp actor (each asks for one CPU).
WATCH = textwrap.dedent("""
    import json, sys, time, ray
    ray.init(address=sys.argv[1], log_to_driver=False)
    from ray._private.state import available_resources_per_node
    busy, deadline = set(), time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        for node, free in available_resources_per_node().items():
            if free.get("CPU", 0.0) < 1.0:
                busy.add(node)
        print(json.dumps({"busy": sorted(busy), "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}),
              flush=True)
        time.sleep(0.5)
""")


@contextlib.contextmanager
def ray_cluster(tmp_path: Path):
    """A head and a worker node, 1 CPU each, distinct ports; stopped by PID afterwards."""
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    started = []

    def start(name: str, args: list[str]) -> None:
        log = open(tmp_path / f"ray-{name}.log", "w")
        started.append(subprocess.Popen(["ray", "start", *args, *common], env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start("head", ["--head", f"--port={port}", "--include-dashboard=false"])
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while subprocess.run(["ray", "status", f"--address={address}"], env=env, capture_output=True).returncode:
            if time.monotonic() > deadline or started[0].poll() is not None:
                raise RuntimeError(f"the Ray head did not start: {(tmp_path / 'ray-head.log').read_text()[-2000:]}")
            time.sleep(1.0)
        start("worker", [f"--address={address}", f"--dashboard-agent-listen-port={_free_port()}",
                         f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"])
        while "/2.0 CPU" not in status(address, env):  # "0.0/2.0 CPU": both nodes' CPUs
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray worker did not join: {status(address, env)[-1500:]}")
            time.sleep(1.0)
        yield address, started
    finally:
        tree = {p.pid for p in started} | set(descendants(*(p.pid for p in started)))
        for process in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        time.sleep(3.0)
        for pid in tree | set(descendants(*(p.pid for p in started))):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in started:
            process.wait(timeout=30)
        # `ray start` records the cluster for later `ray.init()` calls; `ray stop` would remove the
        # record, killing by PID does not: remove ours, or later simulations try to join it.
        record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if record.is_file() and record.read_text().strip().endswith(f":{port}"):
            record.unlink()


def status(address: str, env: dict) -> str:
    return subprocess.run(["ray", "status", f"--address={address}"], env=env, capture_output=True, text=True).stdout


def test_ray_cluster_runs_an_actor_on_each_node_with_the_single_node_metrics(tmp_path, monkeypatch):
    reference = run_inprocess(dict(CONFIG), DEVICES)[1]
    with ray_cluster(tmp_path) as (address, started):
        watcher = subprocess.Popen([sys.executable, "-c", WATCH, address, "600"], stdout=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            # Named before the SuperLink starts: its simulations inherit its environment, and
            # without an address a LocalSimulation's runs start a Ray of their own.
            monkeypatch.setenv("RAY_ADDRESS", address)
            with LocalSimulation() as sim:
                run = sim.run(ROOT, {**CONFIG, "output-dir": str(tmp_path), "run-name": "run"},
                              num_supernodes=DEVICES, cpus_per_client=1)
        finally:
            os.killpg(watcher.pid, signal.SIGKILL)
            lines = watcher.stdout.read().splitlines()
            watcher.wait(timeout=30)
        pids = {p.pid for p in started} | set(descendants(*(p.pid for p in started)))
    seen = [json.loads(line) for line in lines if line.startswith("{")]
    assert seen, "the watcher saw nothing"
    assert len(seen[-1]["nodes"]) == 2 and set(seen[-1]["busy"]) == set(seen[-1]["nodes"]), seen[-1]
    metrics = tmp_path / "run" / "metrics.csv"
    assert metrics.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    rows = list(csv.DictReader(open(metrics)))
    assert [int(r["completed"]) for r in rows[1:]] == [DEVICES] * CONFIG["num-rounds"]
    for got, want in zip(rows, reference):
        assert float(got["test_accuracy"]) == pytest.approx(want["test_accuracy"], abs=1e-9)
        assert int(got["bytes_up"]) == want["bytes_up"]
    time.sleep(1.0)
    assert not [pid for pid in pids if _alive(pid)], "Ray processes outlived the test"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if open(f"/proc/{pid}/stat").read().split()[2] == "Z":
            return False
    return True
