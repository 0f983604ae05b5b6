"""A SuperNode's share of a split round, in this process: the ClientApp's handler for one node
serving several virtual devices, timed without the engine around it.

bench_limit's ``--trace`` shows a node's handler inside Flower's simulation, where two nodes
share the cores and the times move by half between runs; here the same handler (the real
ClientApp ``_train``: records in and out, ``context.state``, the device steps) runs alone, so
a change to the node's own work shows. The server steps the devices' chunks in between, as in
a round, so the backward requests carry real gradients.

    python experiments/bench_node.py --data-path ../shared/datasets/uci_har_subset.npz [--devices 10] [--profile]

Prints the median seconds of the forward and the backward message over rounds 2..R.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time

import torch
from flwr.app import Context, Message, RecordDict

from fedsplitkd.clients import client_app
from fedsplitkd.clients.records import BACKWARD, FORWARD, from_bundle, to_bundle
from fedsplitkd.config import resolve
from fedsplitkd.protocol.device import BACKWARD_KIND
from fedsplitkd.run.experiment import build
from fedsplitkd.strategies.inprocess import _server_identity

NODE = 7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="the UCI HAR subset .npz")
    parser.add_argument("--devices", type=int, default=10, help="virtual devices the node serves")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="also print where the handler's time goes")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each ClientApp (device-threads = 1)
    overrides = {"dataset": "har", "data-path": args.data_path, "output-dir": tempfile.mkdtemp(),
                 "virtual-devices": 2 * args.devices}
    server = build(resolve(overrides)).server
    devices = list(range(0, 2 * args.devices, 2))  # one node's share of a round-robin deal to two nodes
    context = Context(run_id=1, node_id=NODE, node_config={}, state=RecordDict(), run_config=dict(overrides))
    profile = cProfile.Profile() if args.profile else None

    def handle(payloads: dict, kind: str, server_round: int) -> tuple[dict, float]:
        message = Message(to_bundle(payloads), dst_node_id=NODE, message_type=kind)
        message.metadata.__dict__["_message_id"] = f"{kind}-{time.monotonic_ns()}"
        if profile and server_round > 1:  # round 1 sets the devices up (data, models, imports)
            profile.enable()
        start = time.perf_counter()
        reply = client_app._train(message, context)
        seconds = time.perf_counter() - start
        if profile:
            profile.disable()
        return from_bundle(reply.content), seconds

    forward, backward = [], []
    with _server_identity():
        for server_round in range(1, args.rounds + 1):
            chunks, seconds = handle(server.first_requests(devices, server_round, lambda key: NODE), FORWARD, server_round)
            forward.append(seconds)
            teacher = {d: server.teacher_logits(d, chunks[d]) for d in devices}
            grads, _, _ = server.train_chunks(chunks, teacher)
            requests = {d: {"kind": BACKWARD_KIND, "round": server_round, "grads": grads[d], "cursor": 0,
                            "final": chunks[d]["remaining"] == 0} for d in devices}
            _, seconds = handle(requests, BACKWARD, server_round)
            backward.append(seconds)
    print(f"one node, {args.devices} devices, median of rounds 2..{args.rounds}: "
          f"forward {statistics.median(forward[1:]):.4f} s, backward {statistics.median(backward[1:]):.4f} s")
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
