"""The benchmark's table from the runs already cached, cell by cell: a sweep still running, or
stopped, reports the dataset x partition x method cells that are complete and names the others.

    python experiments/bench_table.py experiments/configs/quick.yaml --out results/quick

It replays the harness's own protocol (fedsplitkd.tools.bench.bench_cell) with a runner that only reads
the cache: the seeded tuning asks for the same trials in the same order, so a complete cell
gives exactly the row the finished sweep would. Nothing is run. summary.md, summary.csv,
tuned.yaml and the plots are written as the harness writes them, for the complete cells.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fedsplitkd.tools import bench


class NotCached(Exception):
    pass


class CacheOnly(bench.CachedRunner):
    def __call__(self, config: dict) -> list[dict]:
        if not (self.directory(config) / "summary.json").is_file():
            raise NotCached
        return super().__call__(config)


def cache_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments that name a sweep and its cached runs (for the scripts that read them)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("sweep")
    parser.add_argument("--out", required=True)
    parser.add_argument("--code", default="", help="read the runs of this code version (default: this checkout's)")
    parser.add_argument("--threads", type=int, default=0, help="read the runs made with fedsplitkd-bench --threads N")
    return parser


def cache_reader(args: argparse.Namespace, sweep: dict, kind: type[CacheOnly] = CacheOnly) -> CacheOnly:
    """A runner that reads the sweep's runs of ``args``' code version and thread count from the cache."""
    runner = kind(Path(args.out), sweep.get("devices", 20), sweep.get("backend", "inprocess"), threads=args.threads)
    runner.version = args.code or runner.version
    return runner


def main() -> None:
    parser = cache_arguments(__doc__.splitlines()[0])
    parser.add_argument("--report", default="", help="write summary.md, summary.csv, tuned.yaml and the plots "
                        "here (default: --out), e.g. for a sweep that reads another sweep's runs")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.getLogger("fedsplitkd").setLevel(logging.ERROR)
    sweep = bench.load_sweep(args.sweep, args.overrides)
    runner = cache_reader(args, sweep)
    cells, missing = [], []
    for cell in bench.settings(sweep):
        try:
            cells.append(bench.bench_cell(sweep, cell, runner))
        except NotCached:
            missing.append("/".join(cell[:3]))
    rows, chosen = bench.finish(sweep, cells)  # in the sweep's cell order, each KD row with its gain
    report = Path(args.report or args.out)
    report.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python experiments/bench_table.py", args.sweep, "--out", args.out,
                        *(["--report", args.report] if args.report else []),
                        *bench.run_flags(args.code, args.threads), *args.overrides])
    text = bench.write_report(rows, chosen, report, command) if rows else ""
    if missing:
        note = f"\nNot complete (not in this table): {', '.join(missing)}.\n"
        (report / "summary.md").write_text(text + note)
        text += note
    print(text, end="")
    print(f"code {runner.version}: {len(rows)} cells complete, {len(missing)} not")


if __name__ == "__main__":
    main()
