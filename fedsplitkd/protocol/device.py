"""The device side of the split-KD protocol, as functions of (request, state) -> (reply, state).

A round on a device is a chain of requests from the edge server:

1. ``weights/*`` (the global device part): start the round, reply the first chunk's
   activations (``exchange-batches`` minibatches).
2. ``grads``: apply the cut-layer gradients of the chunk in flight, then reply the next
   chunk, or, when the request says ``final``, the trained device part.

Nothing survives between requests but ``state`` (Flower keeps it in ``context.state``),
so any process can serve any request; the batch order is recomputed from the seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from fedsplitkd.data import datasets as data_lib
from torch import nn

from fedsplitkd.models.zoo import SplitModel, student_for, teacher_for
from fedsplitkd.protocol.payload import TEACHER, WEIGHTS, Payload, PayloadError, pack, unpack
from fedsplitkd.protocol.runtime import DeviceRuntime, load_numpy_state, round_lr, set_lr, state_to_numpy
from fedsplitkd import streams
from fedsplitkd.config import RunConfig

# A training request names its kind: ``forward`` starts the round from the global device part,
# ``backward`` carries a chunk's cut-layer gradients.
FORWARD_KIND, BACKWARD_KIND = "forward", "backward"


class DeviceDropout(RuntimeError):
    """An injected failure (``dropout-rate``): the device goes away at ``dropout-stage``."""


def check_dropout(cfg, server_round: int, device_key: int, stage: str) -> None:
    """Fail, at ``stage`` of ``server_round``, the devices ``dropout-rate`` picks.

    The pick is a pure function of (seed, round, device), so the in-process and the Flower
    run lose the same devices, and a stage sees the same losses whatever the other settings.
    """
    rate = cfg.faults.dropout_rate
    if rate and cfg.faults.dropout_stage == stage and \
            streams.dropout(cfg.train.seed, server_round, device_key).random() < rate:
        raise DeviceDropout(f"device {device_key} dropped out at stage '{stage}' of round {server_round}")


def batch_plan(num_samples: int, batch_size: int, epochs: int, seed: int, server_round: int,
               device_key: int) -> list[np.ndarray]:
    """The round's minibatches of local sample indices, reproducible from the seed."""
    rng = streams.batches(seed, server_round, device_key)
    plan = []
    for _ in range(epochs):
        order = rng.permutation(num_samples)
        plan += [order[i:i + batch_size] for i in range(0, num_samples, batch_size)]
    return plan


@dataclass
class DeviceSetup:
    """A device in this process: its data, and the models and runtimes it shares with the others."""

    cfg: RunConfig
    device_key: int
    data: data_lib.DeviceData
    student: SplitModel
    embedding: nn.Module | None
    runtimes: dict = field(default_factory=dict)  # cut -> DeviceRuntime
    gkt: nn.Module | None = None                  # FedGKT's own extractor + head
    gkt_initial: dict | None = None

    def runtime(self, cut: str | None = None) -> DeviceRuntime:
        """The runtime for a cut (the server may move the cut between rounds)."""
        cut = cut or self.cfg.split.cut
        if cut not in self.runtimes:
            self.runtimes[cut] = DeviceRuntime(self.student, cut, self.cfg.train.learning_rate,
                                               self.cfg.train.momentum, self.embedding, self.cfg.train.grad_clip)
        return self.runtimes[cut]


@functools.lru_cache(maxsize=4)
def _models(cfg: RunConfig, shape=None) -> tuple[SplitModel, nn.Module | None, dict]:
    """The student, the teacher's embedding module and the runtimes, once per process: every
    device has the same architecture, and every request loads its weights (and optimizer
    state) before use, so the devices a process serves share them. Building the teacher per
    device cost most of a simulated split message. ``shape``: a device's own file's
    (``own_data.ModelShape``); None reads it from the run config's dataset."""
    dataset = shape if shape is not None else data_lib.load_dataset(cfg)
    embedding = None
    if cfg.split.teacher_mode != "none":
        teacher = teacher_for(cfg, dataset)
        embedding = teacher.device_part(cfg.split.teacher_cut)
    return student_for(cfg, dataset), embedding, {}


def _device(cfg: RunConfig, device_key: int, local: data_lib.DeviceData, shape=None) -> DeviceSetup:
    """The config app's device, as ``fedsplitkd.library.SplitDevice`` builds a library user's: the
    zoo's student, the device's arrays, the zoo teacher's embedding part, the run config. Built
    here, not through the library: the protocol must not import its own façade (a circle)."""
    student, embedding, runtimes = _models(cfg, shape)
    return DeviceSetup(cfg, device_key, local, student, embedding if cfg.split.uses_teacher else None, runtimes)


@functools.lru_cache(maxsize=256)
def _setup(cfg: RunConfig, partition_id: int, num_partitions: int, cache_dir: str | None) -> DeviceSetup:
    if cache_dir:  # a fresh process per message: the prepared data, without partitioning the dataset
        from fedsplitkd.data import prepared

        local, shape = prepared.device_data(cfg, partition_id, num_partitions, cache_dir)
        return _device(cfg, partition_id, local, shape)
    return _device(cfg, partition_id, data_lib.device_data(cfg, partition_id, num_partitions))


def device_setup(cfg, partition_id: int, num_partitions: int, cache_dir: str | None = None) -> DeviceSetup:
    """Device ``partition_id`` of ``num_partitions`` in this process. ``cache_dir``: keep its
    prepared data there (``fedsplitkd.data.prepared``); the same data, without the partitioning."""
    return _setup(cfg, partition_id, num_partitions,
                  str(cache_dir) if cache_dir else None)


def own_device_setup(cfg, node_config, partition_id: int) -> DeviceSetup:
    """A device holding only its own data: the file its node config's ``data-path`` names."""
    from fedsplitkd.data.own_data import device_file

    local, shape = device_file(node_config, cfg, partition_id)
    return _device(cfg, partition_id, local, shape)


def handle_train(request: Payload, state: Payload, setup: DeviceSetup) -> tuple[Payload, Payload]:
    """Serve one training request; return the reply and the device's new state."""
    cfg, local = setup.cfg, setup.data
    server_round = int(request.get("round", -1))
    stage = request.get("kind")
    if stage not in (FORWARD_KIND, BACKWARD_KIND):
        raise PayloadError(f"field 'kind' = {stage!r}: a training request is {FORWARD_KIND!r} or {BACKWARD_KIND!r}")
    check_dropout(cfg, server_round, setup.device_key, stage)
    if stage == FORWARD_KIND:
        if not any(k.startswith(WEIGHTS) for k in request):
            raise PayloadError(f"a {FORWARD_KIND!r} request for round {server_round} carries no weights")
        state = {k: v for k, v in state.items() if k.startswith(TEACHER) or k == "teacher-sent"}
        state.update({k: v for k, v in request.items() if k.startswith((WEIGHTS, TEACHER))})
        cut = str(request.get("cut", cfg.split.cut))
        if cut != "default" and cut not in setup.student.cut_points:
            raise PayloadError(f"field 'cut' = {cut!r} is not a cut point: {setup.student.cut_points}")
        state.update({"round": server_round, "cursor": 0, "optimizer": b"", "cut": cut})
    elif state.get("round") != server_round or "grads" not in request:
        raise PayloadError(f"a {BACKWARD_KIND!r} request for round {server_round} needs field 'grads' and a "
                           f"device in that round; the device is in round {state.get('round')}")
    runtime = setup.runtime(state["cut"])
    runtime.load(unpack(WEIGHTS, state), state["optimizer"])
    set_lr(runtime.optimizer, round_lr(cfg, server_round))
    plan = batch_plan(len(local.y_train), cfg.train.batch_size, cfg.train.local_epochs, cfg.train.seed,
                      server_round, setup.device_key)
    mode = cfg.split.teacher_mode
    if mode == "cached" and "teacher-sent" not in state:
        state["teacher-sent"] = np.zeros(len(local.y_train), dtype=bool)

    if stage == BACKWARD_KIND:
        start, stop = state["cursor"] - state["in-flight"], state["cursor"]
        # The server names the batch its gradients start at: a device whose state is not the
        # one they were computed for (a lost update) refuses them, even when the rows match.
        if request.get("cursor") != start:
            raise PayloadError(f"field 'cursor' = {request.get('cursor')!r}, but the chunk in flight "
                               f"starts at batch {start}: these gradients are not for it")
        batches = plan[start:stop]
        sizes = [len(b) for b in batches]
        grads = np.asarray(request["grads"], dtype=np.float32)
        if grads.shape[0] != sum(sizes):
            raise PayloadError(f"field 'grads' has {grads.shape[0]} rows for {sum(sizes)} samples")
        runtime.backward([local.x_train[b] for b in batches], np.split(grads, np.cumsum(sizes)[:-1]))
        if mode == "cached":  # the gradients acknowledge the teacher inputs of that chunk
            state["teacher-sent"][np.concatenate(batches)] = True

    if request.get("final", False):
        weights = state_to_numpy(runtime.part)  # the optimizer's state ends with the round
        examples = sum(len(b) for b in plan)
        state = {k: v for k, v in state.items() if k.startswith(TEACHER) or k == "teacher-sent"}
        return {"round": server_round, "num-examples": examples, **pack(WEIGHTS, weights)}, state

    cursor = state["cursor"]
    chunk = plan[cursor:cursor + cfg.split.exchange_batches]
    ids = np.concatenate(chunk)
    x = local.x_train[ids]
    reply: Payload = {
        "round": server_round,
        "activations": runtime.forward(x),
        "labels": local.y_train[ids],
        "batch-sizes": np.array([len(b) for b in chunk], dtype=np.int64),
        "remaining": len(plan) - cursor - len(chunk),
    }
    if mode != "none":
        load_numpy_state(runtime.teacher_embedding, unpack(TEACHER, state))
    if mode == "embedding":
        reply["teacher-input"] = runtime.teacher_input(x)
    elif mode == "cached":
        new = ids[~state["teacher-sent"][ids]]
        reply.update({"sample-ids": ids.astype(np.int64), "teacher-ids": new.astype(np.int64),
                      "teacher-input": runtime.teacher_input(local.x_train[new])})
    weights, optimizer_state = runtime.save()
    state.update(pack(WEIGHTS, weights))
    state.update({"optimizer": optimizer_state, "cursor": cursor + len(chunk), "in-flight": len(chunk)})
    return reply, state


def handle_evaluate(request: Payload, setup: DeviceSetup) -> Payload:
    """Split inference on the local validation split with the given device part."""
    check_dropout(setup.cfg, int(request.get("round", -1)), setup.device_key, "evaluate")
    runtime, local = setup.runtime(request.get("cut")), setup.data
    load_numpy_state(runtime.part, unpack(WEIGHTS, request))
    return {"round": int(request.get("round", -1)),
            "activations": runtime.forward(local.x_val), "labels": local.y_val}
