"""Large cohorts: split-KD against stock Flower FedAvg with 10,000 virtual devices.

Both methods run through ``flwr run`` on a private simulation SuperLink with the same
student (an MLP), data (a generated 64-feature, 10-class set, IID over the devices),
device profiles and sampling (``fraction-train`` of the cohort per round). The devices
are virtual (``virtual-devices``): SuperNodes serve whichever devices are drawn, because
Flower's simulation engine scans every node for every message it delivers (a
10,000-node FedAvg round took 259 s here). Stock FedAvg sends one message per device,
so it gets one node per sampled device; split-KD deals the sampled devices to
``--split-nodes`` nodes, each serving its share in one message per exchange, and runs
once more with one node per device for comparison. Reported per
method: start-up (SuperLink to first round, including node discovery), the median round
time, and the peak resident memory of the whole process tree (SuperLink, ServerApp,
simulation engine, Ray workers), sampled every 0.2 s. The generated dataset is
memory-mapped from this run's cache, and the teacher trained, once before the runs, so the processes share
it rather than each holding a copy. A second split-KD run with a
tenth of the cohort shows whether memory follows the cohort or the sample.

    python experiments/bench_scale.py --devices 10000 --sampled 100
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fedsplitkd.config import resolve
from fedsplitkd.run.experiment import build
from fedsplitkd.tools.localsim import LocalSimulation, tree_rss_bytes


def write_dataset(path: Path, devices: int, per_device: int, seed: int = 0) -> Path:
    """Ten Gaussian classes in 64 dimensions, enough samples for every device."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, 64)).astype(np.float32)
    n_train, n_test = int(devices * per_device / 0.9) + 1, 2000  # 10 % becomes the public split
    y_train, y_test = rng.integers(0, 10, n_train), rng.integers(0, 10, n_test)
    noise = lambda n: 1.5 * rng.normal(size=(n, 64)).astype(np.float32)  # noqa: E731
    np.savez(path, x_train=centres[y_train] + noise(n_train), y_train=y_train,
             x_test=centres[y_test] + noise(n_test), y_test=y_test)
    return path


class PeakMemory:
    """Samples the resident memory of a process tree in a background thread."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            time.sleep(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_one(out: Path, name: str, config: dict, nodes: int) -> dict:
    started = time.perf_counter()
    with LocalSimulation() as sim, PeakMemory(sim.process.pid) as memory:
        result = sim.run(".", {**config, "run-name": name, "min-nodes": nodes}, num_supernodes=nodes,
                         cpus_per_client=1)
    total = time.perf_counter() - started
    if not (out / name / "summary.json").is_file():
        raise SystemExit(f"run {name} wrote no results:\n{(result.stdout + result.stderr)[-3000:]}")
    rows = list(csv.DictReader(open(out / name / "metrics.csv")))
    wall = [float(r["wall_s"]) for r in csv.DictReader(open(out / name / "timings.csv"))]
    return {"round_s": statistics.median(wall[2:]), "startup_s": total - sum(wall[1:]),
            "peak_gib": memory.peak / 2**30, "accuracy": float(rows[-1]["test_accuracy"]),
            "completed": int(rows[-1]["completed"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--sampled", type=int, default=100, help="devices sampled per round")
    parser.add_argument("--per-device", type=int, default=16, help="training samples per device")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--split-nodes", type=int, default=10,
                        help="SuperNodes serving split-KD's sampled devices (each node's share in one "
                             "message per exchange); stock FedAvg needs one node per sampled device")
    parser.add_argument("--server-batching", default="joint", choices=["joint", "per-device"],
                        help="joint: one server step over all devices' minibatch j (CPSL)")
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="fedsplitkd-scale-"))
    # Every process's caches (the memory-mapped dataset, the teacher) in this run's directory.
    os.environ["FEDSPLITKD_CACHE"] = str(out / "cache")
    data = write_dataset(out / "data.npz", args.devices, args.per_device)
    base = {"dataset": "npz", "data-path": str(data), "partition": "iid", "num-rounds": args.rounds,
            "batch-size": 16, "exchange-batches": 8, "teacher-epochs": 5, "output-dir": str(out),
            "learning-rate": 0.05}
    started = time.perf_counter()
    build(resolve(base))  # the mapped dataset every run's processes share, and the teacher, made once here
    print(f"dataset cache and teacher made in {time.perf_counter() - started:.1f} s (in no run's start-up)")
    print(f"{args.devices} virtual devices, {args.sampled} sampled per round, {args.per_device} samples each, "
          f"{args.rounds} rounds, split-KD server batching {args.server_batching}; "
          f"round time = median of rounds 3..{args.rounds}")
    print(f"{'method':<10} {'cohort':>7} {'nodes':>6} {'startup s':>10} {'round s':>8} {'peak RSS GiB':>13} "
          f"{'completed':>9} {'final acc':>9}")
    results = {}
    runs = (("fedavg", args.devices, args.sampled), ("splitkd", args.devices, args.split_nodes),
            ("splitkd", args.devices, args.sampled), ("splitkd", args.devices // 10, args.split_nodes))
    for method, cohort, nodes in runs:
        config = {**base, "method": method, "fraction-train": args.sampled / cohort, "virtual-devices": cohort,
                  **({"server-batching": args.server_batching} if method == "splitkd" else {})}
        r = results[method, cohort, nodes] = run_one(out, f"{method}-{cohort}-{nodes}", config, nodes)
        print(f"{method:<10} {cohort:>7} {nodes:>6} {r['startup_s']:>10.1f} {r['round_s']:>8.3f} "
              f"{r['peak_gib']:>13.2f} {r['completed']:>9} {r['accuracy']:>9.4f}", flush=True)
    fedavg = results["fedavg", args.devices, args.sampled]
    split = results["splitkd", args.devices, args.split_nodes]
    one_each = results["splitkd", args.devices, args.sampled]
    small = results["splitkd", args.devices // 10, args.split_nodes]
    print(f"split-KD / FedAvg round time: {split['round_s'] / fedavg['round_s']:.2f} (goal <= 1.2) with "
          f"{args.split_nodes} nodes; {one_each['round_s'] / fedavg['round_s']:.2f} with one node per device")
    print(f"split-KD peak RSS: {split['peak_gib']:.2f} GiB (goal < 4); {args.devices // 10} -> "
          f"{args.devices} devices: x{split['peak_gib'] / small['peak_gib']:.2f}")


if __name__ == "__main__":
    main()
