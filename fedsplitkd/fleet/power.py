"""Transmit power control: a device with time to spare sends at the least power that meets the round.

At band b and uplink time t, Shannon's rate b log2(1 + P g / (N0 b)) = bits / t gives the
least power P = (2^(bits / (t b)) - 1) N0 b / g. The transmit energy P t falls as t grows
(toward the Shannon limit bits N0 ln 2 / g), so a device that would finish before the
round's deadline spends its slack on a slower uplink and saves energy without delaying
the round. The receive and compute energy do not change.

``Links`` holds the devices served at once as arrays: min-max bandwidth evaluates these
thousands of times a round (a bisection on the deadline around one on each device's band).
"""

from __future__ import annotations

import numpy as np

from fedsplitkd.fleet.profiles import NOISE_W_PER_HZ, DeviceProfile, EdgeServer, channel_gain

MAX_BITS_PER_HZ = 1000.0  # beyond this, 2^x overflows: no power a device has would do


class Links:
    """The radio side of devices served at once; compute time and energy are fixed inputs."""

    def __init__(self, profiles: list[DeviceProfile], server: EdgeServer, compute_s: list[float],
                 compute_j: list[float], bytes_up: list[int], bytes_down: list[int], fadings: list[float]):
        self.compute_s, self.compute_j = np.asarray(compute_s, float), np.asarray(compute_j, float)
        self.bits_up, self.bits_down = 8 * np.asarray(bytes_up, float), 8 * np.asarray(bytes_down, float)
        gains = np.array([channel_gain(p.distance_m, f) for p, f in zip(profiles, fadings)])
        self.noise = NOISE_W_PER_HZ / gains  # noise power per Hz over the gain
        self.max_power = np.array([p.tx_power_w for p in profiles])
        self.rx_power = np.array([p.rx_power_w for p in profiles])
        self.server_power = server.downlink_power_w

    def _seconds(self, bits: np.ndarray, band: np.ndarray, power) -> np.ndarray:
        rate = band * np.log2(1 + power / (self.noise * band))
        return np.divide(bits, rate, out=np.zeros_like(bits), where=bits > 0)

    def downlink_s(self, band: np.ndarray) -> np.ndarray:
        return self._seconds(self.bits_down, band, self.server_power)

    def time_at_max(self, band: np.ndarray) -> np.ndarray:
        """Each device's time sending at its full power."""
        return self.compute_s + self._seconds(self.bits_up, band, self.max_power) + self.downlink_s(band)

    def least_power(self, band: np.ndarray, deadline: float) -> np.ndarray:
        """The least transmit power that has each device done by ``deadline`` (inf: none does)."""
        spare = deadline - self.compute_s - self.downlink_s(band)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            bits_per_hz = np.where(spare > 0, self.bits_up / (np.maximum(spare, 1e-300) * band), np.inf)
            power = np.expm1(np.minimum(bits_per_hz, MAX_BITS_PER_HZ) * np.log(2)) * self.noise * band
        power = np.where(bits_per_hz > MAX_BITS_PER_HZ, np.inf, power)
        return np.where(self.bits_up > 0, power, np.where(spare >= 0, 0.0, np.inf))

    def energy(self, band: np.ndarray, deadline: float) -> np.ndarray:
        """Each device's energy at the least power meeting ``deadline`` (inf where even its
        full power does not)."""
        power = self.least_power(band, deadline)
        downlink = self.downlink_s(band)
        uplink = self._seconds(self.bits_up, band, np.where(np.isfinite(power), power, self.max_power))
        energy = self.compute_j + power * uplink + self.rx_power * downlink
        return np.where(power <= self.max_power * (1 + 1e-12), energy, np.inf)


def least_bands(meets, total: float, n: int) -> np.ndarray:
    """Per device, the least band in (0, total] with ``meets(bands)`` true (a bisection on all
    devices at once; ``meets`` is monotone in the band); inf where the whole band does not."""
    whole = np.full(n, total)
    low, high = np.full(n, total * 1e-9), whole.copy()
    for _ in range(60):
        mid = (low + high) / 2
        ok = meets(mid)
        low, high = np.where(ok, low, mid), np.where(ok, mid, high)
    return np.where(meets(whole), high, np.inf)


def slack_powers(links: Links, bands: np.ndarray, deadline: float) -> np.ndarray:
    """Each device's transmit power for a round that ends at ``deadline``: the least that
    meets it, or its full power where even that does not."""
    power = links.least_power(bands, deadline)
    return np.where(power <= links.max_power, power, links.max_power)


def minmax_with_power(links: Links, total: float, budgets: np.ndarray, claim: float, low: float,
                      high: float) -> tuple[np.ndarray, float] | None:
    """Min-max bandwidth when devices send at the least power meeting the deadline (the rules
    of ``allocate_bandwidth``'s full-power min-max, with energy at the least power).

    At deadline T a device's least band has it done by T at full power and, if it has a
    finite ``budgets`` entry that the whole band can meet at T, within ``excess`` x that
    budget at its least power; a budget the whole band cannot meet asks for the equal share.
    ``excess`` is 1, or where the budgets' bands exceed ``claim`` at ``high``, the least
    that fits. Then the least T in [low, high] whose bands fit in ``total`` (``high`` grows
    until they do). Less power is less energy, so a budget asks for less band than at full
    power and the slowest device gets more. Returns the bands (the left-over band shared
    out) and T, or None where no deadline fits.
    """
    n = len(budgets)
    budgeted = np.isfinite(budgets)
    slack = 1 + 1e-12  # float rounding between these arrays and the scalar cost model

    def thrifty(deadline: float, excess: float) -> np.ndarray:  # least bands within excess x budget
        reachable = budgeted & (links.energy(np.full(n, total), deadline) <= budgets)
        limits = np.where(reachable, excess * budgets, np.inf)
        bands = least_bands(lambda b: links.energy(b, deadline) <= limits, total, n)
        return np.where(reachable, bands, np.where(budgeted, total / n, 0.0))

    excess = 1.0
    if thrifty(high, excess).sum() > claim * slack:  # the least worst relative overspend that fits the claim
        top = 2.0
        while thrifty(high, top).sum() > claim * slack and top < 1e6:
            top *= 2
        bottom = 1.0
        for _ in range(40):
            mid = (bottom + top) / 2
            bottom, top = (mid, top) if thrifty(high, mid).sum() > claim * slack else (bottom, mid)
        excess = top

    def bands_at(deadline: float) -> np.ndarray:
        timely = least_bands(lambda b: links.time_at_max(b) <= deadline * slack, total, n)
        return np.maximum(timely, thrifty(deadline, excess))

    for _ in range(60):
        if bands_at(high).sum() <= total * slack:
            break
        low, high = high, 1.5 * high
    else:
        return None
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if bands_at(mid).sum() > total * slack else (low, mid)
    bands = bands_at(high)
    return bands + (total - bands.sum()) / n, high
