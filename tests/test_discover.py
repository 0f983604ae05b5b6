"""Node discovery: which device each node is, and which nodes are left out."""

from __future__ import annotations

import logging

import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from fedsplitkd.clients.records import to_records
from fedsplitkd.strategies.grid import NodeMap, discover


class DeclaringGrid:
    """Nodes that answer a query with the node config they were given."""

    def __init__(self, declared: dict[int, dict]):
        self.declared, self.outbox = declared, []

    def get_node_ids(self):
        return list(self.declared)

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata._message_id = f"q{msg.metadata.dst_node_id}-{i}"
            self.outbox.append(Message(to_records(self.declared[msg.metadata.dst_node_id]), reply_to=msg))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        out, self.outbox = self.outbox, []
        return out


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_nodes_with_bad_or_taken_partitions_are_left_out_with_a_warning(caplog):
    grid = DeclaringGrid({
        11: {"partition-id": 0, "num-partitions": 3},
        12: {"partition-id": 2, "num-partitions": 3},
        13: {"partition-id": 3, "num-partitions": 3},   # out of range
        14: {"partition-id": 0, "num-partitions": 3},   # taken
        15: {"partition-id": -1, "num-partitions": 0},  # no node config
    })
    nodes = NodeMap()
    with caplog.at_level(logging.WARNING):
        devices = discover(grid, nodes, min_nodes=1)
    assert devices == [0, 2] and nodes == {0: 11, 2: 12} and nodes.declared == 3
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 3


def test_inconsistent_partition_counts_are_reported(caplog):
    grid = DeclaringGrid({11: {"partition-id": 0, "num-partitions": 2},
                          12: {"partition-id": 1, "num-partitions": 4}})
    with caplog.at_level(logging.WARNING):
        devices = discover(grid, NodeMap(), min_nodes=1)
    assert devices == [0, 1]
    assert any("may overlap" in r.getMessage() for r in caplog.records)


def test_min_nodes_zero_waits_until_every_declared_device_is_known(monkeypatch):
    """Nodes register over time; with min-nodes 0 the first call waits for all of them."""
    full = {11: {"partition-id": 0, "num-partitions": 3}, 12: {"partition-id": 1, "num-partitions": 3},
            13: {"partition-id": 2, "num-partitions": 3}}
    grid = DeclaringGrid({11: full[11]})
    sleeps = []

    def register_next(seconds):  # each wait, one more node connects
        sleeps.append(seconds)
        grid.declared = {n: full[n] for n in list(full)[:len(grid.declared) + 1]}

    monkeypatch.setattr("fedsplitkd.strategies.grid.time.sleep", register_next)
    assert discover(grid, NodeMap(), min_nodes=0, wait_s=60) == [0, 1, 2]
    assert len(sleeps) == 2


def test_a_node_that_rejoins_serves_its_device_again(caplog):
    """A SuperNode that died and restarted registers as a new node: in a later pass the node
    answering for the device serves it."""
    grid = DeclaringGrid({11: {"partition-id": 0, "num-partitions": 2}, 12: {"partition-id": 1, "num-partitions": 2}})
    nodes = NodeMap()
    assert discover(grid, nodes, min_nodes=1) == [0, 1]
    grid.declared = {11: grid.declared[11], 21: {"partition-id": 1, "num-partitions": 2}}  # 12 died, 21 is back
    with caplog.at_level(logging.WARNING):
        assert discover(grid, nodes, min_nodes=1) == [0, 1]
    assert nodes == {0: 11, 1: 21}
    assert any("node 21 answers for it now, not node 12" in r.getMessage() for r in caplog.records)
    # The dead node still listed (its heartbeat has not expired) is not asked again.
    grid.declared[12] = {"partition-id": 1, "num-partitions": 2}
    asked = []
    push = grid.push_messages
    grid.push_messages = lambda messages: (asked.extend(m.metadata.dst_node_id for m in messages), push(messages))[1]
    assert discover(grid, nodes, min_nodes=1) == [0, 1] and nodes == {0: 11, 1: 21} and asked == []
