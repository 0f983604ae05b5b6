"""Clustering, adaptive cut, bandwidth and server-compute allocation and ASL's energy queue
against fixed-cut split learning, and a cut per device (ASL) with all devices in parallel.

HAR on a heterogeneous fleet; the edge's spectrum is shared by the devices it serves at
once (``equal`` shares unless the variant allocates). Every variant runs the same data,
devices and seed in one process (the Flower run gives the same metrics, see
bench_protocol.py); the figures are the cost model's simulated delay and device energy.

The budgeted variants run twice: every device transmitting at its full power, and with
``power-allocation = least-energy`` (a device with time to spare sends at the least power
that has it done when the slowest one is, and min-max counts the energy that saves).

The last variants give every device a per-round energy budget: ``--budget-fraction`` of
its own mean energy per round under the fixed cut (plain split learning), so at 1.0 no
device may spend more than split learning made it spend. The budgets go in a
``profile-file`` (the same profiles, each with its budget). ``budget`` makes a cut over
any device's budget infeasible and min-max bandwidth keeps each device the band its budget
needs, in every round; ``lyapunov`` (ASL) lets a device overspend while its energy-deficit
queue allows, keeping the budget on average. "over budget" counts the devices whose mean
energy per round exceeds their budget (by more than 1e-9, float rounding), "worst" is the
largest excess.

    python experiments/bench_cpsl.py --data-path ../shared/datasets/uci_har_subset.npz
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import tempfile
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

from fedsplitkd.run.experiment import run_inprocess

VARIANTS = {
    "fixed cut, no clustering": {"clusters": "1", "cut": "default", "bandwidth-allocation": "equal"},
    "min-max bandwidth, no clustering": {"clusters": "1", "cut": "default", "bandwidth-allocation": "minmax"},
    "adaptive cut + min-max, no clustering": {"clusters": "1", "cut": "adaptive", "bandwidth-allocation": "minmax"},
    "clustering": {"clusters": "auto", "cut": "default", "bandwidth-allocation": "equal"},
    "clustering + adaptive cut": {"clusters": "auto", "cut": "adaptive", "bandwidth-allocation": "equal"},
    "+ min-max bandwidth": {"clusters": "auto", "cut": "adaptive", "bandwidth-allocation": "minmax"},
    "+ pipelined server": {"clusters": "auto", "cut": "adaptive", "bandwidth-allocation": "minmax",
                           "server-allocation": "pipelined"},
    "per-device cut + min-max + pipelined": {"clusters": "1", "cut": "per-device", "bandwidth-allocation": "minmax",
                                             "server-allocation": "pipelined"},
}
PER_DEVICE = VARIANTS["per-device cut + min-max + pipelined"]
BUDGETED = {
    "min-max, no clustering, budget/round": {"clusters": "1", "cut": "default", "bandwidth-allocation": "minmax"},
    "min-max, no clustering, Lyapunov V 0.1": {"clusters": "1", "cut": "default", "bandwidth-allocation": "minmax",
                                               "energy-control": "lyapunov", "lyapunov-v": 0.1},
    "+ pipelined server, budget/round": {"energy-control": "budget"},
    "+ pipelined server, Lyapunov V 0.1": {"energy-control": "lyapunov", "lyapunov-v": 0.1},
    "per-device cut, budget/round": {**PER_DEVICE, "energy-control": "budget"},
    "per-device cut, Lyapunov V 0.1": {**PER_DEVICE, "energy-control": "lyapunov", "lyapunov-v": 0.1},
}
LEAST_ENERGY = {"power-allocation": "least-energy"}
BUDGETED.update({f"{name}, least-energy power": {**variant, **LEAST_ENERGY} for name, variant in list(BUDGETED.items())})


def device_energy(exp) -> dict[int, float]:
    """Mean energy per round, by device."""
    spent = defaultdict(list)
    for row in exp.device_rows:
        spent[int(row["device"])].append(row["energy_j"])
    return {d: statistics.mean(e) for d, e in spent.items()}


def over_budget(exp) -> tuple[int, float]:
    """Devices whose mean energy per round exceeds their budget (beyond float rounding: a budget
    met exactly sums to it within ~1e-16), and the worst relative overspend."""
    profiles = exp.server.costs.profiles
    ratios = [energy / profiles[d].energy_budget_j for d, energy in device_energy(exp).items()]
    return sum(r > 1 + 1e-9 for r in ratios), max(ratios) - 1


def budgeted_profiles(exp, devices: int, fraction: float, directory: Path) -> Path:
    """A profile-file of the run's device profiles, each budgeted fraction x its energy per round."""
    energy = device_energy(exp)
    profiles = [replace(exp.server.costs.profiles[d], energy_budget_j=fraction * energy.get(d, math.inf))
                for d in range(devices)]
    path = directory / "budgeted_profiles.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(profiles[0])))
        writer.writeheader()
        writer.writerows(asdict(p) for p in profiles)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--class-mix", default="mcu:1,raspberry_pi:1,jetson_nano:1,smartphone:1")
    parser.add_argument("--teacher-input", default="cached")
    parser.add_argument("--budget-fractions", default="1.0,0.8")
    args = parser.parse_args()
    base = {"dataset": "har", "data-path": args.data_path, "num-rounds": args.rounds,
            "class-mix": args.class_mix, "teacher-input": args.teacher_input, "profile-jitter": 0.2}
    print(f"HAR, {args.devices} devices ({args.class_mix}), {args.rounds} rounds, teacher input "
          f"{args.teacher_input}; delay and energy are per-round means")
    print(f"{'variant':<62} {'delay s':>9} {'vs fixed':>9} {'energy J':>9} {'final acc':>9} {'over budget':>11} "
          f"{'worst':>7} {'cuts':>16}")
    reference = None

    def report(name: str, overrides: dict) -> None:
        nonlocal reference, fixed
        exp, rows = run_inprocess({**base, **overrides}, args.devices)
        delay = statistics.mean(r["round_delay_s"] for r in rows[1:])
        energy = statistics.mean(r["device_energy_j"] for r in rows[1:])
        reference = reference or delay
        cuts = sorted({cut for h in exp.scheduler.history
                       for cut in [*h.get("cuts", {}).values(), *h.get("device-cuts", {}).values()]})
        over, worst = over_budget(exp) if "profile-file" in overrides else (None, None)
        budget = f"{f'{over}/{args.devices}':>11} {worst:>+7.2%}" if over is not None else f"{'-':>11} {'-':>7}"
        print(f"{name:<62} {delay:>9.3f} {delay / reference - 1:>+9.1%} {energy:>9.3f} "
              f"{rows[-1]['test_accuracy']:>9.4f} {budget} {','.join(cuts):>16}", flush=True)
        fixed = fixed or exp

    fixed = None
    for name, variant in VARIANTS.items():
        report(name, variant)
    for fraction in map(float, args.budget_fractions.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            profiles = budgeted_profiles(fixed, args.devices, fraction, Path(tmp))
            print(f"budgets: {fraction:g} x each device's energy per round under the fixed cut")
            for name, variant in BUDGETED.items():
                report(name, {**VARIANTS["+ pipelined server"], **variant, "profile-file": str(profiles)})


if __name__ == "__main__":
    main()
