"""The user's teacher in the library: left as it was, run in eval mode, and its test accuracy reported
by SplitKD.from_models (issue 35)."""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.clientapp import ClientApp
from torch import nn

from fedsplitkd import SplitDevice, SplitKDConfig, edge_server, teacher_accuracy
from fedsplitkd.clients import register_device
from fedsplitkd.strategies import SplitKD
from fedsplitkd.strategies.inprocess import InProcessGrid, _server_identity

FEATURES, CLASSES = 8, 3
CONFIG = SplitKDConfig(cut="fc1", batch_size=16, exchange_batches=2, kd_alpha=0.5)


def student() -> nn.Sequential:
    return nn.Sequential(OrderedDict([("fc1", nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU())),
                                      ("head", nn.Linear(16, CLASSES))]))


def teacher_parts() -> tuple[nn.Module, nn.Module]:
    """An embedding with BatchNorm and a body with dropout: both behave differently in train mode."""
    torch.manual_seed(0)
    return (nn.Sequential(nn.Linear(FEATURES, 12), nn.BatchNorm1d(12), nn.ReLU()),
            nn.Sequential(nn.Dropout(0.5), nn.Linear(12, CLASSES)))


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    centres = np.random.default_rng(0).normal(scale=3.0, size=(CLASSES, FEATURES))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    return (centres[y] + rng.normal(size=(n, FEATURES))).astype(np.float32), y


def snapshot(module: nn.Module) -> tuple[dict, list, list]:
    return (copy.deepcopy(module.state_dict()), [m.training for m in module.modules()],
            [p.requires_grad for p in module.parameters()])


def assert_same(module: nn.Module, before: tuple[dict, list, list]) -> None:
    weights, modes, grads = snapshot(module)
    assert modes == before[1] and grads == before[2]
    for name, value in before[0].items():
        torch.testing.assert_close(weights[name], value, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("kd_mode", ["standard", "mutual"])
def test_the_users_teacher_is_left_as_it_was(kd_mode):
    """Two rounds (mutual learning trains the server's teacher) leave the user's modules with their
    weights, train mode and requires_grad; the server's copy runs in eval mode, frozen."""
    embedding, body = teacher_parts()
    embedding.train(), body.train()
    before = snapshot(embedding), snapshot(body)
    config = dataclasses.replace(CONFIG, kd_mode=kd_mode)

    def device(context):
        x, y = blobs(64, context.node_config["partition-id"])
        return SplitDevice(student(), [(x, y)], teacher_embedding=embedding, config=config)

    strategy = SplitKD.from_models(student(), (FEATURES,), body, embedding, config)
    server_teacher = strategy.server.teacher
    with _server_identity():
        grid = InProcessGrid({}, 2, register_device(ClientApp(), device))
        strategy.start(grid, ArrayRecord(strategy.server.student.state_dict()), num_rounds=2)
    assert strategy.last_stats.completed == 2
    assert_same(embedding, before[0])
    assert_same(body, before[1])
    assert server_teacher[0] is not embedding and server_teacher[1] is not body
    if kd_mode == "standard":  # the server's frozen teacher: eval mode (BatchNorm's running stats, no dropout)
        rest = strategy.server.edge.teacher_rest
        assert not any(m.training for m in rest.modules()) and not any(p.requires_grad for p in rest.parameters())
    else:  # the copy trained, the user's teacher did not
        moved = server_teacher.state_dict()["body.1.weight"]
        assert not torch.equal(moved, before[1][0]["1.weight"])


def test_a_device_runs_a_frozen_copy_of_the_embedding():
    embedding, _ = teacher_parts()
    before = snapshot(embedding)
    x, y = blobs(32, 1)
    device = SplitDevice(student(), [(x, y)], teacher_embedding=embedding, config=CONFIG)
    runtime = device.setup(0).runtime()
    assert not runtime.teacher_embedding.training
    assert_same(embedding, before)


def trained_teacher() -> tuple[nn.Module, nn.Module]:
    embedding, body = teacher_parts()
    whole = nn.Sequential(embedding, body)
    x, y = blobs(300, 100)
    optimizer = torch.optim.Adam(whole.parameters(), lr=0.02)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(whole(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
    return embedding, body


def test_from_models_reports_the_teachers_test_accuracy():
    embedding, body = trained_teacher()
    x, y = blobs(200, 7)
    whole = nn.Sequential(embedding, body).eval()
    with torch.no_grad():
        expected = float((whole(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    whole.train()
    assert expected > 0.8  # a teacher worth measuring
    batches = [{"img": torch.from_numpy(x[i:i + 50]), "label": torch.from_numpy(y[i:i + 50])}
               for i in range(0, 200, 50)]
    by_data = SplitKD.from_models(student(), (FEATURES,), body, embedding, CONFIG, test_data=batches)
    assert by_data.teacher_accuracy == pytest.approx(expected)

    seen = []

    def users_test(model: nn.Module) -> float:  # the user's own test, as quickstart's test() is
        seen.append([m.training for m in model.modules()])
        with torch.no_grad():
            return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())

    by_function = SplitKD.from_models(student(), (FEATURES,), body, embedding, CONFIG, evaluate_teacher=users_test)
    assert by_function.teacher_accuracy == pytest.approx(expected)
    assert seen and not any(seen[0])  # it got the teacher in eval mode
    assert SplitKD.from_models(student(), (FEATURES,), body, embedding, CONFIG).teacher_accuracy is None
    # kd_alpha = 0 keeps no teacher on the server; the user's teacher is still measured, and left in train mode
    plain = SplitKD.from_models(student(), (FEATURES,), body, embedding, SplitKDConfig(cut="fc1", kd_alpha=0.0),
                                test_data=[(x, y)])
    assert plain.teacher_accuracy == pytest.approx(expected) and embedding.training and body.training


def test_teacher_accuracy_restores_modes_and_names_bad_input():
    embedding, body = teacher_parts()
    whole = nn.Sequential(embedding, body)
    whole[1][0].eval()  # a mixed state, restored as it was
    modes = [m.training for m in whole.modules()]
    x, y = blobs(40, 2)
    accuracy = teacher_accuracy(whole, [(x, y)])
    assert 0.0 <= accuracy <= 1.0 and [m.training for m in whole.modules()] == modes
    with pytest.raises(ValueError, match="the teacher's evaluation returned tuple: it must return the accuracy"):
        teacher_accuracy(whole, evaluate=lambda model: (0.3, 0.9))  # quickstart's test returns (loss, accuracy)
    assert [m.training for m in whole.modules()] == modes
    with pytest.raises(ValueError, match="give test_data or evaluate"):
        teacher_accuracy(whole)
    with pytest.raises(ValueError, match="there is no teacher to measure"):
        SplitKD.from_models(student(), (FEATURES,), config=SplitKDConfig(cut="fc1", kd_alpha=0.0), test_data=[(x, y)])
    server = edge_server(student(), (FEATURES,), body, embedding, CONFIG)
    assert server.teacher[0] is not embedding  # edge_server holds copies too


def test_measuring_a_model_leaves_its_modes_and_the_config_apps_teacher_stays_frozen():
    """protocol.runtime.evaluate gives each module its mode back; so the config app's teacher,
    measured (Experiment.teacher_accuracy) after the edge server froze it, still runs in eval mode."""
    from fedsplitkd.config import resolve
    from fedsplitkd.protocol.runtime import evaluate
    from fedsplitkd.run.experiment import build

    from conftest import tiny

    embedding, body = teacher_parts()
    whole = nn.Sequential(embedding, body)
    body.eval()
    modes = [m.training for m in whole.modules()]
    x, y = blobs(40, 3)
    evaluate(whole, x, y)
    assert [m.training for m in whole.modules()] == modes
    exp = build(resolve(tiny()))
    rest = exp.server.edge.teacher_rest
    assert rest is not None and not any(m.training for m in rest.modules())


def test_building_the_server_leaves_batchnorm_statistics_alone():
    """The server sizes the parts with an example through each block: a BatchNorm student or zoo
    (SplitModel) teacher neither refuses a batch of one nor takes it into its running statistics;
    a mutual teacher keeps its train mode."""
    from fedsplitkd.library import split_model

    def with_batchnorm() -> nn.Sequential:
        return nn.Sequential(OrderedDict([("fc1", nn.Sequential(nn.Linear(FEATURES, 12), nn.BatchNorm1d(12))),
                                          ("head", nn.Sequential(nn.BatchNorm1d(12), nn.Linear(12, CLASSES)))]))

    for kd_mode in ("standard", "mutual"):
        net, zoo_teacher = with_batchnorm(), split_model(with_batchnorm(), (FEATURES,))
        for bn in (net.fc1[1], zoo_teacher.fc1[1], zoo_teacher.head[0]):
            bn.running_mean.fill_(0.5)
        server = edge_server(net, (FEATURES,), zoo_teacher, config=dataclasses.replace(CONFIG, kd_mode=kd_mode))
        for bn in (net.fc1[1], zoo_teacher.fc1[1], zoo_teacher.head[0]):
            assert torch.equal(bn.running_mean, torch.full((12,), 0.5)) and int(bn.num_batches_tracked) == 0
        assert net.training and net.fc1[1].training  # the student trains
        assert server.edge.teacher_rest[0][0].training == (kd_mode == "mutual")
