"""Clustered collaborative training (CPSL) with an adaptive cut per cluster.

Devices are grouped by k-means on standardised profile features. Within a round the
clusters train one after another; inside a cluster the devices train in parallel. Each
cluster runs at its own cut and starts from the student the previous cluster left:
its averaged device parts replace the blocks below its cut, and the blocks above were
trained in place by the server. So one student comes out of clusters with different
cuts, and no layer is ever averaged across clusters (the rule for layers that some
clusters hold on the device and others on the server is: the latest cluster's wins).

The cut of a cluster minimises ``delay + energy-weight * energy`` of the cluster's
predicted round over the student's cut points, subject to every device's memory and
energy budget, from the cost model (``cut = 'adaptive'``). With ``energy-control =
lyapunov`` (ASL) the energy budget holds on average instead: each device keeps an
energy-deficit queue, and every round the cut minimises ``lyapunov-v * delay + sum(queue *
energy)`` (delay in units of the best cut's, joules in units of each device's budget).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable
from dataclasses import dataclass, replace

import numpy as np

from fedsplitkd.fleet.costs import CostModel, DeviceTraffic, device_cost, training_memory
from fedsplitkd.fleet.profiles import DeviceProfile, channel_gain, rate_bps
from fedsplitkd.protocol.runtime import load_numpy_state, state_to_numpy
from fedsplitkd.protocol.server import RoundStats, SplitKDServer, Transport, average, price_round

log = logging.getLogger("fedsplitkd")

FEATURES = {
    "compute": lambda p: p.flops,
    "link": lambda p: rate_bps(p.uplink_hz, p.tx_power_w, channel_gain(p.distance_m)),
    "energy": lambda p: min(p.energy_budget_j, 1e9),
    "memory": lambda p: p.memory_bytes,
}


@dataclass
class Clusters:
    labels: dict[Hashable, int]     # device -> cluster
    centres: np.ndarray             # (k, features), in the features' own units
    features: list[str]


def cluster_devices(profiles: dict[Hashable, DeviceProfile], features: list[str], k: int | str,
                    seed: int) -> Clusters:
    """k-means on standardised profile features; k = 'auto' picks k by silhouette score."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    devices = list(profiles)
    raw = np.array([[FEATURES[f](profiles[d]) for f in features] for d in devices], dtype=np.float64)
    scaler = StandardScaler().fit(raw)
    x = scaler.transform(raw)
    distinct = len(np.unique(x.round(9), axis=0))
    if k == "auto":
        candidates = range(2, min(8, distinct - 1) + 1)
        if not candidates:
            k = 1
        else:
            scored = [(silhouette_score(x, KMeans(c, n_init=10, random_state=seed).fit_predict(x)), c)
                      for c in candidates]
            k = max(scored)[1]
    k = max(1, min(int(k), distinct))
    model = KMeans(k, n_init=10, random_state=seed).fit(x)
    return Clusters(dict(zip(devices, model.labels_.tolist())),
                    scaler.inverse_transform(model.cluster_centers_), features)


def predicted_traffic(server: SplitKDServer, samples: int, teacher_samples: int | None = None) -> DeviceTraffic:
    """What a device with ``samples`` training samples (all local epochs) sends and receives
    in a round at this cut: per sample its activations, int64 labels (one per position for a
    sequence) and, for ``teacher_samples`` of them (default: all, with a teacher), the teacher
    input; per minibatch its size; once the device part each way."""
    act = int(np.prod(server.act_shape)) * 4
    emb = int(np.prod(server.emb_shape)) * 4 if server.mode != "none" else 0
    if teacher_samples is None:
        teacher_samples = samples if server.mode != "none" else 0
    labels = int(np.prod(server.label_shape, dtype=np.int64)) * 8
    epochs, batch_size = server.cfg.train.local_epochs, server.cfg.train.batch_size
    batches = epochs * -(-(samples // epochs) // batch_size)
    params = sum(p.numel() for p in server.device_part.parameters()) * 4
    return DeviceTraffic(bytes_up=samples * (act + labels) + teacher_samples * emb + 8 * batches + params,
                         bytes_down=samples * act + params, samples=samples, teacher_samples=teacher_samples)


def teacher_inputs(server: SplitKDServer, device: Hashable, samples: int) -> int:
    """How many teacher inputs a device will send in a round: all its samples, but none
    once the server caches them (``teacher-input = cached`` after the device's first round)."""
    if server.mode == "none" or (server.mode == "cached" and server.teacher_cache.get(device)):
        return 0
    return samples


def memory_needed(server: SplitKDServer, batch_size: int) -> int:
    """What a device's training at ``server``'s cut holds (``training_memory``, bytes)."""
    return training_memory(server.flops.device_params, server.flops.device_activations, batch_size)


def pick_cut(table: dict[str, tuple[float, float]], warn: bool = True) -> str:
    """From {cut: (score, violation)}: the lowest score among cuts that violate nothing, else
    the least violating cut (ties: the earlier cut; ``warn``: log that none fits)."""
    feasible = [(score, i, cut) for i, (cut, (score, violation)) in enumerate(table.items()) if violation == 0]
    if feasible:
        return min(feasible)[2]
    least = min((violation, i, cut) for i, (cut, (_, violation)) in enumerate(table.items()))[2]
    if warn:
        log.warning("no cut fits every device's memory and energy budget; taking the least violating, %s", least)
    return least


def cut_table(server: SplitKDServer, costs: CostModel, devices: list[Hashable],
              samples: dict[Hashable, int], energy_weight: float,
              queues: dict[Hashable, float] | None = None, v: float = 0.1) -> dict[str, tuple[float, float]]:
    """Per cut point: the cluster's predicted score and how far its devices' memory and energy
    budgets are exceeded (sum of relative excesses).

    The score is delay + energy_weight * energy. With ``queues`` (ASL's Lyapunov energy-deficit
    queues, joules per device) it is the drift-plus-penalty ``v * delay / best delay +
    sum((queue / budget) * (energy / budget))``, in units of the best cut's delay and of each
    device's budget, and a round's energy budget is no constraint: the queues keep it on average."""
    predicted, violations = {}, {}
    for cut in server.student.cut_points:
        at_cut = server.at_cut(cut)
        traffic = {d: predicted_traffic(at_cut, samples[d], teacher_inputs(server, d, samples[d])) for d in devices}
        predicted[cut] = costs.costs(traffic, at_cut.flops)
        memory = memory_needed(at_cut, server.cfg.train.batch_size)
        violations[cut] = sum(max(0.0, memory / costs.profiles[int(d)].memory_bytes - 1) for d in devices)
    delays = {cut: costs.delay(list(p.values())) for cut, p in predicted.items()}
    energies = {cut: {d: c.energy_j for d, c in p.items()} for cut, p in predicted.items()}
    budgets = {d: costs.profiles[int(d)].energy_budget_j for d in devices}
    return score_cuts(delays, energies, budgets, violations, energy_weight, queues, v)


def score_cuts(delays: dict[str, float], energies: dict[str, dict[Hashable, float]], budgets: dict[Hashable, float],
               violations: dict[str, float], energy_weight: float, queues: dict[Hashable, float] | None,
               v: float) -> dict[str, tuple[float, float]]:
    """``cut_table``'s (score, violation) per cut from each cut's predicted delay, its devices'
    energies and their memory violations (the energy budgets add to those without ``queues``)."""
    best = max(min(delays.values()), 1e-12)
    table = {}
    for cut, energy in energies.items():
        if queues is None:
            score = delays[cut] + energy_weight * sum(energy.values())
            violation = violations[cut] + sum(max(0.0, e / budgets[d] - 1) for d, e in energy.items())
        else:
            score = v * delays[cut] / best + sum(queues.get(d, 0.0) / budgets[d] * e / budgets[d]
                                                 for d, e in energy.items() if math.isfinite(budgets[d]))
            violation = violations[cut]
        table[cut] = (score, violation)
    return table


def update_queues(queues: dict[Hashable, float], energies: dict[Hashable, float],
                  budgets: dict[Hashable, float]) -> None:
    """ASL's energy-deficit queues after a round: Q <- max(0, Q + energy - budget) per device
    that trained (devices without a finite budget keep no queue)."""
    for d, energy in energies.items():
        if math.isfinite(budgets[d]):
            queues[d] = max(0.0, queues.get(d, 0.0) + energy - budgets[d])


def device_cuts(server: SplitKDServer, costs: CostModel, devices: list[Hashable], samples: dict[Hashable, int],
                energy_weight: float, queues: dict[Hashable, float] | None = None, v: float = 0.1
                ) -> dict[Hashable, str]:
    """Each device's own cut: ``pick_cut`` on its own ``score_cuts`` table (its time as the
    delay), from its cost at an equal share of the edge's band (the devices train in
    parallel and share it; min-max then moves band to the slowest)."""
    share = costs.server.bandwidth_hz / max(1, len(devices))
    tables: dict[Hashable, dict[str, tuple[float, float]]] = {}
    at_cuts = {cut: server.at_cut(cut) for cut in server.student.cut_points}
    memory = {cut: memory_needed(at_cut, server.cfg.train.batch_size) for cut, at_cut in at_cuts.items()}
    for d in devices:
        profile = costs.profiles[int(d)]
        if costs.bandwidth != "dedicated":
            profile = replace(profile, uplink_hz=share, downlink_hz=share)
        teacher = teacher_inputs(server, d, samples[d])
        at = {cut: device_cost(profile, costs.server, at_cut.flops, predicted_traffic(at_cut, samples[d], teacher),
                               costs.fading_of(int(d)))
              for cut, at_cut in at_cuts.items()}
        tables[d] = score_cuts({cut: c.time_s for cut, c in at.items()},
                               {cut: {d: c.energy_j} for cut, c in at.items()}, {d: profile.energy_budget_j},
                               {cut: max(0.0, memory[cut] / profile.memory_bytes - 1) for cut in at},
                               energy_weight, queues, v)
    unfit = [d for d, table in tables.items() if min(violation for _, violation in table.values()) > 0]
    if unfit:
        log.warning("%d of %d devices: no cut fits the device's memory and energy budget; each takes its least "
                    "violating cut", len(unfit), len(devices))
    return {d: pick_cut(table, warn=False) for d, table in tables.items()}


class Scheduler:
    """Runs a round as clusters in sequence, each at its cut; one cluster of all by default."""

    def __init__(self, server: SplitKDServer, cfg, pool_samples: int):
        self.server, self.cfg = server, cfg
        self.pool_samples = pool_samples  # all devices' samples per round, for unseen devices' share
        self.fleet_size = 1               # set by whoever knows how many devices there are
        self.samples: dict[Hashable, int] = {}  # samples each device put through last time
        self.clusters: Clusters | None = None
        self.cuts: dict[int, str] = {}
        self.history: list[dict] = []  # per round: assignments, centres, cuts
        # energy-control = lyapunov: each device's energy deficit (J), shared with the cost model
        self.queues: dict[Hashable, float] = server.costs.deficits if server.costs is not None else {}

    def plan(self, devices: list[Hashable], server_round: int) -> list[dict[Hashable, str]]:
        """Each cluster's devices with their cuts, clustering and choosing cuts when due."""
        cfg, costs = self.cfg, self.server.costs
        every = cfg.fleet.recluster_every
        due = self.clusters is None or (every and (server_round - 1) % every == 0)
        if cfg.fleet.clusters != "1" and (due or any(d not in self.clusters.labels for d in devices)):
            known = set(self.clusters.labels) if self.clusters and not due else set()
            fleet = {d: costs.profiles[int(d)] for d in sorted(known | set(devices))}
            k = cfg.fleet.clusters if cfg.fleet.clusters == "auto" else int(cfg.fleet.clusters)
            self.clusters = cluster_devices(fleet, cfg.fleet.cluster_features.split(","), k, cfg.train.seed)
            self.cuts = {}
        labels = self.clusters.labels if self.clusters else {d: 0 for d in devices}
        groups: dict[int, list[Hashable]] = {}
        for d in devices:
            groups.setdefault(labels[d], []).append(d)
        lyapunov = cfg.fleet.energy_control == "lyapunov"
        queues = self.queues if lyapunov else None
        guess = max(1, self.pool_samples // max(1, self.fleet_size))
        plan = []
        for c in sorted(groups):
            samples = {d: self.samples.get(d, guess) for d in groups[c]}
            if cfg.split.cut == "per-device":
                plan.append(device_cuts(self.server, costs, groups[c], samples, cfg.fleet.energy_weight, queues,
                                        cfg.fleet.lyapunov_v))
                continue
            if cfg.split.cut != "adaptive":
                cut = cfg.split.cut
            else:
                if c not in self.cuts or due or lyapunov:  # the queues move every round
                    self.cuts[c] = pick_cut(cut_table(self.server, costs, groups[c], samples, cfg.fleet.energy_weight,
                                                      queues, cfg.fleet.lyapunov_v))
                cut = self.cuts[c]
            plan.append({d: cut for d in groups[c]})
        entry = {"round": server_round, "clusters": {int(c): g for c, g in groups.items()},
                 "centres": self.clusters.centres.tolist() if self.clusters else []}
        if cfg.split.cut == "per-device":
            entry["device-cuts"] = {int(d): cut for cuts in plan for d, cut in cuts.items()}
        else:
            entry["cuts"] = {int(c): next(iter(cuts.values())) for c, cuts in zip(sorted(groups), plan)}
        self.history.append(entry)
        return plan

    def run_round(self, transport: Transport, devices: list[Hashable], server_round: int) -> RoundStats:
        total = RoundStats()
        for cuts in self.plan(devices, server_round):
            if len(set(cuts.values())) == 1:
                stats = self.server.at_cut(next(iter(cuts.values()))).run_round(transport, list(cuts), server_round)
            else:
                stats = self.run_parallel(transport, cuts, server_round)
            self.samples.update({d: t.samples for d, t in stats.traffic.items() if t.samples})
            if self.cfg.fleet.energy_control == "lyapunov":
                profiles = self.server.costs.profiles
                update_queues(self.queues, {r["device"]: r["energy_j"] for r in stats.device_costs},
                              {r["device"]: profiles[int(r["device"])].energy_budget_j for r in stats.device_costs})
            total = merge(total, stats)
        return total

    def run_parallel(self, transport: Transport, cuts: dict[Hashable, str], server_round: int) -> RoundStats:
        """Devices at different cuts, in parallel: all start from the same student and share the
        edge's band, and the server serves each at its cut (priced as one group of parallel devices).

        A block that some devices hold and the server trains for the others (whose cut is
        below it) becomes the example-weighted average of those devices' copies and the
        server's copy, the server's weighted by the samples it trained that block on; a block
        every device holds is their average (FedAvg), one above every cut is the server's.
        The server runs the cuts one after another (shallowest first); a deeper cut's devices
        get the round's starting weights of their blocks, not those the server trained.
        """
        student = self.server.student
        start = state_to_numpy(student)
        depth = {d: student.cut_index(cut) for d, cut in cuts.items()}
        total, finals, flops = RoundStats(), {}, {}
        for cut in sorted(set(cuts.values()), key=student.cut_index):
            at_cut = self.server.at_cut(cut)
            own = state_to_numpy(at_cut.device_part)  # the server's copy of the blocks below this cut
            load_numpy_state(at_cut.device_part, {k: start[k] for k in own})
            stats, done = at_cut.train_round(transport, [d for d in cuts if cuts[d] == cut], server_round)
            load_numpy_state(at_cut.device_part, own)
            finals.update(done)
            flops.update({d: at_cut.flops for d in stats.traffic})
            total = merge(total, stats)
        price_round(self.server.costs, total, finals, flops)
        blocks = {name: i for i, name in enumerate(student.block_names)}
        merged = {}
        for key, value in state_to_numpy(student).items():
            block = blocks[key.split(".")[0]]
            copies = [(weights[key], n) for d, (weights, n) in finals.items() if depth[d] > block]
            served = sum(n for d, (_, n) in finals.items() if depth[d] <= block)
            if served:
                copies.append((value, served))
            merged[key] = average([{key: w} for w, _ in copies], [n for _, n in copies])[key] if copies else value
        load_numpy_state(student, merged)
        return total


SUMMED = ("devices", "completed", "samples", "loss_sum", "bytes_up", "bytes_down", "bytes_up_activations",
          "bytes_up_teacher", "bytes_up_labels", "bytes_up_weights", "exchanges", "transport_s", "server_s")
LAST = ("sim_time_s", "cum_device_energy_j")


def merge(a: RoundStats, b: RoundStats) -> RoundStats:
    """Two sequential parts of a round as one: counts add, the clock reads the later."""
    merged = RoundStats(**{f: getattr(a, f) + getattr(b, f) for f in SUMMED})
    merged.dropped = a.dropped + b.dropped
    merged.drops = a.drops + b.drops
    merged.traffic = {**a.traffic, **b.traffic}
    merged.completed_keys = a.completed_keys + b.completed_keys
    merged.device_costs = a.device_costs + b.device_costs
    merged.costs = {k: (b.costs[k] if k in LAST else a.costs.get(k, 0) + b.costs[k]) for k in b.costs}
    return merged
