"""The split-KD training loop: every round of every run, in process or over Flower, is this loop.

A round, for the devices sampled from the fleet:

1. the server sends each device the global device part (and, once, the teacher's embedding);
2. each device runs its lower part to the cut and uploads a chunk of activations, labels and
   teacher inputs (``device.handle_train``, kind ``forward``);
3. the server runs the upper part and the teacher, takes a step on the KD + CE loss and returns
   the cut-layer gradients (``SplitKDServer.train_chunks``);
4. each device backpropagates them through its lower part (kind ``backward``) and uploads its
   next chunk, until its round's batches are done and it returns its trained device part;
5. the server averages the device parts, weighted by the samples each trained on
   (``SplitKDServer.aggregate``).

Steps 1-5 are ``SplitKDServer.run_round``, run per cluster at its cut by the ``Scheduler``.
Then, when ``fraction_evaluate`` > 0, a sample of devices evaluates the student on its own
validation split, and ``on_round`` sees the round's results (the caller evaluates, records,
checkpoints), before the next round starts or, where the caller allows it, while the next
round's first requests are out (the devices compute as the server evaluates). What differs
between transports is only the ``Fleet``: which devices exist and how requests reach them
(``InProcessFleet`` here; ``fedsplitkd.strategies.transport.GridFleet`` over a Flower Grid).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedsplitkd.fleet.schedule import Scheduler
from fedsplitkd.protocol.device import DeviceSetup, handle_evaluate, handle_train
from fedsplitkd.protocol.payload import WEIGHTS, Payload, pack
from fedsplitkd.protocol.runtime import state_to_numpy
from fedsplitkd.protocol.server import RoundStats, Transport, exchange


def sample_devices(keys: list[Hashable], fraction: float, rng: np.random.Generator) -> list[Hashable]:
    """A round's devices: ``fraction`` of ``keys`` (at least one), in key order."""
    count = max(1, int(round(fraction * len(keys))))
    return [keys[i] for i in sorted(rng.choice(len(keys), size=count, replace=False))]


@dataclass
class Evaluation:
    """Split evaluation of the student on the sampled devices' validation splits."""

    accuracy: float
    loss: float
    samples: int
    dropped: int


class Fleet(Protocol):
    """The devices a run trains, and how requests reach them."""

    @property
    def size(self) -> int:
        """How many devices there are (the scheduler sizes its cost guesses by it)."""

    def sample(self, fraction: float, rng: np.random.Generator) -> list[Hashable]:
        """The devices of the next training or evaluation exchange."""

    def transport(self, devices: list[Hashable], evaluate: bool = False) -> Transport:
        """Carries training (or, with ``evaluate``, split-evaluation) requests to ``devices``."""


def evaluate_round(scheduler: Scheduler, fleet: Fleet, fraction: float, rng: np.random.Generator,
                   server_round: int) -> Evaluation:
    """Split inference on the devices' validation data, with the current student."""
    server = scheduler.server
    request = {"round": server_round, **pack(WEIGHTS, state_to_numpy(server.device_part))}
    devices = fleet.sample(fraction, rng)
    replies = exchange(fleet.transport(devices, evaluate=True), {d: request for d in devices})
    return Evaluation(*server.evaluate_replies(replies, server_round))


def train(scheduler: Scheduler, fleet: Fleet, rounds: Iterable[int], rngs: dict[str, np.random.Generator],
          fraction_train: float, fraction_evaluate: float,
          on_round: Callable[[int, RoundStats, Evaluation | None], None],
          overlap: Callable[[int], bool] = lambda server_round: False) -> None:
    """Run ``rounds`` of split-KD over ``fleet``; ``rngs`` holds the 'train' and 'evaluate' sampling streams.

    ``on_round(r, ...)`` runs before round r+1 starts, or, where ``overlap(r)`` holds, once
    round r+1's first requests are out: the caller's evaluation and recording then run while
    the devices compute instead of before they start. The student is the same either way
    (the server changes it only on the devices' replies), but the scheduler has planned round
    r+1 and the sampling streams have moved on: a round whose state ``on_round`` captures (a
    checkpoint) must not overlap.
    """
    pending: Callable[[], None] | None = None  # the last round's on_round, not yet run

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            record, pending = pending, None
            record()

    for server_round in rounds:
        devices = fleet.sample(fraction_train, rngs["train"])
        scheduler.fleet_size = fleet.size
        transport = fleet.transport(devices)
        if pending is not None:
            transport = _AfterFirstSend(transport, flush)
        try:
            stats = scheduler.run_round(transport, devices, server_round)
        finally:
            flush()  # a round that sent nothing, or failed, still records the one before
        evaluation = None
        if fraction_evaluate > 0.0:
            evaluation = evaluate_round(scheduler, fleet, fraction_evaluate, rngs["evaluate"], server_round)
        pending = functools.partial(on_round, server_round, stats, evaluation)
        if not overlap(server_round):
            flush()
    flush()


class _AfterFirstSend:
    """A transport that calls ``then`` once its first requests are sent."""

    def __init__(self, transport: Transport, then: Callable[[], None]):
        self.transport, self.then = transport, then

    def send(self, requests: dict[Hashable, Payload]) -> None:
        self.transport.send(requests)
        self.then()

    def receive(self) -> dict[Hashable, Payload | str]:
        return self.transport.receive()

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


class InProcessTransport:
    """Calls the device handlers directly, keeping each device's state in a dict."""

    def __init__(self, setups: dict[Hashable, DeviceSetup], evaluate: bool = False,
                 states: dict[Hashable, Payload] | None = None):
        self.setups, self.evaluate = setups, evaluate
        self.states: dict[Hashable, Payload] = states if states is not None else {key: {} for key in setups}
        self.replies: dict[Hashable, Payload | str] = {}

    def send(self, requests: dict[Hashable, Payload]) -> None:
        for key, request in requests.items():
            try:
                if self.evaluate:
                    self.replies[key] = handle_evaluate(request, self.setups[key])
                else:
                    self.replies[key], self.states[key] = handle_train(request, self.states[key], self.setups[key])
            except Exception as err:  # a failing device must not stop the round
                self.replies[key] = f"{type(err).__name__}: {err}"

    def receive(self) -> dict[Hashable, Payload | str]:
        replies, self.replies = self.replies, {}
        return replies


class InProcessFleet:
    """Devices in this process, keyed 0..N-1; their states live as long as the fleet."""

    def __init__(self, setups: dict[Hashable, DeviceSetup]):
        self.setups = setups
        self.states: dict[Hashable, Payload] = {key: {} for key in setups}

    @property
    def size(self) -> int:
        return len(self.setups)

    def sample(self, fraction: float, rng: np.random.Generator) -> list[Hashable]:
        return sample_devices(list(self.setups), fraction, rng)

    def transport(self, devices: list[Hashable], evaluate: bool = False) -> InProcessTransport:
        return InProcessTransport(self.setups, evaluate, self.states)
