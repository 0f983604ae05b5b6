"""SGD with momentum for what devices train, without ``torch.optim``.

A real SuperNode starts a fresh ClientApp process for every message, and the first
``torch.optim`` optimizer a process builds imports ``torch._dynamo`` (``torch._disable_dynamo``
on ``Optimizer.add_param_group``): 1.6 s of a message that computes for milliseconds. This
is ``torch.optim.SGD``'s update as it runs on the CPU (``_single_tensor_sgd``: no weight
decay, dampening or Nesterov), the same floats bit for bit (``tests/test_sgd.py``), on any
torch device. The server, a long-lived process, keeps ``torch.optim``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import torch


class DeviceSGD:
    """``torch.optim.SGD(params, lr, momentum)``'s step, ``zero_grad`` and ``param_groups``;
    its momentum buffers round-trip through bytes (``state_bytes`` / ``load_state_bytes``)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0):
        self.params = list(params)
        self.param_groups = [{"params": self.params, "lr": lr, "momentum": momentum}]
        self.state: dict[int, torch.Tensor] = {}  # parameter index -> momentum buffer

    @torch.no_grad()
    def step(self) -> None:
        lr, momentum = self.param_groups[0]["lr"], self.param_groups[0]["momentum"]
        for i, param in enumerate(self.params):
            if param.grad is None:
                continue
            grad = param.grad
            if momentum != 0:
                buf = self.state.get(i)
                if buf is None:
                    buf = self.state[i] = grad.detach().clone()
                else:
                    buf.mul_(momentum).add_(grad, alpha=1)
                grad = buf
            param.add_(grad, alpha=-lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def state_bytes(self) -> bytes:
        """The momentum buffers as an .npz (empty before the first step)."""
        if not self.state:
            return b""
        buffer = io.BytesIO()
        np.savez(buffer, **{str(i): buf.detach().cpu().numpy() for i, buf in self.state.items()})
        return buffer.getvalue()

    def load_state_bytes(self, data: bytes) -> None:
        """Restore ``state_bytes``' buffers (``b""``: none, as before the first step)."""
        self.state.clear()
        if data:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                for name in arrays.files:
                    i = int(name)
                    if not 0 <= i < len(self.params) or arrays[name].shape != tuple(self.params[i].shape):
                        raise ValueError(f"optimizer state: buffer {name} {arrays[name].shape} fits no parameter")
                    self.state[i] = torch.from_numpy(arrays[name].copy()).to(self.params[i].device)
