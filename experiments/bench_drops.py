"""Fault-free split-KD runs through Flower must drop no device: a stress run of the transport.

Before one message in flight per node (strategies/transport.py, GridTransport), nodes that
served several virtual devices could get overlapping messages, lose a device's state and
drop it at the backward stage. This runs fault-free split-KD through `flwr run` on:

- a generated image set of shape (N, 1, 28, 28), 8,000 train / 2,000 test, 10 classes (the
  2-D CNN family), with virtual devices on 2 SuperNodes and with one SuperNode per device;
- the HAR subset (1-D CNN), with virtual devices on 2 SuperNodes;

and counts every dropped device-round in metrics.csv (failed, invalid, by stage).

    python experiments/bench_drops.py --data-path ../shared/datasets/uci_har_subset.npz
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np

from fedsplitkd.tools.localsim import LocalSimulation

ROOT = Path(__file__).resolve().parents[1]
DROPS = ("dropped_failed", "dropped_invalid", "dropped_forward", "dropped_backward")


def write_images(path: Path, seed: int = 0) -> Path:
    """10 classes of 28x28 images: a smooth random template per class, shifted and noised."""
    rng = np.random.default_rng(seed)
    templates = rng.normal(size=(10, 7, 7)).repeat(4, 1).repeat(4, 2)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n)
        shifts = rng.integers(-2, 3, (n, 2))
        x = np.stack([np.roll(templates[c], tuple(s), (0, 1)) for c, s in zip(y, shifts)])
        return (x + rng.normal(scale=1.0, size=x.shape))[:, None].astype(np.float32), y

    (x_train, y_train), (x_test, y_test) = draw(8000), draw(2000)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="UCI HAR .npz")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", type=int, nargs="+", default=[0, 1, 2],
                        help="which settings to run: 0 2-D CNN virtual, 1 2-D CNN a node per device, 2 HAR virtual")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-drops-"))
    images = write_images(out / "images.npz")
    settings = [  # (name, run config, SuperNodes)
        ("2-D CNN, virtual on 2 nodes", {"dataset": "npz", "data-path": str(images),
                                         "virtual-devices": args.devices}, 2),
        ("2-D CNN, a node per device", {"dataset": "npz", "data-path": str(images)}, args.devices),
        ("HAR 1-D CNN, virtual on 2 nodes", {"dataset": "har", "data-path": str(Path(args.data_path).resolve()),
                                             "virtual-devices": args.devices}, 2),
    ]
    print(f"fault-free split-KD through flwr run: {args.devices} devices, {args.rounds} rounds, seeds {args.seeds}")
    print(f"{'setting':<34} {'seed':>4} {'device-rounds':>13} {'completed':>9} {'dropped':>7} "
          f"{'final acc':>9} {'wall s':>7}")
    total = 0
    with LocalSimulation() as sim:
        for name, overrides, nodes in [settings[i] for i in args.settings]:
            for seed in args.seeds:
                run_name = f"{name.split(',')[0].replace(' ', '-')}-{nodes}-{seed}"
                started = time.perf_counter()
                sim.run(ROOT, {**overrides, "seed": seed, "num-rounds": args.rounds, "output-dir": str(out),
                               "run-name": run_name}, num_supernodes=nodes, cpus_per_client=1)
                path = out / run_name / "metrics.csv"
                if not path.is_file():
                    raise SystemExit(f"{name}, seed {seed}: the run wrote no metrics.csv (see {out})")
                rows = list(csv.DictReader(open(path)))[1:]
                if len(rows) != args.rounds:
                    raise SystemExit(f"{name}, seed {seed}: {len(rows)} of {args.rounds} rounds in {path}")
                dropped = sum(int(r["dropped_failed"]) + int(r["dropped_invalid"]) for r in rows)
                total += dropped
                print(f"{name:<34} {seed:>4} {sum(int(r['devices']) for r in rows):>13} "
                      f"{sum(int(r['completed']) for r in rows):>9} {dropped:>7} "
                      f"{float(rows[-1]['test_accuracy']):>9.4f} {time.perf_counter() - started:>7.0f}", flush=True)
    print(f"dropped device-rounds in all: {total}")


if __name__ == "__main__":
    main()
