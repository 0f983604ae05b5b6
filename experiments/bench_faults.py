"""Device dropout: final accuracy with 30 % of the sampled devices failing, by stage.

Each stage drops the devices ``dropout-rate`` picks (a function of seed, round and
device): before their forward pass, after uploading activations and before the backward
(the server has trained on their data, their device part never comes back), or during
split evaluation. Same data, devices and seed as the fault-free run, in one process (the
Flower run repeats it: tests/test_simulation.py).

    python experiments/bench_faults.py --data-path ../shared/datasets/uci_har_subset.npz
"""

from __future__ import annotations

import argparse

import logging

from fedsplitkd.experiment import run_inprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="UCI HAR .npz")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--rate", type=float, default=0.3)
    parser.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    args = parser.parse_args()
    logging.getLogger("fedsplitkd").setLevel(logging.ERROR)  # one warning per dropped device otherwise
    base = {"dataset": "har", "data-path": args.data_path, "num-rounds": args.rounds,
            "lr-schedule": args.lr_schedule}
    print(f"HAR, {args.devices} devices, {args.rounds} rounds, lr-schedule {args.lr_schedule}, "
          f"dropout rate {args.rate}")
    print(f"{'stage':<10} {'final acc':>9} {'vs none (pt)':>12} {'last-5 mean':>11} {'vs none (pt)':>12} "
          f"{'dropped':>8} {'completed':>9}")
    reference = None
    for stage in ("none", "forward", "backward"):
        cfg = dict(base) if stage == "none" else {**base, "dropout-rate": args.rate, "dropout-stage": stage}
        _, rows = run_inprocess(cfg, args.devices)
        accuracy = rows[-1]["test_accuracy"]
        last5 = sum(r["test_accuracy"] for r in rows[-5:]) / 5
        reference = (accuracy, last5) if reference is None else reference
        dropped = sum(r["dropped_failed"] for r in rows)
        completed = sum(r["completed"] for r in rows)
        print(f"{stage:<10} {accuracy:>9.4f} {100 * (accuracy - reference[0]):>+12.2f} {last5:>11.4f} "
              f"{100 * (last5 - reference[1]):>+12.2f} {dropped:>8} {completed:>9}", flush=True)
    print("evaluate: dropping out of split evaluation changes no training (val_* only); see "
          "tests/test_dropout.py")


if __name__ == "__main__":
    main()
