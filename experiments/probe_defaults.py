"""Do the protocol's defaults learn? One in-process run (``run_inprocess``: the Flower run's loop
and math, no messages) per case, at the defaults plus any ``--set key=value``, each round's test
accuracy and train loss printed, and the run's health at the end.

    python experiments/probe_defaults.py --case cifar10 --set server-batching=joint
    python experiments/probe_defaults.py --case all
    python experiments/probe_defaults.py --case digits,har --vary momentum=0 --vary learning-rate=0.01

Cases: digits, har (the shared subset), cifar10 (the shared JPEG zip, a 10,000-image training
subset, the shared ResNet-56 as teacher), cifar10-0.1 (Dirichlet 0.1), gray28 (an npz of 10,000
real 28x28 grayscale images made here from CIFAR-10's JPEGs: 8,000 train, 2,000 test; a set the
defaults were never tuned on), shakespeare and shakespeare-lm (the shared Tiny Shakespeare: the next
character, and a character language model). 20 devices, 25 rounds unless ``--set num-rounds=N``.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR_ZIP = SHARED / "datasets" / "cifar10-jpeg.zip"
RESNET56 = SHARED / "models" / "cifar-resnet" / "resnet56-4bfd9763.th"
CIFAR = {"dataset": "cifar10", "data-path": str(CIFAR_ZIP), "teacher-path": str(RESNET56), "train-samples": 10000,
         "public-fraction": 0.1}
CASES = {
    "digits": {"dataset": "digits"},
    "har": {"dataset": "har", "data-path": str(SHARED / "datasets" / "uci_har_subset.npz")},
    "cifar10": CIFAR,
    "cifar10-0.1": {**CIFAR, "dirichlet-alpha": 0.1},
    "gray28": {"dataset": "npz"},  # data-path: made on first use
    "shakespeare": {"dataset": "shakespeare", "data-path": str(SHARED / "datasets" / "tiny_shakespeare.txt")},
    "shakespeare-lm": {"dataset": "shakespeare-lm", "data-path": str(SHARED / "datasets" / "tiny_shakespeare.txt")},
}


def gray28(path: Path) -> Path:
    """10,000 CIFAR-10 JPEGs (a fixed random draw) as 28x28 grayscale: 8,000 train, 2,000 test."""
    if path.is_file():
        return path
    from PIL import Image

    with zipfile.ZipFile(CIFAR_ZIP) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        classes = sorted({n.split("/")[2] for n in names})
        picked = [names[i] for i in np.random.default_rng(28).choice(len(names), 10000, replace=False)]
        x = np.stack([np.asarray(Image.open(io.BytesIO(z.read(n))).convert("L").resize((28, 28)), np.float32) / 255
                      for n in picked])[:, None]
        y = np.array([classes.index(n.split("/")[2]) for n in picked], np.int64)
    np.savez(path, x_train=x[:8000], y_train=y[:8000], x_test=x[8000:], y_test=y[8000:])
    return path


def parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value, value)


def probe(case: str, overrides: dict, devices: int) -> dict:
    from fedsplitkd.run.experiment import run_inprocess

    cfg = dict(CASES[case])
    if case == "gray28":
        cfg["data-path"] = str(gray28(Path("/tmp/fedsplitkd-gray28.npz")))
    cfg.update(overrides)
    started = time.perf_counter()
    exp, rows = run_inprocess(cfg, devices)
    accuracies = [round(r["test_accuracy"], 4) for r in rows]
    result = {"case": case, "overrides": overrides, "teacher": round(exp.teacher_accuracy, 4),
              "final": accuracies[-1], "best": max(accuracies), "accuracy": accuracies,
              "train_loss": [round(r["train_loss"], 3) for r in rows[1:]],
              "mb_up_per_round": round(rows[-1]["bytes_up"] / 1e6, 2),
              "mb_up_teacher_round1": round(rows[1]["bytes_up_teacher"] / 1e6, 2),
              "device_energy_j": round(rows[-1]["cum_device_energy_j"], 1),
              **exp.health.summary(), "wall_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="all", help=f"one of {', '.join(CASES)}, or all")
    parser.add_argument("--set", action="append", default=[], help="run-config key=value (repeatable)")
    parser.add_argument("--vary", action="append", default=[],
                        help="one more run per case with these key=value,key=value on top of --set "
                             "(repeatable; the runs share one process and the frozen teacher's outputs)")
    parser.add_argument("--devices", type=int, default=20)
    args = parser.parse_args()
    overrides = {k: parse(v) for k, v in (item.split("=", 1) for item in args.set)}
    variants = [{}] if not args.vary else [
        {k: parse(v) for k, v in (item.split("=", 1) for item in group.split(",") if item)} for group in args.vary]
    from fedsplitkd.protocol import teacher_memo

    with teacher_memo.kept():
        for case in CASES if args.case == "all" else args.case.split(","):
            for variant in variants:
                probe(case, {**overrides, **variant}, args.devices)


if __name__ == "__main__":
    main()
