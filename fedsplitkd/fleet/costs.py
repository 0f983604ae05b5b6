"""The delay/energy cost model and the virtual clock, the same for every method.

Per device per round: FLOPs from the split model's per-block FLOPs and the samples the
device put through the split (forward plus backward, taken as 3x forward), bytes from
the payloads it really sent and received, compute time FLOPs / FLOP/s, communication time
bits / (B log2(1 + SNR)), energy = compute + transmit + receive.

Round delay: devices served in parallel take as long as the slowest, then the server's
compute for all of them (it is shared: it serves them one after another), or, with
``server-allocation = pipelined``, the server steps each device as soon as it is ready;
sequential groups (clusters) add up. With a deadline, a slower device is a straggler: waited for,
or dropped from the aggregation (the server then waits only until the deadline).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable
from dataclasses import dataclass, replace


import numpy as np

from fedsplitkd.models.zoo import SplitModel
from fedsplitkd.fleet.power import Links, minmax_with_power, slack_powers
from fedsplitkd.fleet.profiles import DeviceProfile, EdgeServer, Fleet, channel_gain, rate_bps
from fedsplitkd import streams

log = logging.getLogger("fedsplitkd")


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
    # What the device's training holds (``training_memory``): the parameters it trains and the
    # activations a sample leaves up to where it stops (the cut; the whole model for FedAvg)
    device_params: int = 0
    device_activations: int = 0

    @classmethod
    def of(cls, student: SplitModel, cut: str, teacher: SplitModel | None, teacher_trains: bool = False,
           teacher_cut: str = "default") -> SplitFlops:
        """``teacher_trains`` (mutual learning): the teacher's server part also runs backward.
        ``teacher_cut``: the teacher's blocks up to it run on the device."""
        stats, k = student.block_stats(), student.cut_index(cut)
        tstats = teacher.block_stats() if teacher is not None else []
        t = teacher.cut_index(teacher_cut) if teacher is not None else 0
        rest = sum(s.forward_flops for s in tstats[t:]) * ((1 + BACKWARD_FACTOR) if teacher_trains else 1)
        return cls(sum(s.forward_flops for s in stats[:k]), sum(s.forward_flops for s in stats[k:]),
                   sum(s.forward_flops for s in tstats[:t]), rest,
                   sum(s.params for s in stats[:k]), sum(s.activation_numel for s in stats[:k]))


def training_memory(params: int, activations: int, batch_size: int) -> int:
    """Bytes (float32) a device's training holds: the weights it trains with their gradients
    and momentum, and a batch's activations with their gradients. The adaptive cut keeps it
    within each device's memory; every method's ``devices.csv`` rows compare it."""
    return 4 * (3 * params + 2 * batch_size * activations)


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
    energy = compute_energy(profile, device_flops) + profile.tx_power_w * uplink_s + profile.rx_power_w * downlink_s
    return DeviceCost(device_flops, server_flops, device_flops / profile.flops, uplink_s, downlink_s, energy)


def compute_energy(profile: DeviceProfile, device_flops: float) -> float:
    """Joules the device's own compute takes (DVFS model where it has a kappa)."""
    if profile.kappa > 0:
        return profile.kappa * profile.cpu_hz ** 2 * device_flops / profile.flops_per_cycle
    return profile.energy_per_flop * device_flops


def group_delay(costs: list[DeviceCost], server: EdgeServer, deadline_s: float = math.inf,
                allocation: str = "after-all") -> float:
    """Delay of devices served in parallel; a device is ready after its own time (at most the deadline).

    ``after-all``: the server starts once the slowest device is ready, then serves them all.
    ``pipelined``: the server gives its compute to each device's step as soon as that device
    is ready, in the order they become ready, as our edge server does (it steps a device when
    its reply arrives). The round ends at that schedule's makespan; no way of sharing the
    server's compute among the devices (CARD-style) ends sooner, since every schedule that
    never idles while a device waits has this same makespan.
    """
    if not costs:
        return 0.0
    if allocation == "after-all":
        return min(max(c.time_s for c in costs), deadline_s) + sum(c.server_flops for c in costs) / server.flops
    clock = 0.0
    for ready, work in sorted((min(c.time_s, deadline_s), c.server_flops / server.flops) for c in costs):
        clock = max(clock, ready) + work
    return clock


def round_delay(groups: list[list[DeviceCost]], server: EdgeServer, deadline_s: float = math.inf,
                allocation: str = "after-all") -> float:
    """Sequential groups of parallel devices: their delays add up."""
    return sum(group_delay(g, server, deadline_s, allocation) for g in groups)


def allocate_bandwidth(profiles: list[DeviceProfile], server: EdgeServer, flops: SplitFlops | list[SplitFlops],
                       traffics: list[DeviceTraffic], fadings: list[float], policy: str, power: str = "max",
                       deadline_s: float = math.inf) -> list[DeviceProfile]:
    """The profiles with the edge's bandwidth shared among devices served at once (``flops``:
    one split for all, or each device's own, when they train at different cuts) and, with
    ``power = 'least-energy'``, each device's transmit power lowered to the least that has it
    done when the round's slowest device is (no later than ``deadline_s``; see power.py).

    ``dedicated``: each keeps its own link. ``equal``: B / n each, up and down. ``minmax``:
    the split of B that minimises the slowest device's time (bisection on that time) while
    every device stays within its per-round energy budget. A device's transfers cost it
    less energy the more bandwidth it gets, so each budget asks for a least bandwidth; a
    budget that the whole band cannot meet asks for the equal share B / n (no split keeps
    it within budget; min-max shall not push it further over). The budgets together claim
    at most their devices' equal shares of B; where they ask for more, the floors keep the
    worst relative overspend least (the cost model's ``over_budget`` rows show who is over).
    """
    if power not in ("max", "least-energy") or power != "max" and policy == "dedicated":
        raise ValueError(f"power allocation '{power}' with bandwidth '{policy}': least-energy needs a shared band")
    if policy == "dedicated" or not profiles:
        return profiles
    total, n = server.bandwidth_hz, len(profiles)
    splits = flops if isinstance(flops, list) else [flops] * n

    def with_band(p: DeviceProfile, hz: float) -> DeviceProfile:
        return replace(p, uplink_hz=hz, downlink_hz=hz)

    def cost_at(i: int, hz: float) -> DeviceCost:
        return device_cost(with_band(profiles[i], hz), server, splits[i], traffics[i], fadings[i])

    def links() -> Links:
        computes = [cost_at(i, total) for i in range(n)]
        return Links(profiles, server, [c.compute_s for c in computes],
                     [compute_energy(p, c.device_flops) for p, c in zip(profiles, computes)],
                     [t.bytes_up for t in traffics], [t.bytes_down for t in traffics], fadings)

    def at_power(bands: list[float], radio: Links, deadline: float) -> list[DeviceProfile]:
        powers = slack_powers(radio, np.asarray(bands, float), min(deadline, deadline_s))
        return [replace(p, uplink_hz=float(b), downlink_hz=float(b), tx_power_w=float(w))
                for p, b, w in zip(profiles, bands, powers)]

    if policy == "equal":
        if power == "max":
            return [with_band(p, total / n) for p in profiles]
        radio = links()
        return at_power([total / n] * n, radio, float(radio.time_at_max(np.full(n, total / n)).max()))

    def least_band(meets) -> float:  # least bandwidth with meets(band), given meets(total)
        low, high = total * 1e-9, total
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (low, mid) if meets(mid) else (mid, high)
        return high

    budgets = [p.energy_budget_j for p in profiles]
    budgeted = [i for i in range(n) if math.isfinite(budgets[i])]
    reachable = {i for i in budgeted if cost_at(i, total).energy_j <= budgets[i]}

    def floors_at(excess: float) -> list[float]:  # least bands keeping each device within excess x budget
        floors = [0.0] * n
        for i in budgeted:  # over budget whatever the split: no less than the equal share
            floors[i] = (least_band(lambda hz: cost_at(i, hz).energy_j <= excess * budgets[i])
                         if i in reachable else total / n)
        return floors

    # The budgets claim at most their devices' equal shares, so that the unbudgeted devices
    # keep a share (the slowest device's time would otherwise grow without bound).
    claim = total * len(budgeted) / n
    floors = floors_at(1.0)
    if sum(floors) > claim:  # the least worst relative overspend that fits the claim
        low, high = 1.0, max([cost_at(i, total / n).energy_j / budgets[i] for i in reachable] + [1.0])
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if sum(floors_at(mid)) > claim * (1 + 1e-12) else (low, mid)
        floors = floors_at(high)

    def band_for(i: int, deadline: float) -> float:  # least bandwidth meeting the deadline and the budget
        if cost_at(i, total).time_s > deadline:
            return math.inf
        return max(floors[i], least_band(lambda hz: cost_at(i, hz).time_s <= deadline))

    share = (total - sum(floors)) / n  # the floors plus an equal share of the rest is feasible
    low = max(cost_at(i, total).time_s for i in range(n))             # nobody beats having it all
    high = max(cost_at(i, floors[i] + share).time_s for i in range(n))
    if power == "least-energy":  # the same rules, the budgets met at the least power
        radio = links()
        found = minmax_with_power(radio, total, np.array(budgets, float), claim, low, high)
        if found is not None:
            return at_power(list(found[0]), radio, found[1])
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if sum(band_for(i, mid) for i in range(n)) > total else (low, mid)
    bands = [band_for(i, high) for i in range(n)]
    spare = (total - sum(bands)) / n  # hand out what the bisection left over
    return [with_band(p, b + spare) for p, b in zip(profiles, bands)]


def each_split(flops: SplitFlops | dict[Hashable, SplitFlops], devices) -> list[SplitFlops]:
    """Each of ``devices``' split: ``flops`` is one split for all or, where they train at
    different cuts, each one's."""
    return [flops[d] for d in devices] if isinstance(flops, dict) else [flops] * len(devices)


class CostModel:
    """Profiles of the fleet plus the clock: prices every round of any method alike."""

    def __init__(self, profiles: Fleet, server: EdgeServer, fading: bool, deadline_s: float,
                 drop_stragglers: bool, seed: int, bandwidth: str = "dedicated",
                 server_allocation: str = "after-all", rounds: int = 1, participation: float = 1.0,
                 power_allocation: str = "max", batch_size: int = 32):
        self.profiles, self.server = profiles, server
        self.batch_size = batch_size
        self.over_memory: set[int] = set()  # devices whose training did not fit their memory, all rounds
        self.power_allocation = power_allocation
        self.fading, self.deadline_s, self.drop_stragglers, self.seed = fading, deadline_s, drop_stragglers, seed
        self.bandwidth, self.server_allocation = bandwidth, server_allocation
        self.server_round = 0
        self.sim_time_s = 0.0
        self.energy_j = 0.0
        # energy-control = lyapunov: each device's energy deficit (J), which the bandwidth
        # allocation takes off its budget, spread over the rounds left that the device is
        # expected to train in (this one and a fraction-train share of the later ones), so
        # that it pays it back by the end of the run without giving up the min-max split at once
        self.deficits: dict[Hashable, float] = {}
        self.rounds, self.participation = rounds, participation

    def fading_of(self, device: int) -> float:
        """Rayleigh fading power gain, redrawn every round (1 without fading)."""
        if not self.fading:
            return 1.0
        return float(streams.fading(self.seed, self.server_round, device).exponential())

    @classmethod
    def from_config(cls, cfg) -> CostModel:
        fleet = Fleet(cfg)
        deadline = cfg.fleet.deadline_s or math.inf
        return cls(fleet, fleet.server, cfg.fleet.fading, deadline, cfg.fleet.straggler_policy == "drop",
                   cfg.train.seed, cfg.fleet.bandwidth_allocation, cfg.fleet.server_allocation, cfg.train.num_rounds,
                   cfg.train.fraction_train, cfg.fleet.power_allocation, cfg.train.batch_size)

    def delay(self, costs: list[DeviceCost], deadline_s: float = math.inf) -> float:
        """``group_delay`` under this model's server allocation."""
        return group_delay(costs, self.server, deadline_s, self.server_allocation)

    def costs(self, traffic: dict[Hashable, DeviceTraffic], flops: SplitFlops | dict[Hashable, SplitFlops]
              ) -> dict[Hashable, DeviceCost]:
        """Each device's cost, the edge's bandwidth shared among them per the allocation policy;
        ``flops`` is one split for all devices or, where they train at different cuts, each one's."""
        devices = list(traffic)
        splits = each_split(flops, devices)
        fadings = [self.fading_of(int(d)) for d in devices]
        budgeted = [self.profiles[int(d)] for d in devices]
        if self.deficits:
            left = 1 + self.participation * max(0, self.rounds - self.server_round)
            budgeted = [replace(p, energy_budget_j=max(0.0, p.energy_budget_j - self.deficits.get(d, 0.0) / left))
                        for d, p in zip(devices, budgeted)]
        profiles = allocate_bandwidth(budgeted, self.server, splits, [traffic[d] for d in devices], fadings,
                                      self.bandwidth, self.power_allocation, self.deadline_s)
        return {d: device_cost(p, self.server, split, traffic[d], f)
                for d, p, split, f in zip(devices, profiles, splits, fadings)}

    def stragglers(self, traffic: dict[Hashable, DeviceTraffic], flops: SplitFlops | dict[Hashable, SplitFlops]
                   ) -> set[Hashable]:
        """Devices past the deadline that the drop policy keeps out of the average."""
        if not self.drop_stragglers:
            return set()
        return {d for d, c in self.costs(traffic, flops).items() if c.time_s > self.deadline_s}

    def account_server(self, server_flops: float) -> dict:
        """A round of server compute alone (the central baseline); advances the clock."""
        delay = server_flops / self.server.flops
        self.sim_time_s += delay
        return {"device_flops": 0.0, "server_flops": server_flops, "device_energy_j": 0.0,
                "round_delay_s": delay, "sim_time_s": self.sim_time_s, "cum_device_energy_j": self.energy_j,
                "stragglers": 0}

    def account(self, traffic: dict[Hashable, DeviceTraffic], flops: SplitFlops | dict[Hashable, SplitFlops],
                server_flops: float = 0.0) -> tuple[dict, list[dict]]:
        """Totals (metrics.csv columns) and per-device rows of devices served in parallel,
        plus ``server_flops`` of server work after them that no device waits on (FedDF's
        distillation); advances the clock (sequential groups are accounted one after another)."""
        costs = self.costs(traffic, flops)
        delay = self.delay(list(costs.values()), self.deadline_s) + server_flops / self.server.flops
        self.sim_time_s += delay
        energy = sum(c.energy_j for c in costs.values())
        self.energy_j += energy
        totals = {"device_flops": sum(c.device_flops for c in costs.values()),
                  "server_flops": sum(c.server_flops for c in costs.values()) + server_flops,
                  "device_energy_j": energy, "round_delay_s": delay, "sim_time_s": self.sim_time_s,
                  "cum_device_energy_j": self.energy_j,
                  "stragglers": sum(c.time_s > self.deadline_s for c in costs.values())}
        memory = self.memory(traffic, flops)
        rows = [{"device": d, "class": self.profiles[int(d)].device_class, "samples": traffic[d].samples,
                 "bytes_up": traffic[d].bytes_up, "bytes_down": traffic[d].bytes_down,
                 "device_flops": c.device_flops, "server_flops": c.server_flops, "compute_s": c.compute_s,
                 "uplink_s": c.uplink_s, "downlink_s": c.downlink_s, "time_s": c.time_s,
                 "energy_j": c.energy_j, "straggler": c.time_s > self.deadline_s,
                 "over_budget": c.energy_j > self.profiles[int(d)].energy_budget_j,
                 "memory_bytes": memory[d], "over_memory": memory[d] > self.profiles[int(d)].memory_bytes}
                for d, c in costs.items()]
        return totals, rows

    def memory(self, traffic: dict[Hashable, DeviceTraffic], flops: SplitFlops | dict[Hashable, SplitFlops]
               ) -> dict[Hashable, int]:
        """Each training device's ``training_memory``; the first time some do not fit their
        memory, say so once (a whole-model method on MCU-class devices: nothing stops them, the
        table would price a deployment that cannot run)."""
        memory = {d: training_memory(split.device_params, split.device_activations, self.batch_size)
                  for (d, t), split in zip(traffic.items(), each_split(flops, traffic)) if t.samples}
        over = {d: m for d, m in memory.items() if m > self.profiles[int(d)].memory_bytes}
        if over and not self.over_memory:
            d = min(over, key=int)
            profile = self.profiles[int(d)]
            log.warning("fedsplitkd: %d of %d training devices cannot hold their training in memory: device %s "
                        "(%s, %.3g MB) needs %.3g MB (weights, gradients, momentum, a batch of %d's activations); "
                        "devices.csv's over_memory says which", len(over), len(memory), d,
                        profile.device_class, profile.memory_bytes / 1e6, over[d] / 1e6, self.batch_size)
        self.over_memory |= {int(d) for d in over}
        return {d: memory.get(d, 0) for d in traffic}
