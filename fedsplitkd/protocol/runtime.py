"""Device and edge runtimes of split knowledge distillation (plain PyTorch).

The device runs the student's lower part (and, in ``embedding`` mode, the teacher's
frozen embedding module); the edge server runs the student's upper part and the frozen
teacher, computes the KD loss, steps its optimizer and returns the cut-layer gradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from fedsplitkd.protocol.kd import feature_distance, kd_loss
from fedsplitkd.models.zoo import SplitModel
from fedsplitkd.protocol import teacher_memo
from fedsplitkd.protocol.sgd import DeviceSGD


class NonFiniteLoss(FloatingPointError):
    """A step's loss or gradients are not finite; ``indices`` names the culprit minibatches,
    or is None when the gradients of several minibatches overflowed together."""

    def __init__(self, indices: list[int] | None):
        super().__init__(f"non-finite loss or gradients from minibatches {indices}")
        self.indices = indices


def torch_device(name: str) -> torch.device:
    """The server's torch device for run-config 'torch-device' ('cpu', 'cuda' or 'auto')."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run-config 'torch-device' = 'cuda': torch sees no CUDA device here")
        # TF32 tensor cores for float32 matmuls: several times the throughput, ~1e-3 relative error.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif name != "cpu":
        raise ValueError(f"run-config 'torch-device' = {name!r}: must be 'cpu', 'cuda' or 'auto'")
    return torch.device(name)


def torch_device_of(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters live (CPU for a module without any)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def per_sample(losses: torch.Tensor) -> torch.Tensor:
    """One loss per sample: a sequence's per-token losses (N, T) averaged over its tokens."""
    return losses.reshape(len(losses), -1).mean(1)


OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]  # a user's server-part optimizer


def make_optimizer(params, lr: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


def round_lr(cfg, server_round: int) -> float:
    """The learning rate of a round: ``learning-rate``, or under ``lr-schedule = cosine``
    decayed over the run's rounds (round 1 at the full rate) so the last rounds settle."""
    lr = cfg.train.learning_rate
    if cfg.train.lr_schedule == "cosine":
        lr *= 0.5 * (1.0 + math.cos(math.pi * (max(server_round, 1) - 1) / cfg.train.num_rounds))
    return lr


def set_lr(optimizer: torch.optim.Optimizer | DeviceSGD, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def state_to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_numpy_state(module: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})


def clip(params, max_norm: float) -> None:
    """Scale a step's gradient down to L2 norm ``max_norm`` (``grad-clip``; 0 = never). KD towards a
    teacher whose logits reach +-30 can take steps that kill a small student's ReLUs in one go;
    a bounded step cannot, and a step already within the bound is left exactly as it was."""
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm, foreach=True)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def last_linear(model: nn.Module, what: str) -> nn.Linear:
    """``model``'s last ``nn.Linear`` (its classifier): feature distillation matches its input."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"kd-feature-weight: the {what} has no nn.Linear whose input (its features) to distil")
    return linears[-1]


@contextlib.contextmanager
def features_of(linear: nn.Linear | None) -> Iterator[list[torch.Tensor]]:
    """Within: every forward pass through ``linear`` appends its input, averaged over any positions,
    to the list yielded. The hook lives only meanwhile, so a saved or copied model carries none."""
    kept: list[torch.Tensor] = []
    if linear is None:
        yield kept
        return
    handle = linear.register_forward_pre_hook(
        lambda _, args: kept.append(args[0].reshape(len(args[0]), -1, args[0].shape[-1]).mean(1)))
    try:
        yield kept
    finally:
        handle.remove()


def projector(width_in: int, width_out: int) -> nn.Linear:
    """The feature term's map from the student's features to the teacher's width, drawn from its own
    generator: turning the term on leaves every other random draw of the run as it was."""
    layer = torch.nn.utils.skip_init(nn.Linear, width_in, width_out)
    generator = torch.Generator().manual_seed(0)
    bound = 1.0 / math.sqrt(width_in)  # nn.Linear's own initial range
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


class DeviceRuntime:
    """The device's student part and optimizer; weights load from and save to plain arrays."""

    def __init__(self, student: SplitModel, cut: str, lr: float, momentum: float,
                 teacher_embedding: nn.Module | None = None, grad_clip: float = 0.0):
        self.part = student.device_part(cut)
        self.grad_clip = grad_clip
        self.teacher_embedding = freeze(teacher_embedding) if teacher_embedding is not None else None
        self.optimizer = DeviceSGD(self.part.parameters(), lr, momentum)  # no torch.optim import per message

    def load(self, weights: dict[str, np.ndarray], optimizer_state: bytes = b"") -> None:
        load_numpy_state(self.part, weights)
        self.optimizer.load_state_bytes(optimizer_state)

    def save(self) -> tuple[dict[str, np.ndarray], bytes]:
        return state_to_numpy(self.part), self.optimizer.state_bytes()

    @torch.no_grad()
    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.part(torch.from_numpy(x)).numpy()

    @torch.no_grad()
    def teacher_input(self, x: np.ndarray) -> np.ndarray:
        assert self.teacher_embedding is not None
        return self.teacher_embedding(torch.from_numpy(x)).numpy()

    def backward(self, batches: list[np.ndarray], grads: list[np.ndarray]) -> None:
        """Apply the cut-layer gradients of ``batches``, one optimizer step per batch.

        All gradients are taken at the weights that produced the activations (the
        weights now held), then applied in order: with several batches per exchange,
        step j uses a gradient j-1 steps stale, as in delayed SGD. With one batch per
        exchange this is exact split learning.
        """
        params = [p for p in self.part.parameters()]
        per_batch = []
        for x, g in zip(batches, grads):
            out = self.part(torch.from_numpy(x))
            # The vector-Jacobian product as the gradient of <out, g>: the same floats reach
            # ``out`` (1 * g), and no ``grad_outputs`` tensor, whose check imports sympy (0.7 s
            # of a fresh device process).
            per_batch.append(torch.autograd.grad((out * torch.from_numpy(g)).sum(), params))
        for step_grads in per_batch:
            for p, g in zip(params, step_grads):
                p.grad = g
            clip(params, self.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class EdgeRuntime:
    """The edge server: student upper part + teacher, KD loss, cut-layer gradients.

    The teacher is frozen, or with ``mutual`` (deep mutual learning, Zhang et al. 2018)
    trained each step towards the labels and the student's softened predictions by the same
    loss with the roles swapped; its embedding on the devices stays frozen either way.

    With ``feature_weight`` β > 0 (a frozen teacher) each sample's loss gains
    ``β · feature_distance(P s, t)``: s and t the inputs of the student's and the teacher's
    last ``nn.Linear``, P a linear map trained with the server part (FitNets' regressor,
    Romero et al. 2015, at the classifier). P stays on the server; the device parts learn the
    term through the cut-layer gradient.
    """

    def __init__(self, student: SplitModel, cut: str, teacher: SplitModel | None,
                 alpha: float, temperature: float, lr: float, momentum: float, mutual: bool = False,
                 optimizer: OptimizerFactory | None = None, precision: str = "fp32", compiled: bool = False,
                 grad_clip: float = 0.0, teacher_cut: str = "default", feature_weight: float = 0.0):
        self.part = student.server_part(cut)
        self.grad_clip = grad_clip
        rest = teacher.server_part(teacher_cut) if teacher else None
        self.mutual = mutual and rest is not None
        self.teacher_rest = rest if self.mutual or rest is None else freeze(rest)
        self.alpha, self.temperature = alpha, temperature
        self.torch_dev = torch_device_of(self.part)  # the server's torch device; payloads stay numpy
        self.feature_weight = feature_weight if rest is not None else 0.0
        if self.feature_weight and self.mutual:
            raise ValueError("kd-feature-weight: feature distillation needs a frozen teacher, not kd-mode mutual")
        # the modules whose inputs the feature term reads, and P (None: no feature term)
        self.student_linear = last_linear(self.part, "student's server part") if self.feature_weight else None
        self.teacher_linear = last_linear(rest, "teacher") if self.feature_weight else None
        self.projector = projector(self.student_linear.in_features, self.teacher_linear.in_features).to(
            self.torch_dev) if self.feature_weight else None
        self.trained = list(self.part.parameters()) + (list(self.projector.parameters()) if self.projector else [])
        # precision bf16: the forward passes run under autocast; the weights, the optimizer,
        # the loss and everything sent to the devices stay float32
        self.precision = precision
        # compiled: torch.compile wraps the same modules (their parameters, not copies), so
        # loading weights into self.part reaches the compiled forward too
        # (not with the feature term: its hooks come and go every step, each a recompilation)
        compiled = compiled and not self.feature_weight
        self.forward = torch.compile(self.part) if compiled else self.part
        self.teacher_forward = torch.compile(rest) if compiled and rest is not None else self.teacher_rest
        build = optimizer or (lambda params: make_optimizer(params, lr, momentum))
        self.optimizer = build(self.trained)
        self.teacher_optimizer = build(rest.parameters()) if self.mutual else None

    def set_lr(self, lr: float) -> None:
        for optimizer in (self.optimizer, self.teacher_optimizer):
            if optimizer is not None:
                set_lr(optimizer, lr)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.torch_dev.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @torch.no_grad()
    def teacher_logits(self, teacher_input: np.ndarray) -> np.ndarray:
        """The frozen teacher's logits for its inputs, one row a sample; with the feature term
        each row goes on with the teacher's features (``train_step`` splits them off)."""
        assert self.teacher_rest is not None

        def compute(rows: np.ndarray) -> np.ndarray:
            with self.autocast(), features_of(self.teacher_linear) as features:
                logits = self.teacher_forward(torch.from_numpy(rows).to(self.torch_dev)).float()
            return torch.cat([logits, *(f.float() for f in features)], 1).cpu().numpy()

        variant = self.precision + ("+features" if self.feature_weight else "")
        return teacher_memo.outputs(self.teacher_rest, teacher_input, compute, variant)

    def train_step(self, activations: list[np.ndarray], labels: list[np.ndarray],
                   teacher_logits: list[np.ndarray | None]) -> tuple[list[np.ndarray], float]:
        """One server step on the devices' minibatches taken together.

        The server part sees the concatenated batch (mean loss over all its samples); each
        device gets the gradient of its own minibatch's mean loss, exactly what it would
        get training alone. A sample's loss is its mean over positions (sequence labels).
        With ``mutual`` the third argument holds the teacher's inputs, not its logits (they
        change every step), and the teacher steps too. Returns the per-device gradients and
        the summed per-sample loss.
        """
        sizes = [len(a) for a in activations]
        acts = self.joined(activations).requires_grad_(True)
        y = self.joined(labels)
        t = None if self.alpha == 0.0 and not self.feature_weight else self.joined(teacher_logits)
        if self.feature_weight:  # each row: the teacher's logits, then its features
            t, t_features = t[:, :-self.projector.out_features], t[:, -self.projector.out_features:]
        with self.autocast(), features_of(self.student_linear) as features:
            t_logits = self.teacher_forward(t).float() if self.mutual else None
            logits = self.forward(acts).float()
        if self.mutual:
            t = t_logits.detach()
        losses = per_sample(kd_loss(logits, t, y, self.alpha, self.temperature, reduction="none"))
        if self.feature_weight:
            losses = losses + self.feature_weight * feature_distance(self.projector(features[-1].float()), t_features)
        finite = torch.isfinite(losses.detach())
        if not finite.all():  # no step: the caller drops these devices and retries without them
            raise NonFiniteLoss([i for i, ok in enumerate(torch.split(finite, sizes)) if not ok.all()])
        loss = losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # one check, one host sync (a sync per tensor stalls an accelerator's queue)
        checks = [torch.isfinite(acts.grad).all()] + [
            torch.isfinite(p.grad).all() for p in self.trained if p.grad is not None]
        if not torch.stack(checks).all():
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss([0] if len(sizes) == 1 else None)
        clip(self.trained, self.grad_clip)
        self.optimizer.step()
        if self.mutual:  # the teacher towards the labels and the student's softened predictions
            teacher_loss = kd_loss(t_logits, logits.detach(), y, self.alpha, self.temperature)
            if torch.isfinite(teacher_loss):
                self.teacher_optimizer.zero_grad(set_to_none=True)
                teacher_loss.backward()
                self.teacher_optimizer.step()
        # d(mean over all)/da_i = (n_i / n) * d(mean over device i)/da_i
        total = float(sum(sizes))
        grads = [(g * (total / n)).cpu().numpy() for g, n in zip(torch.split(acts.grad, sizes), sizes)]
        return grads, float(losses.detach().double().sum())

    def joined(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """The devices' arrays as one tensor on the server's torch device. On an accelerator
        each array goes over as it is and they are joined there: no copy of the whole joint
        batch in host memory, memory-bound CPU work that the accelerator would wait for."""
        if self.torch_dev.type == "cpu":
            return torch.from_numpy(np.concatenate(arrays))
        # a payload decoded from bytes is read-only, which torch.from_numpy does not take
        return torch.cat([torch.from_numpy(a if a.flags.writeable else a.copy()).to(self.torch_dev)
                          for a in arrays])


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode; afterwards each module gets back its own train/eval mode (a frozen
    teacher measured here stays in eval mode, a training student goes back to training)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


class Scores(NamedTuple):
    """One pass of a model over a labelled split."""

    accuracy: float
    loss: float  # mean cross-entropy, nats
    predicted: np.ndarray  # how many labels the model assigned to each class (the health check's input)


@torch.no_grad()
def scores(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> Scores:
    """Accuracy, mean cross-entropy (nats) and predicted-class counts of ``model`` on (x, y),
    per label: per token when y holds a label per position (loss / ln 2 is then bits per character)."""
    torch_dev = torch_device_of(model)
    correct, loss, predicted = 0, 0.0, 0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            logits = model(torch.from_numpy(x[i:i + batch_size]).to(torch_dev))
            target = torch.from_numpy(y[i:i + batch_size]).to(torch_dev)
            loss += float(nn.functional.cross_entropy(logits.reshape(target.numel(), -1), target.reshape(-1),
                                                      reduction="sum"))
            guess = logits.argmax(-1)
            correct += int((guess == target).sum())
            predicted = predicted + np.bincount(guess.reshape(-1).cpu().numpy(), minlength=logits.shape[-1])
    return Scores(correct / max(1, y.size), loss / max(1, y.size), np.asarray(predicted))


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> tuple[float, float]:
    """Accuracy and mean cross-entropy (nats) of ``model`` on (x, y), as ``scores``."""
    accuracy, loss, _ = scores(model, x, y, batch_size)
    return accuracy, loss
