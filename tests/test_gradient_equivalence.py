"""Split training (device + edge runtimes, or the whole protocol) equals unsplit training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedsplitkd import config as config_lib
from fedsplitkd.run import experiment
from fedsplitkd.protocol.device import batch_plan, device_setup
from fedsplitkd.protocol.kd import kd_loss
from fedsplitkd.models.zoo import build_student, build_teacher
from fedsplitkd.protocol.runtime import DeviceRuntime, EdgeRuntime, round_lr
from fedsplitkd.protocol.rounds import InProcessTransport

from conftest import tiny

SHAPES = {"mlp": (64,), "cnn1d": (9, 128), "cnn2d": (1, 8, 8)}
NUM_CLASSES = 10
BATCH, STEPS, LR, MOMENTUM, ALPHA, T = 8, 3, 0.05, 0.9, 0.5, 3.0


def _cases():
    for family, shape in SHAPES.items():
        for cut in build_student(family, shape, NUM_CLASSES).cut_points:
            yield pytest.param(family, cut, id=f"{family}-{cut}")


def test_every_family_has_several_cut_points():
    cuts = {f: build_student(f, s, NUM_CLASSES).cut_points for f, s in SHAPES.items()}
    assert cuts == {"mlp": ["fc1", "fc2"], "cnn1d": ["conv1", "conv2", "conv3"],
                    "cnn2d": ["conv1", "conv2", "fc"]}


def _batches(shape, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((BATCH, *shape)).astype(np.float32),
             rng.integers(0, NUM_CLASSES, size=BATCH).astype(np.int64)) for _ in range(STEPS)]


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("family,cut", list(_cases()))
def test_split_training_equals_unsplit_training(family, cut):
    shape = SHAPES[family]
    torch.manual_seed(0)
    student = build_student(family, shape, NUM_CLASSES)
    reference = copy.deepcopy(student)
    initial = copy.deepcopy(student.state_dict())
    teacher = build_teacher(family, shape, NUM_CLASSES)

    device = DeviceRuntime(student, cut, LR, MOMENTUM,
                           teacher_embedding=teacher.device_part(teacher.cut_points[0]))
    edge = EdgeRuntime(student, cut, teacher, ALPHA, T, LR, MOMENTUM)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR, momentum=MOMENTUM)

    for x, y in _batches(shape):
        acts = device.forward(x)
        t_logits = edge.teacher_logits(device.teacher_input(x))
        grads, loss_sum = edge.train_step([acts], [y], [t_logits])
        assert len(grads) == 1 and grads[0].shape == acts.shape and grads[0].dtype == np.float32
        device.backward([x], [grads[0]])

        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        with torch.no_grad():
            target = teacher(xt)
        # the split teacher (device embedding + edge rest) gives the unsplit teacher's logits
        torch.testing.assert_close(torch.from_numpy(t_logits), target, atol=1e-6, rtol=0)
        loss = kd_loss(reference(xt), target, yt, ALPHA, T)
        assert loss_sum == pytest.approx(float(loss.detach()) * BATCH, rel=1e-5)
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        ref_opt.step()

    _assert_same_params(student, reference)
    # ...and training did move every parameter tensor (the comparison is not vacuous)
    for k, v in student.state_dict().items():
        assert not torch.equal(v, initial[k]), f"{k} did not change"
    # the teacher stayed frozen
    assert all(not p.requires_grad for p in teacher.parameters())


def test_edge_gradient_split_over_devices_equals_each_device_alone():
    """Two devices' minibatches in one server step: each gets its own mean-loss gradient."""
    torch.manual_seed(0)
    student = build_student("mlp", (64,), NUM_CLASSES)
    (x1, y1), (x2, y2), _ = _batches((64,))
    x2, y2 = x2[:5], y2[:5]  # unequal sizes
    part = student.device_part("fc1")
    with torch.no_grad():
        a1, a2 = part(torch.from_numpy(x1)).numpy(), part(torch.from_numpy(x2)).numpy()
    alone = []
    for a, y in ((a1, y1), (a2, y2)):
        edge = EdgeRuntime(copy.deepcopy(student), "fc1", None, 0.0, T, LR, MOMENTUM)
        grads, _ = edge.train_step([a], [y], [None])
        alone.append(grads[0])
    edge = EdgeRuntime(copy.deepcopy(student), "fc1", None, 0.0, T, LR, MOMENTUM)
    together, _ = edge.train_step([a1, a2], [y1, y2], [None, None])
    for g, want in zip(together, alone):
        np.testing.assert_allclose(g, want, atol=1e-7, rtol=1e-5)


def _protocol_round(server_round: int, **overrides):
    """One round of the whole protocol for one device with exchange-batches = 1."""
    cfg = config_lib.resolve(tiny(exchange_batches=1, num_rounds=4, teacher_epochs=2, **overrides))
    exp = experiment.build(cfg)
    reference = copy.deepcopy(exp.student)
    setup = device_setup(cfg, 0, 1)
    transport = InProcessTransport({0: setup})
    stats = exp.server.run_round(transport, [0], server_round)
    return cfg, exp, reference, setup, stats


def _train_unsplit(reference, exp, setup, cfg, server_round: int, lr: float) -> None:
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr, momentum=cfg["momentum"])
    for batch in batch_plan(len(setup.data.y_train), cfg["batch-size"], cfg["local-epochs"], cfg["seed"],
                            server_round, 0):
        x = torch.from_numpy(setup.data.x_train[batch])
        y = torch.from_numpy(setup.data.y_train[batch])
        with torch.no_grad():
            target = exp.teacher(x)
        loss = kd_loss(reference(x), target, y, cfg["kd-alpha"], cfg["kd-temperature"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def protocol_round():
    return _protocol_round(1)


def test_protocol_round_equals_unsplit_training(protocol_round):
    cfg, exp, reference, setup, stats = protocol_round
    assert stats.completed == 1 and not stats.dropped
    plan = batch_plan(len(setup.data.y_train), cfg["batch-size"], cfg["local-epochs"], cfg["seed"], 1, 0)
    assert stats.exchanges == len(plan) + 1  # one chunk per minibatch, plus the final reply
    assert stats.samples == len(setup.data.y_train)
    _train_unsplit(reference, exp, setup, cfg, 1, cfg["learning-rate"])
    _assert_same_params(exp.student, reference)


def test_cosine_schedule_trains_both_sides_at_the_rounds_rate():
    """Round 3 of 4 under lr-schedule = cosine: device and edge both step at lr * (1 + cos(pi/2)) / 2."""
    cfg, exp, reference, setup, _ = _protocol_round(3, lr_schedule="cosine")
    lr = round_lr(cfg, 3)
    assert lr == pytest.approx(cfg["learning-rate"] * 0.5)
    _train_unsplit(reference, exp, setup, cfg, 3, lr)
    _assert_same_params(exp.student, reference)
    assert round_lr(cfg, 1) == cfg["learning-rate"] and 0 < round_lr(cfg, 4) < round_lr(cfg, 3)
    assert round_lr(cfg.replace(**{"lr-schedule": "constant"}), 4) == cfg["learning-rate"]


def test_protocol_round_moved_the_device_part(protocol_round):
    """Guard against a vacuous comparison: the aggregated device part is not the initial one."""
    cfg, exp, _, _, _ = protocol_round
    torch.manual_seed(cfg["seed"])
    initial = build_student(cfg["student-model"], exp.dataset.input_shape, exp.dataset.num_classes)
    for k, v in exp.server.device_part.state_dict().items():
        assert not torch.equal(v, initial.state_dict()[k]), f"{k} did not change"


def test_teacher_cache_is_in_the_temporary_directory(protocol_round, teacher_cache_dir):
    from fedsplitkd.models.teacher import default_cache_dir

    assert default_cache_dir() == teacher_cache_dir / "teachers"
    assert list((teacher_cache_dir / "teachers").glob("teacher-*.pt"))


def test_mutual_learning_steps_the_teacher_and_gives_the_student_standard_kd():
    """kd-mode mutual: the student's step is standard KD towards the teacher's current logits;
    the teacher's server part steps on kd_loss with the roles swapped (its embedding stays)."""
    shape, cut = SHAPES["cnn2d"], "conv1"
    torch.manual_seed(0)
    student, teacher = build_student("cnn2d", shape, NUM_CLASSES), build_teacher("cnn2d", shape, NUM_CLASSES)
    standard_student, standard_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    mutual = EdgeRuntime(student, cut, teacher, ALPHA, T, LR, MOMENTUM, mutual=True)
    standard = EdgeRuntime(standard_student, cut, standard_teacher, ALPHA, T, LR, MOMENTUM)
    embed = teacher.device_part(teacher.cut_points[0])
    x, y = _batches(shape)[0]
    acts = student.device_part(cut)(torch.from_numpy(x)).detach().numpy()
    inputs = embed(torch.from_numpy(x)).detach().numpy()
    rest = teacher.server_part(teacher.cut_points[0])
    with torch.no_grad():
        t_logits = rest(torch.from_numpy(inputs))
        expected = kd_loss(t_logits, standard.part(torch.from_numpy(acts)), torch.from_numpy(y), ALPHA, T)
    before, frozen = copy.deepcopy(rest.state_dict()), copy.deepcopy(standard_teacher.state_dict())
    grads_mutual, _ = mutual.train_step([acts], [y], [inputs])
    grads_standard, _ = standard.train_step([acts], [y], [t_logits.numpy()])
    np.testing.assert_allclose(grads_mutual[0], grads_standard[0], atol=1e-6)
    _assert_same_params(mutual.part, standard.part)
    assert any(not torch.equal(before[k], v) for k, v in rest.state_dict().items())  # the teacher moved
    assert all(torch.equal(v, frozen[k]) for k, v in standard_teacher.state_dict().items())  # standard: frozen
    with torch.no_grad():
        after = kd_loss(rest(torch.from_numpy(inputs)), standard.part(torch.from_numpy(acts)), torch.from_numpy(y),
                        ALPHA, T)
    assert float(after) < float(expected)  # its step lowered its own loss on this batch
    for p, q in zip(embed.parameters(), teacher.device_part(teacher.cut_points[0]).parameters()):
        assert p is q and p.grad is None  # the embedding is not trained

