"""Split-KD against Flower's FedAvg in one real deployment: round times and where they go.

One TLS deployment on 127.0.0.1 (``fedsplitkd.tools.deployment.LocalDeployment``: a SuperLink and
3 SuperNodes, a device each) runs the same job twice, as split-KD (``exchange-batches``
1000: one forward and one backward message per device per round) and as ``method=fedavg``
(Flower's FedAvg strategy: one training message per device per round). A SuperNode starts
a fresh ``flwr-clientapp`` process for every message; with ``FEDSPLITKD_TIMING`` set
(``fedsplitkd.clients.timing``) each process records its start, our imports, the handler's
device setup and its compute, so the report splits a message's time between Flower's part
and ours. Round time is the median of rounds 2..R (round 1 also finds the nodes).

    python experiments/bench_deployment.py [--rounds 4] [--superexec-poll 1.0] [--no-cache]

The last line reads ``round ratio (split-KD/FedAvg) X.XX``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from fedsplitkd.tools.deployment import LocalDeployment, parse_run_config

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"split-KD": {"method": "splitkd"}, "FedAvg": {"method": "fedavg"}}
# A message's time inside its ClientApp process, between these marks (clients/timing.py).
PHASES = [("flower start", "process", "import"), ("our imports", "import", "imported"),
          ("to handler", "imported", "handler"), ("device setup", "handler", "setup"),
          ("compute", "setup", "end")]


def round_seconds(run_dir: Path) -> list[float]:
    with open(run_dir / "timings.csv", newline="") as f:
        return [float(r["wall_s"]) for r in csv.DictReader(f) if int(r["round"]) > 0]


def messages(directory: Path, start: float, end: float) -> list[dict]:
    """The timing lines of the ClientApp processes that handled a message in [start, end]."""
    lines = [json.loads(line) for file in directory.glob("*.jsonl") for line in file.read_text().splitlines()]
    return [m for m in lines if start <= m["handler"] <= end]


def breakdown(lines: list[dict]) -> dict[str, dict[str, float]]:
    """Per message type, the median seconds of each phase (a setup served from this process's
    memory counts as zero: the handler then marks no setup of its own)."""
    table: dict[str, dict[str, float]] = {}
    for kind in sorted({m["type"] for m in lines}):
        rows = [m for m in lines if m["type"] == kind]
        for m in rows:
            m.setdefault("setup", m["handler"])
            if m["setup"] < m["handler"]:  # a mark left by an earlier message of this process
                m["setup"] = m["handler"]
        table[kind] = {name: statistics.median(m[b] - m[a] for m in rows if m.get(a) and m.get(b))
                       for name, a, b in PHASES}
        table[kind]["messages"] = len(rows)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--superexec-poll", type=float, default=None,
                        help="FLWR_SUPEREXEC_TASK_POLL_INTERVAL on every node (Flower's default 1.0 s)")
    parser.add_argument("--no-cache", action="store_true", help="no prepared-data cache on the devices")
    parser.add_argument("--run-config", default="", help='extra overrides for both runs, "k=v ..."')
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="fedsplitkd-bench-deploy-"))
    timing = work / "timing"
    env = {"FEDSPLITKD_TIMING": str(timing), "FEDSPLITKD_CACHE": str(work / "cache")}
    if args.superexec_poll is not None:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(args.superexec_poll)
    common = {"num-rounds": args.rounds, "exchange-batches": 1000, "output-dir": str(work / "out"),
              **parse_run_config(args.run_config)}
    node_configs = [{"cache-dir": ""} if args.no_cache else {} for _ in range(args.supernodes)]
    results = {}
    try:
        with LocalDeployment(args.supernodes, tls=True, env=env, node_configs=node_configs) as dep:
            for label, overrides in METHODS.items():
                start = time.time()
                result = dep.run(ROOT, {**common, **overrides, "run-name": overrides["method"]})
                if not result.ok:
                    raise SystemExit(f"{label} run failed: {result.problems}")
                results[label] = (round_seconds(result.run_dir), messages(timing, start, time.time()))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    poll = args.superexec_poll if args.superexec_poll is not None else 1.0
    print(f"{args.supernodes} SuperNodes, TLS, {args.rounds} rounds, SuperExec poll {poll:g} s, "
          f"prepared-data cache {'off' if args.no_cache else 'on'}")
    print(f"{'method':10s} {'round s (median 2..R)':>22s}   rounds")
    medians = {}
    for label, (seconds, _) in results.items():
        medians[label] = statistics.median(seconds[1:] or seconds)
        print(f"{label:10s} {medians[label]:22.2f}   {' '.join(f'{s:.1f}' for s in seconds)}")
    print("\nper message, median seconds inside its flwr-clientapp process:")
    print(f"{'message':24s} {'count':>5s} " + " ".join(f"{name:>13s}" for name, _, _ in PHASES))
    for label, (_, lines) in results.items():
        for kind, row in breakdown(lines).items():
            print(f"{kind:24s} {row['messages']:5d} " + " ".join(f"{row[name]:13.2f}" for name, _, _ in PHASES))
    print(f"round ratio (split-KD/FedAvg) {medians['split-KD'] / medians['FedAvg']:.2f}")


if __name__ == "__main__":
    main()
