"""Clustering, adaptive cut, bandwidth and server-compute allocation and ASL's energy queue
against fixed-cut split learning.

HAR on a heterogeneous fleet; the edge's spectrum is shared by the devices it serves at
once (``equal`` shares unless the variant allocates). Every variant runs the same data,
devices and seed in one process (the Flower run gives the same metrics, see
bench_protocol.py); the figures are the cost model's simulated delay and device energy.

The last variants give every device a per-round energy budget: ``--budget-fraction`` of
the mean energy per round its class spent under the unbudgeted "+ pipelined server"
variant. ``budget`` makes a cut over any device's budget infeasible in every round;
``lyapunov`` (ASL) lets a device overspend while its energy-deficit queue allows, keeping
the budget on average. "over budget" counts the devices whose mean energy per round
exceeds their budget.

    python experiments/bench_cpsl.py --data-path ../shared/datasets/uci_har_subset.npz
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from fedsplitkd.run.experiment import run_inprocess
from fedsplitkd.fleet.profiles import BUNDLED_CLASSES

VARIANTS = {
    "fixed cut, no clustering": {"clusters": "1", "cut": "default", "bandwidth-allocation": "equal"},
    "min-max bandwidth, no clustering": {"clusters": "1", "cut": "default", "bandwidth-allocation": "minmax"},
    "adaptive cut + min-max, no clustering": {"clusters": "1", "cut": "adaptive", "bandwidth-allocation": "minmax"},
    "clustering": {"clusters": "auto", "cut": "default", "bandwidth-allocation": "equal"},
    "clustering + adaptive cut": {"clusters": "auto", "cut": "adaptive", "bandwidth-allocation": "equal"},
    "+ min-max bandwidth": {"clusters": "auto", "cut": "adaptive", "bandwidth-allocation": "minmax"},
    "+ pipelined server": {"clusters": "auto", "cut": "adaptive", "bandwidth-allocation": "minmax",
                           "server-allocation": "pipelined"},
}
BUDGETED = {
    "+ energy budget (per round)": {"energy-control": "budget"},
    "+ Lyapunov queue, V 0.1": {"energy-control": "lyapunov", "lyapunov-v": 0.1},
    "+ Lyapunov queue, V 0.01": {"energy-control": "lyapunov", "lyapunov-v": 0.01},
}


def class_energy(exp) -> dict[str, float]:
    """Mean energy per device per round, by device class."""
    spent = defaultdict(list)
    for row in exp.device_rows:
        spent[row["class"]].append(row["energy_j"])
    return {c: statistics.mean(e) for c, e in spent.items()}


def over_budget(exp) -> int:
    """Devices whose mean energy per round exceeds their budget."""
    spent = defaultdict(list)
    for row in exp.device_rows:
        spent[row["device"]].append(row["energy_j"])
    profiles = exp.server.costs.profiles
    return sum(statistics.mean(e) > profiles[int(d)].energy_budget_j for d, e in spent.items())


def budgeted_classes(energy: dict[str, float], fraction: float, directory: Path) -> Path:
    """The bundled device classes with ``energy_budget_j`` = fraction x each class's energy."""
    spec = OmegaConf.to_container(OmegaConf.load(BUNDLED_CLASSES))
    for name, values in spec["classes"].items():
        values["energy_budget_j"] = fraction * energy.get(name, math.inf)
    path = directory / "budgeted_classes.yaml"
    OmegaConf.save(OmegaConf.create(spec), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--class-mix", default="mcu:1,raspberry_pi:1,jetson_nano:1,smartphone:1")
    parser.add_argument("--teacher-input", default="cached")
    parser.add_argument("--budget-fraction", type=float, default=0.8)
    args = parser.parse_args()
    base = {"dataset": "har", "data-path": args.data_path, "num-rounds": args.rounds,
            "class-mix": args.class_mix, "teacher-input": args.teacher_input, "profile-jitter": 0.2}
    print(f"HAR, {args.devices} devices ({args.class_mix}), {args.rounds} rounds, teacher input "
          f"{args.teacher_input}; delay and energy are per-round means")
    print(f"{'variant':<38} {'delay s':>9} {'vs fixed':>9} {'energy J':>9} {'final acc':>9} {'over budget':>11} "
          f"{'cuts':>16}")
    reference, last = None, None

    def report(name: str, overrides: dict) -> None:
        nonlocal reference, last
        exp, rows = run_inprocess({**base, **overrides}, args.devices)
        delay = statistics.mean(r["round_delay_s"] for r in rows[1:])
        energy = statistics.mean(r["device_energy_j"] for r in rows[1:])
        reference = reference or delay
        cuts = sorted({cut for h in exp.scheduler.history for cut in h["cuts"].values()})
        budget = f"{over_budget(exp)}/{args.devices}" if "device-classes" in overrides else "-"
        print(f"{name:<38} {delay:>9.3f} {delay / reference - 1:>+9.1%} {energy:>9.3f} "
              f"{rows[-1]['test_accuracy']:>9.4f} {budget:>11} {','.join(cuts):>16}", flush=True)
        last = exp

    for name, variant in VARIANTS.items():
        report(name, variant)
    with tempfile.TemporaryDirectory() as tmp:
        classes = budgeted_classes(class_energy(last), args.budget_fraction, Path(tmp))
        print(f"budgets: {args.budget_fraction:g} x each class's energy per round under '+ pipelined server'")
        for name, variant in BUDGETED.items():
            report(name, {**VARIANTS["+ pipelined server"], **variant, "device-classes": str(classes)})


if __name__ == "__main__":
    main()
