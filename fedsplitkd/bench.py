"""The benchmark harness: methods x datasets x partitions x seeds through Flower's simulation.

    fedsplitkd-bench experiments/configs/quick.yaml --out results/quick [key=value ...]

The YAML (omegaconf; command-line ``key=value`` overrides, e.g. ``seeds=[0,1]``):

    devices: 20                 # simulated SuperNodes
    target_accuracy: 0.8        # for "rounds to target"
    run_config: {num-rounds: 15}          # every run
    datasets:   {digits: {}, har: {dataset: har, data-path: ...}}
    partitions: {dirichlet-0.5: {partition: dirichlet, dirichlet-alpha: 0.5}}
    methods:    {splitkd: {}, fedavg: {learning-rate: 0.05}}
    seeds: [0]

Each run's results go to ``<out>/runs/<hash of its run config>``; a run whose
summary.json exists is not run again, so an interrupted sweep resumes where it stopped.
``<out>/summary.csv`` and ``summary.md`` hold final accuracy (mean ± std over seeds),
rounds to the target, total bytes, device energy and simulated time; ``<out>/plots``
holds accuracy against round, simulated time and device energy, one line per method.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import statistics
import sys
from pathlib import Path

from omegaconf import OmegaConf

from fedsplitkd.config import ConfigError, resolve
from fedsplitkd.localsim import LocalSimulation

SECTIONS = ("datasets", "partitions", "methods")


def load_sweep(path: str, overrides: list[str]) -> dict:
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"fedsplitkd-bench: no sweep file at '{file}'")
    sweep = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(file), OmegaConf.from_dotlist(overrides)))
    missing = [k for k in (*SECTIONS, "seeds") if not sweep.get(k)]
    if missing:
        raise SystemExit(f"fedsplitkd-bench: '{file}' needs non-empty {missing}")
    return sweep


def plan(sweep: dict) -> list[dict]:
    """One entry per run: its labels and its full run config (validated now, not mid-sweep)."""
    runs = []
    for dataset, d_cfg in sweep["datasets"].items():
        for partition, p_cfg in sweep["partitions"].items():
            for method, m_cfg in sweep["methods"].items():
                for seed in sweep["seeds"]:
                    config = {**sweep.get("run_config", {}), **(d_cfg or {}), **(p_cfg or {}),
                              "method": method, **(m_cfg or {}), "seed": seed}
                    config.setdefault("dataset", dataset)
                    try:
                        resolve(config)
                    except ConfigError as err:
                        raise SystemExit(f"fedsplitkd-bench: {dataset}/{partition}/{method}: {err}") from None
                    digest = hashlib.sha256(json.dumps([config, sweep.get("devices", 20)],
                                                       sort_keys=True).encode()).hexdigest()[:12]
                    runs.append({"dataset": dataset, "partition": partition, "method": method, "seed": seed,
                                 "config": config, "hash": digest})
    return runs


def read_rows(directory: Path) -> list[dict]:
    with open(directory / "metrics.csv") as f:
        return [{k: (v if k == "method" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def execute(runs: list[dict], out: Path, devices: int, cpus: int, app: str) -> list[str]:
    """Run what is not cached; returns the failures (a run is judged by its metrics)."""
    from tqdm import tqdm

    todo = [r for r in runs if not (out / "runs" / r["hash"] / "summary.json").is_file()]
    failures = []
    if not todo:
        return failures
    with LocalSimulation() as sim:
        for run in tqdm(todo, desc="runs", unit="run", file=sys.stdout):
            label = f"{run['dataset']}/{run['partition']}/{run['method']}/seed {run['seed']}"
            directory = out / "runs" / run["hash"]
            result = sim.run(app, {**run["config"], "output-dir": str(out / "runs"), "run-name": run["hash"]},
                             num_supernodes=devices, cpus_per_client=cpus)
            if not (directory / "summary.json").is_file():
                failures.append(label)
                (out / "failed").mkdir(parents=True, exist_ok=True)
                (out / "failed" / f"{run['hash']}.log").write_text(result.stdout + result.stderr)
    return failures


def summarise(runs: list[dict], out: Path, target: float) -> list[dict]:
    groups: dict[tuple, list[list[dict]]] = {}
    for run in runs:
        directory = out / "runs" / run["hash"]
        if (directory / "summary.json").is_file():
            groups.setdefault((run["dataset"], run["partition"], run["method"]), []).append(read_rows(directory))
    table = []
    for (dataset, partition, method), seeds in groups.items():
        finals = [rows[-1]["test_accuracy"] for rows in seeds]
        to_target = [next((r["round"] for r in rows if r["test_accuracy"] >= target), math.nan) for rows in seeds]
        mean = lambda values: statistics.fmean(values)  # noqa: E731
        table.append({
            "dataset": dataset, "partition": partition, "method": method, "seeds": len(seeds),
            "final_accuracy": mean(finals), "final_accuracy_std": statistics.pstdev(finals),
            "rounds_to_target": mean(to_target),
            "bytes_up": mean([sum(r["bytes_up"] for r in rows) for rows in seeds]),
            "bytes_down": mean([sum(r["bytes_down"] for r in rows) for rows in seeds]),
            "device_energy_j": mean([rows[-1]["cum_device_energy_j"] for rows in seeds]),
            "sim_time_s": mean([rows[-1]["sim_time_s"] for rows in seeds]),
        })
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["dataset"])
        writer.writeheader()
        writer.writerows(table)
    lines = [f"| dataset | partition | method | final accuracy | rounds to {target:g} | MB up | MB down | "
             "device energy J | simulated time s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['dataset']} | {row['partition']} | {row['method']} | {row['final_accuracy']:.4f} ± "
                     f"{row['final_accuracy_std']:.4f} | {row['rounds_to_target']:.1f} | "
                     f"{row['bytes_up'] / 1e6:.1f} | {row['bytes_down'] / 1e6:.1f} | {row['device_energy_j']:.2f} | "
                     f"{row['sim_time_s']:.1f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(groups, out / "plots")
    return table


def plot(groups: dict, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    settings = sorted({(d, p) for d, p, _ in groups})
    for dataset, partition in settings:
        for column, label in (("round", "round"), ("sim_time_s", "simulated time (s)"),
                              ("cum_device_energy_j", "cumulative device energy (J)")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for (d, p, method), seeds in sorted(groups.items()):
                if (d, p) == (dataset, partition):
                    rows = seeds[0]  # the first seed's curve
                    ax.plot([r[column] for r in rows], [r["test_accuracy"] for r in rows], marker=".", label=method)
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{dataset}, {partition}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(directory / f"{dataset}_{partition}_accuracy_vs_{column}.png", dpi=110)
            plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedsplitkd-bench", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="the sweep YAML (e.g. experiments/configs/quick.yaml)")
    parser.add_argument("--out", required=True, help="directory for runs, summary and plots")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--app", default=".", help="the Flower app directory (this checkout)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the sweep YAML")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(sweep)
    cached = sum((out / "runs" / r["hash"] / "summary.json").is_file() for r in runs)
    print(f"{len(runs)} runs ({cached} cached) on {sweep.get('devices', 20)} simulated devices")
    failures = execute(runs, out, sweep.get("devices", 20), args.cpus_per_client, args.app)
    summarise(runs, out, sweep.get("target_accuracy", 0.8))
    print((out / "summary.md").read_text())
    if failures:
        raise SystemExit(f"fedsplitkd-bench: {len(failures)} runs failed (logs in {out / 'failed'}): "
                         + ", ".join(failures))


if __name__ == "__main__":
    main()
