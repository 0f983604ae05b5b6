"""Time split-KD rounds through Flower's simulation against the same math in one process.

Same config, devices, batches, models and seed on both sides; the Flower side runs the
real ServerApp/ClientApp through ``flwr run`` on a private SuperLink. Round 1 holds the
start-up (Ray actors, imports) and is reported apart; per-round times are the median of
rounds 2..R. The Flower side runs with one SuperNode per device, and with the devices
virtual (``virtual-devices``) on two nodes that serve their share in one message per
exchange: the same math with a tenth of the messages.

    python experiments/bench_protocol.py --data-path ../shared/datasets/uci_har_subset.npz
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

from fedsplitkd.run.experiment import run_inprocess
from fedsplitkd.tools.localsim import LocalSimulation


def median_round(rows: list[dict]) -> float:
    return statistics.median(float(r["wall_s"]) for r in rows if int(r["round"]) >= 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="UCI HAR .npz (x_train, y_train, x_test, y_test)")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--exchange-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cpus-per-client", type=int, nargs="+", default=[2, 1],
                        help="Ray CPUs per ClientApp (2 = one actor on 2 cores, 1 = two actors)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[0, 2],
                        help="SuperNodes: 0 = one per device (its partition); n > 0 = the devices "
                             "virtual, dealt to n nodes that serve their share in one message")
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="fedsplitkd-bench-"))
    base = {"dataset": "har", "data-path": str(Path(args.data_path).resolve()),
            "num-rounds": args.rounds, "output-dir": str(out)}
    print(f"HAR 1-D CNN student + teacher, {args.devices} devices, {args.rounds} rounds "
          f"(per-round = median of rounds 2..{args.rounds})")
    print(f"{'K':>3} {'cpus':>4} {'nodes':>5} {'exch/round':>10} {'in-process s':>12} {'flower s':>9} "
          f"{'ratio':>6} {'startup s':>9} {'acc in-proc':>11} {'acc flower':>10} {'same metrics':>12}")
    for k in args.exchange_batches:
        cfg = {**base, "exchange-batches": k}
        run_inprocess(cfg, args.devices)  # warm caches (teacher, data) so both sides start alike
        _, inproc = run_inprocess(cfg, args.devices)
        for cpus, nodes in ((c, n) for c in args.cpus_per_client for n in args.nodes):
            name = f"k{k}-cpu{cpus}-nodes{nodes}"
            virtual = {"virtual-devices": args.devices, "min-nodes": nodes} if nodes else {}
            started = time.perf_counter()
            with LocalSimulation() as sim:
                sim.run(".", {**cfg, **virtual, "run-name": name}, num_supernodes=nodes or args.devices,
                        cpus_per_client=cpus)
            total = time.perf_counter() - started
            metrics = out / name / "metrics.csv"
            if not metrics.is_file():
                raise SystemExit(f"the Flower run {name} wrote no {metrics}: see its log")
            flower = list(csv.DictReader(open(metrics)))
            for row, timing in zip(flower, csv.DictReader(open(out / name / "timings.csv"))):
                row.update(timing)
            if len(flower) != args.rounds + 1:
                raise SystemExit(f"the Flower run {name} finished {len(flower) - 1} of {args.rounds} rounds")
            t_in, t_fl = median_round(inproc), median_round(flower)
            startup = total - sum(float(r["wall_s"]) for r in flower if int(r["round"]) >= 2)
            same = all(abs(float(f["test_loss"]) - a["test_loss"]) < 1e-4 and int(f["bytes_up"]) == a["bytes_up"]
                       for f, a in zip(flower, inproc))
            print(f"{k:>3} {cpus:>4} {nodes or args.devices:>5} {int(flower[-1]['exchanges']):>10} "
                  f"{t_in:>12.3f} {t_fl:>9.3f} "
                  f"{t_fl / t_in:>6.2f} {startup:>9.1f} {inproc[-1]['test_accuracy']:>11.4f} "
                  f"{float(flower[-1]['test_accuracy']):>10.4f} {'yes' if same else 'NO':>12}", flush=True)


if __name__ == "__main__":
    main()
