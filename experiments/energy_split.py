"""Where the devices' energy goes, per benchmark cell: their own compute against their radios.

    python experiments/energy_split.py experiments/configs/cifar.yaml --out results/cifar [--code C --threads N]

It replays the harness's protocol from the cache, as bench_table.py does (nothing is run), and
reads the seed runs of each cell's chosen config: every device's FLOPs in devices.csv priced by
its own profile (the run's fleet, rebuilt from its config.yaml) with the cost model's
``compute_energy``; the radio's share is the rest of the device's energy (transmit and receive).
Figures are means over the cell's seeds, in joules over the whole run.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import pandas as pd
import yaml

from fedsplitkd.config import resolve
from fedsplitkd.fleet.costs import compute_energy
from fedsplitkd.fleet.profiles import Fleet
from fedsplitkd.tools import bench

from bench_table import CacheOnly, NotCached, cache_arguments, cache_reader  # experiments/, beside this script


class Recording(CacheOnly):
    """Reads the cache only, and keeps the directory of every run the protocol asks for."""

    asked: list[tuple[dict, Path]]  # (config, run directory), set empty per cell

    def __call__(self, config: dict) -> list[dict]:
        rows = super().__call__(config)
        self.asked.append((config, self.directory(config)))
        return rows


def split_of(run: Path) -> tuple[float, float, float]:
    """(device energy, of it the devices' compute, device FLOPs) of one run, summed over its rounds."""
    fleet = Fleet(resolve(yaml.safe_load((run / "config.yaml").read_text())))
    rows = pd.read_csv(run / "devices.csv")
    compute = sum(compute_energy(fleet[int(r.device)], float(r.device_flops)) for r in rows.itertuples())
    return float(rows["energy_j"].sum()), compute, float(rows["device_flops"].sum())


def joules(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.4g}"


def main() -> None:
    parser = cache_arguments(__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.getLogger("fedsplitkd").setLevel(logging.ERROR)
    sweep = bench.load_sweep(args.sweep, args.overrides)
    runner = cache_reader(args, sweep, Recording)
    print("| partition | method | device energy J | devices' compute J | radio J | compute share | device TFLOPs |")
    print("|---|---|---|---|---|---|---|")
    for cell in bench.settings(sweep):
        runner.asked = []
        try:
            _, chosen = bench.bench_cell(sweep, cell, runner)
        except NotCached:
            continue
        seeds = [d for config, d in runner.asked if config.get("seed") in sweep["seeds"]
                 and all(config.get(k) == v for k, v in chosen.items())]
        splits = [split_of(d) for d in dict.fromkeys(seeds)]
        energy, compute, flops = (statistics.fmean(s[i] for s in splits) for i in range(3))
        print(f"| {cell[1]} | {cell[2]} | {joules(energy)} | {joules(compute)} | {joules(energy - compute)} | "
              f"{compute / energy:.0%} | {flops / 1e12:.3g} |")
    print(f"code {runner.version}; `python experiments/energy_split.py {args.sweep} --out {args.out}"
          + "".join(f" {f}" for f in bench.run_flags(args.code, args.threads))
          + "".join(f" {o}" for o in args.overrides) + "`")


if __name__ == "__main__":
    main()
