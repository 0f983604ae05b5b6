"""The cost model against hand computations; profiles; FLOP counts; the deadline."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny
from fedsplitkd.config import resolve
from fedsplitkd.fleet.costs import DeviceCost, DeviceTraffic, SplitFlops, device_cost, group_delay, round_delay
from fedsplitkd.run.experiment import run_inprocess
from fedsplitkd.models.zoo import build_student, build_teacher
from fedsplitkd.fleet.profiles import (DeviceProfile, EdgeServer, Fleet, ProfileError, load_classes,
                                 load_profile_csv, parse_mix)

PROFILE = DeviceProfile("test", flops=1e9, memory_bytes=1e6, energy_per_flop=1e-9, uplink_hz=1e6,
                        downlink_hz=2e6, tx_power_w=0.1, rx_power_w=0.2, distance_m=100)
SERVER = EdgeServer(flops=1e4, downlink_power_w=10.0)
FLOPS = SplitFlops(device=100, server=1000, teacher_device=50, teacher_server=500)


def test_device_cost_by_hand():
    traffic = DeviceTraffic(bytes_up=1000, bytes_down=500, samples=10, teacher_samples=10)
    cost = device_cost(PROFILE, SERVER, FLOPS, traffic)
    gain = 10 ** (-(128.1 + 37.6 * math.log10(0.1)) / 10)   # 90.5 dB at 100 m
    noise = 10 ** (-17.4) / 1000                              # W/Hz
    up_rate = 1e6 * math.log2(1 + 0.1 * gain / (noise * 1e6))
    down_rate = 2e6 * math.log2(1 + 10.0 * gain / (noise * 2e6))
    assert cost.device_flops == 10 * 3 * 100 + 10 * 50
    assert cost.server_flops == 10 * 3 * 1000 + 10 * 500
    assert cost.compute_s == pytest.approx(3500 / 1e9)
    assert cost.uplink_s == pytest.approx(8000 / up_rate)
    assert cost.downlink_s == pytest.approx(4000 / down_rate)
    assert cost.energy_j == pytest.approx(1e-9 * 3500 + 0.1 * 8000 / up_rate + 0.2 * 4000 / down_rate)


def test_dvfs_energy_by_hand():
    dvfs = DeviceProfile(**{**PROFILE.__dict__, "kappa": 1e-28, "cpu_hz": 1e9, "flops_per_cycle": 2.0})
    cost = device_cost(dvfs, SERVER, FLOPS, DeviceTraffic(samples=10))
    assert cost.energy_j == pytest.approx(1e-28 * 1e18 * 3000 / 2.0)


def costs(*times_and_flops):
    return [DeviceCost(0, f, t, 0, 0, 0) for t, f in times_and_flops]


def test_round_delay_is_the_sum_of_the_groups_maxima_plus_server_time():
    first = costs((1.0, 1e4), (3.0, 2e4), (2.0, 3e4))   # slowest 3 s, server 6e4 / 1e4 = 6 s
    second = costs((0.5, 1e4))                             # 0.5 s + 1 s
    assert group_delay(first, SERVER) == pytest.approx(9.0)
    assert round_delay([first, second], SERVER) == pytest.approx(10.5)
    assert round_delay([first, second], SERVER, deadline_s=2.0) == pytest.approx(2.0 + 6.0 + 0.5 + 1.0)


def test_a_pipelined_server_steps_each_device_when_it_is_ready():
    # Ready at 1, 2 and 10 s; server work 3, 3 and 1 s (SERVER does 1e4 FLOP/s).
    group = costs((1.0, 3e4), (2.0, 3e4), (10.0, 1e4))
    assert group_delay(group, SERVER) == pytest.approx(10.0 + 7.0)
    assert group_delay(group, SERVER, allocation="pipelined") == pytest.approx(11.0)  # 1+3, 4+3, max(7, 10)+1
    assert group_delay(group, SERVER, deadline_s=5.0, allocation="pipelined") == pytest.approx(8.0)  # 4, 7, 7+1
    together = costs((2.0, 1e4), (2.0, 2e4))  # ready at once: nothing to overlap
    assert group_delay(together, SERVER, allocation="pipelined") == pytest.approx(group_delay(together, SERVER))
    rng = np.random.default_rng(0)
    for _ in range(50):  # never later than waiting for all, never sooner than the last device or the work
        group = costs(*zip(rng.exponential(2.0, 6), rng.exponential(2e4, 6)))
        pipelined = group_delay(group, SERVER, allocation="pipelined")
        assert pipelined <= group_delay(group, SERVER) + 1e-9
        assert pipelined >= max(max(c.time_s for c in group), sum(c.server_flops for c in group) / 1e4) - 1e-9


@pytest.mark.parametrize("family,shape,tokens", [("mlp", (64,), False), ("cnn1d", (9, 128), False),
                                                 ("cnn2d", (1, 8, 8), False), ("charcnn", (40,), True)])
def test_block_flops_agree_with_a_count_by_hand(family, shape, tokens):
    for model in (build_student(family, shape, 10, tokens), build_teacher(family, shape, 10, tokens)):
        x = model.example_input()
        for stats, (_, block) in zip(model.block_stats(), model.named_children()):
            expected = analytic_flops_at(block, x)
            assert stats.forward_flops == pytest.approx(expected, rel=0.05), stats.name
            with torch.no_grad():
                x = block(x)


def analytic_flops_at(block: nn.Module, x) -> float:
    """2 x multiply-adds of every Linear / Conv layer, counted by hand from the shapes."""
    total = 0.0

    def count(layer, inputs, output):
        nonlocal total
        if isinstance(layer, nn.Linear):
            total += 2 * layer.in_features * layer.out_features
        elif isinstance(layer, nn.Conv1d):
            total += 2 * layer.in_channels * layer.out_channels * layer.kernel_size[0] * output.shape[-1]
        elif isinstance(layer, nn.Conv2d):
            total += (2 * layer.in_channels * layer.out_channels * layer.kernel_size[0]
                      * layer.kernel_size[1] * output.shape[-2] * output.shape[-1])

    hooks = [layer.register_forward_hook(count) for layer in block.modules()]
    with torch.no_grad():
        block(x)
    for hook in hooks:
        hook.remove()
    return total


# ---- profiles ----------------------------------------------------------------------------
def test_same_seed_same_fleet_and_independent_of_fleet_size():
    a, b = Fleet(resolve({"seed": 1})), Fleet(resolve({"seed": 1}))
    assert [a[i] for i in range(30)] == [b[i] for i in reversed(range(30))][::-1]
    c = Fleet(resolve({"seed": 2}))
    assert [a[i] for i in range(30)] != [c[i] for i in range(30)]
    assert {a[i].device_class for i in range(60)} == {"mcu", "raspberry_pi", "jetson_nano", "smartphone"}


def test_class_mix_and_jitter():
    fleet = Fleet(resolve({"class-mix": "mcu:1", "profile-jitter": 0.1}))
    base, _ = load_classes()
    for i in range(20):
        assert fleet[i].device_class == "mcu"
        assert 0.9 * base["mcu"].flops <= fleet[i].flops <= 1.1 * base["mcu"].flops
        assert fleet[i].tx_power_w == base["mcu"].tx_power_w  # not jittered
    assert parse_mix("mcu:1,smartphone:3", base) == {"mcu": 0.25, "smartphone": 0.75}


def test_profile_file_and_bad_profiles(tmp_path):
    path = tmp_path / "fleet.csv"
    path.write_text("device_class,flops,memory_bytes,energy_per_flop,uplink_hz,downlink_hz,tx_power_w,"
                    "rx_power_w,distance_m,energy_budget_j\n"
                    "pi,1e10,4e9,5e-10,2e7,2e7,0.1,0.2,80,5\nphone,1e11,6e9,4e-11,1e7,1e7,0.2,0.3,150,\n")
    fleet = load_profile_csv(str(path))
    assert [p.device_class for p in fleet] == ["pi", "phone"]
    assert fleet[0].energy_budget_j == 5 and fleet[1].energy_budget_j == math.inf
    with pytest.raises(ProfileError, match="no profile for device 2"):
        Fleet(resolve({"profile-file": str(path)}))[2]
    with pytest.raises(ProfileError, match="unknown class 'toaster'"):
        parse_mix("toaster:1", load_classes()[0])
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes:\n  x:\n    flops: fast\nedge_server:\n  flops: 1\n  downlink_power_w: 1\n")
    with pytest.raises(ProfileError, match="class 'x' misses"):
        load_classes(str(bad))


# ---- the clock in a run --------------------------------------------------------------------
def test_the_clock_adds_round_delays_and_prices_what_was_sent():
    exp, rows = run_inprocess(tiny(num_rounds=2, teacher_input="embedding"), 3)
    assert rows[2]["sim_time_s"] == pytest.approx(rows[1]["round_delay_s"] + rows[2]["round_delay_s"])
    for r in rows[1:]:
        per_device = [d for d in exp.device_rows if d["round"] == r["round"]]
        assert sum(d["bytes_up"] for d in per_device) == r["bytes_up"]
        assert sum(d["energy_j"] for d in per_device) == pytest.approx(r["device_energy_j"])
        assert r["device_flops"] == sum(d["samples"] for d in per_device) * 3 * exp.server.flops.device \
            + sum(d["samples"] for d in per_device) * exp.server.flops.teacher_device
    # cached teacher inputs: the device runs the teacher's embedding in a sample's first round only
    exp, rows = run_inprocess(tiny(num_rounds=2, teacher_input="cached"), 3)
    samples = [sum(d["samples"] for d in exp.device_rows if d["round"] == r) for r in (1, 2)]
    assert rows[1]["device_flops"] == samples[0] * (3 * exp.server.flops.device + exp.server.flops.teacher_device)
    assert rows[2]["device_flops"] == samples[1] * 3 * exp.server.flops.device


def test_stragglers_past_the_deadline_are_dropped_or_waited_for():
    _, waited = run_inprocess(tiny(deadline_s=1e-6, straggler_policy="wait"), 3)
    exp, dropped = run_inprocess(tiny(deadline_s=1e-6, straggler_policy="drop"), 3)
    assert waited[1]["stragglers"] == dropped[1]["stragglers"] == 3
    assert waited[1]["completed"] == 3 and dropped[1]["completed"] == 0
    server_s = dropped[1]["server_flops"] / exp.server.costs.server.flops
    assert dropped[1]["round_delay_s"] == pytest.approx(1e-6 + server_s)


def test_fading_is_repeatable_and_unit_mean():
    cfg = resolve({"fading": True})
    from fedsplitkd.fleet.costs import CostModel

    model = CostModel.from_config(cfg)
    draws = []
    for r in range(1, 400):
        model.server_round = r
        draws.append(model.fading_of(3))
    model.server_round = 5
    assert model.fading_of(3) == draws[4]
    assert np.mean(draws) == pytest.approx(1.0, rel=0.15)


# ---- every method priced by the same rules --------------------------------------------------

def _play(path):
    from test_lm import play
    return play(path)


@pytest.mark.parametrize("case", ["classifier", "language-model"])
def test_the_adaptive_cuts_predicted_traffic_is_what_a_round_sends(tmp_path, case):
    """The prediction the cut is chosen by equals a real round's bytes: labels are 8 bytes
    per position for a sequence (8 x T a sample), plus 8 bytes per minibatch size."""
    from fedsplitkd.run import experiment
    from fedsplitkd.protocol.device import device_setup
    from fedsplitkd.protocol.payload import payload_bytes, pack, TEACHER
    from fedsplitkd.fleet.schedule import predicted_traffic
    from fedsplitkd.protocol.rounds import InProcessTransport
    from test_lm import lm_run
    overrides = tiny(local_epochs=2) if case == "classifier" else {**lm_run(_play(tmp_path / "play.txt")),
                                                                    "local-epochs": 2}
    overrides["teacher-input"] = "embedding"  # the teacher input of every sample, each round
    exp = experiment.build(resolve(overrides))
    stats = exp.server.run_round(InProcessTransport({0: device_setup(exp.cfg, 0, 4)}), [0], 1)
    real = stats.traffic[0]
    predicted = predicted_traffic(exp.server, real.samples)
    assert predicted.bytes_up == real.bytes_up
    # The teacher's embedding goes down once per device in the whole run: not per round.
    assert predicted.bytes_down == real.bytes_down - payload_bytes(pack(TEACHER, exp.server.teacher_weights))
    if case == "language-model":  # by hand: the int64 labels of T positions a sample
        assert exp.server.label_shape == (exp.cfg["seq-len"],)


def test_feddf_distillation_is_priced_as_server_compute():
    """Each member's forward over the public set once; per step and sample, the fused model's
    forward and backward."""
    from fedsplitkd.baselines.accounting import round_stats, whole_flops
    from fedsplitkd.baselines.feddf import distill_flops
    from fedsplitkd.fleet.costs import CostModel

    cfg = resolve(tiny())
    student = build_student("auto", (1, 8, 8), 10)
    forward = sum(s.forward_flops for s in student.block_stats())
    assert distill_flops(student, members=4, steps=100, batch_size=64, public=500) == forward * (4 * 500 + 100 * 64 * 3)
    assert distill_flops(student, members=4, steps=0, batch_size=64, public=500) == 0
    traffic = {0: DeviceTraffic(bytes_up=1000, bytes_down=1000, samples=50)}
    plain = round_stats(CostModel.from_config(cfg), dict(traffic), whole_flops(student), 1)
    costs = CostModel.from_config(cfg)
    priced = round_stats(costs, dict(traffic), whole_flops(student), 1, server_flops=1e9)
    assert priced.costs["server_flops"] == plain.costs["server_flops"] + 1e9
    assert priced.costs["round_delay_s"] == pytest.approx(plain.costs["round_delay_s"] + 1e9 / costs.server.flops)
    assert priced.costs["device_energy_j"] == plain.costs["device_energy_j"]


def test_training_memory_is_priced_alike_for_whole_model_and_split_methods(tmp_path, caplog):
    """FedAvg's devices train the whole student, split learning's the blocks below the cut:
    both are checked against each device's memory by one rule. On MCU-class devices (1 MB) the
    digits student at width 2 fits below the cut (0.53 MB) and not whole (2.6 MB)."""
    from fedsplitkd.baselines.accounting import whole_flops
    from fedsplitkd.fleet.costs import training_memory
    from fedsplitkd.strategies.inprocess import run_app

    student = build_student("auto", (1, 8, 8), 10, width=2)
    whole, split = whole_flops(student), SplitFlops.of(student, "default", None)
    assert whole.device_params == sum(p.numel() for p in student.parameters())
    assert split.device_params == sum(p.numel() for p in student.device_part("default").parameters())
    assert training_memory(100, 10, 32) == 4 * (3 * 100 + 2 * 32 * 10)
    config = {**tiny(), "class-mix": "mcu:1", "student-width": 2, "output-dir": str(tmp_path)}
    with caplog.at_level("WARNING", logger="fedsplitkd"):
        fedavg = run_app({**config, "method": "fedavg", "run-name": "fedavg"}, 2)
    assert len([r for r in caplog.records if "cannot hold their training in memory" in r.getMessage()]) == 1
    caplog.clear()
    split_run = run_app({**config, "method": "split", "run-name": "split"}, 2)
    assert not [r for r in caplog.records if "in memory" in r.getMessage()]
    for directory, need, over in [(fedavg, training_memory(whole.device_params, whole.device_activations, 32), True),
                                  (split_run, training_memory(split.device_params, split.device_activations, 32), False)]:
        rows = [r for r in csv.DictReader(open(directory / "devices.csv")) if int(r["samples"])]
        assert rows and {int(r["memory_bytes"]) for r in rows} == {need}
        assert {r["over_memory"] for r in rows} == {str(over)}
        summary = json.loads((directory / "summary.json").read_text())
        assert summary["devices_over_memory"] == (len({r["device"] for r in rows}) if over else 0)
