"""Device dropout: final accuracy with 30 % of the sampled devices failing, by stage.

Each stage drops the devices ``dropout-rate`` picks (a function of seed, round and
device): before their forward pass, or after uploading activations and before the
backward (the server has trained on their data, their device part never comes back).
Dropping out of split evaluation changes no training (val_* only; tests/test_dropout.py).
Each seed's faulty runs are compared with that seed's fault-free run (same data,
devices and seed, in one process; the Flower run repeats it: tests/test_simulation.py).
A single run's final accuracy on the 950-sample test set moves by a point or more with
any change of trajectory, so the gap is reported per seed and as the mean over seeds.

    python experiments/bench_faults.py --data-path ../shared/datasets/uci_har_subset.npz
"""

from __future__ import annotations

import argparse
import logging
import statistics

from fedsplitkd.run.experiment import run_inprocess

STAGES = ("forward", "backward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="UCI HAR .npz")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--rate", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--learning-rate", type=float, default=0.01)
    args = parser.parse_args()
    logging.getLogger("fedsplitkd").setLevel(logging.ERROR)  # one warning per dropped device otherwise
    print(f"HAR, {args.devices} devices, {args.rounds} rounds, learning-rate {args.learning_rate} "
          f"({args.lr_schedule}), "
          f"dropout rate {args.rate}, seeds {args.seeds}")
    print(f"{'seed':>4} {'stage':<9} {'final acc':>9} {'vs none (pt)':>12} {'dropped':>8} {'completed':>9}")
    gaps: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for seed in args.seeds:
        base = {"dataset": "har", "data-path": args.data_path, "num-rounds": args.rounds, "seed": seed,
                "lr-schedule": args.lr_schedule, "learning-rate": args.learning_rate}
        reference = None
        for stage in ("none", *STAGES):
            cfg = base if stage == "none" else {**base, "dropout-rate": args.rate, "dropout-stage": stage}
            _, rows = run_inprocess(cfg, args.devices)
            accuracy = rows[-1]["test_accuracy"]
            reference = accuracy if reference is None else reference
            if stage != "none":
                gaps[stage].append(100 * (accuracy - reference))
            print(f"{seed:>4} {stage:<9} {accuracy:>9.4f} {100 * (accuracy - reference):>+12.2f} "
                  f"{sum(r['dropped_failed'] for r in rows):>8} {sum(r['completed'] for r in rows):>9}", flush=True)
    for stage, values in gaps.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{stage}: mean gap {statistics.mean(values):+.2f} pt (sd {spread:.2f}) over {len(values)} seeds")


if __name__ == "__main__":
    main()
