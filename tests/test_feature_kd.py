"""Feature distillation (kd-feature-weight): the loss, the server step, the config and a run."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny
from fedsplitkd.config import ConfigError, resolve
from fedsplitkd.models.zoo import build_student, build_teacher
from fedsplitkd.protocol.kd import feature_distance, kd_loss
from fedsplitkd.protocol.runtime import DeviceRuntime, EdgeRuntime
from fedsplitkd.run.experiment import run_inprocess

SHAPE, CLASSES, LR, MOMENTUM, ALPHA, T, BETA = (1, 8, 8), 10, 0.05, 0.9, 0.3, 2.0, 0.7


def test_feature_distance_is_two_minus_twice_the_cosine_whatever_the_scale():
    s = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    t = torch.tensor([[5.0, 0.0], [-30.0, -40.0], [0.0, 2.0]])
    torch.testing.assert_close(feature_distance(s, t), torch.tensor([0.0, 4.0, 2.0 - 2.0 ** 0.5]))
    torch.testing.assert_close(feature_distance(10 * s, 0.1 * t), feature_distance(s, t))
    with pytest.raises(ValueError, match="do not fit"):
        feature_distance(s, t[:, :1])


def _runtimes(beta: float):
    torch.manual_seed(0)
    student, teacher = build_student("cnn2d", SHAPE, CLASSES), build_teacher("cnn2d", SHAPE, CLASSES)
    device = DeviceRuntime(student, "conv1", LR, MOMENTUM, teacher_embedding=teacher.device_part("conv1"))
    return student, teacher, device, EdgeRuntime(student, "conv1", teacher, ALPHA, T, LR, MOMENTUM,
                                                 feature_weight=beta)


def _batches(n=2):
    rng = np.random.default_rng(3)
    return [(rng.standard_normal((6, *SHAPE)).astype(np.float32), rng.integers(0, CLASSES, 6)) for _ in range(n)]


def test_the_server_step_descends_kd_plus_the_feature_term_and_returns_its_cut_gradient():
    student, teacher, device, edge = _runtimes(BETA)
    assert edge.projector.in_features == 64 and edge.projector.out_features == 256  # fc widths of the two
    rows = edge.teacher_logits(device.teacher_input(_batches()[0][0]))
    assert rows.shape == (6, CLASSES + 256)
    reference, projector = copy.deepcopy(student.server_part("conv1")), copy.deepcopy(edge.projector)
    optimizer = torch.optim.SGD([*reference.parameters(), *projector.parameters()], lr=LR, momentum=MOMENTUM)
    for x, y in _batches():
        acts, t_rows = device.forward(x), edge.teacher_logits(device.teacher_input(x))
        (grad,), loss_sum = edge.train_step([acts], [y], [t_rows])
        # by hand: the teacher's features are the input of its classifier
        xt = torch.from_numpy(x)
        with torch.no_grad():
            t_features = torch.nn.Sequential(*list(teacher.children())[:-1])(xt)
        torch.testing.assert_close(torch.from_numpy(t_rows[:, CLASSES:]), t_features)
        a = torch.from_numpy(acts).requires_grad_(True)
        s_features = reference[:-1](a)
        loss = (kd_loss(reference[-1](s_features), torch.from_numpy(t_rows[:, :CLASSES]), torch.from_numpy(y),
                        ALPHA, T, reduction="none")
                + BETA * feature_distance(projector(s_features), t_features)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert loss_sum == pytest.approx(float(loss.detach()) * len(x), rel=1e-5)
        torch.testing.assert_close(torch.from_numpy(grad), a.grad, atol=1e-6, rtol=1e-5)
        device.backward([x], [grad])
    for ours, theirs in zip([*edge.part.parameters(), *edge.projector.parameters()],
                            [*reference.parameters(), *projector.parameters()]):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert not edge.student_linear._forward_pre_hooks and not edge.teacher_linear._forward_pre_hooks


def test_the_term_off_changes_nothing_and_on_it_draws_nothing_from_the_runs_generator():
    states, runtimes = [], {}
    for beta in (0.0, BETA):
        runtimes[beta] = _runtimes(beta)  # each seeds torch with 0, then builds the models and the runtimes
        states.append(torch.get_rng_state())
    assert torch.equal(*states)  # P comes from its own generator
    _, _, device, off = runtimes[0.0]
    assert off.projector is None and off.trained == list(off.part.parameters())
    x, _ = _batches(1)[0]
    assert off.teacher_logits(device.teacher_input(x)).shape == (6, CLASSES)  # the logits alone


def test_the_feature_term_alone_still_needs_and_reads_the_teacher():
    cfg = resolve({"kd-alpha": 0.0, "kd-feature-weight": 1.0})
    assert cfg.split.uses_teacher and cfg.split.teacher_mode == "cached"
    assert resolve({"kd-alpha": 0.0}).split.teacher_mode == "none"
    # split learning is split-KD without its teacher: both terms off
    assert not resolve({"method": "split", "kd-feature-weight": 1.0}).split.uses_teacher


@pytest.mark.parametrize("overrides", [{"method": "fedavg"}, {"kd-mode": "mutual", "teacher-input": "embedding"},
                                       {"kd-feature-weight": -1.0}])
def test_the_config_refuses_feature_distillation_where_it_has_no_meaning(overrides):
    with pytest.raises(ConfigError, match="kd-feature-weight"):
        resolve({"kd-feature-weight": 0.5, **overrides})


def test_steps_on_the_feature_term_alone_pull_the_students_features_to_the_teachers():
    _, _, device, edge = _runtimes(BETA)
    edge.alpha = 0.0  # CE and the feature term
    x, y = _batches(1)[0]
    t = torch.from_numpy(edge.teacher_logits(device.teacher_input(x))[:, CLASSES:])

    def distance() -> float:
        with torch.no_grad():
            s = torch.nn.Sequential(*list(edge.part.children())[:-1])(torch.from_numpy(device.forward(x)))
            return float(feature_distance(edge.projector(s), t).mean())

    before = distance()
    for _ in range(20):
        (grad,), _ = edge.train_step([device.forward(x)], [y], [edge.teacher_logits(device.teacher_input(x))])
        device.backward([x], [grad])
    assert distance() < 0.5 * before


def test_a_split_kd_run_with_the_feature_term_learns_and_caches_the_teachers_features():
    _, plain = run_inprocess(tiny(num_rounds=5), 3)
    exp, rows = run_inprocess(tiny(num_rounds=5, kd_feature_weight=1.0), 3)
    assert rows[-1]["test_accuracy"] > 0.3 and rows[-1]["test_accuracy"] != plain[-1]["test_accuracy"]
    cached = next(iter(exp.server.teacher_cache.values()))
    assert next(iter(cached.values())).shape == (exp.dataset.num_classes + exp.server.edge.projector.out_features,)


def test_a_resumed_feature_kd_run_ends_like_the_uninterrupted_one(tmp_path):
    run = tiny(num_rounds=3, kd_feature_weight=1.0, teacher_input="embedding")
    full_exp, full = run_inprocess(run, 3)
    run_inprocess({**run, "num-rounds": 2, "checkpoint-every": 1}, 3, checkpoint_dir=tmp_path)
    exp, resumed = run_inprocess({**run, "resume": str(tmp_path)}, 3)
    assert resumed[-1]["test_loss"] == full[-1]["test_loss"]
    assert torch.equal(exp.server.edge.projector.weight, full_exp.server.edge.projector.weight)


def test_a_users_own_modules_take_the_feature_term_through_the_library():
    from collections import OrderedDict

    from torch import nn

    from fedsplitkd.library import SplitDevice, SplitKDConfig, edge_server

    student = nn.Sequential(OrderedDict([("fc1", nn.Sequential(nn.Linear(8, 16), nn.ReLU())),
                                         ("head", nn.Linear(16, 3))]))
    embedding, body = nn.Sequential(nn.Linear(8, 12), nn.ReLU()), nn.Sequential(nn.Linear(12, 5), nn.ReLU(),
                                                                                nn.Linear(5, 3))
    config = SplitKDConfig(cut="fc1", kd_alpha=0.0, kd_feature_weight=0.5)
    server = edge_server(student, (8,), body, embedding, config)
    assert server.mode == "cached" and (server.edge.projector.in_features, server.edge.projector.out_features) == (16, 5)
    data = [(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(ConfigError, match="teacher_embedding"):
        SplitDevice(student, data, config=config)  # the term reads the teacher: the device needs its embedding
