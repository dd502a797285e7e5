"""Parameters of a simulated decoy-state BB84 link.

Every field has the meaning it has in the decoy-state literature, so a parameter set
from a paper can be typed in directly. `LinkParams.validate()` names the offending
field and the allowed range; the CLI turns that into a one-line user error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from qkd.common.errors import QkdError
from qkd.sim.constants import (
    DEFAULT_CASCADE_VARIANT,
    DEFAULT_EPS_COR,
    DEFAULT_EPS_SEC,
    DEFAULT_FRAME_BITS,
    DEFAULT_QBER_ABORT,
)
from qkd.sim.constants import EVE_MODES as EVE_MODES  # re-exported (older importers)


class ParamError(QkdError, ValueError):
    """A parameter is out of range; the message names the field and the fix."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name


@dataclass(frozen=True)
class LinkParams:
    # Channel.
    distance_km: float = 25.0
    fiber_loss_db_km: float = 0.2
    # Bob's detection system: efficiency of the detectors (and Bob's optics).
    detector_efficiency: float = 0.10
    # Y0: probability per pulse that the detection system clicks with no signal
    # (both detectors together), the quantity the decoy papers call the background rate.
    dark_count_prob: float = 1.7e-6
    # e_d: probability that a photon reaching Bob hits the wrong detector (optics).
    misalignment: float = 0.033
    afterpulse_prob: float = 0.0
    dead_time_s: float = 0.0
    # Source: signal, weak decoy and vacuum (implied) intensities and their probabilities.
    mu: float = 0.5
    nu: float = 0.1
    p_mu: float = 0.8
    p_nu: float = 0.1
    # Probability that Alice (and Bob) choose the Z basis, which carries the key.
    basis_bias: float = 0.5
    rep_rate_hz: float = 1e9
    pulses: int = 10**9
    # Attack on the quantum channel.
    eve: str = "none"
    eve_fraction: float = 1.0
    # Post-processing.
    ec_efficiency: float = 1.10  # f used by the theory curves (the simulation measures its own)
    eps_sec: float = DEFAULT_EPS_SEC
    eps_cor: float = DEFAULT_EPS_COR
    qber_abort: float = DEFAULT_QBER_ABORT
    frame_bits: int = DEFAULT_FRAME_BITS
    cascade_variant: str = DEFAULT_CASCADE_VARIANT

    @property
    def p_vac(self) -> float:
        return 1.0 - self.p_mu - self.p_nu

    @property
    def channel_transmittance(self) -> float:
        return 10.0 ** (-self.fiber_loss_db_km * self.distance_km / 10.0)

    @property
    def eta_sys(self) -> float:
        """Overall transmittance: fibre times Bob's detection efficiency."""
        return self.channel_transmittance * self.detector_efficiency

    @property
    def dark_per_detector(self) -> float:
        # Two detectors, independent dark clicks, chosen so that P(any dark click) = Y0.
        return 1.0 - math.sqrt(1.0 - self.dark_count_prob)

    @property
    def dead_time_slots(self) -> int:
        return math.ceil(self.dead_time_s * self.rep_rate_hz - 1e-9) if self.dead_time_s > 0 else 0

    @property
    def intensities(self) -> tuple[float, float, float]:
        return (self.mu, self.nu, 0.0)

    @property
    def intensity_probs(self) -> tuple[float, float, float]:
        return (self.p_mu, self.p_nu, self.p_vac)

    def with_(self, **changes: Any) -> LinkParams:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> LinkParams:
        def rng(name: str, lo: float, hi: float, lo_open: bool = False,
                hi_open: bool = False) -> None:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v):
                raise ParamError(name, f"must be a number, got {v!r}")
            bad_lo = v <= lo if lo_open else v < lo
            bad_hi = v >= hi if hi_open else v > hi
            if bad_lo or bad_hi:
                lb = "(" if lo_open else "["
                rb = ")" if hi_open else "]"
                raise ParamError(name, f"must be in {lb}{lo:g}, {hi:g}{rb}, got {v:g}")

        rng("distance_km", 0.0, 1e5)
        rng("fiber_loss_db_km", 0.0, 100.0)
        rng("detector_efficiency", 0.0, 1.0, lo_open=True)
        rng("dark_count_prob", 0.0, 0.5)
        rng("misalignment", 0.0, 0.5)
        rng("afterpulse_prob", 0.0, 0.5)
        rng("dead_time_s", 0.0, 1.0)
        rng("mu", 0.0, 10.0, lo_open=True)
        rng("nu", 0.0, 10.0, lo_open=True)
        rng("p_mu", 0.0, 1.0, lo_open=True, hi_open=True)
        rng("p_nu", 0.0, 1.0, lo_open=True, hi_open=True)
        rng("basis_bias", 0.0, 1.0, lo_open=True, hi_open=True)
        rng("rep_rate_hz", 0.0, 1e12, lo_open=True)
        rng("eve_fraction", 0.0, 1.0)
        rng("ec_efficiency", 1.0, 10.0)
        rng("eps_sec", 0.0, 1.0, lo_open=True, hi_open=True)
        rng("eps_cor", 0.0, 1.0, lo_open=True, hi_open=True)
        rng("qber_abort", 0.0, 0.5)
        if self.p_vac <= 0.0:
            raise ParamError(
                "p_mu", f"p_mu + p_nu must be below 1 to leave room for vacuum pulses, "
                f"got {self.p_mu + self.p_nu:g}"
            )
        # Lim et al. 2014 need mu1 > mu2 + mu3 and mu2 > mu3 >= 0 (here mu3 = 0).
        if not self.mu > self.nu:
            raise ParamError("nu", f"the weak decoy must be below the signal (mu={self.mu:g}), "
                             f"got {self.nu:g}")
        if not isinstance(self.pulses, int) or self.pulses < 1000:
            raise ParamError("pulses", f"must be an integer >= 1000, got {self.pulses!r}")
        if self.pulses > 10**15:
            raise ParamError("pulses", "must be at most 1e15")
        if self.eve not in EVE_MODES:
            raise ParamError("eve", f"must be one of {', '.join(EVE_MODES)}, got {self.eve!r}")
        if not isinstance(self.frame_bits, int) or not 256 <= self.frame_bits <= 1 << 22:
            raise ParamError("frame_bits", f"must be an integer in [256, 4194304], "
                             f"got {self.frame_bits!r}")
        return self
