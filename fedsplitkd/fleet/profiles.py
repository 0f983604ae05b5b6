"""Device profiles: what each simulated device computes, transmits and spends.

Classes come from a YAML file (``device_classes.yaml`` beside this module, with the
source of every figure, or the user's own); a fleet is sampled from a class mix with
jitter, deterministically for a seed, or read per device from a CSV file.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

from omegaconf import OmegaConf

from fedsplitkd import streams

BUNDLED_CLASSES = Path(__file__).with_name("device_classes.yaml")
NOISE_W_PER_HZ = 10 ** (-174 / 10) / 1000  # thermal noise, -174 dBm/Hz


class ProfileError(ValueError):
    """A profile file or class mix is unusable; the message names the file, class or field."""


@dataclass(frozen=True)
class DeviceProfile:
    device_class: str
    flops: float              # effective FLOP/s
    memory_bytes: float
    energy_per_flop: float    # J/FLOP (used unless kappa > 0)
    uplink_hz: float
    downlink_hz: float
    tx_power_w: float
    rx_power_w: float
    distance_m: float
    energy_budget_j: float = math.inf   # per round
    kappa: float = 0.0                  # DVFS model: E = kappa * f^2 * cycles
    cpu_hz: float = 0.0
    flops_per_cycle: float = 1.0


@dataclass(frozen=True)
class EdgeServer:
    flops: float
    downlink_power_w: float
    bandwidth_hz: float = 4e7  # shared among the devices served at once (bandwidth-allocation)


NUMERIC = [f.name for f in fields(DeviceProfile) if f.name != "device_class"]
REQUIRED = NUMERIC[:8]


def _profile(name: str, values: dict, origin: str) -> DeviceProfile:
    missing = [k for k in REQUIRED if k not in values]
    unknown = [k for k in values if k not in NUMERIC]
    if missing or unknown:
        raise ProfileError(f"{origin}: class '{name}' misses {missing} / has unknown fields {unknown}")
    try:
        numbers = {k: float(v) for k, v in values.items()}
    except (TypeError, ValueError) as err:
        raise ProfileError(f"{origin}: class '{name}': {err}") from err
    bad = [k for k, v in numbers.items() if not v >= 0 or (k in ("flops", "uplink_hz", "downlink_hz") and v == 0)]
    if bad:
        raise ProfileError(f"{origin}: class '{name}': fields {bad} must be positive numbers")
    return DeviceProfile(name, **numbers)


def load_classes(path: str = "") -> tuple[dict[str, DeviceProfile], EdgeServer]:
    """Device classes and the edge server from a YAML file ('' = the bundled one)."""
    file = Path(path).expanduser() if path else BUNDLED_CLASSES
    if not file.is_file():
        raise ProfileError(f"device-classes '{file}': no such file")
    spec = OmegaConf.to_container(OmegaConf.load(file))
    if not isinstance(spec, dict) or not isinstance(spec.get("classes"), dict) or "edge_server" not in spec:
        raise ProfileError(f"device-classes '{file}': needs 'classes' and 'edge_server' sections")
    classes = {name: _profile(name, values, f"device-classes '{file}'") for name, values in spec["classes"].items()}
    server = spec["edge_server"]
    try:
        edge = EdgeServer(float(server["flops"]), float(server["downlink_power_w"]),
                          float(server.get("bandwidth_hz", EdgeServer.bandwidth_hz)))
    except (KeyError, TypeError, ValueError) as err:
        raise ProfileError(f"device-classes '{file}': edge_server needs flops and downlink_power_w ({err})") from err
    return classes, edge


def parse_mix(mix: str, classes: dict[str, DeviceProfile]) -> dict[str, float]:
    """'mcu:1,raspberry_pi:2' -> normalised weights ('' = every class alike)."""
    if not mix:
        return {name: 1 / len(classes) for name in classes}
    weights = {}
    for item in mix.split(","):
        name, _, weight = item.strip().partition(":")
        if name not in classes:
            raise ProfileError(f"class-mix: unknown class '{name}' (known: {', '.join(classes)})")
        try:
            weights[name] = float(weight or 1)
        except ValueError:
            raise ProfileError(f"class-mix: weight of '{name}' must be a number, got '{weight}'") from None
    total = sum(weights.values())
    if total <= 0:
        raise ProfileError("class-mix: weights must add up to more than 0")
    return {k: v / total for k, v in weights.items()}


JITTERED = ("flops", "energy_per_flop", "uplink_hz", "downlink_hz", "distance_m")


def sample_profile(device: int, classes: dict[str, DeviceProfile], mix: dict[str, float],
                   jitter: float, seed: int) -> DeviceProfile:
    """Device ``device``'s profile: a class drawn by ``mix``, each figure scaled by
    U(1 - jitter, 1 + jitter). Its own random stream, so it does not depend on the fleet size."""
    rng = streams.profile(seed, device)
    names = list(mix)
    base = classes[names[rng.choice(len(names), p=[mix[n] for n in names])]]
    return replace(base, **{k: getattr(base, k) * rng.uniform(1 - jitter, 1 + jitter) for k in JITTERED})


class Fleet:
    """Profiles by device (partition) id: from a CSV, or sampled on demand from the classes."""

    def __init__(self, cfg):
        self.classes, self.server = load_classes(cfg.fleet.device_classes)
        self.fixed = load_profile_csv(cfg.fleet.profile_file) if cfg.fleet.profile_file else None
        self.mix = parse_mix(cfg.fleet.class_mix, self.classes)
        self.jitter, self.seed = cfg.fleet.profile_jitter, cfg.train.seed
        self._sampled: dict[int, DeviceProfile] = {}

    def __getitem__(self, device: int) -> DeviceProfile:
        if self.fixed is not None:
            if not 0 <= device < len(self.fixed):
                raise ProfileError(f"profile-file has {len(self.fixed)} devices, no profile for device {device}")
            return self.fixed[device]
        if device not in self._sampled:
            self._sampled[device] = sample_profile(device, self.classes, self.mix, self.jitter, self.seed)
        return self._sampled[device]


def load_profile_csv(path: str) -> list[DeviceProfile]:
    """One row per device (in partition order): device_class and the numeric fields."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ProfileError(f"profile-file '{file}': no such file")
    with open(file, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ProfileError(f"profile-file '{file}': no devices")
    return [_profile(row.pop("device_class", f"device{i}") or f"device{i}",
                     {k: v for k, v in row.items() if v not in ("", None)}, f"profile-file '{file}' row {i + 2}")
            for i, row in enumerate(rows)]


def channel_gain(distance_m: float, fading: float = 1.0) -> float:
    """Linear power gain: 3GPP TR 36.814 path loss 128.1 + 37.6 log10(d/km) dB, times fading."""
    loss_db = 128.1 + 37.6 * math.log10(max(distance_m, 1.0) / 1000)
    return 10 ** (-loss_db / 10) * fading


def rate_bps(bandwidth_hz: float, power_w: float, gain: float) -> float:
    """Shannon rate B log2(1 + SNR) with thermal noise over the bandwidth."""
    return bandwidth_hz * math.log2(1 + power_w * gain / (NOISE_W_PER_HZ * bandwidth_hz))
