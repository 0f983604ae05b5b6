"""DeviceSGD is torch.optim.SGD's update, bit for bit, without importing torch.optim."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from fedsplitkd.protocol.sgd import DeviceSGD


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3), nn.Linear(3, 2))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_steps_equal_torch_sgd_bit_for_bit(momentum):
    ours, theirs = _model(0), _model(0)
    mine, reference = DeviceSGD(ours.parameters(), 0.05, momentum), torch.optim.SGD(theirs.parameters(), 0.05, momentum)
    torch.manual_seed(1)
    for step in range(6):
        x = torch.randn(5, 1, 8, 8)
        for model, optimizer in ((ours, mine), (theirs, reference)):
            if step == 3:  # a new learning rate, as set_lr sets each round
                optimizer.param_groups[0]["lr"] = 0.01
            optimizer.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            if step == 2:  # a parameter without a gradient is left alone, its buffer too
                model[4].bias.grad = None
            optimizer.step()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(a, b), f"step {step}"


def test_state_round_trips_and_continues_exactly():
    ours, theirs = _model(0), _model(0)
    first, reference = DeviceSGD(ours.parameters(), 0.1, 0.9), torch.optim.SGD(theirs.parameters(), 0.1, 0.9)
    assert first.state_bytes() == b""
    x = torch.randn(4, 1, 8, 8)
    for model, optimizer in ((ours, first), (theirs, reference)):
        model(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    second = DeviceSGD(ours.parameters(), 0.1, 0.9)  # a fresh process: the buffers come from its state
    second.load_state_bytes(first.state_bytes())
    for model, optimizer in ((ours, second), (theirs, reference)):
        model(x).sum().backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    second.load_state_bytes(b"")
    assert second.state == {}
    with pytest.raises(ValueError, match="buffer 0"):
        DeviceSGD(nn.Linear(2, 2).parameters(), 0.1, 0.9).load_state_bytes(first.state_bytes())


def test_device_backward_is_the_vector_jacobian_product_bit_for_bit():
    from fedsplitkd.protocol.runtime import DeviceRuntime
    from fedsplitkd.models.splitmodel import SplitModel

    torch.manual_seed(0)
    student = SplitModel([("conv", nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())), ("flat", nn.Flatten()),
                          ("head", nn.Linear(4 * 6 * 6, 2))], (1, 8, 8))
    runtime = DeviceRuntime(student, "conv", 0.1, 0.0)
    reference = copy.deepcopy(runtime.part)
    x, g = torch.randn(3, 1, 8, 8), torch.randn(3, 4, 6, 6)
    runtime.backward([x.numpy()], [g.numpy()])
    expected = torch.autograd.grad(reference(x), list(reference.parameters()), grad_outputs=g)
    for p, before, grad in zip(runtime.part.parameters(), reference.parameters(), expected):
        assert torch.equal(p, before.detach().add(grad, alpha=-0.1))


def test_a_device_step_does_not_import_torch_dynamo():
    script = ("import sys, torch; from fedsplitkd.protocol.sgd import DeviceSGD; m = torch.nn.Linear(3, 2); "
              "o = DeviceSGD(m.parameters(), 0.1, 0.9); m(torch.ones(1, 3)).sum().backward(); o.step(); "
              "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
