"""A real deployment on 127.0.0.1 (SuperLink + 3 SuperNodes, TLS with authentication, and a node
killed and restarted), and the README's example app (experiments/deploy/my_app.py) over an
in-process Grid. The insecure deployment's checks (it completes with the in-process math and
stops every process) run on the own-data deployment: tests/test_own_data.py."""

from __future__ import annotations

import importlib.util
import urllib.request
from pathlib import Path
from uuid import uuid4

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedsplitkd.config import resolve
from fedsplitkd.data.datasets import load_dataset
from fedsplitkd.tools.deployment import (
    DeploymentResult,
    LocalDeployment,
    alive,
    parse_run_config,
)
from fedsplitkd.run.experiment import run_inprocess
from fedsplitkd.models.zoo import student_for
from fedsplitkd.protocol.runtime import evaluate

pytestmark = pytest.mark.integration  # Flower runs through a SuperLink

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 3
# Few messages: each one starts a flwr-clientapp process that imports torch. With every
# batch in one exchange, a round is two messages per device (forward, final backward).
CONFIG = {"dataset": "digits", "num-rounds": 1, "teacher-epochs": 5, "exchange-batches": 1000,
          "batch-size": 32, "seed": 0}


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    """The same config in one process: what every Flower run of it must reproduce."""
    return run_inprocess(dict(CONFIG), DEVICES)[1]


def test_a_completed_status_is_not_enough(tmp_path):
    """Flower reports 'completed' when every ClientApp raised: no results, no success."""
    result = DeploymentResult(0, "", "", 1, "finished:completed", tmp_path / "run")
    LocalDeployment._judge(result, 2)
    assert not result.ok and "metrics.csv" in result.problems[0]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("round,test_accuracy,devices,completed\n0,0.1,0,0\n1,nan,3,3\n")
    result = DeploymentResult(0, "", "", 1, "finished:completed", tmp_path / "run")
    LocalDeployment._judge(result, 2)
    assert any("rounds [0, 1]" in p for p in result.problems)
    assert any("finite" in p for p in result.problems)


def test_run_config_from_the_command_line():
    assert parse_run_config("num-rounds=2 dataset='digits' fading=true kd-alpha=0.5 data-path=\"a b\"") == {
        "num-rounds": 2, "dataset": "digits", "fading": True, "kd-alpha": 0.5, "data-path": "a b"}


# ---- the README's example app -------------------------------------------------------------------

class LoopbackGrid(Grid):
    """Serves every message at once with a ClientApp in this process, one Context per node."""

    def __init__(self, app: ClientApp, run_config: dict, num_nodes: int):
        self.app, self._run = app, None
        self.contexts = {100 + i: Context(run_id=7, node_id=100 + i, state=RecordDict(), run_config=run_config,
                                          node_config={"partition-id": i, "num-partitions": num_nodes})
                         for i in range(num_nodes)}
        self.replies: dict[str, Message] = {}

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            try:
                reply = self.app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001  (a SuperNode reports any ClientApp error)
                reply = Message(Error(0, repr(err)), reply_to=message)
            self.replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def test_readme_example_app_trains_the_same_student(tmp_path, reference, monkeypatch):
    for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):  # Messages outside a run
        monkeypatch.setattr(TaskIdentity, name, value)
    spec = importlib.util.spec_from_file_location("my_app", ROOT / "experiments" / "deploy" / "my_app.py")
    my_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(my_app)
    run_config = {**CONFIG, "output-dir": str(tmp_path), "min-nodes": DEVICES}
    my_app.main(LoopbackGrid(my_app.client_app, run_config, DEVICES),
                Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    cfg = resolve(run_config)
    dataset = load_dataset(cfg)
    student = student_for(cfg, dataset)
    student.load_state_dict(torch.load(tmp_path / "my_student.pt", weights_only=True))
    accuracy, _ = evaluate(student, dataset.x_test, dataset.y_test)
    assert accuracy == pytest.approx(reference[-1]["test_accuracy"], abs=1e-9)


def test_auth_registered_nodes_train_and_an_unregistered_key_is_refused(tmp_path, reference):
    """TLS and SuperNode authentication (this is also the TLS deployment test): 3 nodes with registered keys train; a 4th node, with a
    key the SuperLink never saw, is refused, and the run completes with the registered ones."""
    with LocalDeployment(DEVICES, tls=True, auth=True, unregistered=1) as dep:
        started = dep.pids()
        with pytest.raises(OSError):  # the SuperLink speaks TLS only
            urllib.request.urlopen(f"http://{dep.address}/health", timeout=5)
        listed = dep.nodes()
        result = dep.run(ROOT, {**CONFIG, "output-dir": str(tmp_path), "run-name": "run"})
        stranger = (dep.home / f"supernode-{DEVICES}.log").read_text()
        started |= dep.pids() | dep.seen
    assert not [pid for pid in started if alive(pid)], "processes outlived the deployment"
    assert result.ok, f"{result.problems}\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}"
    assert len(listed) == DEVICES  # only the registered keys
    assert "SuperNode ID:" not in stranger, stranger[-2000:]  # never admitted
    assert [int(r["completed"]) for r in result.rows[1:]] == [DEVICES]
    for got, want in zip(result.rows, reference):
        assert float(got["test_accuracy"]) == pytest.approx(want["test_accuracy"], abs=1e-9)


def test_rejoin_a_killed_node_is_dropped_by_the_round_timeout_and_serves_the_next_round(tmp_path):
    """SuperNode 2 is SIGKILLed once it has received round 1's first train message: the round ends
    without it at its timeout, the drop is counted, the restarted node serves round 2, and the
    server's run goes on to its end."""
    import threading
    import time

    config = {**CONFIG, "num-rounds": 2, "round-timeout": 30.0, "output-dir": str(tmp_path), "run-name": "run"}
    with LocalDeployment(DEVICES) as dep:
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(result=dep.run(ROOT, config)))
        runner.start()
        node_log = dep.home / "supernode-2.log"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and runner.is_alive() and "Receiving: train" not in node_log.read_text():
            time.sleep(0.2)
        dep.kill_supernode(2)  # round 1 has reached it: its reply never comes
        time.sleep(1.0)
        dep.start_supernode(2)
        runner.join(timeout=900)
        rejoined = node_log.read_text().count("SuperNode ID:")
    result = outcome["result"]
    rows = result.rows
    assert [int(r["round"]) for r in rows] == [0, 1, 2], result.stdout[-3000:]
    assert [int(r["completed"]) for r in rows[1:]] == [DEVICES - 1, DEVICES], result.stdout[-3000:]
    assert int(rows[1]["dropped_failed"]) == 1 and rejoined == 2
    assert result.status == "finished:completed" and (tmp_path / "run" / "summary.json").is_file()
