"""The emulated quantum channel: weak-coherent source, fibre, two-detector receiver, Eve.

Physics (the standard fibre model of the decoy-state papers, e.g. Lo, Ma, Chen 2005):

* Alice sends phase-randomised coherent pulses, so the photon number of a pulse of
  intensity k is Poisson(k).
* Each photon survives fibre plus detector with probability eta_sys = 10^(-aL/10) * eta_det,
  independently. A surviving photon hits the wrong detector with probability e_d
  (misalignment) when Bob measures in the preparation basis, and either detector with
  probability 1/2 otherwise. For a coherent state this per-photon splitting is exact.
* Each of the two detectors has an independent dark click per slot with probability d,
  with 1 - (1 - d)^2 = Y0 (the background rate the papers call Y0).
* A double click is mapped to a random bit (the squashing model of Lim et al. 2014).
* Optional afterpulsing (a click triggers a later click in the same detector with
  probability p_ap, delay 1 + Geometric(1/2) slots) and dead time (no click is
  registered within the dead time after a registered click).

Eavesdroppers touch only the pulses in flight (the `_effective_*` step), never Alice's
or Bob's records.

Two samplers with the same distribution:

* ``full``: every pulse gets one 64-bit uniform that selects its joint category
  (intensity, photon number, attacked or not, click or not). Per-pulse choices that
  cannot influence anything observable for a pulse without a click (basis, bit value)
  are drawn only for pulses with a click; they are independent of the category.
* ``detected``: the category counts are drawn from the same multinomial, and only the
  clicked pulses get slot numbers (uniform distinct slots) and details. Cost no longer
  grows with the number of pulses, so long fibres are cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from qkd.sim.constants import CHANNEL_CHUNK_PULSES
from qkd.sim.constants import X_BASIS as X_BASIS  # re-exported (older importers)
from qkd.sim.constants import Z_BASIS as Z_BASIS
from qkd.sim.params import LinkParams

_TWO64 = float(2**64)


@dataclass
class AliceRecord:
    """What Alice's device holds after the quantum phase.

    `slots` lists the slots whose settings the simulator drew (see the module note);
    Alice's protocol only reads the entries for slots Bob announces.
    """

    sent_per_intensity: np.ndarray  # int64[3]: pulses sent per intensity (mu, nu, vacuum)
    slots: np.ndarray  # int64, sorted
    intensity: np.ndarray  # uint8 index into (mu, nu, 0)
    basis: np.ndarray  # uint8, 0 = Z (key), 1 = X
    bit: np.ndarray  # uint8

    def lookup(self, slots: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.slots, slots)
        if idx.size and (idx.max() >= self.slots.size
                         or not np.array_equal(self.slots[idx], slots)):
            raise ValueError("announced slot outside the sent pulse train")
        return idx


@dataclass
class BobRecord:
    """What Bob's device holds: the slots with a registered click, his basis and bit."""

    slots: np.ndarray  # int64, sorted
    basis: np.ndarray
    bit: np.ndarray


@dataclass
class GroundTruth:
    """What only the simulator knows (for tests and diagnostics; never given to a party)."""

    pulses: int
    sampler: str
    photons: np.ndarray  # int16 per Bob click: photons Alice sent (-1 for afterpulses)
    eve_knows: np.ndarray  # bool per Bob click: Eve holds the bit once bases are public
    afterpulse: np.ndarray  # bool per Bob click
    removed_by_dead_time: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class LinkRecords:
    alice: AliceRecord
    bob: BobRecord
    truth: GroundTruth


def _poisson_pmf(mean: float, nmax: int) -> np.ndarray:
    n = np.arange(nmax + 1)
    if mean <= 0:
        p = np.zeros(nmax + 1)
        p[0] = 1.0
        return p
    logp = -mean + n * math.log(mean) - np.array([math.lgamma(i + 1) for i in n])
    p = np.exp(logp)
    p[-1] += max(0.0, 1.0 - p.sum())  # the tail lumps into the last bin
    return p


def _nmax(params: LinkParams) -> int:
    m = max(params.mu, params.nu)
    return int(max(8, math.ceil(m + 12.0 * math.sqrt(m) + 10)))


@dataclass(frozen=True)
class _Categories:
    """Joint per-pulse categories (intensity k, photons n, attacked e) and click probabilities."""

    k: np.ndarray
    n: np.ndarray
    e: np.ndarray
    prob: np.ndarray  # P(category)
    click: np.ndarray  # P(click | category)


def _effective(params: LinkParams, n: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Photons reaching Bob's lab and their survival probability after Eve (if any)."""
    eta = np.full(n.shape, params.eta_sys)
    n_eff = n.astype(np.int64).copy()
    att = e.astype(bool)
    if params.eve == "intercept-resend":
        # Eve measures with an ideal detector at Alice's output and resends one photon.
        n_eff[att] = np.minimum(n_eff[att], 1)
    elif params.eve == "pns":
        # Eve reads the photon number without disturbing it, blocks single photons, keeps
        # one photon of every multi-photon pulse and forwards the rest over a lossless line.
        n_eff[att] = np.maximum(n_eff[att] - 1, 0)
        eta[att & (n >= 2)] = params.detector_efficiency
    return n_eff, eta


def click_probability(params: LinkParams, n_eff: np.ndarray, eta: np.ndarray) -> np.ndarray:
    y0 = params.dark_count_prob
    # (1 - eta)**n directly: a log1p clamp at 1 - 1e-300 is 1.0 in floating point, so
    # eta = 1 (lossless line, ideal detector) gave log(0) * 0 = nan; 0.0**0 is 1.
    no_photon = np.power(1.0 - np.minimum(eta, 1.0), n_eff)
    return 1.0 - (1.0 - y0) * no_photon


def categories(params: LinkParams) -> _Categories:
    nmax = _nmax(params)
    ks, ns, es, ps = [], [], [], []
    attacked = params.eve != "none" and params.eve_fraction > 0
    efracs = [(0, 1.0 - params.eve_fraction), (1, params.eve_fraction)] if attacked else [(0, 1.0)]
    for ki, (mean, pk) in enumerate(zip(params.intensities, params.intensity_probs, strict=True)):
        pn = _poisson_pmf(mean, nmax)
        for e, pe in efracs:
            if pe <= 0:
                continue
            ks.append(np.full(nmax + 1, ki))
            ns.append(np.arange(nmax + 1))
            es.append(np.full(nmax + 1, e))
            ps.append(pk * pe * pn)
    k = np.concatenate(ks).astype(np.uint8)
    n = np.concatenate(ns).astype(np.int16)
    e = np.concatenate(es).astype(np.uint8)
    prob = np.concatenate(ps)
    n_eff, eta = _effective(params, n, e)
    click = click_probability(params, n_eff, eta)
    keep = prob > 0
    return _Categories(k[keep], n[keep], e[keep], prob[keep], click[keep])


def expected_click_probability(params: LinkParams) -> float:
    c = categories(params)
    return float(np.dot(c.prob, c.click))


def _thresholds(weights: np.ndarray) -> np.ndarray:
    """Cumulative probabilities as uint64 thresholds for comparing 64-bit uniforms."""
    cum = np.cumsum(weights)
    t = np.minimum(np.floor(cum * _TWO64), np.nextafter(_TWO64, 0.0))
    return t.astype(np.uint64)


def _sample_full(
    params: LinkParams, cats: _Categories, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pulse sampling: returns (clicked slots, their category, pulses per intensity)."""
    click_mass = cats.prob * cats.click
    noclick_k = np.array([np.sum(cats.prob[cats.k == k] * (1 - cats.click[cats.k == k]))
                          for k in range(3)])
    # One threshold table: click categories first, then the no-click mass of each intensity.
    table = _thresholds(np.concatenate([click_mass, noclick_k]))
    t_click = table[click_mass.size - 1]
    t_nc = table[click_mass.size:]
    click_table = table[: click_mass.size]
    slots_out, cats_out = [], []
    sent = np.zeros(3, dtype=np.int64)
    noclick_counts = np.zeros(3, dtype=np.int64)
    done = 0
    bitgen = rng.bit_generator
    while done < params.pulses:
        m = min(CHANNEL_CHUNK_PULSES, params.pulses - done)
        u = bitgen.random_raw(m)
        idx = np.flatnonzero(u < t_click)
        if idx.size:
            slots_out.append(idx + done)
            cats_out.append(np.searchsorted(click_table, u[idx], side="right"))
        below = [np.count_nonzero(u < t) for t in t_nc[:2]]
        noclick_counts += np.array([below[0] - idx.size, below[1] - below[0], m - below[1]])
        done += m
    slots = np.concatenate(slots_out) if slots_out else np.zeros(0, np.int64)
    cat = np.concatenate(cats_out) if cats_out else np.zeros(0, np.int64)
    cat = np.minimum(cat, click_mass.size - 1)  # guards the top edge of the float table
    sent = noclick_counts + np.bincount(cats.k[cat], minlength=3)
    return slots.astype(np.int64), cat, sent


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    # Sort-based: numpy's hash-based unique is much slower on large int64 arrays.
    a = np.sort(a)
    if a.size:
        a = a[np.concatenate(([True], a[1:] != a[:-1]))]
    return a


def _distinct_slots(n_total: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct uniform slots in [0, n_total), sorted."""
    if count == 0:
        return np.zeros(0, np.int64)
    if count > n_total // 4:
        return np.sort(rng.choice(n_total, size=count, replace=False)).astype(np.int64)
    out = _sorted_unique(rng.integers(0, n_total, size=count, dtype=np.int64))
    while out.size < count:
        more = rng.integers(0, n_total, size=count - out.size, dtype=np.int64)
        out = _sorted_unique(np.concatenate([out, more]))
    return out


def _sample_detected(
    params: LinkParams, cats: _Categories, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    click_mass = cats.prob * cats.click
    noclick = cats.prob * (1 - cats.click)
    probs = np.concatenate([click_mass, noclick])
    probs = probs / probs.sum()
    counts = rng.multinomial(params.pulses, probs)
    nc = click_mass.size
    sent = np.bincount(np.concatenate([cats.k, cats.k]), weights=counts, minlength=3)
    cat = np.repeat(np.arange(nc), counts[:nc])
    rng.shuffle(cat)
    slots = _distinct_slots(params.pulses, cat.size, rng)
    return slots, cat, np.rint(sent).astype(np.int64)


def _trunc_geometric(u: np.ndarray, eta: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Index (1-based) of the first detected photon given at least one of n is detected."""
    log_q = np.log1p(-np.minimum(eta, 1 - 1e-16))
    p_a = -np.expm1(n * log_q)
    j = 1 + np.floor(np.log1p(-u * p_a) / log_q)
    return np.clip(j, 1, np.maximum(n, 1)).astype(np.int64)


def _detect(
    params: LinkParams,
    rng: np.random.Generator,
    k: np.ndarray,
    n: np.ndarray,
    e: np.ndarray,
) -> dict[str, np.ndarray]:
    """Alice's settings and Bob's outcome for pulses known to produce a click."""
    size = k.size
    pz = params.basis_bias
    a_basis = (rng.random(size) >= pz).astype(np.uint8)
    a_bit = rng.integers(0, 2, size, dtype=np.uint8)
    b_basis = (rng.random(size) >= pz).astype(np.uint8)
    att = e.astype(bool)
    s_basis = a_basis.copy()
    s_bit = a_bit.copy()
    depol = np.zeros(size, bool)
    eve_knows = np.zeros(size, bool)
    n_eff, eta = _effective(params, n, e)
    if params.eve == "intercept-resend":
        ebasis = (rng.random(size) >= pz).astype(np.uint8)
        ebit = np.where(ebasis == a_basis, a_bit, rng.integers(0, 2, size, dtype=np.uint8))
        s_basis = np.where(att, ebasis, s_basis)
        s_bit = np.where(att, ebit, s_bit)
        eve_knows = att & (n >= 1) & (ebasis == a_basis)
    elif params.eve == "pns":
        eve_knows = att & (n >= 2)
    elif params.eve == "noise":
        depol = att
    y0 = params.dark_count_prob
    d = params.dark_per_detector
    p_a = -np.expm1(n_eff * np.log1p(-np.minimum(eta, 1 - 1e-16)))
    p_click = 1 - (1 - p_a) * (1 - y0)
    case_a = rng.random(size) < p_a / p_click
    m = np.zeros(size, np.int64)
    ia = np.flatnonzero(case_a)
    if ia.size:
        j = _trunc_geometric(rng.random(ia.size), eta[ia], n_eff[ia])
        m[ia] = 1 + rng.binomial(np.maximum(n_eff[ia] - j, 0), eta[ia])
    dark_c = rng.random(size) < d
    dark_w = rng.random(size) < d
    ib = np.flatnonzero(~case_a)
    if ib.size:
        # No photon detected, so at least one dark click: (c only, w only, both) with
        # weights d(1-d), d(1-d), d^2.
        u = rng.random(ib.size) * (2 - d)
        dark_c[ib] = (u < 1 - d) | (u >= 2 - 2 * d)
        dark_w[ib] = u >= 1 - d
    if params.eve == "beam-splitting":
        # Eve replaces the fibre by a lossless one and taps the fibre's loss with a beam
        # splitter; Bob's statistics are unchanged. She holds the photons that the real
        # fibre would have lost: those not detected by Bob either never crossed the
        # splitter (prob 1-eta_ch) or crossed and were missed by Bob's detector.
        eta_ch = params.channel_transmittance
        miss = params.eta_sys
        p_cross_missed = eta_ch * (1 - params.detector_efficiency) / max(1 - miss, 1e-300)
        rest = np.maximum(n.astype(np.int64) - m, 0)
        crossed_missed = rng.binomial(rest, min(p_cross_missed, 1.0))
        eve_knows = att & (rest - crossed_missed >= 1)
    c = np.where((b_basis == s_basis) & ~depol, 1.0 - params.misalignment, 0.5)
    jc = rng.binomial(m, c)
    click_c = (jc > 0) | dark_c
    click_w = (m - jc > 0) | dark_w
    both = click_c & click_w
    b_bit = np.where(click_c, s_bit, 1 - s_bit).astype(np.uint8)
    b_bit[both] = rng.integers(0, 2, int(both.sum()), dtype=np.uint8)
    return {
        "a_basis": a_basis,
        "a_bit": a_bit,
        "b_basis": b_basis,
        "b_bit": b_bit,
        "eve_knows": eve_knows,
    }


def _afterpulses(
    params: LinkParams,
    rng: np.random.Generator,
    slots: np.ndarray,
    bits: np.ndarray,
    cats: _Categories,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Afterpulse slots, their (same-detector) bit, and Alice's intensity for those slots."""
    trig = np.flatnonzero(rng.random(slots.size) < params.afterpulse_prob)
    if trig.size == 0:
        z = np.zeros(0, np.int64)
        return z, z.astype(np.uint8), z.astype(np.uint8)
    ap = slots[trig] + rng.geometric(0.5, trig.size)
    ok = ap < params.pulses
    ap, abit = ap[ok], bits[trig][ok]
    order = np.argsort(ap, kind="stable")
    ap, abit = ap[order], abit[order]
    first = np.concatenate(([True], ap[1:] != ap[:-1])) if ap.size else np.zeros(0, bool)
    ap, abit = ap[first], abit[first]
    fresh = ~np.isin(ap, slots, assume_unique=True)
    ap, abit = ap[fresh], abit[fresh]
    # The afterpulse lands in a slot whose own pulse did not click: its intensity follows
    # p_k * P(no click | k).
    w = np.array([np.sum(cats.prob[cats.k == k] * (1 - cats.click[cats.k == k])) for k in range(3)])
    kk = rng.choice(3, size=ap.size, p=w / w.sum()).astype(np.uint8)
    return ap, abit, kk


def _dead_time_keep(slots: np.ndarray, dead: int) -> np.ndarray:
    """Greedy dead-time filter: a click is registered unless it falls within `dead` slots
    after the last registered click. Vectorised by resolving one click per cluster per pass."""
    size = slots.size
    if dead <= 0 or size == 0:
        return np.ones(size, bool)
    gap = np.diff(slots, prepend=slots[0] - dead - 1)
    kept = gap > dead  # a click far from its predecessor is always registered
    undecided = ~kept
    idx = np.arange(size)
    while undecided.any():
        last_kept = np.maximum.accumulate(np.where(kept, idx, -1))
        lk = last_kept[undecided]
        und = np.flatnonzero(undecided)
        within = slots[und] - slots[lk] <= dead
        undecided[und[within]] = False  # blocked by a registered click
        # The first still-undecided click after each registered click is registered.
        rest = und[~within]
        if rest.size:
            lk_rest = last_kept[rest]
            first = np.ones(rest.size, bool)
            first[1:] = lk_rest[1:] != lk_rest[:-1]
            kept[rest[first]] = True
            undecided[rest[first]] = False
    return kept


def choose_sampler(params: LinkParams, sampler: str = "auto") -> str:
    if sampler != "auto":
        return sampler
    return "detected" if expected_click_probability(params) < 0.05 else "full"


def simulate_link(
    params: LinkParams, rng: np.random.Generator, sampler: str = "auto"
) -> LinkRecords:
    """Run the quantum phase: send `params.pulses` pulses and record both ends."""
    params.validate()
    sampler = choose_sampler(params, sampler)
    if sampler not in ("full", "detected"):
        raise ValueError(f"sampler must be auto, full or detected, got {sampler!r}")
    cats = categories(params)
    if sampler == "full":
        slots, cat, sent = _sample_full(params, cats, rng)
    else:
        slots, cat, sent = _sample_detected(params, cats, rng)
    k, n, e = cats.k[cat], cats.n[cat], cats.e[cat]
    det = _detect(params, rng, k, n, e)
    a_int, a_basis, a_bit = k, det["a_basis"], det["a_bit"]
    b_basis, b_bit = det["b_basis"], det["b_bit"]
    photons = n.astype(np.int16)
    eve_knows = det["eve_knows"]
    is_ap = np.zeros(slots.size, bool)
    if params.afterpulse_prob > 0 and slots.size:
        ap, ap_bit, ap_k = _afterpulses(params, rng, slots, b_bit, cats)
        m = ap.size
        pz = params.basis_bias
        slots = np.concatenate([slots, ap])
        a_int = np.concatenate([a_int, ap_k])
        a_basis = np.concatenate([a_basis, (rng.random(m) >= pz).astype(np.uint8)])
        a_bit = np.concatenate([a_bit, rng.integers(0, 2, m, dtype=np.uint8)])
        b_basis = np.concatenate([b_basis, (rng.random(m) >= pz).astype(np.uint8)])
        b_bit = np.concatenate([b_bit, ap_bit])
        photons = np.concatenate([photons, np.full(m, -1, np.int16)])
        eve_knows = np.concatenate([eve_knows, np.zeros(m, bool)])
        is_ap = np.concatenate([is_ap, np.ones(m, bool)])
        order = np.argsort(slots, kind="stable")
        slots, a_int, a_basis, a_bit = slots[order], a_int[order], a_basis[order], a_bit[order]
        b_basis, b_bit, photons = b_basis[order], b_bit[order], photons[order]
        eve_knows, is_ap = eve_knows[order], is_ap[order]
    alice = AliceRecord(sent, slots.copy(), a_int, a_basis, a_bit)
    keep = _dead_time_keep(slots, params.dead_time_slots)
    removed = int(slots.size - keep.sum())
    bob = BobRecord(slots[keep], b_basis[keep], b_bit[keep])
    truth = GroundTruth(
        pulses=params.pulses,
        sampler=sampler,
        photons=photons[keep],
        eve_knows=eve_knows[keep],
        afterpulse=is_ap[keep],
        removed_by_dead_time=removed,
    )
    return LinkRecords(alice, bob, truth)
