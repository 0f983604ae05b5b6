"""Clustering, adaptive cut and bandwidth allocation against fixed-cut split learning.

HAR on a heterogeneous fleet; the edge's spectrum is shared by the devices it serves at
once (``equal`` shares unless the variant allocates). Every variant runs the same data,
devices and seed in one process (the Flower run gives the same metrics, see
bench_protocol.py); the figures are the cost model's simulated delay and device energy.

    python experiments/bench_cpsl.py --data-path ../shared/datasets/uci_har_subset.npz
"""

from __future__ import annotations

import argparse
import statistics

from fedsplitkd.experiment import run_inprocess

VARIANTS = {
    "fixed cut, no clustering": {"clusters": "1", "cut": "default", "bandwidth-allocation": "equal"},
    "clustering": {"clusters": "auto", "cut": "default", "bandwidth-allocation": "equal"},
    "clustering + adaptive cut": {"clusters": "auto", "cut": "adaptive", "bandwidth-allocation": "equal"},
    "+ min-max bandwidth": {"clusters": "auto", "cut": "adaptive", "bandwidth-allocation": "minmax"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--class-mix", default="mcu:1,raspberry_pi:1,jetson_nano:1,smartphone:1")
    parser.add_argument("--teacher-input", default="cached")
    args = parser.parse_args()
    base = {"dataset": "har", "data-path": args.data_path, "num-rounds": args.rounds,
            "class-mix": args.class_mix, "teacher-input": args.teacher_input, "profile-jitter": 0.2}
    print(f"HAR, {args.devices} devices ({args.class_mix}), {args.rounds} rounds, teacher input "
          f"{args.teacher_input}; delay and energy are per-round means")
    print(f"{'variant':<28} {'delay s':>9} {'vs fixed':>9} {'energy J':>9} {'final acc':>9} {'cuts':>20}")
    reference = None
    for name, variant in VARIANTS.items():
        exp, rows = run_inprocess({**base, **variant}, args.devices)
        delay = statistics.mean(r["round_delay_s"] for r in rows[1:])
        energy = statistics.mean(r["device_energy_j"] for r in rows[1:])
        reference = reference or delay
        cuts = sorted(set(exp.scheduler.history[-1]["cuts"].values()))
        print(f"{name:<28} {delay:>9.3f} {delay / reference - 1:>+9.1%} {energy:>9.3f} "
              f"{rows[-1]['test_accuracy']:>9.4f} {','.join(cuts):>20}", flush=True)


if __name__ == "__main__":
    main()
