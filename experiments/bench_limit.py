"""The same split-KD work three ways, in one run: a plain PyTorch KD loop (the limit), the
in-process protocol, and Flower's simulation with virtual devices.

The plain loop trains the whole student in one process on exactly the samples the protocol's
devices put through in a round (each device's seeded minibatches, in device order), with the
same batch size, student, teacher, KD loss and SGD, and evaluates on the test split once per
round as the other two do. The in-process protocol is ``run_inprocess`` (device parts, edge
server, numpy payloads, per-device server steps, averaging); the Flower run is the real
ServerApp/ClientApp through ``flwr run`` with 20 virtual devices on 2 SuperNodes (one CPU
each). Per-round time is the median of rounds 2..R; torch runs one thread in this process,
as each ClientApp does. Flower's two SuperNodes compute on both cores, so the plain loop is also
timed with two torch threads (the column ``plain 2t``), the limit with the machine's whole compute.

    python experiments/bench_limit.py --data-path ../shared/datasets/uci_har_subset.npz [--quick]

The last line reads ``limit ratio (flower/plain) X.XX`` for the HAR subset.
"""

from __future__ import annotations

import argparse
import copy
import csv
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedsplitkd.config import RunConfig, resolve
from fedsplitkd.data.datasets import device_data
from fedsplitkd.protocol.device import batch_plan
from fedsplitkd.run.experiment import build, run_inprocess
from fedsplitkd.protocol.kd import kd_loss
from fedsplitkd.tools.localsim import LocalSimulation
from fedsplitkd.protocol.runtime import evaluate

ROOT = Path(__file__).resolve().parents[1]


def median_round(seconds: list[float]) -> float:
    return statistics.median(seconds[1:])  # round 1 holds the warm-up


def plain_loop(cfg: RunConfig, devices: int, threads: int = 1) -> list[float]:
    """Seconds per round of centralised KD over the protocol's samples (no split, no messages)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _plain_rounds(cfg, devices)
    finally:
        torch.set_num_threads(before)


def _plain_rounds(cfg: RunConfig, devices: int) -> list[float]:
    exp = build(cfg)
    student, teacher = copy.deepcopy(exp.student), exp.teacher
    teacher.eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.train.learning_rate, momentum=cfg.train.momentum)
    data = [device_data(cfg, d, devices) for d in range(devices)]
    seconds = []
    for server_round in range(1, cfg.train.num_rounds + 1):
        start = time.perf_counter()
        for d, local in enumerate(data):
            for batch in batch_plan(len(local.y_train), cfg.train.batch_size, cfg.train.local_epochs, cfg.train.seed,
                                    server_round, d):
                x, y = torch.from_numpy(local.x_train[batch]), torch.from_numpy(local.y_train[batch])
                with torch.no_grad():
                    t = teacher(x)
                loss = kd_loss(student(x), t, y, cfg.split.kd_alpha, cfg.split.kd_temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        evaluate(student, exp.dataset.x_test, exp.dataset.y_test)
        seconds.append(time.perf_counter() - start)
    return seconds


def flower(cfg: RunConfig, devices: int, out: Path, name: str) -> tuple[list[float], float]:
    """Seconds per round of the Flower simulation (virtual devices on 2 nodes), and its total."""
    started = time.perf_counter()
    with LocalSimulation() as sim:
        sim.run(ROOT, {**cfg, "virtual-devices": devices, "min-nodes": 2, "output-dir": str(out), "run-name": name},
                num_supernodes=2, cpus_per_client=1)
    total = time.perf_counter() - started
    timings = out / name / "timings.csv"
    if not timings.is_file():
        raise SystemExit(f"the Flower run {name} wrote no {timings}")
    rows = [r for r in csv.DictReader(open(timings)) if int(r["round"]) >= 1]
    if len(rows) != cfg.train.num_rounds:
        raise SystemExit(f"the Flower run {name} finished {len(rows)} of {cfg.train.num_rounds} rounds")
    return [float(r["wall_s"]) for r in rows], total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="the UCI HAR subset .npz")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="4 rounds (about 3 minutes)")
    parser.add_argument("--profile", action="store_true", help="also print where an in-process round spends its time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = 4 if args.quick else args.rounds
    out = Path(tempfile.mkdtemp(prefix="fedsplitkd-limit-"))
    datasets = {"digits": {"dataset": "digits"},
                "har": {"dataset": "har", "data-path": str(Path(args.data_path).resolve())}}
    print(f"{args.devices} devices, {rounds} rounds, exchange-batches 8; seconds per round (median of rounds 2..{rounds})")
    print(f"{'dataset':>8} {'plain':>8} {'plain 2t':>8} {'in-process':>10} {'flower':>8} {'in-proc/plain':>13} "
          f"{'flower/in-proc':>14} {'flower/plain':>12} {'flower/plain 2t':>15} {'flower start-up s':>17}")
    ratio = float("nan")
    for name, keys in datasets.items():
        cfg = resolve({**keys, "num-rounds": rounds, "output-dir": str(out)})
        run_inprocess(cfg, args.devices)  # warm the caches (teacher, data) for every side alike
        plain = median_round(plain_loop(cfg, args.devices))
        plain2 = median_round(plain_loop(cfg, args.devices, threads=2))
        _, rows = run_inprocess(cfg, args.devices)
        inproc = median_round([r["wall_s"] for r in rows[1:]])
        seconds, total = flower(cfg, args.devices, out, name)
        fl = median_round(seconds)
        print(f"{name:>8} {plain:>8.3f} {plain2:>8.3f} {inproc:>10.3f} {fl:>8.3f} {inproc / plain:>13.2f} "
              f"{fl / inproc:>14.2f} {fl / plain:>12.2f} {fl / plain2:>15.2f} {total - sum(seconds[1:]):>17.1f}",
              flush=True)
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(run_inprocess, {**cfg, "num-rounds": 2}, args.devices)
            pstats.Stats(profile).sort_stats("tottime").print_stats(12)
        if name == "har":
            ratio = fl / plain
    print(f"limit ratio (flower/plain) {ratio:.2f}")


if __name__ == "__main__":
    main()
