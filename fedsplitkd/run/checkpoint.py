"""Checkpoints of a split run: all a run needs to go on as if it had never stopped.

Every ``checkpoint-every`` rounds the server writes ``checkpoint.pt`` into the run
directory: the student (device and server parts are one state dict), the teacher's
reference (where it came from and a digest of its weights), the server-part optimizers of
every cut in use, the clusters, cuts and samples of the scheduler, the device profiles,
the virtual clock, the random generators, the round and the metrics rows so far. Setting
``resume`` to that directory continues the run: rounds after the checkpoint run again.

Devices keep nothing across Flower runs, so a resumed run sends each device the teacher's
embedding module again (that round's ``bytes_down`` is larger); the training is the same.
Written atomically (a temporary file, then a rename): a kill mid-write keeps the last one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from fedsplitkd.config import ConfigError
from fedsplitkd.fleet.profiles import DeviceProfile
from fedsplitkd.fleet.schedule import Clusters

FILE = "checkpoint.pt"
VERSION = 1
# Keys a resumed run may change: how long it runs and where it writes, not what it computes.
FREE_KEYS = {"num-rounds", "resume", "checkpoint-every", "round-timeout", "output-dir", "run-name",
             "device-threads", "teacher-cache-dir"}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the run config."""


def teacher_digest(teacher: torch.nn.Module | None) -> str:
    if teacher is None:
        return ""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def capture(exp, server_round: int, rngs: dict[str, np.random.Generator], rows: list[dict]) -> dict:
    """The run's state after ``server_round`` (``exp`` is an ``experiment.Experiment``)."""
    scheduler, costs = exp.scheduler, exp.server.costs
    clusters = scheduler.clusters
    return {
        "version": VERSION,
        "round": server_round,
        "config": dict(exp.cfg),
        "student": exp.student.state_dict(),
        "teacher": {"path": exp.cfg.model.teacher_path, "sha256": teacher_digest(exp.teacher)},
        "server_optimizers": {cut: s.edge.optimizer.state_dict() for cut, s in exp.server.siblings.items()},
        "server_projectors": {cut: s.edge.projector.state_dict() for cut, s in exp.server.siblings.items()
                              if s.edge.projector is not None},  # kd-feature-weight's map, the server's own
        "scheduler": {
            "clusters": None if clusters is None else {
                "labels": {int(d): int(c) for d, c in clusters.labels.items()},
                "centres": clusters.centres.tolist(), "features": list(clusters.features)},
            "cuts": dict(scheduler.cuts), "samples": {int(d): int(n) for d, n in scheduler.samples.items()},
            "history": scheduler.history, "queues": {int(d): float(q) for d, q in scheduler.queues.items()}},
        "profiles": {int(d): dataclasses.asdict(p) for d, p in costs.profiles._sampled.items()},
        "clock": {"sim_time_s": costs.sim_time_s, "energy_j": costs.energy_j,
                  "over_memory": sorted(costs.over_memory)},
        "rng": {"torch": torch.get_rng_state(), **{name: g.bit_generator.state for name, g in rngs.items()}},
        "rows": rows,
    }


def save(directory: Path, state: dict) -> Path:
    path = Path(directory) / FILE
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load(directory: str | Path) -> dict:
    path = Path(directory).expanduser() / FILE
    if not path.is_file():
        raise CheckpointError(f"resume: no {FILE} in '{path.parent}' (was checkpoint-every set?)")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise CheckpointError(f"resume: cannot read '{path}': {str(err).splitlines()[0]}") from err
    if state.get("version") != VERSION:
        raise CheckpointError(f"resume: '{path}' is checkpoint version {state.get('version')}, "
                              f"this fedsplitkd reads {VERSION}")
    return state


def check_config(state: dict, cfg) -> None:
    """The resumed run must compute what the checkpointed one did."""
    for key, value in state["config"].items():
        if key not in FREE_KEYS and cfg.get(key) != value:
            raise ConfigError(f"run-config '{key}' = {cfg.get(key)!r}, but the checkpoint in "
                              f"'{cfg.faults.resume}' was made with {value!r}")
    if cfg.train.lr_schedule != "constant" and cfg.train.num_rounds != state["config"]["num-rounds"]:
        raise ConfigError(f"run-config 'num-rounds' = {cfg.train.num_rounds}: lr-schedule "
                          f"{cfg.train.lr_schedule!r} decays over the checkpointed run's "
                          f"{state['config']['num-rounds']} rounds; keep that number")
    if cfg.train.num_rounds <= state["round"]:
        raise ConfigError(f"run-config 'num-rounds' = {cfg.train.num_rounds}: the checkpoint is at round "
                          f"{state['round']} already")


def restore(exp, state: dict, rngs: dict[str, np.random.Generator]) -> list[dict]:
    """Put the checkpointed state into a freshly built experiment; returns the metrics rows."""
    check_config(state, exp.cfg)
    if state["teacher"]["sha256"] != teacher_digest(exp.teacher):
        raise CheckpointError("resume: the teacher differs from the checkpoint's (sha256 "
                              f"{state['teacher']['sha256'][:12]}…): same teacher-path and teacher cache?")
    exp.student.load_state_dict(state["student"])
    for cut, optimizer in state["server_optimizers"].items():
        exp.server.at_cut(cut).edge.optimizer.load_state_dict(optimizer)
    for cut, projector in state.get("server_projectors", {}).items():
        exp.server.at_cut(cut).edge.projector.load_state_dict(projector)
    scheduler, saved = exp.scheduler, state["scheduler"]
    if saved["clusters"] is not None:
        c = saved["clusters"]
        scheduler.clusters = Clusters(c["labels"], np.array(c["centres"]), c["features"])
    scheduler.cuts, scheduler.samples, scheduler.history = saved["cuts"], saved["samples"], saved["history"]
    scheduler.queues.clear()  # in place: the cost model reads the same queues
    scheduler.queues.update(saved.get("queues", {}))  # absent in checkpoints written before the queues
    costs = exp.server.costs
    profiles = {d: DeviceProfile(**p) for d, p in state["profiles"].items()}
    changed = [d for d, p in profiles.items() if p != costs.profiles[d]]
    if changed:
        raise CheckpointError(f"resume: device {changed[0]}'s profile differs from the checkpoint's "
                              "(device-classes or profile-file changed?)")
    costs.profiles._sampled.update(profiles)
    costs.sim_time_s, costs.energy_j = state["clock"]["sim_time_s"], state["clock"]["energy_j"]
    costs.over_memory = set(state["clock"].get("over_memory", []))  # absent from checkpoints before it
    torch.set_rng_state(state["rng"]["torch"])
    for name, generator in rngs.items():
        generator.bit_generator.state = state["rng"][name]
    return state["rows"]


def resume(exp, rngs: dict[str, np.random.Generator]) -> list[dict]:
    """The metrics rows of the checkpoint ``resume`` names, its state put into ``exp``; [] if fresh."""
    return restore(exp, load(exp.cfg.faults.resume), rngs) if exp.cfg.faults.resume else []


def due(cfg, server_round: int) -> bool:
    """Whether round ``server_round`` ends with a checkpoint (every ``checkpoint-every`` rounds, and the last)."""
    every = cfg.faults.checkpoint_every
    return bool(every) and (server_round % every == 0 or server_round == cfg.train.num_rounds)


def maybe_save(exp, server_round: int, rngs: dict[str, np.random.Generator], rows: list[dict],
               directory: Path | None) -> None:
    if directory is not None and due(exp.cfg, server_round):
        save(directory, capture(exp, server_round, rngs, rows))
