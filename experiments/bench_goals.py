"""The comparison's goals, checked on a benchmark's summary.csv: per dataset and partition,
split-KD against the best federated baseline (accuracy within 0.5 pt at <= 1/10 of its device
energy) and against every federated-distillation baseline (above each); with ``--pretrained``,
the pre-trained-teacher goals (split-KD >= FedAvg + 5 pt at <= 1/10 of its energy, KD gain
>= +3 pt, split-KD >= public-kd + 2 pt, the gap to central-kd, no collapsed seed).

    python experiments/bench_goals.py results/full/summary.csv      # a markdown table
    python experiments/bench_goals.py results/cifar/summary.csv --pretrained

Nothing is typed by hand: every figure is read from the table the harness generated.
"""

from __future__ import annotations

import argparse
import ast
import csv
from pathlib import Path

OURS = "splitkd"
# Federated learning and federated distillation: each device trains a whole model (FedGKT: a
# small one) on its own data. Split learning (split, splitfed) is split-KD's own family: its
# rows are the KD gain, and it spends less device energy than split-KD by construction.
FEDERATED = ("fedavg", "fedprox", "fd", "feddf", "fedgkt")
DISTILLATION = ("fd", "feddf", "fedgkt")  # federated distillation: split-KD must beat each


def cells_with_ours(rows: list[dict]):
    """(dataset, partition, {method: row}) for every dataset x partition with a split-KD row, in table order."""
    for dataset, partition in dict.fromkeys((r["dataset"], r["partition"]) for r in rows):
        cell = {r["method"]: r for r in rows if (r["dataset"], r["partition"]) == (dataset, partition)}
        if OURS in cell:
            yield dataset, partition, cell


def goals(rows: list[dict]) -> list[str]:
    """Markdown lines, one per dataset x partition that has a split-KD row."""
    lines = ["| dataset | partition | split-KD | best federated baseline | gap (pt) | energy ratio | "
             "within 0.5 pt at ≤ 1/10 energy | above FD, FedDF, FedGKT |",
             "|---|---|---|---|---|---|---|---|"]
    for dataset, partition, cell in cells_with_ours(rows):
        ours = cell[OURS]
        acc = float(ours["test_accuracy"])
        rivals = [cell[m] for m in FEDERATED if m in cell]
        if not rivals:
            continue
        best = max(rivals, key=lambda r: float(r["test_accuracy"]))
        missing = [m for m in FEDERATED if m not in cell]  # a sweep still running: say what is not compared
        gap = 100 * (acc - float(best["test_accuracy"]))
        ratio = float(ours["device_energy_j"]) / float(best["device_energy_j"])
        energy_met = ratio <= 0.1
        near = gap >= -0.5 and energy_met
        distillers = [cell[m] for m in DISTILLATION if m in cell]
        beaten = [r["method"] for r in distillers if acc > float(r["test_accuracy"])]
        above = ("yes" if len(beaten) == len(distillers) else
                 "no: " + ", ".join(f"{r['method']} {float(r['test_accuracy']):.4f}" for r in distillers
                                    if r["method"] not in beaten)) if distillers else "—"
        lines.append(f"| {dataset} | {partition} | {acc:.4f} ± {float(ours['test_ci95']):.4f} | "
                     f"{best['method']} {float(best['test_accuracy']):.4f} ± {float(best['test_ci95']):.4f}"
                     f"{' (not yet run: ' + ', '.join(missing) + ')' if missing else ''} | "
                     f"{gap:+.2f} | {ratio:.3f} ({float(ours['device_energy_j']):.1f} J / "
                     f"{float(best['device_energy_j']):.1f} J) | {'**met**' if near else 'not met'} | {above} |")
    return lines


def verdict(met: bool) -> str:
    return "**met**" if met else "not met"


def pretrained_goals(rows: list[dict]) -> list[str]:
    """Markdown lines: the pre-trained-teacher goals, one row per dataset x partition with split-KD."""
    lines = ["| dataset | partition | split-KD | vs FedAvg (≥ +5 pt) | energy vs FedAvg (≤ 1/10) | "
             "KD gain (≥ +3 pt) | vs public-kd (≥ +2 pt) | vs central-kd | seeds not ok (any method) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dataset, partition, cell in cells_with_ours(rows):
        acc = float(cell[OURS]["test_accuracy"])

        def against(method: str, needed: float | None = None) -> str:
            """split-KD minus ``method`` in points, beside its accuracy, and whether it reaches ``needed``."""
            if method not in cell:
                return "not run"
            other = float(cell[method]["test_accuracy"])
            text = f"{100 * (acc - other):+.1f} pt ({other:.4f})"
            return text if needed is None else f"{text}: {verdict(100 * (acc - other) >= needed)}"

        if "fedavg" in cell:
            ours, theirs = float(cell[OURS]["device_energy_j"]), float(cell["fedavg"]["device_energy_j"])
            energy = f"1/{theirs / ours:.1f} ({ours:.1f} J / {theirs:.1f} J): {verdict(ours <= 0.1 * theirs)}"
        else:
            energy = "not run"
        bad = [f"{m} ({', '.join(ast.literal_eval(r['unhealthy']))})" for m, r in cell.items()
               if ast.literal_eval(r.get("unhealthy") or "[]")]  # the csv holds the harness's list as text
        lines.append(f"| {dataset} | {partition} | {acc:.4f} ± {float(cell[OURS]['test_ci95']):.4f} | "
                     f"{against('fedavg', 5)} | {energy} | {against('split', 3)} | {against('public-kd', 2)} | "
                     f"{against('central-kd')} | {'; '.join(bad) or 'none: **met**'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", help="a fedsplitkd-bench summary.csv")
    parser.add_argument("--pretrained", action="store_true", help="the pre-trained-teacher goals instead")
    parser.add_argument("--variant", default="", help="read only the rows of methods named METHOD<VARIANT> "
                        "(e.g. -wide: splitkd-wide, fedavg-wide, ...), as their methods")
    args = parser.parse_args()
    rows = [{**r, "method": r["method"].removesuffix(args.variant)} for r in csv.DictReader(open(Path(args.summary)))
            if r["method"].endswith(args.variant)]
    flags = (" --pretrained" if args.pretrained else "") + (f" --variant={args.variant}" if args.variant else "")
    print(f"Generated by `python experiments/bench_goals.py {args.summary}{flags}`.\n")
    print("\n".join(pretrained_goals(rows) if args.pretrained else goals(rows)))


if __name__ == "__main__":
    main()
