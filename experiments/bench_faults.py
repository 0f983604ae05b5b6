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

from fedsplitkd.experiment import run_inprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="UCI HAR .npz")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--rate", type=float, default=0.3)
    args = parser.parse_args()
    base = {"dataset": "har", "data-path": args.data_path, "num-rounds": args.rounds}
    print(f"HAR, {args.devices} devices, {args.rounds} rounds, dropout rate {args.rate}")
    print(f"{'stage':<10} {'final acc':>9} {'vs none (pt)':>12} {'dropped':>8} {'completed':>9}")
    reference = None
    for stage in ("none", "forward", "backward"):
        cfg = dict(base) if stage == "none" else {**base, "dropout-rate": args.rate, "dropout-stage": stage}
        _, rows = run_inprocess(cfg, args.devices)
        accuracy = rows[-1]["test_accuracy"]
        reference = accuracy if reference is None else reference
        dropped = sum(r["dropped_failed"] for r in rows)
        completed = sum(r["completed"] for r in rows)
        print(f"{stage:<10} {accuracy:>9.4f} {100 * (accuracy - reference):>+12.2f} {dropped:>8} {completed:>9}",
              flush=True)
    print("evaluate: dropping out of split evaluation changes no training (val_* only); see "
          "tests/test_dropout.py")


if __name__ == "__main__":
    main()
