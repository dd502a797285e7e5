"""Finite-size decoy-state parameter estimation and secret key length.

Implements Lim, Curty, Walenta, Xu, Zbinden, "Concise security bounds for practical
decoy-state quantum key distribution", PRA 89, 022307 (2014), eqs. (1)-(5), for
intensities mu1 = mu (signal), mu2 = nu (weak decoy), mu3 = 0 (vacuum). With mu3 = 0
the single-photon bound is the vacuum+weak bound of Ma et al. 2005 with every count
replaced by its Hoeffding confidence limit.

Letters: the paper extracts key from its "X" basis and tests in "Z"; this code keys in Z
and tests in X, so the paper's X <-> Z are swapped below.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def h2(x: float) -> float:
    """Binary entropy in bits (0 at the end points); the one definition in the project."""
    if x <= 0.0 or x >= 1.0:
        return 0.0
    return -x * math.log2(x) - (1.0 - x) * math.log2(1.0 - x)


def gamma(a: float, b: float, c: float, d: float) -> float:
    """Lim et al. 2014 eq. (5) correction for estimating key-basis phase errors from the
    test basis (random sampling without replacement)."""
    if c <= 0 or d <= 0:
        return math.inf
    if b <= 0.0:
        return 0.0  # b log(1/b) -> 0
    if b >= 1.0:
        return math.inf
    inner = (c + d) / (c * d * (1 - b) * b) * 21.0**2 / a**2
    return math.sqrt((c + d) * (1 - b) * b / (c * d * math.log(2)) * math.log2(inner))


@dataclass(frozen=True)
class DecoyEstimate:
    s_z0: float  # vacuum events in the key (lower bound)
    s_z1: float  # single-photon events in the key (lower bound)
    s_x0: float
    s_x1: float
    v_x1: float  # single-photon bit errors in the test basis (upper bound)
    phase_error: float  # upper bound on the single-photon phase error rate of the key
    # The same bounds per pulse of each class, for comparison with the asymptotic papers.
    y1_lower: float
    e1_upper: float

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def _hoeffding(counts: np.ndarray, total: float, mus: np.ndarray, probs: np.ndarray,
               eps_sec: float) -> tuple[np.ndarray, np.ndarray]:
    delta = math.sqrt(total / 2.0 * math.log(21.0 / eps_sec))
    scale = np.exp(mus) / probs
    return scale * (counts - delta), scale * (counts + delta)


def decoy_bounds(
    n_z: np.ndarray, n_x: np.ndarray, m_x: np.ndarray,
    mus: tuple[float, float, float], probs: tuple[float, float, float], eps_sec: float,
) -> DecoyEstimate:
    """Lim et al. 2014 eqs. (2)-(5). Arrays are indexed (mu, nu, vacuum)."""
    mu_a = np.asarray(mus, float)
    p_a = np.asarray(probs, float)
    mu1, mu2, mu3 = mu_a
    tau0 = float(np.sum(p_a * np.exp(-mu_a)))
    tau1 = float(np.sum(p_a * np.exp(-mu_a) * mu_a))

    def s0_s1(n: np.ndarray) -> tuple[float, float]:
        lo, hi = _hoeffding(np.asarray(n, float), float(np.sum(n)), mu_a, p_a, eps_sec)
        s0 = tau0 * (mu2 * lo[2] - mu3 * hi[1]) / (mu2 - mu3)
        s0 = max(s0, 0.0)
        s1 = tau1 * mu1 * (
            lo[1] - hi[2] - (mu2**2 - mu3**2) / mu1**2 * (hi[0] - s0 / tau0)
        ) / (mu1 * (mu2 - mu3) - mu2**2 + mu3**2)
        return s0, max(s1, 0.0)

    s_z0, s_z1 = s0_s1(n_z)
    s_x0, s_x1 = s0_s1(n_x)
    m_lo, m_hi = _hoeffding(np.asarray(m_x, float), float(np.sum(m_x)), mu_a, p_a, eps_sec)
    v_x1 = max(tau1 * (m_hi[1] - m_lo[2]) / (mu2 - mu3), 0.0)
    if s_x1 <= 0 or s_z1 <= 0:
        phase = 0.5
    else:
        b = v_x1 / s_x1
        phase = 0.5 if b >= 0.5 else min(b + gamma(eps_sec, b, s_x1, s_z1), 0.5)
    # Per-pulse views: Y1 >= s_1 / (N_basis tau1) is not available without N, so express
    # the bound relative to the single-photon probability of the detected set instead.
    n_tot = float(np.sum(n_z))
    y1_lower = s_z1 / n_tot if n_tot > 0 else 0.0
    e1_upper = v_x1 / s_x1 if s_x1 > 0 else 0.5
    return DecoyEstimate(s_z0, s_z1, s_x0, s_x1, v_x1, phase, y1_lower, min(e1_upper, 0.5))


def key_length(est: DecoyEstimate, leak_ec: float, eps_sec: float, eps_cor: float) -> float:
    """Lim et al. 2014 eq. (1), before flooring (may be negative)."""
    return (est.s_z0 + est.s_z1 * (1.0 - h2(est.phase_error)) - leak_ec
            - 6.0 * math.log2(21.0 / eps_sec) - math.log2(2.0 / eps_cor))
