"""Asymptotic key-rate theory for the simulated link.

References (formulas restated in docs/qkd-simulator.md):

* GLLP: Gottesman, Lo, Lütkenhaus, Preskill, Quantum Inf. Comput. 4, 325 (2004):
  R >= q { Q0 + Q1 [1 - h(e1)] - f Q h(E) } (the Q0 term as used by Lo 2005 / Ma 2005).
* Lo, Ma, Chen, PRL 94, 230504 (2005): infinite decoy states give Y1 and e1 exactly;
  textbook model Q_mu = Y0 + 1 - exp(-eta mu), E_mu Q_mu = e0 Y0 + e_d (1 - exp(-eta mu)).
* Ma, Qi, Zhao, Lo, PRA 72, 012326 (2005): vacuum + weak decoy lower bound on Y1 and
  upper bound on e1.
* Shor, Preskill, PRL 85, 441 (2000): R = 1 - 2 h(e) per sifted bit for single photons.
* PLOB: Pirandola, Laurenza, Ottaviani, Banchi, Nat. Commun. 8, 15043 (2017): no
  repeaterless protocol beats -log2(1 - eta) bit per channel use.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from qkd.sim.estimation import decoy_bounds, h2, key_length
from qkd.sim.params import LinkParams

# --- the channel models -------------------------------------------------------------


def gain_error_lmc(eta: float, mu: float, y0: float, e_d: float,
                   e0: float = 0.5) -> tuple[float, float]:
    """Gain and QBER of intensity mu in the textbook model of Lo, Ma, Chen 2005."""
    q = y0 + 1.0 - math.exp(-eta * mu)
    eq = e0 * y0 + e_d * (1.0 - math.exp(-eta * mu))
    return q, eq / q


def gain_error_model(eta: float, mu: float, y0: float, e_d: float) -> tuple[float, float]:
    """Gain and QBER of intensity mu in the simulator's two-detector model.

    A coherent state of mean eta*mu splits into independent Poisson streams towards the
    right (mean eta mu (1-e_d)) and wrong (eta mu e_d) detector; with independent dark
    probability d per detector and double clicks mapped to a random bit. To first order
    in Y0 and eta*mu this is the Lo-Ma-Chen model.
    """
    d = 1.0 - math.sqrt(1.0 - y0)
    lam = eta * mu
    pc = 1.0 - (1.0 - d) * math.exp(-lam * (1.0 - e_d))
    pw = 1.0 - (1.0 - d) * math.exp(-lam * e_d)
    q = 1.0 - (1.0 - pc) * (1.0 - pw)
    err = pw * (1.0 - pc) + 0.5 * pc * pw
    return q, err / q


def single_photon_model(eta: float, y0: float, e_d: float) -> tuple[float, float]:
    """Yield Y1 and error rate e1 of single-photon pulses in the simulator's model."""
    d = 1.0 - math.sqrt(1.0 - y0)
    y1 = 1.0 - (1.0 - eta) * (1.0 - d) ** 2
    # photon to the wrong detector: error unless the other one also (dark) clicks (then 1/2);
    # photon to the right detector: error 1/2 if the wrong one dark-clicks; lost: darks only.
    ey = eta * e_d * (1.0 - d / 2.0) + eta * (1.0 - e_d) * d / 2.0 + (1.0 - eta) * y0 / 2.0
    return y1, ey / y1


# --- key-rate formulas ----------------------------------------------------------------


def gllp_rate(q: float, gain: float, qber: float, q1: float, e1: float, f: float,
              q0: float = 0.0) -> float:
    """GLLP (2004) key rate: q { Q0 + Q1 [1 - h(e1)] - f Q h(E) }, floored at 0."""
    r = q * (q0 + q1 * (1.0 - h2(e1)) - f * gain * h2(qber))
    return max(r, 0.0)


def vacuum_weak_bounds(mu: float, nu: float, q_mu: float, q_nu: float, e_nu: float,
                       y0: float, e0: float = 0.5) -> tuple[float, float]:
    """Ma, Qi, Zhao, Lo 2005 vacuum + weak decoy bounds: (Y1 lower, e1 upper).

    Y1^L = mu / (mu nu - nu^2) [Q_nu e^nu - Q_mu e^mu nu^2/mu^2 - (mu^2 - nu^2)/mu^2 Y0]
    e1^U = (E_nu Q_nu e^nu - e0 Y0) / (Y1^L nu)
    """
    y1l = mu / (mu * nu - nu * nu) * (
        q_nu * math.exp(nu) - q_mu * math.exp(mu) * nu * nu / (mu * mu)
        - (mu * mu - nu * nu) / (mu * mu) * y0
    )
    if y1l <= 0:
        return 0.0, 0.5
    e1u = (e_nu * q_nu * math.exp(nu) - e0 * y0) / (y1l * nu)
    return y1l, min(max(e1u, 0.0), 0.5)


def shor_preskill_rate(qber: float, f: float = 1.0) -> float:
    """Shor-Preskill (2000) secret fraction per sifted bit, 1 - f h(e) - h(e) (f=1: 1 - 2h)."""
    return max(1.0 - f * h2(qber) - h2(qber), 0.0)


def plob_bound(eta_channel: float) -> float:
    """PLOB repeaterless bound -log2(1 - eta) in bit per channel use."""
    if eta_channel >= 1.0:
        return math.inf
    return -math.log2(1.0 - eta_channel)


# --- the rates for one parameter set --------------------------------------------------


@dataclass(frozen=True)
class TheoryRates:
    """All in bit per pulse sent (any intensity)."""

    gllp_infinite_decoy: float
    gllp_vacuum_weak: float
    shor_preskill_single_photon: float
    plob: float
    finite_key_expected: float  # Lim et al. 2014 evaluated on the expected counts

    def to_json(self) -> dict[str, float | None]:
        return {k: (None if math.isinf(v) else v) for k, v in asdict(self).items()}


def expected_observables(params: LinkParams) -> dict[str, np.ndarray | float]:
    """Expected gains and QBERs per intensity (mu, nu, vacuum) without an eavesdropper."""
    eta = params.eta_sys
    qe = [gain_error_model(eta, m, params.dark_count_prob, params.misalignment) if m > 0 else
          (params.dark_count_prob, 0.5) for m in params.intensities]
    q = np.array([x[0] for x in qe])
    e = np.array([x[1] for x in qe])
    y1, e1 = single_photon_model(eta, params.dark_count_prob, params.misalignment)
    return {"gain": q, "qber": e, "y1": y1, "e1": e1}


def theory_rates(params: LinkParams, f: float | None = None) -> TheoryRates:
    """Asymptotic rates for the protocol the simulator runs.

    The key is made of the Z-basis detections of all three intensities (Lim et al. 2014),
    so GLLP is applied to that mixed source: Q = sum_k p_k Q_k, Q1 = tau1 Y1,
    Q0 = tau0 Y0, q = p_Z^2. With p_mu = 1 this is exactly Lo-Ma-Chen's formula.
    """
    f = params.ec_efficiency if f is None else f
    obs = expected_observables(params)
    q_k = np.asarray(obs["gain"])
    e_k = np.asarray(obs["qber"])
    p_k = np.array(params.intensity_probs)
    mus = np.array(params.intensities)
    tau0 = float(np.sum(p_k * np.exp(-mus)))
    tau1 = float(np.sum(p_k * np.exp(-mus) * mus))
    q_bar = float(np.sum(p_k * q_k))
    e_bar = float(np.sum(p_k * q_k * e_k) / q_bar)
    qz = params.basis_bias**2
    y0 = params.dark_count_prob
    y1, e1 = float(obs["y1"]), float(obs["e1"])
    inf = gllp_rate(qz, q_bar, e_bar, tau1 * y1, e1, f, q0=tau0 * y0)
    y1l, e1u = vacuum_weak_bounds(params.mu, params.nu, q_k[0], q_k[1], e_k[1], y0)
    vw = gllp_rate(qz, q_bar, e_bar, tau1 * y1l, e1u, f, q0=tau0 * y0)
    # An ideal single-photon source over the same channel (Shor-Preskill with EC cost f).
    sp = qz * y1 * shor_preskill_rate(e1, f)
    return TheoryRates(
        gllp_infinite_decoy=inf,
        gllp_vacuum_weak=vw,
        shor_preskill_single_photon=sp,
        plob=plob_bound(params.channel_transmittance),
        finite_key_expected=expected_finite_key_rate(params, f),
    )


def expected_counts(params: LinkParams) -> dict[str, np.ndarray]:
    """Expected detection and error counts per intensity for `params.pulses` pulses."""
    obs = expected_observables(params)
    q = np.asarray(obs["gain"])
    e = np.asarray(obs["qber"])
    p = np.asarray(params.intensity_probs)
    pz = params.basis_bias
    px = 1.0 - pz
    n = params.pulses
    return {
        "n_z": n * p * pz * pz * q,
        "n_x": n * p * px * px * q,
        "m_z": n * p * pz * pz * q * e,
        "m_x": n * p * px * px * q * e,
    }


def expected_finite_key_rate(params: LinkParams, f: float) -> float:
    """Lim et al. 2014 key length per pulse for the expected counts (EC cost f n h(E))."""
    c = expected_counts(params)
    est = decoy_bounds(c["n_z"], c["n_x"], c["m_x"], params.intensities,
                       params.intensity_probs, params.eps_sec)
    nz = float(np.sum(c["n_z"]))
    ez = float(np.sum(c["m_z"]) / nz) if nz > 0 else 0.5
    ell = key_length(est, f * nz * h2(ez), params.eps_sec, params.eps_cor)
    return max(ell, 0.0) / params.pulses
