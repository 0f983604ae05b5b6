"""The message trace of a Flower run (``FEDSPLITKD_TIMING``) and the limit benchmark's reading of it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from fedsplitkd.clients import timing
from fedsplitkd.clients.records import BACKWARD, FORWARD, to_records
from fedsplitkd.protocol.device import BACKWARD_KIND, FORWARD_KIND
from fedsplitkd.strategies.transport import GridTransport

ROOT = Path(__file__).resolve().parents[1]


class AnsweringGrid:
    """Answers every message at once, with a one-array payload."""

    def __init__(self):
        self.outbox: list[Message] = []

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata._message_id = mid = f"m{len(self.outbox)}-{i}"
            reply = Message(to_records({"round": 1, "activations": np.zeros((2, 3), np.float32)}), reply_to=msg)
            reply.metadata._src_node_id = msg.metadata.dst_node_id
            self.outbox.append(reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        out, self.outbox = self.outbox, []
        return out


def test_the_transport_records_each_push_and_reply_while_timing(tmp_path, monkeypatch):
    for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):  # Messages outside an app
        monkeypatch.setattr(TaskIdentity, name, value)
    monkeypatch.setattr(timing, "DIRECTORY", str(tmp_path))
    transport = GridTransport(AnsweringGrid(), timeout=5, nodes={0: 10, 1: 11})
    transport.send({0: {"kind": FORWARD_KIND, "round": 1}, 1: {"kind": BACKWARD_KIND, "round": 1}})
    assert set(transport.receive()) == {0, 1}
    lines = [json.loads(line) for f in (tmp_path / "server").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["push", "reply", "reply"]
    assert lines[0]["messages"] == [[10, FORWARD], [11, BACKWARD]]
    assert sorted(line["node"] for line in lines[1:]) == [10, 11]
    assert lines[0]["time"] <= lines[1]["time"] <= lines[2]["time"]
    assert not list(tmp_path.glob("*.jsonl"))  # the handlers' lines stay apart from the server's


def test_nothing_is_recorded_unless_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "DIRECTORY", "")
    monkeypatch.chdir(tmp_path)
    timing.event("push", messages=[])
    assert not list(tmp_path.iterdir())


@pytest.fixture
def bench_limit():
    spec = importlib.util.spec_from_file_location("bench_limit", ROOT / "experiments" / "bench_limit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_the_limit_benchmark_splits_each_exchange_at_its_slowest_node(tmp_path, bench_limit):
    # Two rounds on nodes 1 and 2: a forward and a backward exchange each (times in seconds).
    pushes, handlers, replies = [], [], []
    for start, kind in ((0.0, FORWARD), (1.0, BACKWARD), (2.0, FORWARD), (3.0, BACKWARD)):
        pushes.append({"event": "push", "time": start, "messages": [[1, kind], [2, kind]]})
        # node 1: handed out after 0.05 s, 0.1 s in its handler, its reply pulled 0.02 s later;
        # node 2 answers last: 0.08 s, 0.2 s and 0.03 s
        handlers += [{"node": 1, "type": kind, "handler": start + 0.05, "end": start + 0.15},
                     {"node": 2, "type": kind, "handler": start + 0.08, "end": start + 0.28}]
        replies += [{"event": "reply", "node": 1, "time": start + 0.17},
                    {"event": "reply", "node": 2, "time": start + 0.31}]
    pushes.append({"event": "push", "time": 4.0, "messages": [[1, FORWARD], [2, FORWARD]]})  # round 3 begins
    _write(tmp_path / "server" / "1.jsonl", pushes + replies)
    _write(tmp_path / "41.jsonl", handlers[::2])
    _write(tmp_path / "42.jsonl", handlers[1::2])
    table = bench_limit.exchanges(tmp_path)
    assert set(table) == {FORWARD, BACKWARD}
    for rows in table.values():  # the first round's exchanges are the warm-up, left out
        assert len(rows) == 1
        assert rows[0] == pytest.approx([0.08, 0.2, 0.03, 0.69])  # server: from 0.31 s to the next push
