"""Clustering, cut choice, the CPSL schedule and bandwidth allocation."""

import math
from dataclasses import replace

import numpy as np
import pytest

from conftest import tiny
from fedsplitkd.config import resolve
from fedsplitkd.fleet.costs import DeviceTraffic, SplitFlops, allocate_bandwidth, device_cost
from fedsplitkd.protocol.device import device_setup
from fedsplitkd.run.experiment import build
from fedsplitkd.protocol.payload import WEIGHTS, unpack
from fedsplitkd.fleet.profiles import EdgeServer, load_classes, sample_profile
from fedsplitkd.fleet.schedule import cluster_devices, cut_table, pick_cut
from fedsplitkd.protocol.rounds import InProcessTransport


def test_kmeans_recovers_planted_device_classes():
    classes, _ = load_classes()
    planted = ["mcu", "raspberry_pi", "smartphone"]
    fleet = {i: sample_profile(i, classes, {planted[i % 3]: 1.0}, 0.05, seed=0) for i in range(30)}
    for k in (3, "auto"):
        found = cluster_devices(fleet, ["compute", "link", "memory"], k, seed=0)
        assert len(set(found.labels.values())) == 3
        for cls in planted:  # each planted class is exactly one cluster
            members = {found.labels[i] for i in fleet if fleet[i].device_class == cls}
            assert len(members) == 1
        assert found.centres.shape == (3, 3)


def test_pick_cut_on_a_hand_built_table():
    assert pick_cut({"conv1": (5.0, 0.0), "conv2": (3.0, 0.0), "conv3": (1.0, 0.2)}) == "conv2"
    assert pick_cut({"conv1": (5.0, 0.5), "conv2": (3.0, 0.1), "conv3": (1.0, 0.2)}) == "conv2"
    assert pick_cut({"conv1": (2.0, 0.0), "conv2": (2.0, 0.0)}) == "conv1"


def test_cut_follows_the_bottleneck():
    """A fast device on a slow link cuts late (small activations); a slow one on a fast link cuts early."""
    exp = build(resolve(tiny()))  # digits CNN activations: conv1 1024 > conv2 512 > fc 64 floats
    costs, server = exp.server.costs, exp.server
    base = costs.profiles[0]
    fast_cpu_slow_link = replace(base, flops=1e13, uplink_hz=1e4, downlink_hz=1e4)
    slow_cpu_fast_link = replace(base, flops=1e5, uplink_hz=1e9, downlink_hz=1e9, memory_bytes=1e12)
    for profile, expected in ((fast_cpu_slow_link, "fc"), (slow_cpu_fast_link, "conv1")):
        costs.profiles._sampled[0] = replace(profile, memory_bytes=1e12, energy_budget_j=math.inf)
        assert pick_cut(cut_table(server, costs, [0], {0: 100}, energy_weight=0.0)) == expected
    costs.profiles._sampled[0] = replace(fast_cpu_slow_link, memory_bytes=1e3)  # no cut fits in 1 kB
    table = cut_table(server, costs, [0], {0: 100}, energy_weight=0.0)
    assert all(violation > 0 for _, violation in table.values())
    assert pick_cut(table) == min(table, key=lambda c: table[c][1])


class Recording(InProcessTransport):
    """Keeps the weights each device was sent, and its returned part and sample count."""

    def __init__(self, setups):
        super().__init__(setups)
        self.sent, self.finals = {}, {}

    def send(self, requests):
        for d, r in requests.items():
            if any(k.startswith(WEIGHTS) for k in r):
                self.sent[d] = {k: v.copy() for k, v in unpack(WEIGHTS, r).items()}
        super().send(requests)

    def receive(self):
        replies = super().receive()
        for d, r in replies.items():
            if isinstance(r, dict) and "num-examples" in r:
                self.finals[d] = (unpack(WEIGHTS, r), r["num-examples"])
        return replies


def test_mixed_cuts_train_one_student_by_the_sequential_rule():
    """Cluster A (cut conv1) then cluster B (cut conv2): B starts from A's result, and the
    student's blocks below B's cut are the example-weighted average of B's device parts."""
    cfg = resolve(tiny(exchange_batches=8))
    exp = build(cfg)
    transport = Recording({d: device_setup(cfg, d, 4) for d in range(4)})
    sent, finals = transport.sent, transport.finals
    exp.scheduler.plan = lambda devices, rnd: [{0: "conv1", 1: "conv1"}, {2: "conv2", 3: "conv2"}]
    exp.scheduler.run_round(transport, [0, 1, 2, 3], 1)

    def average(devices, key):
        total = sum(finals[d][1] for d in devices)
        return sum(finals[d][0][key].astype(np.float64) * finals[d][1] / total for d in devices)

    for key in ("0.weight", "0.bias"):  # conv1: A's average was B's start, B's average is the result
        np.testing.assert_allclose(sent[2][f"conv1.{key}"], average([0, 1], f"conv1.{key}"), atol=1e-6)
    state = {k: v.numpy() for k, v in exp.student.state_dict().items()}
    for key in ("conv1.0.weight", "conv1.0.bias", "conv2.0.weight", "conv2.0.bias"):
        np.testing.assert_allclose(state[key], average([2, 3], key), atol=1e-6)
    assert set(sent[0]) == {"conv1.0.weight", "conv1.0.bias"}
    assert set(sent[2]) == {"conv1.0.weight", "conv1.0.bias", "conv2.0.weight", "conv2.0.bias"}


def test_parallel_cuts_merge_each_block_from_those_who_trained_it():
    """Devices 0, 1 at conv1 and 2, 3 at conv2 in one parallel group: all start from the same
    student; conv1 is the average of all four device copies, conv2 that of devices 2 and 3
    and of the server's copy (trained on devices 0 and 1, weighted by their samples)."""
    from fedsplitkd.protocol.runtime import state_to_numpy

    cfg = resolve(tiny(exchange_batches=8))
    exp = build(cfg)
    start = state_to_numpy(exp.student)
    server_copy = {}
    shallow = exp.server.at_cut("conv1")
    train_round = shallow.train_round

    def spied(*args):
        result = train_round(*args)
        server_copy.update(state_to_numpy(exp.student))  # conv2 as the server trained it
        return result

    shallow.train_round = spied
    transport = Recording({d: device_setup(cfg, d, 4) for d in range(4)})
    sent, finals = transport.sent, transport.finals
    exp.scheduler.plan = lambda devices, rnd: [{0: "conv1", 1: "conv1", 2: "conv2", 3: "conv2"}]
    stats = exp.scheduler.run_round(transport, [0, 1, 2, 3], 1)
    assert stats.completed == 4 and stats.devices == 4

    def average(copies):
        total = sum(n for _, n in copies)
        return sum(w.astype(np.float64) * n / total for w, n in copies)

    for d in (2, 3):  # the deeper cut starts from the round's student, not what the server trained
        for key, value in sent[d].items():
            np.testing.assert_array_equal(value, start[key])
    state = state_to_numpy(exp.student)
    for key in ("conv1.0.weight", "conv1.0.bias"):
        np.testing.assert_allclose(state[key], average([(finals[d][0][key], finals[d][1]) for d in range(4)]),
                                   atol=1e-6)
    for key in ("conv2.0.weight", "conv2.0.bias"):
        assert not np.allclose(server_copy[key], start[key])  # the server did train it
        expected = average([(finals[d][0][key], finals[d][1]) for d in (2, 3)]
                           + [(server_copy[key], finals[0][1] + finals[1][1])])
        np.testing.assert_allclose(state[key], expected, atol=1e-6)
    head = exp.student.block_names[-1]  # above every cut: the server's, which conv2's devices trained on too
    assert all(not np.array_equal(state[k], server_copy[k]) for k in state if k.startswith(head))


def test_parallel_cuts_are_priced_as_one_group():
    cfg = resolve(tiny(class_mix="mcu:1,smartphone:1", bandwidth_allocation="equal"))
    exp = build(cfg)
    transport = InProcessTransport({d: device_setup(cfg, d, 6) for d in range(6)})
    exp.scheduler.plan = lambda devices, rnd: [{0: "default", 1: "default", 2: "default",
                                                3: "conv2", 4: "conv2", 5: "conv2"}]
    stats = exp.scheduler.run_round(transport, list(range(6)), 1)
    rows = {r["device"]: r for r in stats.device_costs}
    expected = (max(r["time_s"] for r in rows.values())
                + sum(r["server_flops"] for r in rows.values()) / exp.server.costs.server.flops)
    assert stats.costs["round_delay_s"] == pytest.approx(expected)
    shallow, deep = exp.server.at_cut("default").flops, exp.server.at_cut("conv2").flops
    for d, split in ((0, shallow), (3, deep)):  # each device priced at its own cut
        traffic = stats.traffic[d]
        assert rows[d]["device_flops"] == pytest.approx(3 * traffic.samples * split.device
                                                        + traffic.teacher_samples * split.teacher_device)
    assert shallow.device < deep.device
    assert stats.completed == 6


def test_per_device_cut_follows_each_devices_bottleneck():
    from fedsplitkd.fleet.schedule import device_cuts

    exp = build(resolve(tiny(cut="per-device")))
    costs, server = exp.server.costs, exp.server
    base = replace(costs.profiles[0], memory_bytes=1e12, energy_budget_j=math.inf)
    costs.profiles._sampled[0] = replace(base, flops=1e13, uplink_hz=1e4, downlink_hz=1e4)
    costs.profiles._sampled[1] = replace(base, flops=1e5, uplink_hz=1e9, downlink_hz=1e9)
    costs.bandwidth = "dedicated"
    assert device_cuts(server, costs, [0, 1], {0: 100, 1: 100}, energy_weight=0.0) == {0: "fc", 1: "conv1"}


def test_round_delay_is_the_sum_of_the_clusters_maxima():
    cfg = resolve(tiny(class_mix="mcu:1,smartphone:1", bandwidth_allocation="equal"))
    exp = build(cfg)
    transport = InProcessTransport({d: device_setup(cfg, d, 6) for d in range(6)})
    exp.scheduler.plan = lambda devices, rnd: [dict.fromkeys([0, 1, 2], "default"), dict.fromkeys([3, 4, 5], "conv2")]
    stats = exp.scheduler.run_round(transport, list(range(6)), 1)
    by_device = {r["device"]: r for r in stats.device_costs}
    expected = sum(max(by_device[d]["time_s"] for d in group)
                   + sum(by_device[d]["server_flops"] for d in group) / exp.server.costs.server.flops
                   for group in ([0, 1, 2], [3, 4, 5]))
    assert stats.costs["round_delay_s"] == pytest.approx(expected)
    assert stats.costs["sim_time_s"] == pytest.approx(expected)
    assert stats.completed == 6


def test_bandwidth_allocation_equal_and_minmax():
    classes, _ = load_classes()
    server = EdgeServer(flops=1e12, downlink_power_w=20.0, bandwidth_hz=4e7)
    profiles = [sample_profile(i, classes, {"mcu": 0.5, "smartphone": 0.5}, 0.3, seed=1) for i in range(6)]
    traffic = [DeviceTraffic(bytes_up=200_000 * (i + 1), bytes_down=50_000, samples=100) for i in range(6)]
    flops = SplitFlops(1e5, 1e6, 0, 0)
    ones = [1.0] * 6

    def times(allocated):
        return [device_cost(p, server, flops, t).time_s for p, t in zip(allocated, traffic)]

    equal = allocate_bandwidth(profiles, server, flops, traffic, ones, "equal")
    assert all(p.uplink_hz == p.downlink_hz == pytest.approx(4e7 / 6) for p in equal)
    minmax = allocate_bandwidth(profiles, server, flops, traffic, ones, "minmax")
    assert sum(p.uplink_hz for p in minmax) == pytest.approx(4e7, rel=1e-6)
    assert max(times(minmax)) < max(times(equal))
    spread = times(minmax)
    assert max(spread) - min(spread) < 0.05 * max(spread)  # the slowest devices are evened out
    assert allocate_bandwidth(profiles, server, flops, traffic, ones, "dedicated") == profiles


def test_minmax_bandwidth_keeps_each_device_within_its_energy_budget():
    """A fast device's transfers cost it energy: plain min-max starves it of bandwidth to speed up
    the slow ones and it overspends; with a budget it keeps the least band that meets it, the
    slowest device is still faster than under the equal split, and the whole band is used."""
    classes, _ = load_classes()
    server = EdgeServer(flops=1e12, downlink_power_w=20.0, bandwidth_hz=4e7)
    profiles = [sample_profile(i, classes, {"mcu": 0.5, "smartphone": 0.5}, 0.3, seed=1) for i in range(6)]
    traffic = [DeviceTraffic(bytes_up=200_000 * (i + 1), bytes_down=50_000, samples=100) for i in range(6)]
    flops, ones = SplitFlops(1e5, 1e6, 0, 0), [1.0] * 6

    def costs(allocated):
        return [device_cost(p, server, flops, t) for p, t in zip(allocated, traffic)]

    equal = costs(allocate_bandwidth(profiles, server, flops, traffic, ones, "equal"))
    plain = costs(allocate_bandwidth(profiles, server, flops, traffic, ones, "minmax"))
    starved = min(range(6), key=lambda i: equal[i].energy_j - plain[i].energy_j)
    assert plain[starved].energy_j > equal[starved].energy_j  # min-max alone costs this device energy
    budgets = [c.energy_j if i == starved else math.inf for i, c in enumerate(equal)]
    budgeted = [replace(p, energy_budget_j=b) for p, b in zip(profiles, budgets)]
    bands = allocate_bandwidth(budgeted, server, flops, traffic, ones, "minmax")
    capped = costs(bands)
    assert capped[starved].energy_j <= budgets[starved] * (1 + 1e-6)
    assert bands[starved].uplink_hz > allocate_bandwidth(profiles, server, flops, traffic, ones,
                                                         "minmax")[starved].uplink_hz
    assert sum(p.uplink_hz for p in bands) == pytest.approx(4e7, rel=1e-6)
    assert max(c.time_s for c in plain) <= max(c.time_s for c in capped) < max(c.time_s for c in equal)
    # Budgets 0.1 % under the equal split's energies: the band cannot meet them all, and the
    # least worst overspend is the equal split's, every device 0.1 % over.
    tight = [replace(p, energy_budget_j=c.energy_j * 0.999) for p, c in zip(profiles, equal)]
    squeezed = allocate_bandwidth(tight, server, flops, traffic, ones, "minmax")
    assert all(p.uplink_hz == pytest.approx(4e7 / 6, rel=1e-4) for p in squeezed)
    assert all(c.energy_j / p.energy_budget_j == pytest.approx(1 / 0.999, rel=1e-5)
               for c, p in zip(costs(squeezed), tight))


def test_lyapunov_queues_keep_the_energy_budget_on_average_at_less_delay():
    """A device whose fastest cut overspends its budget: ``budget`` never takes that cut, ASL's
    energy-deficit queue takes it while the device is in credit, so its energy is within budget
    on average and its rounds are faster."""
    from fedsplitkd.fleet.schedule import predicted_traffic, update_queues

    exp = build(resolve(tiny()))
    costs, server = exp.server.costs, exp.server
    costs.profiles._sampled[0] = replace(costs.profiles[0], flops=1e13, uplink_hz=1e4, downlink_hz=1e4,
                                         memory_bytes=1e12, energy_budget_j=math.inf)
    at = {cut: costs.costs({0: predicted_traffic(server.at_cut(cut), 100)}, server.at_cut(cut).flops)[0]
          for cut in server.student.cut_points}
    fastest, frugal = min(at, key=lambda c: costs.delay([at[c]])), min(at, key=lambda c: at[c].energy_j)
    assert fastest != frugal
    budget = (at[fastest].energy_j + at[frugal].energy_j) / 2
    costs.profiles._sampled[0] = replace(costs.profiles[0], energy_budget_j=budget)
    runs = {}
    for mode in ("budget", "lyapunov"):
        queues, cuts = {}, []
        for _ in range(200):
            cut = pick_cut(cut_table(server, costs, [0], {0: 100}, 0.0, queues if mode == "lyapunov" else None, 0.1))
            cuts.append(cut)
            if mode == "lyapunov":
                update_queues(queues, {0: at[cut].energy_j}, {0: budget})
        runs[mode] = (np.mean([at[c].energy_j for c in cuts]), np.mean([costs.delay([at[c]]) for c in cuts]), cuts)
    assert set(runs["budget"][2]) == {frugal}
    assert {fastest, frugal} <= set(runs["lyapunov"][2])
    assert runs["lyapunov"][0] <= budget * 1.01                 # on average within budget
    assert runs["lyapunov"][1] < 0.95 * runs["budget"][1]       # and faster


def test_update_queues_is_the_deficit_recursion():
    from fedsplitkd.fleet.schedule import update_queues

    queues = {}
    update_queues(queues, {0: 3.0, 1: 1.0, 2: 5.0}, {0: 2.0, 1: 2.0, 2: math.inf})
    assert queues == {0: 1.0, 1: 0.0}
    update_queues(queues, {0: 1.5, 1: 4.0}, {0: 2.0, 1: 2.0})
    assert queues == {0: 0.5, 1: 2.0}


def test_lyapunov_deficit_comes_off_the_budget_in_the_bandwidth_allocation():
    """Under min-max bandwidth a device in energy deficit gets the band for its budget less its
    deficit spread over the rounds left: more band, less energy this round, so it pays the
    deficit back by the last round."""
    from fedsplitkd.fleet.schedule import predicted_traffic

    exp = build(resolve(tiny(class_mix="mcu:1,smartphone:1", bandwidth_allocation="minmax")))
    costs, server = exp.server.costs, exp.server
    traffic = {d: predicted_traffic(server, 40 + 10 * d) for d in range(6)}
    plain = costs.costs(traffic, server.flops)
    for d in range(6):
        costs.profiles._sampled[d] = replace(costs.profiles[d], energy_budget_j=1.05 * plain[d].energy_j)
    within = costs.costs(traffic, server.flops)
    starved = max(range(6), key=lambda d: within[d].energy_j / costs.profiles[d].energy_budget_j)
    costs.deficits[starved] = costs.profiles[starved].energy_budget_j - 0.9 * within[starved].energy_j
    costs.server_round = costs.rounds  # the last round: the whole deficit is due
    paying = costs.costs(traffic, server.flops)
    assert paying[starved].energy_j <= 0.9 * within[starved].energy_j * (1 + 1e-6)
    costs.server_round = costs.rounds - 1  # two rounds left: half of it is due
    halfway = costs.costs(traffic, server.flops)
    assert paying[starved].energy_j < halfway[starved].energy_j < within[starved].energy_j
    costs.participation = 0.5  # fraction-train 0.5: it trains in 1.5 of the two rounds left, 2/3 is due
    sampled = costs.costs(traffic, server.flops)
    assert paying[starved].energy_j < sampled[starved].energy_j < halfway[starved].energy_j
    assert exp.scheduler.queues is costs.deficits  # the queues the scheduler updates
    assert build(resolve(tiny(fraction_train=0.5))).server.costs.participation == 0.5
