"""Does other code compute the same runs? Cells of the standard or CIFAR preset's tuned configs
(or, for a method they have none of, the full or CIFAR preset's untuned one; seed 0, 20 devices,
the bench's in-process Flower grid), every metrics.csv column compared. Three cells unless named:

    git worktree add /tmp/old OLD_COMMIT
    PYTHONPATH=/tmp/old FEDSPLITKD_CACHE=/tmp/c-old python experiments/same_math.py run old.json [digits/dirichlet-0.5/feddf ...]
    FEDSPLITKD_CACHE=/tmp/c-new python experiments/same_math.py run new.json [the same cells]
    python experiments/same_math.py compare old.json new.json

Each code trains its own teacher (separate caches), so the teacher is compared too.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CELLS = [("digits", "dirichlet-0.5", "splitkd"), ("har", "dirichlet-0.5", "fedavg"), ("har", "dirichlet-0.1", "split")]
TUNED = ("bench-standard", "bench-cifar")  # experiments/<name>/tuned.yaml, searched in this order
SWEEPS = ("full", "cifar")  # experiments/configs/<name>.yaml
PATH_KEYS = ("data-path", "teacher-path")  # relative to the repository root in the presets


def config(dataset: str, partition: str, method: str) -> dict:
    """The cell's tuned config, else a preset's base config for it; paths made absolute."""
    for name in TUNED:
        tuned = yaml.safe_load(open(ROOT / "experiments" / name / "tuned.yaml"))
        if method in tuned.get(dataset, {}).get(partition, {}):
            return absolute(dict(tuned[dataset][partition][method]))
    for name in SWEEPS:
        sweep = yaml.safe_load(open(ROOT / "experiments" / "configs" / f"{name}.yaml"))
        if dataset in sweep["datasets"] and method in sweep["methods"]:
            base = {**sweep["run_config"], **sweep["datasets"][dataset], **sweep["partitions"][partition],
                    "method": method, **(sweep["methods"].get(method) or {})}
            return absolute({"dataset": dataset, **base})
    raise SystemExit(f"same_math: no preset has the cell {dataset}/{partition}/{method}")


def absolute(cfg: dict) -> dict:
    return {k: str((ROOT / v).resolve()) if k in PATH_KEYS and v else v for k, v in cfg.items()}


def run(out: str, cells: list[tuple[str, str, str]]) -> None:
    import fedsplitkd
    from fedsplitkd.strategies.inprocess import run_app

    runs = {}
    for dataset, partition, method in cells:
        cfg = config(dataset, partition, method)
        directory = Path(tempfile.mkdtemp())
        run_app({**cfg, "seed": 0, "output-dir": str(directory), "run-name": "run"}, 20)
        runs["/".join((dataset, partition, method))] = list(csv.DictReader(open(directory / "run" / "metrics.csv")))
    json.dump({"code": fedsplitkd.__file__, "runs": runs}, open(out, "w"))


def compare(first: str, second: str) -> bool:
    a, b = json.load(open(first)), json.load(open(second))
    print(f"{a['code']} against {b['code']}")
    same = True
    for cell, rows in a["runs"].items():
        other = b["runs"][cell]
        diffs = [(r["round"], c) for r, s in zip(rows, other) for c in r if r[c] != s.get(c)]
        ok = not diffs and len(rows) == len(other)
        same &= ok
        print(f"{cell}: {len(rows)} rows, {'identical' if ok else f'differ at {diffs[:3]}'}, "
              f"final test accuracy {rows[-1]['test_accuracy']} / {other[-1]['test_accuracy']}")
    return same


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run(sys.argv[2], [tuple(cell.split("/")) for cell in sys.argv[3:]] or CELLS)
    else:
        sys.exit(0 if compare(sys.argv[2], sys.argv[3]) else 1)
