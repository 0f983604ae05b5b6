"""Pricing whole-model baselines with the same cost model as the split methods."""

from __future__ import annotations

import statistics

from fedsplitkd.fleet.costs import CostModel, DeviceTraffic, SplitFlops
from fedsplitkd.models.zoo import SplitModel
from fedsplitkd.protocol.server import RoundStats


def whole_flops(student: SplitModel) -> SplitFlops:
    """The whole student runs and trains on the device; the server only averages."""
    stats = student.block_stats()
    return SplitFlops(device=sum(s.forward_flops for s in stats), server=0.0, teacher_device=0.0, teacher_server=0.0,
                      device_params=sum(s.params for s in stats),
                      device_activations=sum(s.activation_numel for s in stats))


def round_stats(costs: CostModel, traffic: dict[int, DeviceTraffic], flops: SplitFlops,
                server_round: int, server_flops: float = 0.0) -> RoundStats:
    """A RoundStats (bytes, completed devices, cost totals) from per-device traffic, plus
    ``server_flops`` of server compute after the devices (FedDF's distillation)."""
    costs.server_round = server_round
    stats = RoundStats(devices=len(traffic), completed=sum(t.samples > 0 for t in traffic.values()),
                       samples=sum(t.samples for t in traffic.values()),
                       bytes_up=sum(t.bytes_up for t in traffic.values()),
                       bytes_down=sum(t.bytes_down for t in traffic.values()), traffic=dict(traffic))
    stats.costs, stats.device_costs = costs.account(traffic, flops, server_flops)
    return stats


def mean_of_devices(metrics: list) -> tuple[tuple[float, float], tuple[float, float]]:
    """(test accuracy, loss) and (holdout accuracy, loss), each the mean over the devices'
    own models (NaN where no device reported one)."""
    def mean(key: str) -> float:
        values = [m[key] for m in metrics if key in m]
        return statistics.fmean(values) if values else float("nan")

    return (mean("test_accuracy"), mean("test_loss")), (mean("holdout_accuracy"), mean("holdout_loss"))
