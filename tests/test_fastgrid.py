"""FastGrid under virtual devices, in one process: bundled training equals a node per device,
and a node's reply that loses or breaks one device's section costs only that device."""

import csv

from flwr.app import ConfigRecord

from fedsplitkd.config import resolve
from fedsplitkd.strategies.inprocess import InProcessGrid, _server_identity, run_app
from fedsplitkd.strategies.server_app import run

from conftest import tiny

FLEET = 4


def config(tmp_path, name: str, **extra) -> dict:
    return {**tiny(num_rounds=2, learning_rate=0.05, fraction_train=0.75), "method": "fedavg",
            "output-dir": str(tmp_path), "run-name": name, **extra}


def rows(directory) -> list[dict]:
    return list(csv.DictReader(open(directory / "metrics.csv")))


class LosingGrid(InProcessGrid):
    """The first node's training replies lose device ``lost``'s section, and device ``broken``'s
    arrives as an error section."""

    lost, broken = 0, 2

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for message, mid in zip(messages, ids):
            reply = self.replies.get(mid)
            if reply is not None and message.metadata.message_type == "train" and not reply.has_error():
                for name in [n for n in reply.content if n.startswith(f"{self.lost}/")]:
                    del reply.content[name]
                if f"{self.broken}/arrays" in reply.content:
                    del reply.content[f"{self.broken}/arrays"], reply.content[f"{self.broken}/metrics"]
                    reply.content[f"{self.broken}/error"] = ConfigRecord({"reason": "out of memory"})
        return ids


def test_bundled_fedavg_equals_a_node_per_device(tmp_path):
    nodes = rows(run_app(config(tmp_path, "nodes"), FLEET))
    bundled = rows(run_app(config(tmp_path, "virtual", **{"virtual-devices": FLEET}), 2))
    assert [int(r["completed"]) for r in bundled[1:]] == [3, 3]
    for a, b in zip(nodes, bundled, strict=True):
        assert a["test_accuracy"] == b["test_accuracy"] and a["bytes_up"] == b["bytes_up"]


def test_a_lost_or_failed_section_leaves_out_only_its_device(tmp_path):
    cfg = resolve(config(tmp_path, "losing", **{"virtual-devices": FLEET, "fraction-train": 1.0}))
    with _server_identity():
        directory = run(LosingGrid(dict(cfg), 2), cfg)
    completed = [int(r["completed"]) for r in rows(directory)[1:]]
    assert completed == [FLEET - 2, FLEET - 2]  # devices 0 and 2 (node 1's) left out, 1 and 3 averaged
    devices = {(d["round"], d["device"]) for d in csv.DictReader(open(directory / "devices.csv"))
               if int(d["samples"]) > 0}
    assert {d for _, d in devices} == {"1", "3"}
    assert float(rows(directory)[-1]["test_accuracy"]) > float(rows(directory)[0]["test_accuracy"])



class LateGrid(InProcessGrid):
    """The second node's replies come one pull late, and every message is counted by node and type."""

    def __init__(self, *args):
        super().__init__(*args)
        self.held: list[str] = []
        self.received: dict[tuple[int, str], int] = {}

    def push_messages(self, messages):
        messages = list(messages)
        for message in messages:
            key = (message.metadata.dst_node_id, message.metadata.message_type)
            self.received[key] = self.received.get(key, 0) + 1
        ids = super().push_messages(messages)
        self.held += [mid for message, mid in zip(messages, ids) if message.metadata.dst_node_id == 1001]
        return ids

    def pull_messages(self, message_ids):
        late, self.held = set(self.held), []
        return [self.replies.pop(mid) for mid in message_ids if mid in self.replies and mid not in late]


def test_a_node_serving_several_devices_gets_one_message_per_exchange_when_another_node_is_late(tmp_path):
    # Devices 0 and 2 on node 1000, 1 and 3 on node 1001, one chunk each: the server steps
    # device 0, then waits for node 1001; device 0's gradients must wait for device 2's.
    overrides = {**tiny(num_rounds=2, fraction_train=1.0, exchange_batches=100), "output-dir": str(tmp_path),
                 "virtual-devices": FLEET}
    cfg = resolve({**overrides, "run-name": "late"})
    grid = LateGrid(dict(cfg), 2)
    with _server_identity():
        late = rows(run(grid, cfg))
    assert grid.received[(1000, "train.split_backward")] == grid.received[(1001, "train.split_backward")] == 2
    on_time = rows(run_app({**overrides, "run-name": "on-time"}, 2))
    assert [r["test_accuracy"] for r in late] == [r["test_accuracy"] for r in on_time]
    assert [int(r["completed"]) for r in late[1:]] == [FLEET, FLEET]
