"""Payload fuzzing: malformed replies inside whole rounds never touch the global model.

Each malformed reply must be rejected with a logged reason naming the field, and the
student after the round must be byte-identical to the run in which that device simply
failed at the same point (the honest devices' work is all that counts). Duplicated,
forged and stale replies arrive through the Flower transport on top of the honest ones
and must change nothing at all.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from fedsplitkd import config as config_lib
from fedsplitkd.run import experiment
from fedsplitkd.clients.client_app import split_backward, split_forward
from fedsplitkd.protocol.device import device_setup
from fedsplitkd.protocol.rounds import InProcessTransport
from fedsplitkd.clients.records import BACKWARD
from fedsplitkd.strategies.transport import GridTransport

from conftest import tiny
from malformed import FINAL_MUTATIONS, MUTATIONS, Tampering
from test_client_handlers import new_context

DEVICES, TARGET = 3, 1
OVERRIDES = tiny(exchange_batches=2, batch_size=16,  # several chunks per device, then the final reply
                 teacher_input="embedding")  # what a node serving several devices uses


@pytest.fixture(scope="module")
def exp():
    return experiment.build(config_lib.resolve(OVERRIDES))


@pytest.fixture(scope="module")
def setups(exp):
    return {k: device_setup(exp.cfg, k, DEVICES) for k in range(DEVICES)}


def round_with(exp, setups, at: int, replace) -> tuple[bytes, object]:
    server = copy.deepcopy(exp.server)
    stats = server.run_round(Tampering(setups, TARGET, at, replace), list(range(DEVICES)), 1)
    model = b"".join(v.numpy().tobytes() for v in server.student.state_dict().values())
    return model, stats


CASES = [(name, 0, field, mutate) for name, (field, mutate) in MUTATIONS.items()]
CASES += [(name + "-later-chunk", 1, field, mutate)
          for name, (field, mutate) in MUTATIONS.items() if name in ("activations-nan", "labels-too-large",
                                                                     "round-wrong", "activations-oversize")]
CASES += [(name, -1, field, mutate) for name, (field, mutate) in FINAL_MUTATIONS.items()]


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name,at,field,mutate", CASES, ids=[c[0] for c in CASES])
def test_malformed_reply_is_rejected_and_the_model_is_as_if_the_device_failed(exp, setups, caplog, name, at,
                                                                              field, mutate):
    failed_model, failed = round_with(exp, setups, at, lambda reply: "device failed")
    assert failed.dropped["failed"] == 1
    with caplog.at_level(logging.WARNING, logger="fedsplitkd"):
        model, stats = round_with(exp, setups, at, mutate)
    assert (stats.dropped["invalid"], stats.completed) == (1, DEVICES - 1)
    assert stats.drops[0][0] == TARGET
    logged = [r.getMessage() for r in caplog.records if f"dropped device {TARGET}" in r.getMessage()
              and "(invalid)" in r.getMessage()]
    assert logged and field in logged[0], logged
    assert model == failed_model


# ---- duplicated, forged and stale replies through the Flower transport -----------------------

class HandlerGrid:
    """A Grid whose nodes (``node -> node config``) run the real ClientApp handlers; each
    reply goes through ``deliver``, which returns what arrives for it."""

    def __init__(self, run_config: dict, node_configs: dict[int, dict]):
        self.contexts = {node: new_context() for node in node_configs}
        for node, context in self.contexts.items():
            context.node_config.update(node_configs[node])
            context.run_config.update(run_config)
        self.outbox: list[Message] = []
        self.count = 0

    def deliver(self, msg: Message, reply: Message) -> list[Message]:
        return [reply]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.count += 1
            msg.metadata._message_id = mid = f"m{self.count}"
            handler = split_backward if msg.metadata.message_type == BACKWARD else split_forward
            self.outbox += self.deliver(msg, handler(msg, self.contexts[msg.metadata.dst_node_id]))
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        out, self.outbox = self.outbox, []
        return out


class EchoingGrid(HandlerGrid):
    """Every reply arrives twice, and with it a forged copy from another node and a reply
    to a message nobody sent."""

    def __init__(self, run_config: dict):
        super().__init__(run_config, {node: {"partition-id": i, "num-partitions": DEVICES}
                                      for i, node in enumerate((101, 102, 103))})

    def deliver(self, msg: Message, reply: Message) -> list[Message]:
        forged = Message(reply.content, reply_to=msg)
        forged.metadata._src_node_id = 999
        stale = Message(reply.content, reply_to=msg)
        stale.metadata._reply_to_message_id = "m-unknown"
        return [reply, copy.deepcopy(reply), forged, stale]


def test_duplicated_forged_and_stale_replies_change_nothing(exp, setups, monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    clean, clean_stats = round_with(exp, setups, 0, lambda reply: reply)
    server = copy.deepcopy(exp.server)
    grid = EchoingGrid({**config_lib.DEFAULTS, **OVERRIDES})
    transport = GridTransport(grid, timeout=30, nodes={0: 101, 1: 102, 2: 103})
    stats = server.run_round(transport, list(range(DEVICES)), 1)
    model = b"".join(v.numpy().tobytes() for v in server.student.state_dict().values())
    assert (stats.completed, sum(stats.dropped.values())) == (DEVICES, 0)
    assert stats.bytes_up == clean_stats.bytes_up
    assert model == clean
    assert not np.isnan(stats.train_loss)


# ---- the packed wire record itself -----------------------------------------------------------

def _packed(layout, data: bytes):
    import json

    from flwr.app import ConfigRecord, RecordDict
    return RecordDict({"packed": ConfigRecord({"layout": json.dumps(layout), "data": data})})


PACKED_CASES = {
    "truncated": (_packed([["a", "<f4", [4]]], b"\0" * 12), "runs past"),
    "left-over": (_packed([["a", "<f4", [2]]], b"\0" * 12), "left over"),
    "object-dtype": (_packed([["a", "|O", [1]]], b"\0" * 8), "dtype"),
    "negative-shape": (_packed([["a", "<f4", [-1]]], b""), "shape"),
    "layout-not-json": (None, "malformed"),
}


@pytest.mark.parametrize("name", list(PACKED_CASES))
def test_malformed_packed_records_raise_payload_errors(name):
    from flwr.app import ConfigRecord, RecordDict

    from fedsplitkd.clients.records import from_records
    from fedsplitkd.protocol.payload import PayloadError

    records, reason = PACKED_CASES[name]
    if records is None:
        records = RecordDict({"packed": ConfigRecord({"layout": "{not json", "data": b""})})
    with pytest.raises(PayloadError, match=reason):
        from_records(records)


def test_packed_records_round_trip_every_wire_dtype():
    from fedsplitkd.clients.records import from_records, to_records

    payload = {"f": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.array([1, -2], np.int64),
               "b": np.array([True, False]), "empty": np.zeros((0, 4), np.float32), "round": 3, "cut": "fc1"}
    back = from_records(to_records(payload))
    assert back.keys() == payload.keys() and back["round"] == 3 and back["cut"] == "fc1"
    for k in ("f", "i", "b", "empty"):
        assert back[k].dtype == payload[k].dtype and np.array_equal(back[k], payload[k])
    back["b"][0] = False  # handlers update arrays in place: they must be writable


# ---- virtual devices: several devices per message ----------------------------------------------

class BundlingGrid(HandlerGrid):
    """Two nodes serving a fleet of virtual devices (the server deals them). Counts the
    request sections that carry the teacher's embedding; ``tamper`` may edit a reply's
    records before it leaves."""

    def __init__(self, run_config: dict, tamper=None):
        super().__init__(run_config, {101: {}, 102: {}})
        self.tamper, self.teachers = tamper, 0

    def deliver(self, msg: Message, reply: Message) -> list[Message]:
        self.teachers += sum(name.endswith("/packed") and "teacher/" in msg.content[name]["layout"]
                             for name in msg.content)
        if self.tamper:
            self.tamper(msg, reply)
        return [reply]


def _bundled_round(exp, tamper=None):
    server = copy.deepcopy(exp.server)
    grid = BundlingGrid({**config_lib.DEFAULTS, **OVERRIDES, "virtual-devices": DEVICES}, tamper)
    transport = GridTransport(grid, timeout=30, nodes={0: 101, 1: 102, 2: 101}, bundle=True)
    stats = server.run_round(transport, list(range(DEVICES)), 1)
    return b"".join(v.numpy().tobytes() for v in server.student.state_dict().values()), stats, grid


def test_bundled_devices_train_as_if_each_had_its_node(exp, setups, monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    clean, clean_stats = round_with(exp, setups, 0, lambda reply: reply)
    model, stats, grid = _bundled_round(exp)
    assert (stats.completed, sum(stats.dropped.values())) == (DEVICES, 0)
    assert stats.bytes_up == clean_stats.bytes_up
    assert model == clean
    # The teacher's embedding goes once per node: device 2 uses the copy sent with device 0.
    assert grid.teachers == 2 and stats.bytes_down < clean_stats.bytes_down


def test_a_bad_section_drops_only_its_device(exp, setups, monkeypatch, caplog):
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    def lose_device_2(msg, reply):  # node 101's first reply comes back without device 2's section
        if msg.metadata.message_id == "m1":
            for name in [n for n in reply.content if n.startswith("2/")]:
                del reply.content[name]

    with caplog.at_level(logging.WARNING, logger="fedsplitkd"):
        _, stats, _ = _bundled_round(exp, lose_device_2)
    assert (stats.completed, stats.dropped["failed"]) == (DEVICES - 1, 1)
    assert stats.drops[0][0] == 2 and "no section for this device" in stats.drops[0][3]


# ---- overlapping messages to one node (Flower's simulation engine) ----------------------------

class RacingGrid(BundlingGrid):
    """Flower's simulation engine as it serves a node (flwr/server/superlink/fleet/vce/vce_api.py):
    the engine queues a node's next message without waiting for the one before it, a worker
    takes the node's context as it is when the message starts, and writes the whole context
    back when it ends, just before the reply becomes visible. Here node i's messages end
    ``1 + slowdown * i`` pulls after their push (nodes answer at different speeds), so a
    message pushed to a node whose earlier message has not ended starts from the context
    before that earlier one: the later write wins."""

    def __init__(self, run_config: dict, nodes: int = 2, slowdown: int = 2):
        HandlerGrid.__init__(self, run_config, {101 + n: {} for n in range(nodes)})
        self.tamper, self.teachers = None, 0
        self.slowdown, self.pulls, self.running = slowdown, 0, []
        self.overlaps = 0  # messages that started while one to the same node was running

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.count += 1
            msg.metadata._message_id = mid = f"m{self.count}"
            node = msg.metadata.dst_node_id
            self.overlaps += any(n == node for _, n, _, _ in self.running)
            context = copy.deepcopy(self.contexts[node])  # the context when the worker starts
            reply = split_forward(msg, context)           # both split handlers are one function
            self.running.append((self.pulls + 1 + self.slowdown * (node - 101), node, context, reply))
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        done = [r for r in self.running if r[0] <= self.pulls]
        self.running = [r for r in self.running if r[0] > self.pulls]
        for _, node, context, _ in done:  # update_context, then the reply is stored
            self.contexts[node] = context
        return [reply for *_, reply in done]


def test_no_interleaving_pairs_a_device_with_another_chunks_gradients(exp, monkeypatch):
    """Five devices on two nodes, many chunks each: the transport never lets two messages to
    one node overlap, so every device finishes and the model equals the in-process round."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    devices = 5
    setups = {k: device_setup(exp.cfg, k, devices) for k in range(devices)}
    reference = copy.deepcopy(exp.server)
    reference.run_round(InProcessTransport(setups), list(range(devices)), 1)
    server = copy.deepcopy(exp.server)
    grid = RacingGrid({**config_lib.DEFAULTS, **OVERRIDES, "virtual-devices": devices})
    transport = GridTransport(grid, timeout=30, nodes={d: 101 + d % 2 for d in range(devices)}, bundle=True)
    stats = server.run_round(transport, list(range(devices)), 1)
    assert stats.drops == [] and stats.completed == devices
    assert grid.overlaps == 0
    weights = lambda s: b"".join(v.numpy().tobytes() for v in s.student.state_dict().values())  # noqa: E731
    assert weights(server) == weights(reference)
