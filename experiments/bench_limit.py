"""The same split-KD work three ways, in one run: a plain PyTorch KD loop (the limit), the
in-process protocol, and Flower's simulation with virtual devices.

The plain loop trains the whole student in one process on exactly the samples the protocol's
devices put through in a round (each device's seeded minibatches, in device order), with the
same batch size, student, teacher, KD loss and SGD, and evaluates on the test split once per
round as the other two do. The in-process protocol is ``run_inprocess`` (device parts, edge
server, numpy payloads, per-device server steps, averaging); the Flower run is the real
ServerApp/ClientApp through ``flwr run`` with 20 virtual devices on 2 SuperNodes (one CPU
each). Per-round time is the median of rounds 2..R (the mean is printed too, and the Flower
rounds' quartiles); torch runs one thread in this process, as each ClientApp does. Flower's
rounds are uneven: its simulation engine hands each node a message at 0.1-s polls, so a
round takes a whole number of polls give or take, and its first rounds after start-up are
slower still (the ClientApps' actors warm up). A few rounds sample that noise, not the round
a run settles into: the default is 60 rounds, ``--quick`` 30. Flower's two SuperNodes compute
on both cores, so the plain loop is also timed with two torch threads (the column
``plain 2t``), the limit with the machine's whole compute.

    python experiments/bench_limit.py --data-path ../shared/datasets/uci_har_subset.npz [--quick] [--trace]

``--trace`` records every message of the Flower runs (``FEDSPLITKD_TIMING``: the transport's
pushes and replies, the ClientApp handlers' start and end) and prints where a Flower round's
time goes, per exchange: waiting for the simulation engine to hand the node its message,
the node's handler, the reply's way back, and the server's work until its next push.

The last line reads ``limit ratio (flower/plain) X.XX`` for the HAR subset.
"""

from __future__ import annotations

import argparse
import copy
import csv
import cProfile
import json
import os
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


def mean_round(seconds: list[float]) -> float:
    return statistics.fmean(seconds[1:])


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


def flower(cfg: RunConfig, devices: int, out: Path, name: str, trace: Path | None = None) -> tuple[list[float], float]:
    """Seconds per round of the Flower simulation (virtual devices on 2 nodes), and its total;
    ``trace``: the directory its messages' timing lines go to (clients/timing.py)."""
    started = time.perf_counter()
    if trace:
        os.environ["FEDSPLITKD_TIMING"] = str(trace)  # the simulation's processes inherit it
    else:
        os.environ.pop("FEDSPLITKD_TIMING", None)
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


PHASES = ["engine hand-out", "node handler", "reply back", "server until next push"]


def exchanges(trace: Path) -> dict[str, list[list[float]]]:
    """Per message type, each exchange's seconds in each of ``PHASES``: for every pushed
    message, the hand-out (push to handler start), the handler and the reply (handler end to
    the server's pull), of the node that answered last; then the server's time from that
    reply to its next push. The first exchange of each type (the warm-up round) is left out."""
    handlers = sorted((json.loads(line) for f in trace.glob("*.jsonl") for line in f.read_text().splitlines()),
                      key=lambda h: h["handler"])
    events = sorted((json.loads(line) for f in (trace / "server").glob("*.jsonl") for line in f.read_text().splitlines()),
                    key=lambda e: e["time"])
    pushes = [e for e in events if e["event"] == "push"]
    replies = [e for e in events if e["event"] == "reply"]
    table: dict[str, list[list[float]]] = {}
    for i, push in enumerate(pushes[:-1]):
        last = None  # (reply time, hand-out, handler, reply) of the node that answered last
        for node, kind in push["messages"]:
            handler = next((h for h in handlers if h["node"] == node and h["type"] == kind
                            and h["handler"] >= push["time"]), None)
            reply = next((r["time"] for r in replies if r["node"] == node and handler and r["time"] >= handler["end"]),
                         None)
            if handler is None or reply is None:
                break
            if last is None or reply > last[0]:
                last = (reply, handler["handler"] - push["time"], handler["end"] - handler["handler"],
                        reply - handler["end"])
        else:
            if last is not None:
                table.setdefault(push["messages"][0][1], []).append([*last[1:], pushes[i + 1]["time"] - last[0]])
    return {kind: rows[1:] for kind, rows in table.items() if len(rows) > 1}


def print_exchanges(trace: Path) -> None:
    print(f"{'exchange':>22} " + " ".join(f"{p:>22}" for p in PHASES) + f" {'exchanges':>9}  (median seconds)")
    for kind, rows in exchanges(trace).items():
        medians = [statistics.median(r[k] for r in rows) for k in range(len(PHASES))]
        print(f"{kind:>22} " + " ".join(f"{m:>22.3f}" for m in medians) + f" {len(rows):>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="the UCI HAR subset .npz")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="30 rounds (about 3 minutes)")
    parser.add_argument("--profile", action="store_true", help="also print where an in-process round spends its time")
    parser.add_argument("--trace", action="store_true", help="also print where a Flower round's time goes, per exchange")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = 30 if args.quick else args.rounds
    out = Path(tempfile.mkdtemp(prefix="fedsplitkd-limit-"))
    datasets = {"digits": {"dataset": "digits"},
                "har": {"dataset": "har", "data-path": str(Path(args.data_path).resolve())}}
    print(f"{args.devices} devices, {rounds} rounds, exchange-batches 8; seconds per round (median of rounds 2..{rounds})")
    print(f"{'dataset':>8} {'plain':>8} {'plain 2t':>8} {'in-process':>10} {'flower':>8} {'in-proc/plain':>13} "
          f"{'flower/in-proc':>14} {'flower/plain':>12} {'flower/plain 2t':>15} {'means: flower/plain':>19} "
          f"{'flower start-up s':>17}")
    ratio = float("nan")
    for name, keys in datasets.items():
        cfg = resolve({**keys, "num-rounds": rounds, "output-dir": str(out)})
        run_inprocess({**cfg, "num-rounds": 2}, args.devices)  # warm the caches (teacher, data) for every side
        plain_seconds = plain_loop(cfg, args.devices)
        plain = median_round(plain_seconds)
        plain2 = median_round(plain_loop(cfg, args.devices, threads=2))
        _, rows = run_inprocess(cfg, args.devices)
        inproc = median_round([r["wall_s"] for r in rows[1:]])
        seconds, total = flower(cfg, args.devices, out, name, out / "trace" / name if args.trace else None)
        fl = median_round(seconds)
        means = mean_round(seconds) / mean_round(plain_seconds)
        print(f"{name:>8} {plain:>8.3f} {plain2:>8.3f} {inproc:>10.3f} {fl:>8.3f} {inproc / plain:>13.2f} "
              f"{fl / inproc:>14.2f} {fl / plain:>12.2f} {fl / plain2:>15.2f} {means:>19.2f} "
              f"{total - sum(seconds[1:]):>17.1f}", flush=True)
        quartiles = statistics.quantiles(seconds[1:], n=4)
        print(f"{'':>8} flower rounds 2..{rounds} (s): min {min(seconds[1:]):.3f}, quartiles "
              + ", ".join(f"{q:.3f}" for q in quartiles) + f", max {max(seconds[1:]):.3f}")
        if args.trace:
            print_exchanges(out / "trace" / name)
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(run_inprocess, {**cfg, "num-rounds": 2}, args.devices)
            pstats.Stats(profile).sort_stats("tottime").print_stats(12)
        if name == "har":
            ratio = fl / plain
    print(f"limit ratio (flower/plain) {ratio:.2f}")


if __name__ == "__main__":
    main()
