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

