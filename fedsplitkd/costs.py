"""The delay/energy cost model and the virtual clock, the same for every method.

Per device per round: FLOPs from the split model's per-block FLOPs and the samples the
device put through the split (forward plus backward, taken as 3x forward), bytes from
the payloads it really sent and received, compute time FLOPs / FLOP/s, communication time
bits / (B log2(1 + SNR)), energy = compute + transmit + receive.

Round delay: devices served in parallel take as long as the slowest, then the server's
compute for all of them (it is shared: it serves them one after another); sequential
groups (clusters) add up. With a deadline, a slower device is a straggler: waited for,
or dropped from the aggregation (the server then waits only until the deadline).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from fedsplitkd.models import SplitModel
from fedsplitkd.profiles import DeviceProfile, EdgeServer, Fleet, channel_gain, rate_bps

@dataclass
class DeviceTraffic:
    """What one device sent, received and had trained in a round (the cost model's input)."""

    bytes_up: int = 0
    bytes_down: int = 0
    samples: int = 0           # training samples through the split (forward and backward)
    teacher_samples: int = 0   # samples whose teacher embedding the device computed
    exchanges: int = 0


BACKWARD_FACTOR = 2.0  # backward ~ 2x forward FLOPs (weights and inputs gradients)


@dataclass(frozen=True)
class SplitFlops:
    """Forward FLOPs per sample of each part the protocol runs."""

    device: float          # student blocks up to the cut
    server: float          # student blocks after the cut
    teacher_device: float  # the teacher's embedding module (on the device)
    teacher_server: float  # the rest of the teacher (on the server)

    @classmethod
    def of(cls, student: SplitModel, cut: str, teacher: SplitModel | None) -> SplitFlops:
        stats, k = student.block_stats(), student.cut_index(cut)
        tstats = teacher.block_stats() if teacher is not None else []
        return cls(sum(s.forward_flops for s in stats[:k]), sum(s.forward_flops for s in stats[k:]),
                   sum(s.forward_flops for s in tstats[:1]), sum(s.forward_flops for s in tstats[1:]))


@dataclass(frozen=True)
class DeviceCost:
    device_flops: float
    server_flops: float
    compute_s: float
    uplink_s: float
    downlink_s: float
    energy_j: float

    @property
    def time_s(self) -> float:
        """The device's own time in the round: compute, then its transfers."""
        return self.compute_s + self.uplink_s + self.downlink_s


def device_cost(profile: DeviceProfile, server: EdgeServer, flops: SplitFlops,
                traffic: DeviceTraffic, fading: float = 1.0) -> DeviceCost:
    """What one device's round cost, from what it sent, received and trained."""
    train = 1.0 + BACKWARD_FACTOR
    device_flops = traffic.samples * train * flops.device + traffic.teacher_samples * flops.teacher_device
    server_flops = traffic.samples * train * flops.server + traffic.teacher_samples * flops.teacher_server
    gain = channel_gain(profile.distance_m, fading)
    uplink_s = 8 * traffic.bytes_up / rate_bps(profile.uplink_hz, profile.tx_power_w, gain)
    downlink_s = 8 * traffic.bytes_down / rate_bps(profile.downlink_hz, server.downlink_power_w, gain)
    if profile.kappa > 0:
        compute_j = profile.kappa * profile.cpu_hz ** 2 * device_flops / profile.flops_per_cycle
    else:
        compute_j = profile.energy_per_flop * device_flops
    energy = compute_j + profile.tx_power_w * uplink_s + profile.rx_power_w * downlink_s
    return DeviceCost(device_flops, server_flops, device_flops / profile.flops, uplink_s, downlink_s, energy)


def group_delay(costs: list[DeviceCost], server: EdgeServer, deadline_s: float = math.inf) -> float:
    """Delay of devices served in parallel: the slowest (at most the deadline), then the server."""
    if not costs:
        return 0.0
    slowest = min(max(c.time_s for c in costs), deadline_s)
    return slowest + sum(c.server_flops for c in costs) / server.flops


def round_delay(groups: list[list[DeviceCost]], server: EdgeServer, deadline_s: float = math.inf) -> float:
    """Sequential groups of parallel devices: their delays add up."""
    return sum(group_delay(g, server, deadline_s) for g in groups)


class CostModel:
    """Profiles of the fleet plus the clock: prices every round of any method alike."""

    def __init__(self, profiles: Fleet, server: EdgeServer, flops: SplitFlops,
                 fading: bool, deadline_s: float, drop_stragglers: bool, seed: int):
        self.profiles, self.server, self.flops = profiles, server, flops
        self.fading, self.deadline_s, self.drop_stragglers, self.seed = fading, deadline_s, drop_stragglers, seed
        self.server_round = 0
        self.sim_time_s = 0.0
        self.energy_j = 0.0

    def fading_of(self, device: int) -> float:
        """Rayleigh fading power gain, redrawn every round (1 without fading)."""
        if not self.fading:
            return 1.0
        return float(np.random.default_rng([self.seed, self.server_round, device, 11]).exponential())

    @classmethod
    def from_config(cls, cfg, flops: SplitFlops) -> CostModel:
        fleet = Fleet(cfg)
        deadline = cfg["deadline-s"] or math.inf
        return cls(fleet, fleet.server, flops, cfg["fading"], deadline, cfg["straggler-policy"] == "drop",
                   cfg["seed"])

    def cost(self, device: Hashable, traffic: DeviceTraffic) -> DeviceCost:
        return device_cost(self.profiles[int(device)], self.server, self.flops, traffic,
                           self.fading_of(int(device)))

    def admit(self, device: Hashable, traffic: DeviceTraffic) -> bool:
        """False for a straggler under the drop policy: its part stays out of the average."""
        return not (self.drop_stragglers and self.cost(device, traffic).time_s > self.deadline_s)

    def account(self, traffic: dict[Hashable, DeviceTraffic],
                groups: list[list[Hashable]] | None = None) -> tuple[dict, list[dict]]:
        """The round's totals (metrics.csv columns) and per-device rows; advances the clock."""
        costs = {d: self.cost(d, t) for d, t in traffic.items()}
        groups = groups or [list(costs)]
        delay = round_delay([[costs[d] for d in g] for g in groups], self.server, self.deadline_s)
        self.sim_time_s += delay
        energy = sum(c.energy_j for c in costs.values())
        self.energy_j += energy
        totals = {"device_flops": sum(c.device_flops for c in costs.values()),
                  "server_flops": sum(c.server_flops for c in costs.values()),
                  "device_energy_j": energy, "round_delay_s": delay, "sim_time_s": self.sim_time_s,
                  "cum_device_energy_j": self.energy_j,
                  "stragglers": sum(c.time_s > self.deadline_s for c in costs.values())}
        rows = [{"device": d, "class": self.profiles[int(d)].device_class, "samples": traffic[d].samples,
                 "bytes_up": traffic[d].bytes_up, "bytes_down": traffic[d].bytes_down,
                 "device_flops": c.device_flops, "server_flops": c.server_flops, "compute_s": c.compute_s,
                 "uplink_s": c.uplink_s, "downlink_s": c.downlink_s, "time_s": c.time_s,
                 "energy_j": c.energy_j, "straggler": c.time_s > self.deadline_s,
                 "over_budget": c.energy_j > self.profiles[int(d)].energy_budget_j}
                for d, c in costs.items()]
        return totals, rows
