"""Split-KD's device handlers on the user's own ClientApp.

    app = ClientApp()                       # the user's app, with its own handlers if it likes
    register_device(app, lambda context: SplitDevice(Net().blocks, *load_data(...)))

``make_device(context)`` builds the device from the user's objects (``fedsplitkd.library``);
it runs once per node and process, then its result is reused (the data is read once). The
node's ``partition-id`` (node config, as Flower's simulation sets it and a SuperNode's
``--node-config`` gives it) is the device's id. The device's state between messages lives in
``context.state``, so any process can serve any message.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsplitkd.clients.records import from_records, load_state, store_state, to_records
from fedsplitkd.protocol.device import DeviceSetup, handle_evaluate, handle_train
from fedsplitkd.library import SplitDevice

STATE = "fedsplitkd.device."  # context.state keeps the device's round under this prefix
CACHED = 64                   # setups kept per process (a simulation actor serves many nodes)


def node_partition(context: Context) -> tuple[int, int]:
    """The node's device: (partition-id, num-partitions) from its node config."""
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError("node config needs 'partition-id' and 'num-partitions' "
                         "(flower-supernode --node-config \"partition-id=0 num-partitions=N\")")
    return int(node["partition-id"]), int(node["num-partitions"])


def use_threads(threads: int) -> None:
    """run-config 'device-threads' (0: torch's default). Set in the ClientApp's process only: a
    simulated device is small, and more torch threads per process only contend for the cores."""
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def register_device(app: ClientApp, make_device: Callable[[Context], SplitDevice]) -> ClientApp:
    """Add the split protocol's handlers (``query.describe``, ``train.split_forward``,
    ``train.split_backward``, ``evaluate.split``) to ``app``; the app's other handlers stay."""
    setups: OrderedDict[tuple, DeviceSetup] = OrderedDict()

    def setup(context: Context) -> DeviceSetup:
        key = (context.run_id, context.node_id)
        if key not in setups:
            device = make_device(context)
            if not isinstance(device, SplitDevice):
                raise TypeError(f"make_device returned {type(device).__name__}, not a SplitDevice")
            setups[key] = device.setup(node_partition(context)[0])
            use_threads(setups[key].cfg.fleet.device_threads)
            if len(setups) > CACHED:
                setups.popitem(last=False)
        return setups[key]

    @app.query("describe")
    def describe(msg: Message, context: Context) -> Message:
        device, count = node_partition(context)
        return Message(to_records({"partition-id": device, "num-partitions": count}), reply_to=msg)

    def train(msg: Message, context: Context) -> Message:
        reply, state = handle_train(from_records(msg.content), load_state(context, STATE), setup(context))
        store_state(context, STATE, state)
        return Message(to_records(reply), reply_to=msg)

    app.train("split_forward")(train)
    app.train("split_backward")(train)

    @app.evaluate("split")
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(to_records(handle_evaluate(from_records(msg.content), setup(context))), reply_to=msg)

    return app
