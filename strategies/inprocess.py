"""Flower's Grid with the ClientApp served in this process: every method's ServerApp code and
the real ClientApp handlers, without a SuperLink, Ray or a process per message.

The benchmark's tuning runs hundreds of short runs; through ``flwr run`` each would pay
seconds of start-up and Flower's per-message polling. Here node i is device i (node config
``partition-id = i``, ``num-partitions = N``) with its own ``Context`` for the run, and each
message is served when it is pushed, one after another, so the math is that of a
simulation run (tests/test_inprocess.py compares the two).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedsplitkd.config import resolve

RUN_ID, SERVER_NODE = 1, 0


class InProcessGrid(Grid):
    """``num_nodes`` nodes running ``app`` (the fedsplitkd ClientApp by default) in this process."""

    def __init__(self, run_config: dict, num_nodes: int, app: ClientApp | None = None):
        if app is None:
            from fedsplitkd.clients.client_app import app
        self.app = app
        self.contexts = {1000 + i: Context(run_id=RUN_ID, node_id=1000 + i, state=RecordDict(),
                                           node_config={"partition-id": i, "num-partitions": num_nodes},
                                           run_config=dict(run_config))
                         for i in range(num_nodes)}
        self.replies: dict[str, Message] = {}
        self.count = 0
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            self.count += 1
            message.metadata.__dict__["_message_id"] = mid = f"inprocess-{self.count}"
            context = self.contexts.get(message.metadata.dst_node_id)
            if context is None:
                ids.append("")  # no such node: refused, as the SuperLink refuses it
                continue
            try:
                self.replies[mid] = self.app(message, context)
            except Exception as err:  # noqa: BLE001 - a ClientApp that raises replies an error
                self.replies[mid] = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                                  f"{type(err).__name__}: {err}"), reply_to=message)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(mid) for mid in message_ids if mid in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages([mid for mid in self.push_messages(messages) if mid])


@contextlib.contextmanager
def _server_identity() -> Iterator[None]:
    """Messages built by the ServerApp read the task identity Flower sets in its processes."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SERVER_NODE, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def run_app(run_config: dict, num_nodes: int) -> Path:
    """The fedsplitkd ServerApp's run over ``num_nodes`` in-process nodes; returns the run directory."""
    from fedsplitkd.strategies.server_app import run

    cfg = resolve(run_config)
    with _server_identity():
        return run(InProcessGrid(run_config, num_nodes), cfg)
