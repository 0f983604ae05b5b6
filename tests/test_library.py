"""The library API: split-KD from the user's own student, teacher and data (no zoo, no dataset keys)."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedsplitkd import SplitDevice, SplitKDConfig, edge_server
from fedsplitkd.clients import register_device
from fedsplitkd.config import ConfigError, resolve
from fedsplitkd.protocol.device import device_setup
from fedsplitkd.run.experiment import build
from fedsplitkd.library import to_arrays
from fedsplitkd.protocol.runtime import evaluate
from fedsplitkd.protocol.rounds import InProcessTransport
from fedsplitkd.strategies import SplitKD
from fedsplitkd.strategies.inprocess import InProcessGrid, _server_identity

from conftest import tiny

FEATURES, CLASSES = 16, 4


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four well-separated classes: a student learns them in a round or two."""
    centres = np.random.default_rng(0).normal(scale=3.0, size=(CLASSES, FEATURES))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    return (centres[y] + rng.normal(size=(n, FEATURES))).astype(np.float32), y


def dict_batches(x: np.ndarray, y: np.ndarray, size: int = 32) -> list[dict]:
    return [{"features": torch.from_numpy(x[i:i + size]), "target": torch.from_numpy(y[i:i + size])}
            for i in range(0, len(y), size)]


def student() -> nn.Sequential:
    return nn.Sequential(OrderedDict([("fc1", nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU())),
                                      ("fc2", nn.Sequential(nn.Linear(32, 32), nn.ReLU())),
                                      ("head", nn.Linear(32, CLASSES))]))


def teacher_parts() -> tuple[nn.Module, nn.Module]:
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU()), nn.Linear(64, CLASSES)


def test_batches_are_read_from_tuples_dicts_and_tensors():
    x, y = blobs(50, 1)
    xs, ys = to_arrays(dict_batches(x, y, 16), keys=("features", "target"))
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_array_equal(ys, y)
    xs, ys = to_arrays([(torch.from_numpy(x[:20]), y[:20].tolist()), (x[20:], y[20:])])
    np.testing.assert_array_equal(xs, x)


def test_bad_inputs_are_named():
    x, y = blobs(20, 1)
    with pytest.raises(ValueError, match="train data: a batch has no key 'img'"):
        SplitDevice(student(), dict_batches(x, y))
    with pytest.raises(ValueError, match="labels must be one integer class per sample"):
        to_arrays([(x, x)])
    with pytest.raises(ConfigError, match="'teacher_embedding'"):
        SplitDevice(student(), [(x, y)])  # the default config distils: it needs the embedding
    with pytest.raises(ConfigError, match="run-config 'kd-alpha' = 1.5"):
        SplitKDConfig(kd_alpha=1.5).checked()
    with pytest.raises(ValueError, match="not a cut point"):
        edge_server(student(), (FEATURES,), *reversed(teacher_parts()), SplitKDConfig(cut="head"))
    assert SplitKDConfig.from_run_config({"learning-rate": 0.1, "the-apps-own-key": 3}).learning_rate == 0.1


def test_the_library_round_is_the_config_apps_round():
    """The same student, teacher and device data, built by the user or by the config app: one
    protocol round trains them to the same weights."""
    cfg = resolve(tiny())
    exp = build(cfg)
    ours = copy.deepcopy(exp.student)
    embedding = copy.deepcopy(exp.teacher[0])
    body = copy.deepcopy(exp.teacher.server_part(exp.teacher.cut_points[0]))
    config = SplitKDConfig(**{k: cfg[k.replace("_", "-")] for k in SplitKDConfig.__dataclass_fields__})
    server = edge_server(list(ours.named_children()), exp.student.input_shape, body, embedding, config)

    devices = range(3)
    zoo = {d: device_setup(cfg, d, 3) for d in devices}
    library = {d: SplitDevice(list(copy.deepcopy(exp.student).named_children()),
                              [(zoo[d].data.x_train, zoo[d].data.y_train)], [(zoo[d].data.x_val, zoo[d].data.y_val)],
                              teacher_embedding=copy.deepcopy(embedding), config=config).setup(d)
               for d in devices}
    exp.server.run_round(InProcessTransport(zoo), list(devices), 1)
    server.run_round(InProcessTransport(library), list(devices), 1)
    for (name, a), b in zip(exp.student.state_dict().items(), server.student.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def user_app(trained: list) -> ClientApp:
    """A user's ClientApp: its own train handler, and split-KD's beside it."""
    app = ClientApp()

    @app.train()
    def own_train(msg: Message, context: Context) -> Message:
        trained.append(context.node_id)
        return Message(RecordDict(), reply_to=msg)

    def device(context: Context) -> SplitDevice:
        x, y = blobs(160, 1 + context.node_config["partition-id"])
        return SplitDevice(student(), dict_batches(x[:128], y[:128]), dict_batches(x[128:], y[128:]),
                           teacher_embedding=teacher_parts()[0], config=CONFIG, keys=("features", "target"))

    return register_device(app, device)


CONFIG = SplitKDConfig(cut="fc1", learning_rate=0.05, kd_alpha=0.3, batch_size=16, exchange_batches=2,
                       fraction_evaluate=1.0)


def test_split_kd_trains_a_users_model_in_their_own_flower_app():
    torch.manual_seed(0)
    embedding, body = teacher_parts()
    x_public, y_public = blobs(400, 100)
    teacher = nn.Sequential(embedding, body)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=0.01)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(teacher(torch.from_numpy(x_public)), torch.from_numpy(y_public)).backward()
        optimizer.step()
    net = student()
    x_test, y_test = blobs(300, 200)
    before = evaluate(net, x_test, y_test)[0]
    seen_lrs = []

    def factory(params):  # the user's own optimizer for the server part
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.5)
        seen_lrs.append(opt.param_groups[0]["lr"])
        return opt

    strategy = SplitKD.from_models(net, (FEATURES,), body, embedding, CONFIG, optimizer=factory)
    trained: list[int] = []
    app = user_app(trained)
    with _server_identity():
        grid = InProcessGrid({}, 3, app)
        result = strategy.start(grid, ArrayRecord(net.state_dict()), num_rounds=2)
        grid.send_and_receive([Message(RecordDict(), dst_node_id=1000, message_type="train")])
    net.load_state_dict(result.arrays.to_torch_state_dict())
    after = evaluate(net, x_test, y_test)[0]
    assert strategy.last_stats.completed == 3 and not strategy.last_stats.dropped
    assert after > 0.9 > before
    assert strategy.last_evaluation["val_accuracy"] > 0.9  # split evaluation on the devices' own val data
    assert seen_lrs == [0.05] and strategy.server.edge.optimizer.param_groups[0]["momentum"] == 0.5
    assert trained == [1000]  # the app's own handler still serves plain train messages


def test_the_config_apps_devices_are_split_devices_built_from_the_zoo():
    """device_setup builds a SplitDevice from the partition's arrays (no copy) and the zoo
    teacher's embedding part, whose block names are the teacher's: its weights load."""
    cfg = resolve(tiny())
    exp = build(cfg)
    setup = device_setup(cfg, 1, 4)
    embedding = exp.teacher.device_part(exp.teacher.cut_points[0])
    device = SplitDevice(setup.student, setup.data, teacher_embedding=embedding, config=cfg)
    assert device.data is setup.data and device.embedding is embedding
    assert list(device.embedding.state_dict()) == list(setup.embedding.state_dict()) == \
        list(embedding.state_dict())
    # a user's plain module is named 'embedding', as edge_server names the teacher's first block
    plain = SplitDevice(setup.student, setup.data, teacher_embedding=nn.Linear(3, 3), config=cfg)
    assert all(k.startswith("embedding.") for k in plain.embedding.state_dict())
    assert device.setup(1).cfg is cfg
