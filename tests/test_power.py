"""Transmit power control (power-allocation = least-energy) in the cost model."""

import math
from dataclasses import replace

import numpy as np
import pytest

from conftest import tiny
from fedsplitkd.config import ConfigError, resolve
from fedsplitkd.fleet.costs import DeviceTraffic, SplitFlops, allocate_bandwidth, compute_energy, device_cost
from fedsplitkd.fleet.power import Links
from fedsplitkd.fleet.profiles import EdgeServer, load_classes, sample_profile
from fedsplitkd.fleet.schedule import predicted_traffic
from fedsplitkd.run.experiment import build

SERVER = EdgeServer(flops=1e12, downlink_power_w=20.0, bandwidth_hz=4e7)
FLOPS = SplitFlops(1e5, 1e6, 0, 0)


@pytest.fixture
def group():
    """Six devices (MCUs and phones) with different uploads, served at once."""
    classes, _ = load_classes()
    profiles = [sample_profile(i, classes, {"mcu": 0.5, "smartphone": 0.5}, 0.3, seed=1) for i in range(6)]
    traffic = [DeviceTraffic(bytes_up=200_000 * (i + 1), bytes_down=50_000, samples=100) for i in range(6)]
    return profiles, traffic


def costs(allocated, traffic):
    return [device_cost(p, SERVER, FLOPS, t) for p, t in zip(allocated, traffic)]


def test_least_power_has_the_device_done_at_the_deadline(group):
    """The power from inverting Shannon's rate makes the device's own cost model time equal
    the deadline, at the energy Links predicts, and less than its full power's energy."""
    profiles, traffic = group
    shared = [replace(p, uplink_hz=4e6, downlink_hz=4e6) for p in profiles]
    full = costs(shared, traffic)
    deadline = 1.5 * max(c.time_s for c in full)
    links = Links(shared, SERVER, [c.compute_s for c in full],
                  [compute_energy(p, c.device_flops) for p, c in zip(shared, full)],
                  [t.bytes_up for t in traffic], [t.bytes_down for t in traffic], [1.0] * 6)
    bands = np.full(6, 4e6)
    powers = links.least_power(bands, deadline)
    assert np.all(powers < [p.tx_power_w for p in shared])
    slow = costs([replace(p, tx_power_w=float(w)) for p, w in zip(shared, powers)], traffic)
    assert [c.time_s for c in slow] == pytest.approx([deadline] * 6, rel=1e-9)
    assert [c.energy_j for c in slow] == pytest.approx(list(links.energy(bands, deadline)), rel=1e-9)
    assert all(s.energy_j < f.energy_j for s, f in zip(slow, full))
    assert np.isinf(links.energy(bands, 0.5 * min(c.time_s for c in full))).all()  # no power is that fast


def test_least_energy_power_keeps_the_equal_split_delay_at_less_energy(group):
    profiles, traffic = group
    full = costs(allocate_bandwidth(profiles, SERVER, FLOPS, traffic, [1.0] * 6, "equal"), traffic)
    allocated = allocate_bandwidth(profiles, SERVER, FLOPS, traffic, [1.0] * 6, "equal", "least-energy")
    least = costs(allocated, traffic)
    slowest = max(range(6), key=lambda i: full[i].time_s)
    assert max(c.time_s for c in least) == pytest.approx(full[slowest].time_s, rel=1e-9)
    assert allocated[slowest].tx_power_w == pytest.approx(profiles[slowest].tx_power_w)
    assert all(c.energy_j <= f.energy_j * (1 + 1e-12) for c, f in zip(least, full))
    assert sum(c.energy_j for c in least) < 0.9 * sum(f.energy_j for f in full)


def test_least_energy_power_lets_minmax_speed_up_within_the_budgets(group):
    """Budgets of the equal split's own energies pin min-max at full power to the equal split
    (each device's least band for its budget is its equal share); sending the devices with
    time to spare at their least power frees band for the slowest, within every budget."""
    profiles, traffic = group
    ones = [1.0] * 6
    equal = costs(allocate_bandwidth(profiles, SERVER, FLOPS, traffic, ones, "equal"), traffic)
    budgeted = [replace(p, energy_budget_j=c.energy_j) for p, c in zip(profiles, equal)]
    at_full = costs(allocate_bandwidth(budgeted, SERVER, FLOPS, traffic, ones, "minmax"), traffic)
    allocated = allocate_bandwidth(budgeted, SERVER, FLOPS, traffic, ones, "minmax", "least-energy")
    least = costs(allocated, traffic)
    unbudgeted = costs(allocate_bandwidth(profiles, SERVER, FLOPS, traffic, ones, "minmax"), traffic)
    equal_delay = max(c.time_s for c in equal)
    assert max(c.time_s for c in at_full) == pytest.approx(equal_delay, rel=1e-3)
    assert max(c.time_s for c in unbudgeted) <= max(c.time_s for c in least) < 0.9 * equal_delay
    assert all(c.energy_j <= p.energy_budget_j * (1 + 1e-6) for c, p in zip(least, budgeted))
    assert sum(p.uplink_hz for p in allocated) == pytest.approx(4e7, rel=1e-9)
    assert all(p.tx_power_w <= q.tx_power_w for p, q in zip(allocated, profiles))


def test_least_energy_power_never_makes_a_device_miss_the_deadline(group):
    """With a deadline before the slowest device's time, the others slow down only to the
    deadline: a device in time at full power stays in time."""
    profiles, traffic = group
    ones = [1.0] * 6
    full = costs(allocate_bandwidth(profiles, SERVER, FLOPS, traffic, ones, "equal"), traffic)
    deadline = sorted(c.time_s for c in full)[-2] * 1.01  # only the slowest misses it
    least = costs(allocate_bandwidth(profiles, SERVER, FLOPS, traffic, ones, "equal", "least-energy", deadline),
                  traffic)
    assert sum(c.time_s > deadline * (1 + 1e-9) for c in least) == 1
    assert sorted(c.time_s for c in least)[-2] == pytest.approx(deadline, rel=1e-9)


def test_power_allocation_in_the_run_config_and_the_cost_model():
    with pytest.raises(ConfigError, match="'power-allocation'"):
        resolve(tiny(power_allocation="least-energy", bandwidth_allocation="dedicated"))
    with pytest.raises(ConfigError, match="'power-allocation'"):
        resolve(tiny(power_allocation="lowest"))
    runs = {}
    for power in ("max", "least-energy"):
        exp = build(resolve(tiny(class_mix="mcu:1,smartphone:1", bandwidth_allocation="equal",
                                 power_allocation=power)))
        traffic = {d: predicted_traffic(exp.server, 40 + 10 * d) for d in range(6)}
        runs[power] = exp.server.costs.costs(traffic, exp.server.flops)
    assert math.isclose(max(c.time_s for c in runs["max"].values()),
                        max(c.time_s for c in runs["least-energy"].values()), rel_tol=1e-9)
    assert sum(c.energy_j for c in runs["least-energy"].values()) < sum(c.energy_j for c in runs["max"].values())


def test_budgets_of_the_least_energy_equal_split_are_met_not_relaxed(group):
    """Budgets of what the equal split spends at the least power are below every full-power
    split's energies: full-power min-max can only relax them, but at the least power the
    equal split meets them, so least-energy min-max keeps every device within its budget
    and is no slower than that equal split."""
    profiles, traffic = group
    ones = [1.0] * 6
    reference = allocate_bandwidth(profiles, SERVER, FLOPS, traffic, ones, "equal", "least-energy")
    spent = costs(reference, traffic)
    budgeted = [replace(p, energy_budget_j=c.energy_j) for p, c in zip(profiles, spent)]
    full = costs(allocate_bandwidth(budgeted, SERVER, FLOPS, traffic, ones, "minmax"), traffic)
    assert any(c.energy_j > p.energy_budget_j * 1.01 for c, p in zip(full, budgeted))
    least = costs(allocate_bandwidth(budgeted, SERVER, FLOPS, traffic, ones, "minmax", "least-energy"), traffic)
    assert all(c.energy_j <= p.energy_budget_j * (1 + 1e-6) for c, p in zip(least, budgeted))
    assert max(c.time_s for c in least) <= max(c.time_s for c in spent) * (1 + 1e-9)
