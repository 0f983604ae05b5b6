"""The fedsplitkd ClientApp: one Flower SuperNode is one device.

Handlers: ``query.describe`` (which device this node is), ``train.split_forward`` (a round's first request, carrying the global device
part), ``train.split_backward`` (cut-layer gradients, and the next chunk or the final
device part) and ``evaluate.split`` (split inference on the local validation split). The
device's state between messages lives in ``context.state``. With ``virtual-devices`` a
node serves whichever devices the server names, several per message (one section each,
``to_bundle``), and keeps the teacher's embedding once for all of them.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsplitkd.clients.device_app import node_partition
from fedsplitkd.clients.records import bundle, from_bundle, from_records, load_state, store_state, to_bundle, to_records
from fedsplitkd.config import RunConfig, resolve
from fedsplitkd.data.datasets import holdout_data, load_dataset
from fedsplitkd.protocol.device import device_setup, handle_evaluate, handle_train, own_device_setup
from fedsplitkd.training.gkt import device_head, extract, train_device
from fedsplitkd.training.local import class_logits, class_targets, train_whole
from fedsplitkd.protocol.payload import TEACHER, Payload, PayloadError
from fedsplitkd.models.zoo import student_for
from fedsplitkd.protocol.runtime import evaluate as evaluate_model, load_numpy_state
from fedsplitkd import streams
from fedsplitkd.clients import timing

timing.mark("imported")
STATE_PREFIX = "fedsplitkd."  # context.state holds our ArrayRecord and ConfigRecord under it
OWN_MODEL = "fedsplitkd.own-model"
TEACHER_STATE = "fedsplitkd.teacher."  # virtual devices: the teacher's embedding, once per node
GKT_MODEL = "fedsplitkd.gkt-model"

app = ClientApp()


@functools.lru_cache(maxsize=8)
def _resolve(items: tuple) -> RunConfig:
    return resolve(dict(items))


def _config(context: Context) -> RunConfig:
    cfg = _resolve(tuple(sorted(context.run_config.items())))  # once per run, not per message
    if cfg.fleet.device_threads and torch.get_num_threads() != cfg.fleet.device_threads:
        # Simulated devices are small: several torch threads per ClientApp process only
        # contend with the other processes for the cores.
        torch.set_num_threads(cfg.fleet.device_threads)
    return cfg


def _cache_dir(context: Context) -> str | None:
    """Where this node keeps its prepared data: node config ``cache-dir`` ('' turns it off),
    by default ``$FEDSPLITKD_CACHE/prepared``. A SuperNode starts a process per message, and the
    cache spares each one partitioning the whole dataset."""
    if "cache-dir" in context.node_config:
        return str(context.node_config["cache-dir"]) or None
    from fedsplitkd.data.prepared import default_directory

    return str(default_directory())


def _setup(context: Context, msg: Message):
    cfg = _config(context)
    device, count = node_partition(context)
    if "data-path" in context.node_config:  # the device holds its own data: that file alone, no partitioning
        setup = own_device_setup(cfg, context.node_config, device)
    else:
        setup = device_setup(cfg, device, count, _cache_dir(context))
    timing.mark("setup")
    return setup


def _train(msg: Message, context: Context) -> Message:
    cfg = _config(context)
    if cfg.fleet.virtual_devices:
        return Message(to_bundle(_serve_bundle(msg, context, cfg)), reply_to=msg)
    reply, state = handle_train(from_records(msg.content), load_state(context, STATE_PREFIX), _setup(context, msg))
    store_state(context, STATE_PREFIX, state)
    return Message(to_records(reply), reply_to=msg)


def _serve_bundle(msg: Message, context: Context, cfg: RunConfig) -> dict[int, Payload]:
    """Serve every virtual device a bundle names, each on its own: one device's failure
    is its own error section. The teacher's embedding is kept once per node."""
    replies: dict[int, Payload] = {}
    teacher: Payload | None = None  # the node's copy, read once per message
    for device, request in from_bundle(msg.content).items():
        prefix = f"{STATE_PREFIX}device-{device}."
        try:
            if isinstance(request, PayloadError):
                raise request
            if any(k.startswith(TEACHER) for k in request):  # first: the node's other devices rely on it
                teacher = {k: v for k, v in request.items() if k.startswith(TEACHER)}
                store_state(context, TEACHER_STATE, teacher)
            if not 0 <= device < cfg.fleet.virtual_devices:
                raise PayloadError(f"device {device} is outside virtual-devices = {cfg.fleet.virtual_devices}")
            setup = device_setup(cfg, device, cfg.fleet.virtual_devices)
            if msg.metadata.message_type.startswith(MessageType.EVALUATE):
                replies[device] = handle_evaluate(request, setup)
                continue
            if teacher is None:
                teacher = load_state(context, TEACHER_STATE)
            state = {**teacher, **load_state(context, prefix)}
            replies[device], state = handle_train(request, state, setup)
            store_state(context, prefix, {k: v for k, v in state.items() if not k.startswith(TEACHER)})
        except Exception as err:  # noqa: BLE001 - reported to the server, which drops the device
            replies[device] = {"error": f"{type(err).__name__}: {err}"}
            store_state(context, prefix, {})
    return replies


@app.train("split_forward")
@timing.timed
def split_forward(msg: Message, context: Context) -> Message:
    """Start a round from the global device part; reply the first chunk's activations."""
    return _train(msg, context)


@app.train("split_backward")
@timing.timed
def split_backward(msg: Message, context: Context) -> Message:
    """Apply a chunk's cut-layer gradients; reply the next chunk or the trained device part."""
    return _train(msg, context)


@app.train()
@timing.timed
def train(msg: Message, context: Context) -> Message:
    """Whole-student local training from the global model (FedAvg, FedProx: ``proximal-mu``).

    With ``virtual-devices`` the message names the devices this node serves (config
    ``devices``); each trains from the global model on its own, and the reply holds one
    section per device (``bundle``): a device that fails is its own ``error`` section."""
    cfg = _config(context)
    if not cfg.fleet.virtual_devices:
        return Message(_train_whole(msg, _setup(context, msg)), reply_to=msg)
    devices = msg.content["config"].get("devices") if "config" in msg.content else None
    if not isinstance(devices, list) or not all(isinstance(d, int) for d in devices):
        raise PayloadError(f"field 'devices' = {devices!r}: with virtual-devices = {cfg.fleet.virtual_devices} "
                           "a training message must list the devices it trains")
    sections = {}
    for device in devices:
        try:
            if not 0 <= device < cfg.fleet.virtual_devices:
                raise PayloadError(f"device {device} is outside virtual-devices = {cfg.fleet.virtual_devices}")
            sections[device] = _train_whole(msg, device_setup(cfg, device, cfg.fleet.virtual_devices))
        except Exception as err:  # noqa: BLE001 - reported to the server, which leaves the device out
            sections[device] = RecordDict({"error": ConfigRecord({"reason": f"{type(err).__name__}: {err}"})})
    return Message(bundle(sections), reply_to=msg)


def _train_whole(msg: Message, setup) -> RecordDict:
    """One device's local training from the global model in ``msg``: its model and metrics."""
    load_numpy_state(setup.student, {k: v.numpy() for k, v in msg.content["arrays"].items()})
    config = msg.content["config"]
    samples, loss = train_whole(setup.student, setup.data, setup.cfg, int(config.get("server-round", 0)),
                                setup.device_key, float(config.get("proximal-mu", 0.0)))
    return RecordDict({
        "arrays": ArrayRecord(torch_state_dict=setup.student.state_dict()),
        "metrics": MetricRecord({"num-examples": len(setup.data.y_train), "trained-samples": samples,
                                 "train_loss": loss / max(1, samples)})})


def _train_own(msg: Message, context: Context, federated_distillation: bool) -> Message:
    """Train this device's own student (kept in context.state), test it; with federated
    distillation, towards the global class logits in the message, sharing its own."""
    setup = _setup(context, msg)
    cfg, test = setup.cfg, load_dataset(setup.cfg)
    if OWN_MODEL in context.state:
        load_numpy_state(setup.student, {k: v.numpy() for k, v in context.state[OWN_MODEL].items()})
    else:  # the server's initial student: same seed, same weights
        streams.init_weights(cfg.train.seed)
        initial = student_for(cfg, test)
        setup.student.load_state_dict(initial.state_dict())
    teacher = None
    if federated_distillation and "arrays" in msg.content and "global-logits" in msg.content["arrays"]:
        arrays = msg.content["arrays"]
        teacher = class_targets(arrays["global-logits"].numpy(), arrays["global-counts"].numpy())
    server_round = int(msg.content["config"].get("server-round", 0))
    samples, loss = train_whole(setup.student, setup.data, cfg, server_round, setup.device_key, teacher=teacher)
    context.state[OWN_MODEL] = ArrayRecord(torch_state_dict=setup.student.state_dict())
    metrics = {"num-examples": len(setup.data.y_train), "trained-samples": samples, "train_loss": loss / max(1, samples)}
    if msg.content["config"].get("test", True):  # the server leaves some rounds untested (evaluate-every)
        accuracy, test_loss = evaluate_model(setup.student, test.x_test, test.y_test)
        metrics.update({"test_accuracy": accuracy, "test_loss": test_loss, **_holdout_metrics(setup.student, cfg)})
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if federated_distillation:
        logits, counts = class_logits(setup.student, setup.data.x_train, setup.data.y_train, test.num_classes)
        content["arrays"] = ArrayRecord({"class-logits": Array(logits), "class-counts": Array(counts)})
    return Message(content, reply_to=msg)


def _holdout_metrics(model: nn.Module, cfg) -> dict:
    """A device's own model on the server's holdout split (model selection for the methods
    that keep a model per device); empty without a holdout split."""
    x, y = holdout_data(cfg)
    if not len(y):
        return {}
    accuracy, loss = evaluate_model(model, x, y)
    return {"holdout_accuracy": accuracy, "holdout_loss": loss}


@app.train("local")
@timing.timed
def train_alone(msg: Message, context: Context) -> Message:
    """The local baseline: this device's own student, trained alone."""
    return _train_own(msg, context, federated_distillation=False)


@app.train("fd")
@timing.timed
def train_fd(msg: Message, context: Context) -> Message:
    """Federated distillation: own student, KD towards the global class logits, shares its own."""
    return _train_own(msg, context, federated_distillation=True)


def _gkt_models(setup, context: Context) -> nn.ModuleDict:
    """This device's FedGKT extractor (its student blocks up to the cut) and head, from context.state."""
    if setup.gkt is None:
        streams.init_weights(setup.cfg.train.seed)
        test = load_dataset(setup.cfg)
        extractor = student_for(setup.cfg, test).device_part(setup.cfg.split.cut)
        with torch.no_grad():
            shape = tuple(extractor(setup.student.example_input()).shape[1:])
        setup.gkt = nn.ModuleDict({"extractor": extractor, "head": device_head(shape, test.num_classes)})
        setup.gkt_initial = {k: v.clone() for k, v in setup.gkt.state_dict().items()}
    if GKT_MODEL in context.state:
        load_numpy_state(setup.gkt, {k: v.numpy() for k, v in context.state[GKT_MODEL].items()})
    else:  # the server's initial student (same seed) and a seeded head
        setup.gkt.load_state_dict(setup.gkt_initial)
    return setup.gkt


@app.train("fedgkt")
@timing.timed
def train_gkt(msg: Message, context: Context) -> Message:
    """FedGKT: train own extractor + head (KD towards the server's logits), upload features."""
    setup = _setup(context, msg)
    models = _gkt_models(setup, context)
    arrays = msg.content["arrays"] if "arrays" in msg.content else {}
    server_logits = arrays["server-logits"].numpy() if "server-logits" in arrays else None
    if server_logits is not None and server_logits.shape[0] != len(setup.data.y_train):
        raise PayloadError(f"field 'server-logits' has {server_logits.shape[0]} rows for "
                           f"{len(setup.data.y_train)} samples")
    server_round = int(msg.content["config"].get("server-round", 0))
    samples, loss = train_device(models["extractor"], models["head"], setup.data, server_logits, setup.cfg,
                                 server_round, setup.device_key)
    context.state[GKT_MODEL] = ArrayRecord(torch_state_dict=models.state_dict())
    features, logits = extract(models["extractor"], models["head"], setup.data.x_train)
    return Message(RecordDict({
        "arrays": ArrayRecord({"features": Array(features), "logits": Array(logits),
                               "labels": Array(setup.data.y_train)}),
        "metrics": MetricRecord({"num-examples": len(setup.data.y_train), "trained-samples": samples,
                                 "train_loss": loss / max(1, samples)})}), reply_to=msg)


@app.evaluate("fedgkt")
@timing.timed
def evaluate_gkt(msg: Message, context: Context) -> Message:
    """FedGKT: this device's extractor under the server's part, on the test split."""
    setup = _setup(context, msg)
    models = _gkt_models(setup, context)
    upper = setup.student.server_part(setup.cfg.split.cut)
    load_numpy_state(upper, {k: v.numpy() for k, v in msg.content["arrays"].items()})
    test = load_dataset(setup.cfg)
    model = nn.Sequential(models["extractor"], upper)
    accuracy, loss = evaluate_model(model, test.x_test, test.y_test)
    return Message(RecordDict({"metrics": MetricRecord({"test_accuracy": accuracy, "test_loss": loss,
                                                        "num-examples": len(test.y_test),
                                                        **_holdout_metrics(model, setup.cfg)})}), reply_to=msg)


@app.query("describe")
@timing.timed
def describe(msg: Message, context: Context) -> Message:
    """Which device this node is: its partition id and the partition count."""
    node = context.node_config
    return Message(to_records({"partition-id": int(node.get("partition-id", -1)),
                               "num-partitions": int(node.get("num-partitions", 0))}), reply_to=msg)


@app.evaluate("split")
@timing.timed
def evaluate(msg: Message, context: Context) -> Message:
    """Split inference: activations and labels of the local validation split."""
    cfg = _config(context)
    if cfg.fleet.virtual_devices:
        return Message(to_bundle(_serve_bundle(msg, context, cfg)), reply_to=msg)
    return Message(to_records(handle_evaluate(from_records(msg.content), _setup(context, msg))), reply_to=msg)
